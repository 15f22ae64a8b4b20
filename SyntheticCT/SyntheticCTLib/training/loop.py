"""The training loop: AdamW with warmup and cosine decay, validation, checkpoints, resume, DDP, export.

Run it with :func:`train` (or ``syntheticct train --config FILE [--resume]``). Under ``torchrun``
(``WORLD_SIZE`` > 1) it trains with DistributedDataParallel: gloo on the CPU, NCCL on GPUs; each rank
draws its own share of every global batch (sample indices ``rank::world_size`` of the step's block,
each sample seeded by ``(seed, epoch, index)``), and only rank 0 writes files.

Validation runs after each epoch (every ``validation.every_epochs``) on whole validation volumes,
through :func:`SyntheticCTLib.synthesis.inference.synthesize` (the product's sliding-window inference, on a
model package written from the current weights), and is scored by
:func:`SyntheticCTLib.comparison.compare.compare`: MAE, ME, PSNR, SSIM in the body (SynthRAD
conventions), bone Dice and bone-surface distances. The best model is the one with the lowest
validation bone-surface p95.

Outputs in ``output_dir``: ``checkpoints/last.pt`` (every ``checkpoint_every`` steps, at each epoch end
and on cancel), ``checkpoints/best.pt``, ``metrics.csv`` (one row per epoch), ``steps.csv`` (one row per
step), ``learning_curves.png``, ``training_summary.json``, ``train.log`` and the exported package ``model/``.
"""

from __future__ import annotations

import copy
import csv
import datetime
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from SyntheticCTLib.kernel.errors import Cancelled, SyntheticCTError
from SyntheticCTLib.kernel.io import atomic_output
from SyntheticCTLib.kernel.jsonio import write_json
from SyntheticCTLib.kernel.progress import CancelToken, ProgressCallback, no_progress, scaled, with_cancel
from SyntheticCTLib.models.errors import ModelPackageError
from SyntheticCTLib.models.package import load_model_package, load_weights
from SyntheticCTLib.training.augment import apply_intensity, apply_spatial, draw_spatial, rotation_margin
from SyntheticCTLib.training.config import TrainingConfig, load_config
from SyntheticCTLib.training.data import (
    PatchSampler,
    PreparedCase,
    collect_cases,
    generate_phantom_cases,
    prepare_cases,
)
from SyntheticCTLib.training.export import build_card, export_package, state_dict_sha256
from SyntheticCTLib.training.losses import SynthesisLoss
from SyntheticCTLib.training.validation import VALIDATION_KEYS, selection_score, validate

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
EPOCH_COLUMNS = (
    ("epoch", "step", "lr", "train_loss", "train_l1", "train_gradient")
    + tuple(f"val_{k}" for k in VALIDATION_KEYS)
    + ("val_time_s", "elapsed_s", "best")
)
STEP_COLUMNS = ("step", "epoch", "loss", "l1", "gradient", "lr")


class TrainingError(SyntheticCTError):
    """Training cannot start or continue (e.g. ``--resume`` with no checkpoint or another configuration)."""


@dataclass
class TrainResult:
    """What a training run produced."""

    output_dir: Path
    package_dir: Optional[Path]
    steps: int
    best_epoch: Optional[int]
    best_metrics: Dict[str, float]
    history: List[Dict[str, Any]]
    elapsed_s: float
    summary: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------------------------


