"""Composition package: settings and the ``twincast`` command line."""

__version__ = "0.1.0"
