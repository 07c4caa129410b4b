"""Segmenting rasters: tiling, normalizing, the rolling blend, the threaded stages, batches."""
