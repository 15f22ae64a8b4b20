"""Hounsfield-unit constants: one definition each.

Two "air" values are in use on purpose, and they mean different things:

- :data:`AIR_HU` (-1000) is air on the Hounsfield scale (its definition). It is what a synthetic CT
  holds outside the body, and what the phantom and the bulk-density baseline paint as air.
- :data:`CT_MIN_HU` (-1024) is the floor of a CT scanner's stored range (12-bit storage with
  intercept -1024). It fills what lies outside a CT's field of view when a CT is resampled, so that
  padding reads as the scanner's own "nothing", and it bounds the clip range of the CT and the metrics.
"""

from __future__ import annotations

AIR_HU = -1000.0
"""Air on the Hounsfield scale."""

WATER_HU = 0.0
"""Water on the Hounsfield scale."""

CT_MIN_HU = -1024.0
"""The lowest value of a classic CT's stored range (unsigned 12 bits with intercept -1024)."""

CT_MAX_HU = 3071.0
"""The highest value of a classic CT's 12-bit stored range (4095 - 1024)."""

BONE_THRESHOLD_HU = 200.0
"""The default threshold above which a CT voxel counts as bone (comparison, bone masks)."""

__all__ = ["AIR_HU", "WATER_HU", "CT_MIN_HU", "CT_MAX_HU", "BONE_THRESHOLD_HU"]
