"""Tessera's engine: streamed, tiled U-Net segmentation of rasters into class rasters and polygons.

Nothing in this package imports QGIS or Qt. Heavy libraries (torch, rasterio, shapely) are
imported by the modules that use them, so ``import tessera.core`` stays cheap.
"""

__version__ = "0.7.0"
