"""What client and server must agree on beyond the generated messages: mode names,
the taken-batches bitmap, the version of a saved loader state.

Every mode name is derived from the proto's ``Mode`` enum (``MODE_SHARED`` ->
``"shared"``), so a mode added to the proto is known here, to the loader's argument
check, the server's plan and the CLI's listings at once.
"""

from __future__ import annotations

import numpy as np

from batchferry.v1 import loader_pb2 as _pb2

__all__ = ["CONVERT_COLLATE", "MODES", "MODE_NAMES", "MODE_VALUES", "STATE_VERSION", "Bitmap"]

# Version of DataLoader.state_dict(); a loader refuses any other.
STATE_VERSION = 1
# The built-in collate of torch's batch_size=None (default_convert; no batch dimension),
# which a loader asks for by this name and GetSample builds samples with.
CONVERT_COLLATE = "convert"

MODE_VALUES: dict[str, int] = {name.removeprefix("MODE_").lower(): value for name, value in _pb2.Mode.items()}
MODE_NAMES: dict[int, str] = {value: name for name, value in MODE_VALUES.items()}
# In the proto's order: "independent" (the default) first.
MODES: tuple[str, ...] = tuple(MODE_VALUES)


class Bitmap:
    """Which batches of an epoch are taken: bit ``i`` is bit ``i % 8`` of byte ``i // 8``.

    Sent in ``OpenStream.taken`` (over one stream's positions) and kept in a loader's
    ``state_dict()`` (over the epoch's batches) when batches are taken out of order.
    """

    __slots__ = ("_bytes",)

    def __init__(self, raw: bytes | bytearray = b"") -> None:
        self._bytes = bytearray(raw)

    def __contains__(self, index: int) -> bool:
        return index // 8 < len(self._bytes) and bool(self._bytes[index // 8] >> (index % 8) & 1)

    def __bool__(self) -> bool:
        return any(self._bytes)

    def __len__(self) -> int:
        """How many are taken."""
        return int(self.bits().sum())

    def __bytes__(self) -> bytes:
        return bytes(self._bytes)

    def add(self, index: int) -> None:
        if len(self._bytes) <= index // 8:
            self._bytes.extend(bytes(index // 8 + 1 - len(self._bytes)))
        self._bytes[index // 8] |= 1 << (index % 8)

    def bits(self) -> np.ndarray:
        """One bool per bit, trailing zero bits of the last byte included."""
        raw = np.frombuffer(bytes(self._bytes), dtype=np.uint8)
        return np.unpackbits(raw, bitorder="little").astype(bool)

    def mask(self, length: int) -> np.ndarray:
        """One bool per index below ``length``: bits past it dropped, missing ones False."""
        bits = self.bits()[:length]
        return np.pad(bits, (0, length - len(bits)))

    def positions(self, limit: int) -> np.ndarray:
        """The taken indices below ``limit``."""
        return np.flatnonzero(self.bits()[:limit])

    def stride(self, start: int, step: int) -> Bitmap:
        """The bitmap over indices ``start, start + step, ...`` (one stream's part of the epoch)."""
        return Bitmap.from_bits(self.bits()[start::step])

    def prefix(self) -> int:
        """How many indices from 0 on are all taken."""
        bits = self.bits()
        return len(bits) if bits.all() else int(np.argmin(bits))

    @classmethod
    def from_bits(cls, bits: np.ndarray) -> Bitmap:
        return cls(np.packbits(bits.astype(bool), bitorder="little").tobytes())
