"""Stage 5: train the target model on each curated set with DeepSpeed inside Ray Train.

Pure logic lives in :mod:`~influencespace.train.model` (the CLIP-style target model),
:mod:`~influencespace.train.sampler` (the weighted, sharded sampler), :mod:`~influencespace.train.data`
(reading a variant's training set) and :mod:`~influencespace.train.recipe` (the DeepSpeed training
recipe); :mod:`~influencespace.train.stage` is the Ray adapter. See docs/training.md.
"""
