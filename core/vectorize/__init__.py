"""Class rasters into polygons: strip-wise tracing, true areas, the GeoPackage writer."""
