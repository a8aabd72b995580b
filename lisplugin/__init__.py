"""lisplugin: digital-morphology plugin for laboratory information systems."""

__version__ = "0.1.0"
