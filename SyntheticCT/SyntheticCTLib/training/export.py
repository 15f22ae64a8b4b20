"""Export a trained network as a model package that ``syntheticct models add`` accepts as it is.

The card (``model.json``) is built from the training configuration and the prepared training data:
the inputs (echo times of phantom cases), the distinct acquisition protocols of all training cases
(``training_data.protocols``: field strength, echo times, TR, flip angle), the normalisation the training used, the working spacing,
the HU output mapping, patch size and overlap, the training summary with ``input_statistics`` (p1,
p50 and p99 of the raw intensities inside the body, per channel), the spacing and field-of-view ranges
of the training data, and the validation metrics. :func:`SyntheticCTLib.models.package.write_model_package`
writes the weights (safetensors) and their SHA-256.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.models.package import write_model_package
from SyntheticCTLib.training.config import TrainingConfig
from SyntheticCTLib.training.data import PreparedCase, normalization_specs

logger = logging.getLogger(__name__)


def describe_inputs(
    config: TrainingConfig, cases: Sequence[PreparedCase], manifests: Sequence[Mapping[str, Any]], n_channels: int
) -> List[Dict[str, Any]]:
    """The card's ``inputs``: the configured ones, the echoes of phantom cases, or generic channel names."""
    if config.model.inputs:
        return [dict(i) for i in config.model.inputs]
    for manifest in manifests:
        params = manifest.get("parameters") or {}
        echo_times = params.get("echo_times_ms") or manifest.get("echo_times_ms")
        if echo_times and len(echo_times) == n_channels:
            field = params.get("field_strength") or params.get("field_strength_t")
            sequence = config.export.sequence or "3D multi-echo gradient echo (MEGRE), magnitude"
            inputs = []
            for k, te in enumerate(echo_times):
                entry = {"name": f"echo{k + 1}", "sequence": sequence, "echo": k + 1, "echo_time_ms": float(te)}
                if field:
                    entry["field_strength_t"] = float(field)
                inputs.append(entry)
            return inputs
    return [{"name": f"channel{k + 1}", "sequence": config.export.sequence or "MRI"} for k in range(n_channels)]


def _acquisition_number(value: Any, digits: int) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
        return None
    return round(float(value), digits)


def training_protocols(manifests: Sequence[Mapping[str, Any]], n_channels: int) -> List[Dict[str, Any]]:
    """The card's ``training_data.protocols``: the distinct acquisitions of the training cases.

    Each case's manifest gives its acquisition (a phantom's ``parameters``: ``field_strength_t``,
    ``echo_times_ms``, ``tr_ms``, ``flip_angle_deg``; one's own ``case.json``: the same keys at its top
    level, those it has). Echo times are rounded to 0.01 ms, the field strength to 0.1 T, TR to 0.1 ms and
    the flip angle to 0.1 degree; equal acquisitions are listed once, with their number of ``cases``,
    sorted by field strength and echo times. Cases without ``n_channels`` echo times are left out.
    """
    counts: Dict[tuple, int] = {}
    for manifest in manifests:
        if not isinstance(manifest, Mapping):
            continue
        params = manifest.get("parameters")
        merged = {
            **manifest,
            **{k: v for k, v in (params if isinstance(params, Mapping) else {}).items() if v is not None},
        }
        get = merged.get
        tes = get("echo_times_ms")
        if not isinstance(tes, (list, tuple)) or len(tes) != n_channels:
            continue
        rounded = tuple(_acquisition_number(t, 2) for t in tes)
        if any(t is None for t in rounded):
            continue
        field = get("field_strength_t")
        if field is None:
            field = get("field_strength")
        key = (
            _acquisition_number(field, 1),
            rounded,
            _acquisition_number(get("tr_ms"), 1),
            _acquisition_number(get("flip_angle_deg"), 1),
        )
        counts[key] = counts.get(key, 0) + 1
    protocols = []
    for (field, tes, tr, flip), n in sorted(counts.items(), key=lambda kv: (kv[0][0] or 0.0, kv[0][1], str(kv[0][2:]))):
        entry: Dict[str, Any] = {"field_strength_t": field, "echo_times_ms": list(tes)}
        if tr is not None:
            entry["tr_ms"] = tr
        if flip is not None:
            entry["flip_angle_deg"] = flip
        entry["cases"] = n
        protocols.append(entry)
    return protocols


