"""The canvas the phantom is painted on: CT numbers, complex MRI signal per echo, and label maps.

Structures are painted back to front with the "over" rule: a structure with occupancy ``a`` in a
voxel takes fraction ``a`` of it, and what was there keeps ``1 - a``. The CT and every echo's
complex signal mix linearly with the occupancy, so boundaries have true partial volume; the label
maps take the structure where ``a >= 0.5``.
"""

from __future__ import annotations

from typing import List, Sequence, Union

import numpy as np

from SyntheticCTLib.phantom.shapes import Block

F32 = np.float32
C64 = np.complex64


class Canvas:
    """Arrays in numpy (z, y, x) order for one phantom."""

    def __init__(self, shape: Sequence[int], n_echoes: int, background_hu: float = -1000.0) -> None:
        shape = tuple(int(s) for s in shape)
        self.ct = np.full(shape, background_hu, dtype=F32)
        self.mri: List[np.ndarray] = [np.zeros(shape, dtype=C64) for _ in range(n_echoes)]
        self.labels = np.zeros(shape, dtype=np.uint8)
        self.bone = np.zeros(shape, dtype=np.uint8)

    def paint(
        self,
        block: Block,
        alpha: np.ndarray,
        label: int,
        hu: Union[float, np.ndarray],
        signals: Sequence[Union[complex, np.ndarray]],
        bone_id: int = 0,
    ) -> None:
        """Paint a structure of occupancy ``alpha`` (block-shaped) with CT number ``hu`` and per-echo ``signals``."""
        inside_any = alpha > 0
        ranges = []
        for axes in ((1, 2), (0, 2), (0, 1)):
            hits = np.flatnonzero(inside_any.any(axis=axes))
            if hits.size == 0:
                return
            ranges.append(slice(int(hits[0]), int(hits[-1]) + 1))
        crop = tuple(ranges)  # the part of the block the structure touches
        s = tuple(slice(b.start + c.start, b.start + c.stop) for b, c in zip(block.slices, crop))
        alpha = alpha[crop]
        ct = self.ct[s]
        hu = hu[crop] if isinstance(hu, np.ndarray) and hu.ndim == 3 else hu
        ct += alpha * (np.asarray(hu, dtype=F32) - ct)
        for echo, sig in zip(self.mri, signals):
            if isinstance(sig, np.ndarray) and sig.ndim == 3:
                sig = sig[crop]
            m = echo[s]
            m += alpha * (sig - m)
        inside = alpha >= F32(0.5)
        self.labels[s][inside] = label
        self.bone[s][inside] = bone_id
