"""The Docker plugin HTTP protocol: the VolumeDriver server over the volume
manager, and a client for any Docker volume plugin."""
