"""Training of synthesis models on registered MRI/CT pairs, and export as model packages.

Modules: :mod:`.config` (YAML/JSON configuration with validation), :mod:`.data` (cases, CT-to-MRI
alignment, resampling, patch sampling), :mod:`.augment` (intensity and spatial augmentation),
:mod:`.losses` (L1 with bone weight, gradient difference), :mod:`.loop` (the training loop,
validation, checkpoints, DistributedDataParallel) and :mod:`.export` (model package writing).

Heavy imports (torch) happen inside the modules that need them; importing this package is cheap.
"""

from __future__ import annotations

from SyntheticCTLib.training.config import ConfigError, TrainingConfig, load_config

__all__ = ["ConfigError", "TrainingConfig", "load_config", "train"]


def train(config, **kwargs):
    """Run a training; see :func:`SyntheticCTLib.training.loop.train`."""
    from SyntheticCTLib.training.loop import train as _train

    return _train(config, **kwargs)
