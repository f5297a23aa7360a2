"""Stage 1, embed: x = f(v, t), one cross-modal vector per image–text pair.

Pure logic lives here (no Ray import): :mod:`.preprocess` (decode, resize, tokenise),
:mod:`.encoders` (the encoder interface, open_clip), :mod:`.offline_default` (EfficientNet-Lite0 +
MiniLM with aligned heads; :mod:`.minilm` runs MiniLM on torch layers), :mod:`.fusion` (f),
:mod:`.pairs` (input planning, shards, schema);
:mod:`.stage` is the Ray Data adapter. Heavy libraries are imported where used.
"""
