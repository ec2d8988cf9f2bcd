"""The volume manager: named volumes with drivers (managed directory, bind,
copy-on-write clone, tmpfs), reference-counted mounts and crash-safe state."""
