"""The I/O edge: the only code of the engine that opens data files (rasters, plain images,
polygon layers) and writes outputs (sinks), and the one way outputs are committed (atomic)."""
