"""Registration: align a synthetic CT (or an MRI) with a CT of the same patient.

Rigid, affine, deformable B-spline and bone-local (rigid per bone) registration with SimpleITK,
its initialization and image pyramid, and the transform files it reads and writes. Stands on the
kernel only.
"""
