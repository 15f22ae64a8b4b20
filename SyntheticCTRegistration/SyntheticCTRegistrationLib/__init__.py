"""SyntheticCTRegistrationLib: register a synthetic CT (or MRI) to a CT and compare bone surfaces.

The logic of the SyntheticCTRegistration 3D Slicer module, runnable without Slicer.
"""

from __future__ import annotations

__version__ = "0.1.0"
