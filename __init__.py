"""Tessera — deep-learning segmentation of rasters, as a QGIS plugin.

Importing this package is cheap and never touches QGIS, torch or rasterio: QGIS calls
:func:`classFactory`, which imports the plugin class lazily. The engine lives in
:mod:`tessera.core` and runs without QGIS.
"""


def classFactory(iface):  # noqa: N802  (QGIS's required name)
    """Entry point QGIS calls when it loads the plugin."""
    from .plugin import TesseraPlugin

    return TesseraPlugin(iface)
