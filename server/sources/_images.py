"""Image decoding shared by the image sources: Pillow to uint8 CHW, with torchvision's resize and crop.

``resize=N`` scales the shorter side to N (``torchvision.transforms.Resize(N)``),
``resize=HxW`` to exactly H x W, both bilinear as torchvision does on Pillow
images; ``crop=N`` or ``crop=HxW`` takes the centre (``CenterCrop``, padding
with zeros where the image is smaller). ``mode`` is the Pillow mode the image is
converted to first (``RGB`` as torchvision's loader, ``L``, ``LA``, ``RGBA``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._common import parse_hw, require

__all__ = ["IMG_EXTENSIONS", "ImageDecode"]

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CHANNELS = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}


def pillow() -> Any:
    return require("PIL.Image", "images", "decoding images")


@dataclass(frozen=True)
class ImageDecode:
    mode: str = "RGB"
    resize: int | tuple[int, int] | None = None  # int: shorter side
    crop: tuple[int, int] | None = None  # centre, (height, width)

    def __post_init__(self) -> None:
        if self.mode not in _CHANNELS:
            raise ValueError(f"mode must be one of {', '.join(_CHANNELS)}, got {self.mode!r}")

    @classmethod
    def from_options(cls, opts: dict[str, str]) -> ImageDecode:
        resize: int | tuple[int, int] | None = None
        if "resize" in opts:
            h, w = parse_hw("resize", opts["resize"])
            resize = h if "x" not in opts["resize"].lower() else (h, w)
        crop = parse_hw("crop", opts["crop"]) if "crop" in opts else None
        return cls(opts.get("mode", "RGB"), resize, crop)

    def shape(self) -> tuple[int, int, int] | None:
        """The (C, H, W) every image decodes to, when the options fix it."""
        size = self.crop or (self.resize if isinstance(self.resize, tuple) else None)
        return None if size is None else (_CHANNELS[self.mode], *size)

    def decode(self, source: Path | bytes) -> torch.Tensor:
        """Decode a file or encoded bytes to a uint8 (C, H, W) tensor; ``OSError`` if it cannot."""
        arr = self._hwc(source)
        return torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C"))  # a writable copy

    def decode_into(self, source: Path | bytes, out: torch.Tensor) -> None:
        """Decode straight into ``out`` (C, H, W), which must have :meth:`shape`."""
        out.numpy()[...] = self._hwc(source).transpose(2, 0, 1)

    def _hwc(self, source: Path | bytes) -> np.ndarray:
        image = pillow()
        f = io.BytesIO(source) if isinstance(source, bytes) else source.open("rb")
        try:
            with image.open(f) as opened:
                img = opened.convert(self.mode)
            if self.resize is not None:
                w, h = img.size
                if isinstance(self.resize, tuple):
                    size = (self.resize[1], self.resize[0])
                elif w <= h:
                    size = (self.resize, int(self.resize * h / w))
                else:
                    size = (int(self.resize * w / h), self.resize)
                if size != img.size:
                    img = img.resize(size, image.Resampling.BILINEAR)
            arr = np.asarray(img)
        except (image.DecompressionBombError, SyntaxError, ValueError) as exc:
            raise OSError(str(exc)) from exc
        finally:
            f.close()
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return arr if self.crop is None else _center_crop(arr, *self.crop)


def _center_crop(arr: np.ndarray, ch: int, cw: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if ch > h or cw > w:  # torchvision pads with zeros, then crops
        top, left = (ch - h) // 2 if ch > h else 0, (cw - w) // 2 if cw > w else 0
        padded = np.zeros((max(h, ch), max(w, cw), arr.shape[2]), arr.dtype)
        padded[top : top + h, left : left + w] = arr
        arr, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)
    return arr[top : top + ch, left : left + cw]
