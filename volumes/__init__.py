"""The volume manager: named volumes with drivers (managed directory, bind,
copy-on-write clone, tmpfs), reference-counted mounts and crash-safe state.

`VolumeManager` is the entry point (create, get, list, path, mount, unmount,
remove, prune, recover); `VolumeConfig` holds the administrator's settings.
`drivers.cephfs.SharedVolumes` is the other entry point: volumes kept in a CephFS
filesystem, the same on every host (Docker's Scope "global"), mounted through
`cephfuse`.
"""

from .config import VolumeConfig
from .manager import NoSuchVolume, Volume, VolumeManager

__all__ = ["NoSuchVolume", "Volume", "VolumeConfig", "VolumeManager"]
