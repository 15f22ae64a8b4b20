"""Registration: align a synthetic CT (or an MRI) with a CT of the same patient.

Rigid, affine, deformable B-spline and bone-local (rigid per bone) registration with SimpleITK,
its initialization and image pyramid, and the transform files it reads and writes. Stands on the
kernel only.

The choices below are defined here, without importing SimpleITK, so that the command line can offer
them without loading the registration.
"""

MODES = ("rigid", "affine", "deformable", "bone-local")
"""Registration modes: rigid (Euler 3D), affine, deformable (B-spline over the affine), bone-local (rigid per bone)."""

METRICS = ("auto", "correlation", "meansquares", "mattes")
"""Similarity metrics; ``auto``: correlation for two CT-like images, Mattes mutual information otherwise."""

INITIALIZATIONS = ("auto", "geometry", "moments", "none")
"""``auto``: best of as-is, geometry and moments, with the rotation search; ``geometry``/``moments``: that
translation only, with the rotation search; ``none``: the images as they are (physical space), no search."""
