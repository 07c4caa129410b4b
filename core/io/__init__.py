"""The I/O edge: the only code of the engine that opens raster files and commits outputs."""
