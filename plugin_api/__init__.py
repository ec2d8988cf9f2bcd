"""The Docker plugin HTTP protocol: the plugin service (`server.PluginService`) answering
VolumeDriver over any implementation of `protocol.VolumeDriver` (strata's is the volume
manager) and, on the same socket, GraphDriver (`graphdriver`, dockerd's storage driver) over
strata's layer store for dockerd (`graph_store.GraphStore`: layers as strata-unionfs mounts,
diffs through the image store's tar code); a client for any Docker volume plugin
(`client.PluginClient`, `client.discover`), and the shared request/response shapes
(`protocol`)."""
