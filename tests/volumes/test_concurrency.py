"""Many clients at once, on the same and on different volumes, with CLI processes
changing the same state meanwhile: no lost reference, no torn record."""

from __future__ import annotations

import asyncio
import json
import subprocess

from common import kernel
from plugin_api.client import PluginClient, PluginError

from .conftest import STRATA, Env, Service

CLIENTS = 64
ROUNDS = 5


def test_64_concurrent_clients(service: Service, env: Env) -> None:
    async def client(i: int, c: PluginClient) -> list[str]:
        shared, own = "shared", f"own{i}"
        await c.create(shared, None)  # all 64 race to create the same volume: idempotent
        await c.create(own, {"type": "tmpfs", "size": "1m"} if i % 2 else None)
        errors = []
        for r in range(ROUNDS):
            await c.mount(shared, f"s-{i}-{r}")
            await c.mount(own, f"o-{i}")
            if r % 2:
                await c.unmount(shared, f"s-{i}-{r}")
            await c.get(shared)
            await c.unmount(own, f"o-{i}")
            try:
                await c.remove(shared)  # always in use by someone: must be refused
                errors.append("removed a shared volume in use")
            except PluginError as e:
                if "in use" not in str(e):
                    errors.append(str(e))
        await c.remove(own)
        return errors

    async def main() -> list[list[str]]:
        # Each client its own connection pool, as separate Docker daemons / processes would be.
        clients = [PluginClient(service.address, timeout=120) for _ in range(CLIENTS)]
        for c in clients:
            await c.__aenter__()
        try:
            return await asyncio.gather(*(client(i, c) for i, c in enumerate(clients)))
        finally:
            for c in clients:
                await c.__aexit__(None, None, None)

    # Meanwhile, CLI processes create and remove volumes of their own on the same state.
    cli = [
        subprocess.Popen(
            ["sh", "-c", f"for n in 1 2 3 4 5; do {STRATA} --root {env.root} volume create cli{k}x$n"
             f" >/dev/null && {STRATA} --root {env.root} volume rm cli{k}x$n >/dev/null || exit 1; done"],
        )
        for k in range(2)
    ]
    results = asyncio.run(main())
    assert [rc for rc in (p.wait(120) for p in cli)] == [0, 0]
    assert [e for errs in results for e in errs] == []

    rec = json.loads((env.root / "volumes" / "shared" / "volume.json").read_text())
    expected = {f"s-{i}-{r}": 1 for i in range(CLIENTS) for r in range(ROUNDS) if r % 2 == 0}
    assert rec["Mounts"] == expected
    assert sorted(p.name for p in (env.root / "volumes").iterdir()) == [".lock", "shared"]
    assert not any(t.startswith(str(env.root)) for _, t, _, _ in kernel.mounts())

    async def drain() -> None:
        async with PluginClient(service.address) as c:
            await asyncio.gather(*(c.unmount("shared", mid) for mid in expected))
            assert (await c.get("shared"))["Status"]["MountCount"] == 0
            await c.remove("shared")

    asyncio.run(drain())
