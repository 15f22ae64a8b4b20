"""Comparison: how far a synthetic CT's bone lies from a CT's, and how its HU differ.

Bone masks and surfaces, surface distances, image metrics, offscreen renderings, the HTML pieces
of a comparison and the screw-trajectory check. Stands on the kernel only; the transform it
applies comes from :mod:`SyntheticCTLib.registration` through the caller.
"""
