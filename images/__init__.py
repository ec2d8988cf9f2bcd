"""The image store: content-addressed layers in the overlay format, ready to
be lowers of a union.

Modules: `store` (layers by ChainID, images, tags, holds, garbage collection;
`Store(root).image(ref).lowerdirs` is what a mount needs), `archive` (apply /
produce OCI layer tars in the overlay format), `changes` (what an upper
changed over its lowers, as `docker diff` lists it), `dedup` (file-level, xxh3),
`formats` (docker save archives, OCI layouts), `registry` (v2 pull/push),
`reference` (image names) and `digest` (verified sha256, ChainIDs). Imports
`unionfs` (the whiteout format) and `common`.
"""
