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

``ROOT`` may be a URL of object storage (see :mod:`._remote`): the files are listed
once under it (a class is a first-level folder holding any file: object stores have
no empty folders), and each image is fetched into the cache when a batch needs it,
the batch's images ``fetch_threads`` at a time.
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
from ._remote import RemoteFile, Store, is_url, local_path

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
        store: Store | None = None,
    ) -> None:
        pillow()  # fail at start, naming the extra, rather than at the first batch
        self.decoder = ImageDecode(mode, resize, crop)
        self.transform = transform
        self.allow_empty = allow_empty
        self.store: Store | None = None
        self._remote: list[RemoteFile] = []
        if is_url(root):
            self.root: str | Path = str(root).rstrip("/")
            self.store = store or Store()
            self.classes, self.class_to_idx, self._remote, pairs = _remote_listing(
                self.store, self.root, allow_empty
            )
        else:
            self.root = Path(local_path(str(root)))
            if not self.root.is_dir():
                raise ValueError(f"no such directory {str(root)!r}")
            self.classes, self.class_to_idx = find_classes(self.root)
            pairs = make_dataset(self.root, self.class_to_idx, allow_empty=allow_empty)
        self.samples = [(relative(path, self.root), label) for path, label in pairs]
        self.targets = np.array([label for _, label in pairs], dtype=np.int64)

    # Pickle by path: each process lists the folders itself (the same sorted order).
    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.root, self.decoder, self.transform, self.allow_empty, self.store))

    def __len__(self) -> int:
        return len(self.samples)

    def _fetch(self, indices: Sequence[int]) -> None:
        """Bring a batch's remote images into the cache together, not one after another."""
        if self.store is not None:
            self.store.fetch_many([self._remote[i] for i in indices], indices)

    def _image(self, index: int, out: torch.Tensor | None = None) -> torch.Tensor:
        rel = self.samples[index][0]
        if self.store is not None:
            rel = self._remote[index].url
            target = out

            def decode(path: Path) -> torch.Tensor:
                if target is None:
                    return self.decoder.decode(path)
                self.decoder.decode_into(path, target)
                return target

            try:
                return self.store.read(self._remote[index], index, decode)
            except OSError as exc:
                raise SampleError(index, rel, f"cannot decode: {exc}") from exc
        assert isinstance(self.root, Path)
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
        self._fetch(indices)
        return [self[i] for i in indices]

    def batch_gatherer(self) -> Gather | None:
        shape = self.decoder.shape()
        if shape is None or self.transform is not None:
            return None

        def gather(idx: np.ndarray, writer: SlotWriter) -> list[torch.Tensor]:
            images = writer.alloc((len(idx), *shape), torch.uint8)
            self._fetch(idx.tolist())
            for row, i in zip(images, idx.tolist(), strict=True):
                self._image(i, row)
            return [images, take_array(self.targets, idx, writer)]

        return gather


def _remote_listing(
    store: Store, root: str, allow_empty: bool
) -> tuple[list[str], dict[str, int], list[RemoteFile], list[tuple[str, int]]]:
    """Classes, image files and (URL, label) pairs under ``root``, in torchvision's order."""
    by_class: dict[str, list[RemoteFile]] = {}
    for f in store.find(root):
        parts = f.url[len(root) + 1 :].split("/")
        if len(parts) > 1:
            by_class.setdefault(parts[0], [])
            if f.url.lower().endswith(IMG_EXTENSIONS):
                by_class[parts[0]].append(f)
    if not by_class:
        raise ValueError(f"no class folders in {root}")
    classes = sorted(by_class)
    empty = [name for name in classes if not by_class[name]]
    if empty and not allow_empty:
        raise ValueError(
            f"no images ({', '.join(IMG_EXTENSIONS)}) in class folder(s) {', '.join(empty)} of {root}; "
            "set allow_empty=true to keep them as classes without samples"
        )
    files = [
        f
        for name in classes
        for f in sorted(by_class[name], key=lambda f: (f.url.rsplit("/", 1)[0], f.url.rsplit("/", 1)[1]))
    ]
    class_to_idx = {name: i for i, name in enumerate(classes)}
    pairs = [(f.url, class_to_idx[f.url[len(root) + 1 :].split("/")[0]]) for f in files]
    return classes, class_to_idx, files, pairs


def _rebuild(
    root: str | Path,
    decoder: ImageDecode,
    transform: Callable[[torch.Tensor], Any] | None,
    allow_empty: bool,
    store: Store | None,
) -> ImageFolderDataset:
    return ImageFolderDataset(
        root,
        mode=decoder.mode,
        resize=decoder.resize,
        crop=decoder.crop,
        transform=transform,
        allow_empty=allow_empty,
        store=store,
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
