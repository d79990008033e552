"""The batchferry client (``batchferry.client``): a DataLoader fed by a loader server."""

from .dataset import RemoteDataset
from .loader import DataLoader
from .options import LoaderConfig
from .rescale import merge_states
from .stats import LoaderStats

__all__ = ["DataLoader", "LoaderConfig", "LoaderStats", "RemoteDataset", "merge_states"]
