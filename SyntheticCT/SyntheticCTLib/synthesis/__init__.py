"""Synthesis: MRI to synthetic CT with a model package.

Input checks against the model card, intensity normalization, sliding-window inference (torch is
imported only where a model runs), the DICOM CT export and the non-learned baselines. Stands on the
kernel and :mod:`SyntheticCTLib.models`.
"""
