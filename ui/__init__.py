"""Tessera's QGIS user interface: the panel, styling, background tasks, dependency check."""
