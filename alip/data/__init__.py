"""Data layer: dataset schema, shard readers/writers (Parquet, WebDataset), local/S3 storage,
image decoding with rejects, and the built-in procedural image-text world (:mod:`alip.data.world`).

Submodules are imported explicitly (``from alip.data.dataset import read_shard``); this package
file stays empty of imports so that importing one piece does not pull in the others.
"""
