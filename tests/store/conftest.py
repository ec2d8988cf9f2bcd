"""Fixtures for the layer store tests: a private store root and the CLI run in-process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from runtime.cli import main
from unionfs.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state")


class CLIResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def strata(store: Store, capsys: pytest.CaptureFixture[str]) -> Callable[..., CLIResult]:
    """Run `strata --root <store> ARGS...`; fails the test on a non-zero exit unless check=False."""

    def run(*args: str, check: bool = True) -> CLIResult:
        capsys.readouterr()
        code = main(["--root", str(store.root), *args])
        captured = capsys.readouterr()
        result = CLIResult(code, captured.out, captured.err)
        if check and code != 0:
            raise AssertionError(f"strata {' '.join(args)} exited {code}: {captured.err}")
        return result

    return run
