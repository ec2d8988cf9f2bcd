"""strata's storage driver, the lowest package of the stack.

Offers `strata-unionfs` (a FUSE copy-on-write union filesystem with kernel
overlayfs semantics and on-disk format, a drop-in for fuse-overlayfs), the
layer store (content-addressed image layers, layer tars in and out,
deduplication) and the kernel-interface helpers the packages above share.
Imports nothing of volumes/, plugin_api/ or runtime/.

The layer store's modules: `store` (layers by ChainID, images, tags, holds,
garbage collection; `Store(root).image(ref).lowerdirs` is what a mount needs),
`archive` (apply / produce OCI layer tars in the overlay format), `dedup`,
`image_formats` (docker save archives, OCI layouts), `registry` (v2 pull/push),
`reference` (image names) and `digest` (verified sha256, ChainIDs).
"""