class _Dist:
    """Rank, world size and collectives; a no-op stand-in when not distributed."""

    def __init__(self, device_name: str) -> None:
        import torch

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.device = _select_device(device_name, self.local_rank if self.world > 1 else None)
        self.enabled = self.world > 1
        self.initialized_here = False
        if self.enabled:
            import torch.distributed as dist

            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60))
                self.initialized_here = True
            logger.info(
                "Distributed training: rank %d of %d (%s, backend %s).", self.rank, self.world, self.device, backend
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def mean(self, value: float) -> float:
        if not self.enabled:
            return float(value)
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def gather(self, obj: Any) -> List[Any]:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.enabled and self.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _select_device(name: str, local_rank: Optional[int]):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("training.device is 'cuda' but no CUDA device is available.")
        return torch.device("cuda", local_rank or 0)
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TrainingError("training.device is 'mps' but MPS is not available.")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------------------------
# Schedule, batches
# ----------------------------------------------------------------------------------------------------------------


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate factor at ``step``: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_batch(sampler: PatchSampler, config: TrainingConfig, epoch: int, indices: Sequence[int], device):
    """Assemble the augmented batch of the given global sample indices: ``(image, target, body, bone)`` tensors."""
    import torch

    patch = tuple(config.training.patch_size)
    aug = config.augmentation
    spacing_zyx = tuple(float(s) for s in config.data.spacing_mm)[::-1]
    margin = rotation_margin(patch, aug.rotation_degrees)
    images, targets, bodies, bones, airs = [], [], [], [], []
    for index in indices:
        rng = sampler.rng(epoch, index)
        spatial = draw_spatial(rng, aug)
        size = [p + 2 * m for p, m in zip(patch, margin)] if spatial.rotates else list(patch)
        sample = sampler.sample(rng, size)
        n = sample.image.shape[0]
        stack = torch.from_numpy(
            np.concatenate(
                [sample.image, sample.target[None], sample.body[None], sample.bone[None], sample.air[None]], axis=0
            )
        )
        stack = apply_spatial(stack, patch, spatial, spacing=spacing_zyx, nearest_channels=(n + 1, n + 2, n + 3))
        image = apply_intensity(stack[:n], rng, aug)
        images.append(image)
        targets.append(stack[n : n + 1])
        bodies.append(stack[n + 1 : n + 2])
        bones.append(stack[n + 2 : n + 3])
        airs.append(stack[n + 3 : n + 4])
    return tuple(torch.stack(t).to(device, non_blocking=True) for t in (images, targets, bodies, bones, airs))


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Dict[str, Any]]) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _fmt(row.get(k)) for k in columns})


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return "" if value is None else value