def _range(values: Sequence[Sequence[float]]) -> Dict[str, List[float]]:
    array = np.asarray(values, dtype=float)
    return {
        "min": [round(float(v), 4) for v in array.min(axis=0)],
        "max": [round(float(v), 4) for v in array.max(axis=0)],
    }


def pooled_input_statistics(
    cases: Sequence[PreparedCase], per_case_voxels: int = 200_000, seed: int = 0
) -> List[Dict[str, float]]:
    """p1, p50 and p99 of each channel's raw intensities inside the body, pooled over ``cases``."""

    rng = np.random.default_rng(seed)
    n_channels = len(cases[0].mri)
    pooled: List[List[np.ndarray]] = [[] for _ in range(n_channels)]
    for case in cases:
        index = np.flatnonzero(case.body.ravel())
        if index.size > per_case_voxels:
            index = rng.choice(index, per_case_voxels, replace=False)
        for c, image in enumerate(case.mri):
            pooled[c].append(sitk.GetArrayViewFromImage(image).ravel()[index])
    stats = []
    for values in pooled:
        p1, p50, p99 = np.percentile(np.concatenate(values), [1, 50, 99])
        stats.append({"p1": round(float(p1), 4), "p50": round(float(p50), 4), "p99": round(float(p99), 4)})
    return stats


def build_card(
    config: TrainingConfig,
    train_cases: Sequence[PreparedCase],
    *,
    manifests: Sequence[Mapping[str, Any]] = (),
    validation_metrics: Optional[Mapping[str, Any]] = None,
    summary: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """``model.json`` content (without ``weights``) for a network trained with ``config`` on ``train_cases``."""
    n_channels = len(train_cases[0].mri)
    inputs = describe_inputs(config, train_cases, manifests, n_channels)
    kwargs = dict(config.model.kwargs)
    kwargs["in_channels"] = n_channels
    patch = list(config.model.patch_size or config.training.patch_size)
    spacing_xyz = [float(s) for s in config.data.spacing_mm]
    training_data: Dict[str, Any] = {
        "summary": (summary or {}).get("text", "") if summary else "",
        "cases": len(train_cases),
        "case_names": [c.name for c in train_cases],
        "input_statistics": pooled_input_statistics(train_cases, seed=config.seed),
        "protocols": training_protocols(manifests, n_channels),
        "spacing_mm": _range([c.info["source_spacing_mm"] for c in train_cases]),
        "fov_mm": _range([c.info["source_fov_mm"] for c in train_cases]),
        "working_spacing_mm": spacing_xyz,
        "training_command": f"syntheticct train --config {config.source.name}",
        "config_sha256": _file_sha256(config.source),
    }
    if not training_data["protocols"]:  # nothing known: the card's inputs[].echo_time_ms speak (if any)
        del training_data["protocols"]
    if summary:
        training_data.update({k: v for k, v in summary.items() if k != "text"})
    card: Dict[str, Any] = {
        "name": config.model.name,
        "version": config.model.version,
        "description": config.model.description
        or f"Synthetic CT model '{config.model.name}' trained with `syntheticct train`.",
        "license": config.export.license,
        "intended_use": config.export.intended_use,
        "architecture": {"name": config.model.architecture, "kwargs": kwargs},
        "inputs": inputs,
        "spacing_mm": spacing_xyz,
        "orientation": "input",
        "normalization": normalization_specs(config, n_channels),
        "output": {
            "scale": config.model.output_scale,
            "offset": config.model.output_offset,
            "clip": [float(config.model.output_clip[0]), float(config.model.output_clip[1])],
        },
        "patch_size": [int(p) for p in patch],
        "overlap": float(config.model.overlap),
        "training_data": training_data,
        "validation_metrics": dict(validation_metrics or {}),
    }
    if config.export.anatomy:
        card["anatomy"] = config.export.anatomy
    return card


def export_package(out_dir: Path, card: Mapping[str, Any], state_dict: Mapping[str, Any]) -> Path:
    """Write the package (replacing one already there) and return its folder."""

    clean = {_strip(k): v for k, v in state_dict.items()}
    return write_model_package(Path(out_dir), card, clean, overwrite=True)


def _file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def _strip(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def state_dict_sha256(state_dict: Mapping[str, Any]) -> str:
    """SHA-256 over the tensors of a state dict (sorted by name): equal weights give equal digests."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        digest.update(_strip(key).encode())
        array = value.detach().to("cpu").contiguous().numpy() if hasattr(value, "detach") else np.asarray(value)
        digest.update(str(array.dtype).encode() + str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
