"""Issue 11's reproductions on the container side: commit of a container that keeps
changing (paused, as docker), a container that makes a 5,000-level tree (diff, commit,
rm and prune end in one-line errors or work, and the next run works), `-w` to a
directory the image lacks, and a root-only containers directory."""

from __future__ import annotations

import os
import stat

from .conftest import IMAGE, Strata

DEPTH = 5000


def test_commit_pauses_a_container_that_keeps_renaming(strata: Strata) -> None:
    strata.run_d("--name", "renamer", IMAGE, "sh", "-c",
                 "mkdir -p /w/a; while true; do mv /w/a /w/b; mv /w/b /w/a; "
                 "ln -sf /etc /w/l; rm -f /w/l; done")
    try:
        for i in range(5):
            res = strata("commit", "renamer", f"renamed:{i}", check=False)
            assert res.returncode == 0, res.stderr
            assert res.stdout.startswith("sha256:") and "Traceback" not in res.stderr
            assert strata.inspect("renamer")["State"]["Status"] == "running"  # thawed again
        unpaused = strata("commit", "--pause=false", "renamer", "renamed:x", check=False)
        assert "Traceback" not in unpaused.stderr
        assert unpaused.returncode == 0 or len(unpaused.stderr.strip().splitlines()) == 1
    finally:
        strata("rm", "-f", "renamer")
        for i in [*range(5), "x"]:
            strata("rmi", f"renamed:{i}", check=False)


def test_a_5000_level_tree_in_a_container_leaves_nothing_broken(strata: Strata) -> None:
    script = f"i=0; while [ $i -lt {DEPTH} ]; do mkdir d; cd d; i=$((i+1)); done; echo made"
    res = strata("run", "--name", "deep", IMAGE, "sh", "-c", script, timeout=300)
    assert res.stdout.strip() == "made"
    diff = strata("diff", "deep", check=False, timeout=300)
    assert "Traceback" not in diff.stderr
    assert diff.returncode == 0 or len(diff.stderr.strip().splitlines()) == 1
    commit = strata("commit", "deep", "deep:1", check=False, timeout=300)
    assert "Traceback" not in commit.stderr
    assert commit.returncode == 0 or len(commit.stderr.strip().splitlines()) == 1, commit.stderr
    strata("rm", "deep", timeout=300)
    prune = strata("system", "prune", check=False, timeout=300)
    assert prune.returncode == 0 and "Traceback" not in prune.stderr
    assert not [d for d in (strata.root / "containers").iterdir() if d.name.startswith((".rm-", ".new-"))]
    assert strata("run", "--rm", IMAGE, "echo", "still works").stdout == "still works\n"
    strata("rmi", "deep:1", check=False)


def test_workdir_that_the_image_lacks_is_created(strata: Strata) -> None:
    assert strata("run", "--rm", "-w", "/not/there/yet", IMAGE, "pwd").stdout == "/not/there/yet\n"


def test_containers_directory_is_root_only(strata: Strata) -> None:
    strata("run", "--rm", IMAGE, "true")
    for d in (strata.root, strata.root / "containers"):
        mode = stat.S_IMODE(os.stat(d).st_mode)
        assert mode & 0o007 == 0, f"{d} is {oct(mode)}"
