"""The paired MRI/CT digital phantom: a lumbar-spine-like torso section with known ground truth.

>>> from SyntheticCTLib.phantom import make_phantom, write_phantom   # doctest: +SKIP
>>> phantom = make_phantom(seed=3, size=(64, 64, 48), spacing=2.0)
>>> write_phantom(phantom, "case3")

See :mod:`.tissues` for the labels and the tissue table with its sources, :mod:`.anatomy` for the
randomized anatomy, :mod:`.mri` for the signal model.
"""

from __future__ import annotations

from SyntheticCTLib.phantom.case import Case, load_case, write_phantom
from SyntheticCTLib.phantom.generator import OPTIONS, Phantom, make_phantom
from SyntheticCTLib.phantom.tissues import BONE_LABELS, TISSUE_TABLE, TISSUES

__all__ = [
    "BONE_LABELS",
    "Case",
    "OPTIONS",
    "Phantom",
    "TISSUES",
    "TISSUE_TABLE",
    "load_case",
    "make_phantom",
    "write_phantom",
]
