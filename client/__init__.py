"""The batchferry client (``batchferry.client``): a DataLoader fed by a loader server."""

from .loader import DataLoader, LoaderConfig

__all__ = ["DataLoader", "LoaderConfig"]