def plot_learning_curves(path: Path, steps: Sequence[Dict[str, Any]], epochs: Sequence[Dict[str, Any]]) -> None:
    """A PNG with the training loss per step (and its moving average), validation MAE, Dice and surfaces."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), dpi=100)
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    if steps:
        s = np.array([r["step"] for r in steps], dtype=float)
        loss = np.array([r["loss"] for r in steps], dtype=float)
        ax.plot(s, loss, color="0.75", lw=0.6, label="loss per step")
        k = max(1, min(50, len(loss) // 10))
        if len(loss) >= k > 1:
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(s[k - 1 :], smooth, color="C0", lw=1.5, label=f"moving average ({k})")
        ax.set_yscale("log")
        ax2 = ax.twinx()
        ax2.plot(s, [r["lr"] for r in steps], color="C3", lw=0.8, alpha=0.6)
        ax2.set_ylabel("learning rate", color="C3")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss")
    ax.legend(loc="upper right", fontsize=8)
    val = [r for r in epochs if r.get("val_mae_hu") is not None and math.isfinite(r.get("val_mae_hu") or math.nan)]
    x = [r["step"] for r in val]
    panels = [
        (axes[0, 1], [("val_mae_hu", "MAE (HU)"), ("val_me_hu", "ME (HU)")], "validation MAE / ME in the body"),
        (axes[1, 0], [("val_bone_dice", "bone Dice"), ("val_ssim", "SSIM")], "validation bone Dice, SSIM"),
        (
            axes[1, 1],
            [("val_surface_mean_mm", "surface mean (mm)"), ("val_surface_p95_mm", "surface p95 (mm)")],
            "validation bone-surface distance",
        ),
    ]
    for ax, series, title in panels:
        for key, label in series:
            ys = [r.get(key) for r in val]
            if any(y is not None for y in ys):
                ax.plot(x, [np.nan if y is None else y for y in ys], marker="o", ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
        if series[0][0] == "val_surface_mean_mm" and val:
            ax.set_yscale("log")  # early epochs can be tens of mm, the goal is below 1 mm
        if val:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(str(tmp), format="png")


# ----------------------------------------------------------------------------------------------------------------
# Initial weights and batch-norm recalibration (validation scoring: :mod:`.validation`)
# ----------------------------------------------------------------------------------------------------------------


def load_initial_weights(network, config: TrainingConfig) -> Dict[str, Any]:
    """Load ``model.init_weights`` into ``network`` (fine-tuning); return where they came from.

    ``init_weights`` is a model package (folder or ``.zip``), a checkpoint (``.pt``: ``last.pt``/``best.pt``
    or a plain state dict), or a training configuration (YAML/JSON), meaning the package that
    configuration's training wrote (``output_dir/model``). The architecture must be the same.
    """

    path = Path(config.model.init_weights)
    base = Path(config.source).resolve().parent if config.source else None
    try:  # as the configuration names it, not as this machine's absolute path
        shown = str(path.resolve().relative_to(base)) if base else str(path)
    except ValueError:
        shown = str(path)
    info: Dict[str, Any] = {"source": shown}
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml", ".json"):
        package_dir = load_config(path).output_dir / "model"
        if not (package_dir / "model.json").is_file():
            raise TrainingError(
                f"model.init_weights names the configuration '{path}', whose model '{package_dir}' does not exist "
                f"yet; train it first: syntheticct train --config {path}"
            )
        info["config"] = path.name
        path = package_dir
    try:
        if path.is_dir() or path.suffix.lower() == ".zip":
            package = load_model_package(path)
            name, kwargs = package.architecture
            wanted = dict(config.model.kwargs)
            wanted["in_channels"] = kwargs.get("in_channels")
            if name != config.model.architecture or {k: kwargs.get(k) for k in wanted} != wanted:
                raise TrainingError(
                    f"model.init_weights: '{path}' is a {name} {kwargs}, not the configured "
                    f"{config.model.architecture} {config.model.kwargs}."
                )
            state = package.load_state_dict()
            info.update({"package": package.name, "version": package.version})
        else:
            checkpoint = _load_checkpoint(path)
            state = checkpoint.get("model", checkpoint)
        load_weights(network, state, str(path))
    except ModelPackageError as e:
        raise TrainingError(f"model.init_weights: {e}") from e
    info["weights_sha256"] = state_dict_sha256(state)
    logger.info("Initialised the network from '%s'.", path)
    return info


RECALIBRATION_EPOCH = 2**31 - 2
"""The sampler's epoch key of the batches that recalibrate batch-norm statistics (the same batches every time)."""


