"""Volume drivers, chosen per volume with `-o type=NAME`: local (default), bind,
clone, tmpfs. `driver_for(type)` gives the one to use. Beside them, `cephfs` holds
the shared backend (`SharedVolumes`): not a type of this host's volumes but a
second VolumeDriver of its own, whose records live in the cluster."""

from __future__ import annotations

from common.errors import StrataError

from .base import DATA, Driver, DriverContext, refuse_unknown
from .bind import BindDriver
from .clone import CloneDriver
from .local import LocalDriver
from .tmpfs import TmpfsDriver

DEFAULT_TYPE = "local"
DRIVERS: dict[str, Driver] = {d.type: d for d in (LocalDriver(), BindDriver(), CloneDriver(), TmpfsDriver())}


def driver_for(type_: str) -> Driver:
    try:
        return DRIVERS[type_]
    except KeyError:
        raise StrataError(f"unknown volume type {type_!r} (known: {', '.join(sorted(DRIVERS))})") from None


__all__ = ["DATA", "DEFAULT_TYPE", "DRIVERS", "Driver", "DriverContext", "driver_for", "refuse_unknown"]
