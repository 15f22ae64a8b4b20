"""The kernel: what every other layer of SyntheticCTLib stands on.

Errors, progress and cancellation, volume I/O with atomic outputs, grid geometry, masks and HU
constants. It imports nothing else of the project, and neither torch, Qt nor Slicer.
"""