def recalibrated_copy(network, sampler: PatchSampler, config: TrainingConfig, device):
    """A copy of ``network`` whose batch-norm statistics are recomputed on training batches ("precise BN").

    The running statistics that batch norm keeps during training are an exponential average over the last
    few small batches, noisy enough to shift the network's decisions at inference. The copy's statistics
    are the plain average over ``training.bn_recalibration_batches`` fixed training batches (augmented,
    bone-oversampled: the distribution the network was trained on). The training network is not touched,
    so the training run itself does not depend on this. Networks without batch norm are returned as they are.
    """

    import torch

    batches = int(config.training.bn_recalibration_batches)
    if batches <= 0 or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in network.modules()):
        return network
    copied = copy.deepcopy(network)
    norms = [m for m in copied.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    copied.train()
    size = config.training.batch_size
    with torch.no_grad():
        for b in range(batches):
            image, *_ = make_batch(sampler, config, RECALIBRATION_EPOCH, range(b * size, (b + 1) * size), device)
            copied(image)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return copied.eval()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def config_fingerprint(config: TrainingConfig) -> str:
    """A hash of what must not change on ``--resume`` (model, data, schedule, loss, augmentation, seed)."""
    d = config.to_dict()
    keep = {k: d[k] for k in ("seed", "data", "model", "training", "loss", "augmentation")}
    for key in ("num_threads", "checkpoint_every", "device", "amp", "bn_recalibration_batches"):
        keep["training"].pop(key, None)
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def _save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    import torch

    with atomic_output(path) as tmp:
        torch.save(state, str(tmp))


def _load_checkpoint(path: Path) -> Dict[str, Any]:
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise TrainingError(f"Cannot read the checkpoint '{path}': {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def train(
    config, *, resume: bool = False, progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None
) -> TrainResult:
    """Train a synthesis model as ``config`` (a :class:`TrainingConfig` or a path to a YAML/JSON file) says.

    Parameters
    ----------
    resume
        Continue from ``output_dir/checkpoints/last.pt`` at its exact step (weights, optimizer,
        schedule, gradient scaler, history). The configuration must be the same, except for
        ``training.num_threads``, ``checkpoint_every``, ``device`` and ``amp``.
    progress
        ``report(fraction, stage, message)``; the message carries the loss, learning rate and ETA.
        It may raise :class:`~SyntheticCTLib.kernel.errors.Cancelled` (as may ``cancel``): the last complete
        step is then checkpointed and the exception propagates.

    Returns
    -------
    TrainResult
        With the exported package folder (``output_dir/model``) on rank 0 (None on other ranks).
    """
    if not isinstance(config, TrainingConfig):
        config = load_config(config)
    report = with_cancel(progress or no_progress, cancel)
    tc = config.training
    import torch

    threads = torch.get_num_threads()
    dist = _Dist(tc.device)
    log_handler = None
    rank_filter = None
    out = config.output_dir
    try:
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            log_handler = logging.FileHandler(out / "train.log", encoding="utf-8")
            log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger("SyntheticCTLib").addHandler(log_handler)
        else:
            rank_filter = _RankFilter()
            for handler in logging.getLogger().handlers:
                handler.addFilter(rank_filter)
        return _train(config, resume, report, dist)
    finally:
        if log_handler is not None:
            logging.getLogger("SyntheticCTLib").removeHandler(log_handler)
            log_handler.close()
        if rank_filter is not None:
            for handler in logging.getLogger().handlers:
                handler.removeFilter(rank_filter)
        dist.close()
        torch.set_num_threads(threads)


def _train(config: TrainingConfig, resume: bool, report: ProgressCallback, dist: _Dist) -> TrainResult:
    """Train in stages: prepare the data, build the model, restore the last checkpoint (``resume``), run the
    steps with their epoch ends, export the package."""
    run = _Run(config, report, dist)
    run.check_checkpoint(resume)
    run.prepare_data()
    run.build_model(resume)
    if resume:
        run.restore()
    run.loop()
    return run.finish()


class _Run:
    """One training run and what its stages share.

    The configuration and the distributed context; the prepared cases; the network, the forward model
    (the network or its DDP wrapper), optimiser, schedule, gradient scaler, loss and patch sampler; and the
    state a checkpoint saves and ``--resume`` restores: ``step``, ``history`` (one row per epoch),
    ``step_rows`` (one per step), ``best`` (the selected epoch) and ``prior_elapsed`` (seconds of earlier runs).
    """

    def __init__(self, config: TrainingConfig, report: ProgressCallback, dist: _Dist) -> None:
        import torch

        self.config = config
        self.tc = config.training
        self.out = config.output_dir
        self.report = report
        self.dist = dist
        self.device = dist.device
        self.started = time.time()
        if self.tc.num_threads:
            torch.set_num_threads(self.tc.num_threads)
        elif dist.enabled and self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, dist.local_world)))
        self.checkpoint_path = self.out / "checkpoints" / "last.pt"
        self.total_steps = self.tc.epochs * self.tc.steps_per_epoch
        self.global_batch = self.tc.batch_size * dist.world
        self.fingerprint = config_fingerprint(config)
        self.step = 0
        self.history: List[Dict[str, Any]] = []
        self.step_rows: List[Dict[str, Any]] = []
        self.best: Dict[str, Any] = {"epoch": None, "score": math.inf, "metrics": {}, "step": None}
        self.prior_elapsed = 0.0

    # -- stages before the loop -------------------------------------------------------------------------------

    def check_checkpoint(self, resume: bool) -> None:
        """``--resume`` needs ``last.pt``; a new run over an old one is allowed, with a warning."""
        if resume and not self.checkpoint_path.is_file():
            raise TrainingError(f"--resume: no checkpoint at '{self.checkpoint_path}' to resume from.")
        if not resume and self.dist.is_main and self.checkpoint_path.is_file():
            logger.warning(
                "'%s' exists; starting a new run over it (use --resume to continue it).", self.checkpoint_path
            )

    def prepare_data(self) -> None:
        """Generate the phantom cases (rank 0), prepare every case on the working grid, split them, drop outliers."""
        config, dist, report = self.config, self.dist, self.report
        if dist.is_main:
            generate_phantom_cases(config, progress=scaled(report, 0.0, 0.02))
        dist.barrier()
        train_specs, val_specs = collect_cases(config)
        all_specs = list(train_specs) + list(val_specs)
        self.prepared = prepare_cases(
            config, all_specs, rank=dist.rank, barrier=dist.barrier, progress=scaled(report, 0.02, 0.05)
        )
        by_name = {c.name: c for c in self.prepared}
        train_cases = [by_name[c.name] for c in train_specs]
        self.val_cases = [by_name[c.name] for c in val_specs]
        if config.data.drop_outliers:
            dropped = [c.name for c in train_cases if c.info.get("registration_outlier")]
            if dropped:
                logger.warning("Dropping registration outlier(s) from training: %s.", ", ".join(dropped))
                train_cases = [c for c in train_cases if not c.info.get("registration_outlier")]
        if not train_cases:
            raise TrainingError("No training case is left.")
        self.train_cases = train_cases
        self.manifests = [s.manifest for s in train_specs]
        self.n_channels = train_cases[0].image.shape[0]
        logger.info(
            "Training on %d case(s) (%s), validating on %d (%s); %d channel(s), working grid %s at %s mm.",
            len(train_cases),
            ", ".join(c.name for c in train_cases),
            len(self.val_cases),
            ", ".join(c.name for c in self.val_cases) or "none",
            self.n_channels,
            list(train_cases[0].mri[0].GetSize()),
            list(config.data.spacing_mm),
        )
        if not self.val_cases:
            logger.warning("No validation case: the last weights are exported, and no validation metric is measured.")

    def build_model(self, resume: bool) -> None:
        """The network (seeded; ``init_weights`` unless resuming), its DDP wrapper, AdamW, the warmup-cosine
        schedule, the gradient scaler, the loss and the patch sampler."""
        import torch

        from SyntheticCTLib.models.architectures import build_network

        config, tc, dist, device = self.config, self.tc, self.dist, self.device
        torch.manual_seed(config.seed)
        kwargs = dict(config.model.kwargs)
        kwargs["in_channels"] = self.n_channels
        network = build_network(config.model.architecture, **kwargs)
        self.init_info: Optional[Dict[str, Any]] = None
        if config.model.init_weights is not None and not resume:
            self.init_info = load_initial_weights(network, config)
        self.network = network.to(device)
        torch.manual_seed(config.seed + 1000 * (dist.rank + 1))
        self.model = self.network
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.network, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
        total_steps = self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, tc.warmup_steps, tc.min_lr_ratio)
        )
        self.use_amp = tc.amp and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.loss_fn = SynthesisLoss(
            bone_weight=config.loss.bone_weight,
            air_weight=config.loss.air_weight,
            gradient_weight=config.loss.gradient_weight,
            background_weight=config.loss.background_weight,
        )
        model = config.model
        air_target = (max(-1000.0, model.output_clip[0]) - model.output_offset) / model.output_scale
        self.sampler = PatchSampler(
            self.train_cases,
            bone_fraction=tc.bone_fraction,
            air_fraction=tc.air_fraction,
            seed=config.seed,
            air_target=air_target,
        )

    def restore(self) -> None:
        """Restore the weights, optimiser, schedule, scaler, histories and best epoch from ``last.pt``."""
        tc, dist, path = self.tc, self.dist, self.checkpoint_path
        ckpt = _load_checkpoint(path)
        if ckpt.get("fingerprint") != self.fingerprint:
            raise TrainingError(
                f"--resume: the checkpoint '{path}' was written with another configuration (model, data, "
                "schedule, loss, augmentation or seed differ); resume with the configuration that started the run."
            )
        if int(ckpt.get("world_size", 1)) * int(ckpt.get("batch_size", tc.batch_size)) != dist.world * tc.batch_size:
            logger.warning(
                "Resuming with another global batch size (%d x %d before, %d x %d now).",
                ckpt.get("world_size"),
                ckpt.get("batch_size"),
                dist.world,
                tc.batch_size,
            )
        self.network.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.history = list(ckpt.get("history", []))
        self.step_rows = [dict(r) for r in ckpt.get("steps", []) if int(r["step"]) <= self.step]
        self.best = dict(ckpt.get("best", self.best))
        self.prior_elapsed = float(ckpt.get("elapsed_s", 0.0))
        logger.info(
            "Resuming at step %d of %d (epoch %d).", self.step, self.total_steps, self.step // tc.steps_per_epoch + 1
        )

    # -- checkpoints -------------------------------------------------------------------------------------------

    def checkpoint_state(self) -> Dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint,
            "step": self.step,
            "epoch": self.step // self.tc.steps_per_epoch,
            "model": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "history": self.history,
            "steps": self.step_rows,
            "best": self.best,
            "world_size": self.dist.world,
            "batch_size": self.tc.batch_size,
            "elapsed_s": self.prior_elapsed + time.time() - self.started,
        }

    def save_last(self) -> None:
        if self.dist.is_main:
            _save_checkpoint(self.checkpoint_path, self.checkpoint_state())
            _write_csv(self.out / "steps.csv", STEP_COLUMNS, self.step_rows)

    # -- the loop ----------------------------------------------------------------------------------------------

    def loop(self) -> None:
        """Run the steps from the current one to the last, ending each epoch; on cancel, checkpoint and re-raise."""
        tc = self.tc
        self.val_epochs = [
            e for e in range(tc.epochs) if (e + 1) % self.config.validation.every_epochs == 0 or e == tc.epochs - 1
        ]
        self.loop_start = time.time()
        self.loop_start_step = self.step
        self.val_seconds = 0.0  # validation time so far, for the ETA
        self.n_validations = 0
        try:
            while self.step < self.total_steps:
                epoch = self.step // tc.steps_per_epoch
                lr = self.train_step(epoch)
                self.report_step(epoch, lr)
                if self.step % tc.checkpoint_every == 0 and self.step % tc.steps_per_epoch != 0:
                    self.save_last()
                if self.step % tc.steps_per_epoch == 0:
                    self.end_epoch(epoch, lr)
        except Cancelled:
            logger.warning("Training cancelled at step %d; checkpoint saved, continue with --resume.", self.step)
            self.save_last()
            raise

    def train_step(self, epoch: int) -> float:
        """One optimiser step on this rank's share of the step's global batch; returns the step's learning rate."""
        import torch

        tc, dist = self.tc, self.dist
        in_epoch = self.step % tc.steps_per_epoch
        first = in_epoch * self.global_batch + dist.rank * tc.batch_size
        indices = list(range(first, first + tc.batch_size))
        image, target, body, bone, air = make_batch(self.sampler, self.config, epoch, indices, self.device)
        self.model.train()
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            prediction = self.model(image)
        terms = self.loss_fn(prediction, target, body, bone, air)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms.total).backward()
        if tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step()
        self.step += 1
        loss_value = dist.mean(float(terms.total.detach()))
        l1_value = dist.mean(terms.l1)
        gdl_value = dist.mean(terms.gradient)
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"The training loss became {loss_value} at step {self.step}; lower "
                "training.learning_rate or check the data."
            )
        self.step_rows.append(
            {"step": self.step, "epoch": epoch + 1, "loss": loss_value, "l1": l1_value, "gradient": gdl_value, "lr": lr}
        )
        return lr

    def report_step(self, epoch: int, lr: float) -> None:
        """Report the step, its loss and learning rate, and the ETA (the remaining steps and validations)."""
        tc, step, total_steps = self.tc, self.step, self.total_steps
        done = step - self.loop_start_step
        per_step = (time.time() - self.loop_start - self.val_seconds) / max(done, 1)
        n_val = len(self.val_cases)
        remaining_vals = sum(1 for e in self.val_epochs if (e + 1) * tc.steps_per_epoch >= step) if n_val else 0
        per_validation = self.val_seconds / self.n_validations if self.n_validations else 0.0
        eta = per_step * (total_steps - step) + per_validation * remaining_vals
        self.report(
            step / total_steps,
            "train",
            f"epoch {epoch + 1}/{tc.epochs} step {step}/{total_steps} "
            f"loss {self.step_rows[-1]['loss']:.4f} lr {lr:.2e} ETA {_format_eta(eta)}",
        )

    def end_epoch(self, epoch: int, lr: float) -> None:
        """The epoch's row (mean losses; validation when due), then ``last.pt``, ``metrics.csv`` and the curves."""
        tc = self.tc
        losses = [[r["loss"], r["l1"], r["gradient"]] for r in self.step_rows if r["epoch"] == epoch + 1]
        row = _epoch_row(epoch, self.step, lr, losses, self.prior_elapsed + time.time() - self.started)
        if epoch in self.val_epochs and self.val_cases:
            self.validate_epoch(epoch, row)
        else:
            logger.info("Epoch %d/%d (step %d): loss %.4f", epoch + 1, tc.epochs, self.step, row["train_loss"])
        self.history.append(row)
        if self.dist.is_main:
            self.save_last()
            _write_csv(self.out / "metrics.csv", EPOCH_COLUMNS, self.history)
            plot_learning_curves(self.out / "learning_curves.png", self.step_rows, self.history)

    def validate_epoch(self, epoch: int, row: Dict[str, Any]) -> None:
        """Score the recalibrated weights on the validation cases (rank 0) into ``row``; keep ``best.pt``."""
        tc, step, out, dist, device = self.tc, self.step, self.out, self.dist, self.device
        n_val = len(self.val_cases)
        t0 = time.time()
        self.report(step / self.total_steps, "train", f"epoch {epoch + 1}/{tc.epochs}: validating on {n_val} case(s)")
        if dist.is_main:
            evaluated = recalibrated_copy(self.network, self.sampler, self.config, device)
            result = validate(
                evaluated,
                self.config,
                self.train_cases,
                self.val_cases,
                out / "validation_package",
                self.manifests,
                device,
            )
            mean = result["mean"]
            row.update({f"val_{k}": mean[k] for k in VALIDATION_KEYS})
            row["val_cases"] = result["cases"]
            score = selection_score(mean, self.config.validation.select_by)
            if score < self.best["score"] or self.best["epoch"] is None:
                self.best = {"epoch": epoch + 1, "step": step, "score": score, "metrics": mean}
                row["best"] = 1
                _save_checkpoint(
                    out / "checkpoints" / "best.pt",
                    {
                        "model": evaluated.state_dict(),
                        "epoch": epoch + 1,
                        "step": step,
                        "metrics": mean,
                        "fingerprint": self.fingerprint,
                    },
                )
            logger.info(
                "Epoch %d/%d (step %d): loss %.4f; validation MAE %.1f HU, ME %.1f HU, PSNR %.2f "
                "dB, SSIM %.3f, bone Dice %.3f, surface mean %.3f mm, p95 %.3f mm%s",
                epoch + 1,
                tc.epochs,
                step,
                row["train_loss"],
                mean["mae_hu"],
                mean["me_hu"],
                mean["psnr_db"],
                mean["ssim"],
                mean["bone_dice"],
                mean["surface_mean_mm"],
                mean["surface_p95_mm"],
                " (best)" if row.get("best") else "",
            )
        dist.barrier()
        row["val_time_s"] = time.time() - t0
        self.val_seconds += row["val_time_s"]
        self.n_validations += 1

    # -- export ------------------------------------------------------------------------------------------------

    def finish(self) -> TrainResult:
        """Check that the ranks agree; on rank 0, export the best (else the last, recalibrated) weights as the
        package ``model/`` with its card, and write ``training_summary.json``."""

        config, dist, out, best = self.config, self.dist, self.out, self.best
        checksums = dist.gather(state_dict_sha256(self.network.state_dict()))
        if dist.enabled and len(set(checksums)) != 1:
            logger.error("The ranks ended with different weights: %s", checksums)
        elapsed = self.prior_elapsed + time.time() - self.started
        package_dir = None
        summary: Dict[str, Any] = {}
        if dist.is_main:
            final_state = recalibrated_copy(self.network, self.sampler, config, self.device).state_dict()
            if best.get("epoch") is not None and (out / "checkpoints" / "best.pt").is_file():
                final_state = _load_checkpoint(out / "checkpoints" / "best.pt")["model"]
            card = build_card(
                config,
                self.train_cases,
                manifests=self.manifests,
                validation_metrics=_validation_block(best, self.val_cases),
                summary=self.card_summary(elapsed),
            )
            package_dir = export_package(out / "model", card, final_state)
            summary = {
                "model": config.model.name,
                "package": str(package_dir),
                "steps": self.total_steps,
                "wall_time_s": round(elapsed, 1),
                "best": best,
                "rank_weight_sha256": checksums,
                "train_cases": [c.name for c in self.train_cases],
                "validation_cases": [c.name for c in self.val_cases],
                "cases": {c.name: c.info for c in self.prepared},
                "history": self.history,
                "config": config.to_dict(),
            }
            write_json(out / "training_summary.json", summary)
            logger.info("Training done in %s; model package written to '%s'.", _format_eta(elapsed), package_dir)
        dist.barrier()
        self.report(1.0, "train", "done")
        return TrainResult(
            output_dir=out,
            package_dir=package_dir,
            steps=self.step,
            best_epoch=best.get("epoch"),
            best_metrics=dict(best.get("metrics") or {}),
            history=self.history,
            elapsed_s=elapsed,
            summary=summary,
        )

    def card_summary(self, elapsed: float) -> Dict[str, Any]:
        """The model card's training summary: the data, the schedule, the selection and the registrations."""
        tc, best = self.tc, self.best
        selection = (
            f"best epoch {best.get('epoch')} by validation bone-surface p95."
            if best.get("epoch")
            else "no validation: last weights."
        )
        return {
            "text": (
                f"{len(self.train_cases)} training case(s), {len(self.val_cases)} validation case(s); "
                f"{self.total_steps} steps of {self.global_batch} patch(es) of {list(tc.patch_size)} voxels; "
                + selection
            ),
            "steps": self.total_steps,
            "epochs": tc.epochs,
            "global_batch": self.global_batch,
            "world_size": self.dist.world,
            "patch_size": list(tc.patch_size),
            "seed": self.config.seed,
            "device": str(self.device),
            "wall_time_s": round(elapsed, 1),
            "best_epoch": best.get("epoch"),
            "validation_cases": [c.name for c in self.val_cases],
            "initialized_from": self.init_info,
            "registration": {
                c.name: {
                    "metric_value": c.info["registration"]["metric_value"],
                    "outlier": bool(c.info.get("registration_outlier")),
                }
                for c in self.prepared
                if c.info.get("registration")
            },
            "config": self.config.source.name,
        }


def _epoch_row(epoch: int, step: int, lr: float, losses: List[List[float]], elapsed: float) -> Dict[str, Any]:
    arr = np.array(losses, dtype=float) if losses else np.full((1, 3), np.nan)
    return {
        "epoch": epoch + 1,
        "step": step,
        "lr": lr,
        "train_loss": float(arr[:, 0].mean()),
        "train_l1": float(arr[:, 1].mean()),
        "train_gradient": float(arr[:, 2].mean()),
        "elapsed_s": elapsed,
        "best": 0,
    }


def _validation_block(best: Dict[str, Any], val_cases: Sequence[PreparedCase]) -> Dict[str, Any]:
    if best.get("epoch") is None:
        return {}
    block = {k: round(float(v), 4) for k, v in (best.get("metrics") or {}).items()}
    block["cases"] = [c.name for c in val_cases]
    block["epoch"] = best["epoch"]
    block["note"] = (
        "Mean over the validation cases, used for model selection (lowest bone-surface p95); "
        "see the model card for metrics on held-out cases."
    )
    return block
