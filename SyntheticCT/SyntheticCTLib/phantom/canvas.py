"""The canvas the phantom is painted on: CT numbers, complex MRI signal per echo, and label maps.

Structures are painted back to front with the "over" rule: a structure with occupancy ``a`` in a
voxel takes fraction ``a`` of it, and what was there keeps ``1 - a``. The CT and every echo's
complex signal mix linearly with the occupancy, so boundaries have true partial volume; the label
maps take the structure where ``a >= 0.5``.
"""

from __future__ import annotations

from typing import List, Sequence, Union

import numpy as np

from .shapes import Block

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
        s = block.slices
        ct = self.ct[s]
        ct += alpha * (np.asarray(hu, dtype=F32) - ct)
        for echo, sig in zip(self.mri, signals):
            m = echo[s]
            m += alpha * (sig - m)
        inside = alpha >= F32(0.5)
        self.labels[s][inside] = label
        self.bone[s][inside] = bone_id
