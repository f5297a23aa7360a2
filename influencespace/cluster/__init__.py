"""Stage 2: distributed k-means over the embeddings (pure logic; ``stage.py`` is the Ray adapter).

- ``assign.py``: faiss nearest-centroid search (CPU or GPU) and the per-centroid partial sums;
- ``kmeans.py``: the algorithm around the ``Dataset`` seam (seeding, Lloyd, repair, two-level, resume);
- ``shards.py``: Parquet shards held by workers as a ``Dataset``;
- ``checkpoint.py``: per-iteration centroids on local disk or S3;
- ``stage.py``: ``ClusterStage``, workers as Ray actors or in-process.

See docs/clustering.md.
"""
