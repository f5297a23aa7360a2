"""Stage 4: curation policies and the per-sample manifest."""
