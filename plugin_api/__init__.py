"""The Docker plugin HTTP protocol: the VolumeDriver server (`server.PluginService`)
over any implementation of `protocol.VolumeDriver` (strata's is the volume
manager), a client for any Docker volume plugin (`client.PluginClient`,
`client.discover`), and the shared request/response shapes (`protocol`)."""
