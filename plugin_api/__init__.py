"""The Docker plugin HTTP protocol: the VolumeDriver server over the volume
manager (`server.PluginService`), a client for any Docker volume plugin
(`client.PluginClient`, `client.discover`), and the shared request/response
shapes (`protocol`)."""
