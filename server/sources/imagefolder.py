"""``imagefolder:ROOT[,resize=..][,crop=..][,mode=RGB][,transform=MODULE:CALLABLE][,allow_empty=false]``.

Class folders of images, in torchvision ``ImageFolder``'s order and labels:
classes are ``ROOT``'s sub-folders sorted by name (``class_to_idx`` numbers them
in that order); within each class, ``os.walk`` (following links) sorted by folder,
files sorted by name, keeping those whose lower-cased name ends with one of
torchvision's ``IMG_EXTENSIONS``. A class without images is an error unless
``allow_empty`` is set.

Samples are ``(uint8 tensor [C, H, W], int label)`` decoded with Pillow (see
:mod:`._images` for ``resize``, ``crop`` and ``mode``); ``transform`` is applied
to the image tensor of each sample, as ``ImageFolder(transform=...)`` would be.
When ``crop`` (or ``resize=HxW``) fixes the size and there is no transform,
batches are decoded straight into the slot.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchferry.layout import SlotWriter

from ._common import SampleError, load_callable, parse_bool, relative, split_options
from ._gather import Gather, take_array
from ._images import IMG_EXTENSIONS, ImageDecode, pillow

__all__ = ["ImageFolderDataset", "find_classes", "from_spec", "make_dataset"]

_OPTIONS = {"resize", "crop", "mode", "transform", "allow_empty"}


def find_classes(root: str | Path) -> tuple[list[str], dict[str, int]]:
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(f"no class folders in {root}")
    return classes, {name: i for i, name in enumerate(classes)}


def make_dataset(
    root: str | Path, class_to_idx: dict[str, int], *, allow_empty: bool = False
) -> list[tuple[str, int]]:
    """(path, label) pairs in torchvision's order."""
    samples: list[tuple[str, int]] = []
    empty = []
    for name in sorted(class_to_idx):
        count = len(samples)
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for fname in sorted(files):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(folder, fname), class_to_idx[name]))
        if len(samples) == count:
            empty.append(name)
    if empty and not allow_empty:
        raise ValueError(
            f"no images ({', '.join(IMG_EXTENSIONS)}) in class folder(s) {', '.join(empty)} of {root}; "
            "set allow_empty=true to keep them as classes without samples"
        )
    return samples


class ImageFolderDataset:
    """Images in class folders, ``torchvision.datasets.ImageFolder``'s order and ``class_to_idx``.

    Examples:
        >>> ds = ImageFolderDataset("/data/train", crop=(224, 224))  # doctest: +SKIP
        >>> image, label = ds[0]        # uint8 [3, 224, 224], int
    """

    def __init__(
        self,
        root: str | Path,
        *,
        mode: str = "RGB",
        resize: int | tuple[int, int] | None = None,
        crop: tuple[int, int] | None = None,
        transform: Callable[[torch.Tensor], Any] | None = None,
        allow_empty: bool = False,
    ) -> None:
        pillow()  # fail at start, naming the extra, rather than at the first batch
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"no such directory {str(root)!r}")
        self.decoder = ImageDecode(mode, resize, crop)
        self.transform = transform
        self.allow_empty = allow_empty
        self.classes, self.class_to_idx = find_classes(self.root)
        pairs = make_dataset(self.root, self.class_to_idx, allow_empty=allow_empty)
        self.samples = [(relative(path, self.root), label) for path, label in pairs]
        self.targets = np.array([label for _, label in pairs], dtype=np.int64)

    # Pickle by path: each process lists the folders itself (the same sorted order).
    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.root, self.decoder, self.transform, self.allow_empty))

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, index: int, out: torch.Tensor | None = None) -> torch.Tensor:
        rel = self.samples[index][0]
        try:
            if out is None:
                return self.decoder.decode(self.root / rel)
            self.decoder.decode_into(self.root / rel, out)
            return out
        except FileNotFoundError:
            raise SampleError(index, rel, "file not found") from None
        except OSError as exc:
            raise SampleError(index, rel, f"cannot decode: {exc}") from exc

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self._image(index)
        return (image if self.transform is None else self.transform(image)), self.samples[index][1]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, int]]:
        return [self[i] for i in indices]

    def batch_gatherer(self) -> Gather | None:
        shape = self.decoder.shape()
        if shape is None or self.transform is not None:
            return None

        def gather(idx: np.ndarray, writer: SlotWriter) -> list[torch.Tensor]:
            images = writer.alloc((len(idx), *shape), torch.uint8)
            for row, i in zip(images, idx.tolist(), strict=True):
                self._image(i, row)
            return [images, take_array(self.targets, idx, writer)]

        return gather


def _rebuild(
    root: Path, decoder: ImageDecode, transform: Callable[[torch.Tensor], Any] | None, allow_empty: bool
) -> ImageFolderDataset:
    return ImageFolderDataset(
        root,
        mode=decoder.mode,
        resize=decoder.resize,
        crop=decoder.crop,
        transform=transform,
        allow_empty=allow_empty,
    )


def from_spec(rest: str) -> ImageFolderDataset:
    root, opts = split_options(rest, _OPTIONS)
    decoder = ImageDecode.from_options(opts)
    return ImageFolderDataset(
        root,
        mode=decoder.mode,
        resize=decoder.resize,
        crop=decoder.crop,
        transform=load_callable("transform", opts["transform"]) if "transform" in opts else None,
        allow_empty=parse_bool("allow_empty", opts.get("allow_empty", "false")),
    )
