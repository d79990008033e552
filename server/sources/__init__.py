"""Built-in dataset sources, one module each; ``datasets.py`` maps spec kinds onto them.

Each module has a dataset class and ``from_spec(rest)``, which builds it from the
part of a ``KIND:REST`` spec after the colon. Optional dependencies (Pillow,
pyarrow, datasets) are imported on first use, so importing this package needs
none of them.
"""

from __future__ import annotations

from ._common import MissingDependency, SampleError
from .hf import HFDataset
from .imagefolder import ImageFolderDataset
from .mnist import MnistDataset
from .npy import NpyDataset
from .parquet import ParquetDataset
from .synthetic import SyntheticDataset
from .tokens import TokenDataset
from .webdataset import TarShardDataset

__all__ = [
    "HFDataset",
    "ImageFolderDataset",
    "MissingDependency",
    "MnistDataset",
    "NpyDataset",
    "ParquetDataset",
    "SampleError",
    "SyntheticDataset",
    "TarShardDataset",
    "TokenDataset",
]
