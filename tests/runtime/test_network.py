"""Networking, all inside the session's own network namespace: bridged containers reach
each other, a published port answers through loopback, none/host/container: modes,
--dns and --add-host."""

from __future__ import annotations

import time

from tests.runtime.conftest import IMAGE, Strata


def test_two_bridged_containers_ping_each_other(strata: Strata) -> None:
    strata.run_d("--name", "a", IMAGE, "sleep", "300")
    strata.run_d("--name", "b", IMAGE, "sleep", "300")
    ip_a = strata.inspect("a")["NetworkSettings"]["IPAddress"]
    ip_b = strata.inspect("b")["NetworkSettings"]["IPAddress"]
    assert ip_a and ip_b and ip_a != ip_b
    assert strata("exec", "a", "ping", "-c", "1", "-W", "5", ip_b).returncode == 0
    assert strata("exec", "b", "ping", "-c", "1", "-W", "5", ip_a).returncode == 0
    route = strata("exec", "a", "ip", "route").stdout
    assert "default via 10.77.0.1" in route


def test_published_port_answers_through_loopback(strata: Strata) -> None:
    strata.run_d("--name", "web", "-p", "18080:8080", IMAGE, "sh", "-c",
                 "mkdir /www; echo served > /www/index.html; httpd -f -p 8080 -h /www")
    deadline = time.monotonic() + 20
    while True:
        res = strata.in_netns("busybox", "wget", "-qO-", "http://127.0.0.1:18080/index.html")
        if res.returncode == 0:
            break
        assert time.monotonic() < deadline, res.stderr
        time.sleep(0.2)
    assert res.stdout == "served\n"
    assert "127.0.0.1:18080->8080/tcp" in strata("ps").stdout
    res = strata("run", "-d", "-p", "18080:80", IMAGE, "true", check=False)
    assert res.returncode == 1 and "18080" in res.stderr


def test_none_host_and_container_modes(strata: Strata) -> None:
    out = strata("run", "--rm", "--network", "none", IMAGE, "ip", "-o", "link").stdout
    assert [line.split(":")[1].strip() for line in out.splitlines()] == ["lo"]
    strata.run_d("--name", "netowner", IMAGE, "sleep", "300")
    ip = strata.inspect("netowner")["NetworkSettings"]["IPAddress"]
    out = strata("run", "--rm", "--network", "host", IMAGE, "ip", "-o", "link").stdout
    assert "strata0" in out  # the test namespace's bridge: host mode sees the host's links
    out = strata("run", "--rm", "--network", "container:netowner", IMAGE, "ip", "-o", "addr").stdout
    assert ip in out


def test_dns_and_add_host(strata: Strata) -> None:
    out = strata("run", "--rm", "--dns", "10.0.0.53", "--add-host", "db:10.1.2.3", IMAGE, "sh", "-c",
                 "cat /etc/resolv.conf /etc/hosts").stdout
    assert "nameserver 10.0.0.53" in out and "10.1.2.3\tdb" in out
