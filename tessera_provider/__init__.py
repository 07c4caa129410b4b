"""Tessera's Processing provider (id ``tessera``): one algorithm per module."""
