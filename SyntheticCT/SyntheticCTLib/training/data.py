"""Training data: cases, CT-to-MRI alignment, resampling to the working spacing, and patch sampling.

A case is MRI channel files plus the CT of the same patient. Each case is prepared once:

1. the MRI channels are read (the others resampled onto the first channel's grid when they differ)
   and resampled to the model's working spacing, keeping the MRI field of view and direction;
2. the CT is registered to the MRI when the configuration asks for it (rigid, then optionally
   affine, with :func:`SyntheticCTLib.registration.registration.register`), and resampled onto that
   MRI grid; the registration metric is logged, and outliers among the cases are flagged;
3. the body mask (:func:`SyntheticCTLib.kernel.masks.mri_body_mask`) and the per-channel normalisation
   (:func:`SyntheticCTLib.synthesis.normalization.normalize_channels`) are exactly those the product's inference uses.

Prepared cases are cached under ``output_dir/prepared`` (rank 0 writes, the other ranks read).
:class:`PatchSampler` draws training patches confined to the body, centred on a bone voxel with
probability ``bone_fraction``; sample ``i`` of epoch ``e`` is a pure function of ``(seed, e, i)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.acquisition import Acquisition, acquisition_for_files
from SyntheticCTLib.kernel.errors import SyntheticCTError
from SyntheticCTLib.kernel.geometry import resample_like, resample_to_spacing, same_grid
from SyntheticCTLib.kernel.hu import CT_MIN_HU
from SyntheticCTLib.kernel.io import atomic_output, read_volume
from SyntheticCTLib.kernel.masks import fill_holes, mri_body_mask
from SyntheticCTLib.kernel.progress import ProgressCallback, no_progress, scaled
from SyntheticCTLib.registration.registration import register
from SyntheticCTLib.synthesis.input_check import input_statistics
from SyntheticCTLib.synthesis.normalization import normalize_channels
from SyntheticCTLib.training.config import CaseSpec, ConfigError, PhantomSpec, TrainingConfig, check_architecture

logger = logging.getLogger(__name__)

INTERNAL_AIR_HU = -400.0
"""CT below this inside the body is air (bowel gas, lung): dark in MRI like cortical bone, the classic confusion."""
PREPARED_VERSION = 2
DEFAULT_NORMALIZATION = {"method": "percentile", "lower": 0.5, "upper": 99.5, "mask": "body"}


@dataclass
class PreparedCase:
    """A case on the model's working grid (the MRI grid at the working spacing)."""

    name: str
    mri: List[sitk.Image]  # raw MRI channels, float32
    ct: sitk.Image  # HU, float32, on the MRI grid
    image: np.ndarray  # (C, Z, Y, X) float32, normalised as the inference normalises
    target: np.ndarray  # (Z, Y, X) float32, network units: (HU - offset) / scale
    body: np.ndarray  # (Z, Y, X) bool, the inference's body mask
    bone: np.ndarray  # (Z, Y, X) bool, CT above the bone threshold
    info: Dict[str, Any] = field(default_factory=dict)  # registration, statistics, source geometry
    air: Optional[np.ndarray] = None  # (Z, Y, X) bool, air inside the body (CT below INTERNAL_AIR_HU)

    @property
    def spacing(self) -> Tuple[float, float, float]:
        return tuple(float(s) for s in self.mri[0].GetSpacing())


# ----------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------


def read_case_manifest(path: Path) -> CaseSpec:
    """A case from a ``case.json`` (or its folder), named after the folder.

    Phantom manifests (with ``labels``) are read by :func:`SyntheticCTLib.phantom.load_case`; a minimal
    manifest of one's own data needs only ``{"mri": ["echo1.nii.gz", ...], "ct": "ct.nii.gz"}`` (optionally
    ``"bone_labels"``, and the acquisition: ``"echo_times_ms"`` and ``"field_strength_t"``, read by
    :func:`case_acquisition`), file names relative to the manifest's folder.

    Raises
    ------
    ConfigError
        No manifest, invalid JSON, a missing key or a missing file; the message names it.
    """
    path = Path(path)
    manifest_path = path / "case.json" if path.is_dir() else path
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"No case manifest at '{manifest_path}'.") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"Could not read the case manifest '{manifest_path}': {e}") from e
    if not isinstance(manifest, dict):
        raise ConfigError(f"The case manifest '{manifest_path}' is not a JSON object.")
    name = manifest_path.parent.name
    if "labels" in manifest:
        from SyntheticCTLib.kernel.errors import VolumeReadError
        from SyntheticCTLib.phantom import load_case

        try:
            case = load_case(manifest_path)
        except VolumeReadError as e:
            raise ConfigError(str(e)) from e
        bone = case.bone_labels_path
        return CaseSpec(
            name=name,
            mri=[Path(p) for p in case.mri_paths],
            ct=Path(case.ct_path),
            bone_labels=Path(bone) if bone else None,
            manifest=dict(case.manifest),
        )
    mri = manifest.get("mri")
    if isinstance(mri, str):
        mri = [mri]
    if not isinstance(mri, list) or not mri or not all(isinstance(m, str) and m for m in mri):
        raise ConfigError(f"'mri' in '{manifest_path}' must be a non-empty list of file names.")

    def resolve(value: Any, key: str) -> Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"'{key}' in '{manifest_path}' must be a file name.")
        file = manifest_path.parent / value
        if not file.exists():
            raise ConfigError(f"The case manifest '{manifest_path}' names '{value}' ({key}), which does not exist.")
        return file

    bone = manifest.get("bone_labels")
    return CaseSpec(
        name=name,
        mri=[resolve(m, "mri") for m in mri],
        ct=resolve(manifest.get("ct"), "ct"),
        bone_labels=resolve(bone, "bone_labels") if bone else None,
        manifest=manifest,
    )


_case_from_manifest = read_case_manifest


def case_acquisition(case: CaseSpec) -> Optional[Acquisition]:
    """The echo times and field strength of a case's MRI: from its manifest (a phantom's ``case.json``
    ``parameters``, or ``"echo_times_ms"`` and ``"field_strength_t"`` in one's own), else from the MRI
    files' JSON sidecars (:func:`SyntheticCTLib.kernel.acquisition.acquisition_for_files`); None when unknown.
    """
    return acquisition_for_files(case.mri, case.manifest or None, f"the case.json of '{case.name}'")


def find_cases(folder: Path) -> List[CaseSpec]:
    """Cases of a ``case.json``, of a folder holding one, or of a folder of such folders (sorted by name)."""
    folder = Path(folder)
    if folder.is_file() or (folder / "case.json").is_file():
        return [_case_from_manifest(folder)]
    if not folder.is_dir():
        raise ConfigError(f"No case folder or case.json at '{folder}'.")
    found = [_case_from_manifest(sub) for sub in sorted(folder.iterdir()) if (sub / "case.json").is_file()]
    if not found:
        raise ConfigError(f"'{folder}' holds no case (no case.json in it or in its sub-folders).")
    return found


def phantom_case_name(spec: PhantomSpec, seed: int) -> str:
    """The case name of a generated phantom: ``phantom_seed0007`` or ``phantom_<group>_seed0007``."""
    return f"phantom_{spec.name}_seed{seed:04d}" if spec.name else f"phantom_seed{seed:04d}"


def _phantom_folder(config: TrainingConfig, spec: PhantomSpec, seed: int) -> Path:
    return config.output_dir / spec.folder / phantom_case_name(spec, seed)


def _phantom_key(spec: PhantomSpec, seed: int) -> Dict[str, Any]:
    return {"seed": int(seed), "size": list(spec.size), "spacing": float(spec.spacing), "options": spec.options}


def generate_phantom_cases(config: TrainingConfig, *, progress: Optional[ProgressCallback] = None) -> None:
    """Write the configured phantom cases under ``output_dir`` (skipping those already written alike)."""
    report = progress or no_progress
    jobs = [(spec, seed) for spec in config.data.phantoms for seed in spec.train_seeds + spec.validation_seeds]
    for i, (spec, seed) in enumerate(jobs):
        folder = _phantom_folder(config, spec, seed)
        stamp = folder / "training_key.json"
        key = _phantom_key(spec, seed)
        if (
            (folder / "case.json").is_file()
            and stamp.is_file()
            and json.loads(stamp.read_text(encoding="utf-8")) == key
        ):
            continue
        from SyntheticCTLib.phantom import make_phantom, write_phantom

        report(i / len(jobs), "phantoms", f"phantom seed {seed}")
        logger.info("Generating phantom seed %d, size %s at %g mm.", seed, list(spec.size), spec.spacing)
        phantom = make_phantom(seed, size=tuple(spec.size), spacing=spec.spacing, **spec.options)
        write_phantom(phantom, folder)
        stamp.write_text(json.dumps(key))
    report(1.0, "phantoms", "")


def collect_cases(config: TrainingConfig) -> Tuple[List[CaseSpec], List[CaseSpec]]:
    """The training and validation cases of a configuration (phantom cases must already be written).

    Validation cases: the phantom validation seeds, the named ``validation_cases``, or a seeded random
    ``validation_fraction`` of the others.
    """
    data = config.data
    cases: List[CaseSpec] = list(data.cases)
    for folder in data.case_folders:
        cases.extend(find_cases(folder))
    validation_names = set(data.validation_cases)
    for spec in data.phantoms:
        for seed in list(spec.train_seeds) + list(spec.validation_seeds):
            case = _case_from_manifest(_phantom_folder(config, spec, seed))
            case.name = phantom_case_name(spec, seed)
            cases.append(case)
            if seed in spec.validation_seeds:
                validation_names.add(case.name)
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            f"{config.source}: several cases are named {duplicates}; case names must be unique "
            "(give explicit names, or keep case folders under different names)."
        )
    unknown = sorted(set(data.validation_cases) - set(names))
    if unknown:
        raise ConfigError(
            f"{config.source}: data.validation_cases names unknown case(s) {unknown}; the cases are: {names}."
        )
    counts = {c.name: len(c.mri) for c in cases}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"{config.source}: the cases have different numbers of MRI channels: {counts}.")
    check_architecture(config, next(iter(counts.values())))
    if not validation_names and data.validation_fraction > 0 and len(cases) > 1:
        rng = np.random.default_rng(config.seed)
        n_val = max(1, int(round(data.validation_fraction * len(cases))))
        n_val = min(n_val, len(cases) - 1)
        validation_names = {cases[i].name for i in rng.permutation(len(cases))[:n_val]}
    train = [c for c in cases if c.name not in validation_names]
    validation = [c for c in cases if c.name in validation_names]
    if not train:
        raise ConfigError(f"{config.source}: no training case is left after the validation split.")
    return train, validation


# ----------------------------------------------------------------------------------------------------------------
# Preparation: read, align, resample, normalise
# ----------------------------------------------------------------------------------------------------------------


def read_mri_channels(paths: Sequence[Path]) -> List[sitk.Image]:
    """Read MRI channels as float32; channels on another grid are resampled onto the first one's grid."""
    images = [sitk.Cast(read_volume(p), sitk.sitkFloat32) for p in paths]
    for i in range(1, len(images)):
        if not same_grid(images[0], images[i]):
            logger.warning("MRI channel '%s' is not on the grid of '%s'; resampling it (linear).", paths[i], paths[0])
            images[i] = resample_like(images[i], images[0])
    return images


def align_ct_to_mri(
    mri: sitk.Image,
    ct: sitk.Image,
    mode: str,
    *,
    mri_mask: Optional[sitk.Image] = None,
    progress: Optional[ProgressCallback] = None,
) -> Tuple[sitk.Transform, Dict[str, Any]]:
    """Register the CT (moving) to the MRI (fixed): rigid, then affine when ``mode == "affine"``.

    Returns the transform (MRI points -> CT points, ITK resampling convention) and a summary dict
    (``metric_value``, ``metric``, ``iterations``, ``elapsed_s`` per stage).
    """

    report = progress or no_progress
    rigid = register(mri, ct, mode="rigid", fixed_mask=mri_mask, progress=scaled(report, 0.0, 0.5))
    info: Dict[str, Any] = {
        "rigid": _registration_summary(rigid),
        "metric_value": float(rigid.metric_value),
        "metric": str(getattr(rigid, "metric", "")),
    }
    transform = rigid.transform
    if mode == "affine":
        # Refine on the rigidly resampled CT, then compose: p -> rigid(affine(p)).
        ct_rigid = resample_like(ct, mri, transform=transform, default_value=CT_MIN_HU)
        affine = register(mri, ct_rigid, mode="affine", fixed_mask=mri_mask, progress=scaled(report, 0.5, 1.0))
        composite = sitk.CompositeTransform(transform)
        composite.AddTransform(affine.transform)
        transform = composite
        info["affine"] = _registration_summary(affine)
        info["metric_value"] = float(affine.metric_value)
    report(1.0, "align", "")
    return transform, info


def _registration_summary(result: Any) -> Dict[str, Any]:
    out = {}
    for key in ("mode", "metric", "metric_value", "iterations", "elapsed_s"):
        value = getattr(result, key, None)
        if isinstance(value, (np.floating, np.integer)):
            value = value.item()
        out[key] = value
    return out


def flag_registration_outliers(metrics: Dict[str, float], z_limit: float) -> List[str]:
    """Cases whose registration metric is worse (higher: ITK metrics are minimised) than the others.

    A robust z-score, ``0.6745 (v - median) / MAD``, above ``z_limit`` flags a case. Needs 3 cases or more.
    """
    if len(metrics) < 3:
        return []
    names = list(metrics)
    values = np.array([metrics[n] for n in names], dtype=float)
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    if mad <= 1e-12:
        return []
    z = 0.6745 * (values - median) / mad
    return [n for n, score in zip(names, z) if score > z_limit]


def normalization_specs(config: TrainingConfig, n_channels: int) -> List[Dict[str, Any]]:
    """One normalisation spec per channel (the configured one(s), or 0.5-99.5 percentiles in the body)."""
    specs = config.model.normalization or [dict(DEFAULT_NORMALIZATION)]
    if len(specs) == 1:
        specs = [dict(specs[0]) for _ in range(n_channels)]
    return [dict(s) for s in specs]


def native_body_mask(mri_native: Sequence[sitk.Image], working_grid: sitk.Image) -> sitk.Image:
    """The body mask as the inference makes it: on the input grid, then nearest-neighbour onto the model grid."""

    body = np.asarray(mri_body_mask([sitk.GetArrayViewFromImage(im) for im in mri_native])).astype(np.uint8)
    image = sitk.GetImageFromArray(body)
    image.CopyInformation(mri_native[0])
    if same_grid(image, working_grid):
        return image
    return resample_like(image, working_grid, interpolator=sitk.sitkNearestNeighbor)


def body_mask_and_normalize(
    mri: Sequence[sitk.Image], specs: Sequence[Dict[str, Any]], body: Optional[np.ndarray] = None
):
    """The body mask (the inference's; computed here when not given) and the normalised stack ``(C, Z, Y, X)``."""

    arrays = [sitk.GetArrayFromImage(im).astype(np.float32) for im in mri]
    if body is None:
        body = np.asarray(mri_body_mask(arrays)).astype(bool)
    if not body.any():
        body = np.ones(body.shape, dtype=bool)
    normalized = normalize_channels(arrays, body, list(specs))
    image = np.stack([np.asarray(a, dtype=np.float32) for a in normalized], axis=0)
    return body, image


def _file_key(path: Path) -> List[Any]:
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_size, int(st.st_mtime_ns)]


def _prepare_key(case: CaseSpec, config: TrainingConfig) -> str:
    payload = {
        "version": PREPARED_VERSION,
        "mri": [_file_key(p) for p in case.mri],
        "ct": _file_key(case.ct),
        "spacing": list(config.data.spacing_mm),
        "align": config.data.align,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _cache_folder(config: TrainingConfig, case: CaseSpec) -> Path:
    return config.output_dir / "prepared" / case.name


def _load_cached(folder: Path, key: str, n_channels: int) -> Optional[tuple]:
    meta_path = folder / "prepared.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("key") != key:
        return None
    try:
        mri = [sitk.ReadImage(str(folder / f"mri_{i}.mha"), sitk.sitkFloat32) for i in range(n_channels)]
        ct = sitk.ReadImage(str(folder / "ct.mha"), sitk.sitkFloat32)
        body = sitk.ReadImage(str(folder / "body.mha"), sitk.sitkUInt8)
    except RuntimeError:
        return None
    return mri, ct, body, meta["info"]


def _write_cached(
    folder: Path, key: str, mri: Sequence[sitk.Image], ct: sitk.Image, body: sitk.Image, info: dict
) -> None:

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(mri):
        with atomic_output(folder / f"mri_{i}.mha") as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=False)
    with atomic_output(folder / "ct.mha") as tmp:
        sitk.WriteImage(ct, str(tmp), useCompression=False)
    with atomic_output(folder / "body.mha") as tmp:
        sitk.WriteImage(body, str(tmp), useCompression=True)
    with atomic_output(folder / "prepared.json") as tmp:
        tmp.write_text(json.dumps({"key": key, "info": info}, indent=1))


def resample_case(case: CaseSpec, config: TrainingConfig, *, progress: Optional[ProgressCallback] = None) -> tuple:
    """Read a case, align the CT to the MRI if configured, and resample both to the working grid.

    Returns ``(mri, ct, body, info)``: the MRI channels and the CT (float32) on the working grid, the
    body mask (uint8 image, made as the inference makes it) and a summary (registration, source geometry).
    """
    report = progress or no_progress
    mri_native = read_mri_channels(case.mri)
    ct_native = sitk.Cast(read_volume(case.ct), sitk.sitkFloat32)
    spacing_xyz = tuple(float(s) for s in config.data.spacing_mm)
    mri = [sitk.Cast(resample_to_spacing(im, spacing_xyz), sitk.sitkFloat32) for im in mri_native]
    info: Dict[str, Any] = {
        "name": case.name,
        "mri": [str(p) for p in case.mri],
        "ct": str(case.ct),
        "source_spacing_mm": [float(s) for s in mri_native[0].GetSpacing()],
        "source_fov_mm": [float(n * s) for n, s in zip(mri_native[0].GetSize(), mri_native[0].GetSpacing())],
        "working_size": list(mri[0].GetSize()),
        "registration": None,
    }
    body = native_body_mask(mri_native, mri[0])
    transform: Optional[sitk.Transform] = None
    if config.data.align != "none":
        logger.info("Case '%s': registering the CT to the MRI (%s).", case.name, config.data.align)
        transform, info["registration"] = align_ct_to_mri(
            mri[0], ct_native, config.data.align, mri_mask=body, progress=scaled(report, 0.1, 0.9)
        )
        logger.info(
            "Case '%s': registration metric %.4f (%s).",
            case.name,
            info["registration"]["metric_value"],
            info["registration"].get("metric", ""),
        )
    ct = resample_like(ct_native, mri[0], transform=transform, default_value=CT_MIN_HU, pixel_type=sitk.sitkFloat32)
    report(1.0, "prepare", case.name)
    return mri, ct, body, info


def prepare_cases(
    config: TrainingConfig,
    cases: Sequence[CaseSpec],
    *,
    rank: int = 0,
    barrier=None,
    progress: Optional[ProgressCallback] = None,
) -> List[PreparedCase]:
    """Prepare (or read from the cache) every case; rank 0 writes the cache, the others wait then read it."""
    report = progress or no_progress
    keys = [_prepare_key(c, config) for c in cases]
    if rank == 0:
        for i, (case, key) in enumerate(zip(cases, keys)):
            folder = _cache_folder(config, case)
            if _load_cached(folder, key, len(case.mri)) is None:
                mri, ct, body, info = resample_case(
                    case, config, progress=scaled(report, i / len(cases), (i + 1) / len(cases))
                )
                _write_cached(folder, key, mri, ct, body, info)
    if barrier is not None:
        barrier()
    prepared = []
    specs = None
    for case, key in zip(cases, keys):
        cached = _load_cached(_cache_folder(config, case), key, len(case.mri))
        if cached is None:
            raise SyntheticCTError(
                f"The prepared data of case '{case.name}' is missing from '{_cache_folder(config, case)}'."
            )
        mri, ct, body, info = cached
        specs = specs or normalization_specs(config, len(mri))
        body_array = sitk.GetArrayFromImage(body).astype(bool)
        prepared.append(finish_case(case.name, mri, ct, info, config, specs, body=body_array))
    mark_registration_outliers(prepared, config.data.outlier_z)
    report(1.0, "prepare", "")
    return prepared


def mark_registration_outliers(cases: Sequence[PreparedCase], z_limit: float) -> List[str]:
    """Set ``info["registration_outlier"]`` on each registered case; log a warning for each outlier."""
    metrics = {c.name: float(c.info["registration"]["metric_value"]) for c in cases if c.info.get("registration")}
    outliers = flag_registration_outliers(metrics, z_limit)
    for case in cases:
        if case.info.get("registration"):
            case.info["registration_outlier"] = case.name in outliers
    for name in outliers:
        logger.warning(
            "Case '%s': registration metric %.4f is an outlier among the cases (median %.4f); check its "
            "CT-to-MRI alignment.",
            name,
            metrics[name],
            float(np.median(list(metrics.values()))),
        )
    return outliers


def internal_air_mask(hu: np.ndarray, threshold_hu: float = INTERNAL_AIR_HU) -> np.ndarray:
    """Air enclosed by tissue in a CT ``(z, y, x)``: bowel gas, lung; not the air around the body.

    Air is ``hu < threshold_hu``. It is internal where the tissue mask's holes are, filled in 3D and in each
    axial slice (a gas pocket cut by the field of view's top or bottom is still a hole in its slices). The
    MRI body mask is no test of this: it also covers a rim of the outside air along the skin, which
    outnumbers the gas voxels by tens to one.
    """

    air = hu < threshold_hu
    return fill_holes(~air) & air


def finish_case(
    name: str,
    mri: List[sitk.Image],
    ct: sitk.Image,
    info: Dict[str, Any],
    config: TrainingConfig,
    specs: Sequence[Dict[str, Any]],
    *,
    body: Optional[np.ndarray] = None,
) -> PreparedCase:
    """Body mask, normalised channels, target and bone mask of a resampled case."""
    body, image = body_mask_and_normalize(mri, specs, body)
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    clip = config.model.output_clip
    target = (np.clip(hu, clip[0], clip[1]) - config.model.output_offset) / config.model.output_scale
    bone = (hu > config.loss.bone_threshold_hu) & body
    air = internal_air_mask(hu) & body
    info = dict(info)
    info["input_statistics"] = input_statistics(mri, body)  # the input check's own statistics
    info["bone_voxels"] = int(bone.sum())
    info["body_voxels"] = int(body.sum())
    info["internal_air_voxels"] = int(air.sum())
    return PreparedCase(
        name=name,
        mri=list(mri),
        ct=ct,
        image=image,
        target=target.astype(np.float32),
        body=body,
        bone=bone,
        info=info,
        air=air,
    )


# ----------------------------------------------------------------------------------------------------------------
# Patch sampling
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Patch:
    """One training sample, larger than the patch by ``margin`` on each side when it will be rotated."""

    image: np.ndarray  # (C, d, h, w)
    target: np.ndarray  # (d, h, w)
    body: np.ndarray  # (d, h, w) float32
    bone: np.ndarray  # (d, h, w) float32
    case: str
    centre: Tuple[int, int, int]
    air: Optional[np.ndarray] = None  # (d, h, w) float32, air enclosed in the body (internal_air_mask)


class PatchSampler:
    """Draws patches confined to the body, oversampling bone (and, optionally, air inside the body).

    A patch centre is a random body voxel; with probability ``bone_fraction`` a random bone voxel (when the
    case has bone), and with probability ``air_fraction`` a random voxel of air enclosed in the body
    (:func:`internal_air_mask`: bowel gas, lung; as dark in MRI as cortical bone, so the hardest voxels to
    tell from bone) when the case has some. Sample ``index`` of ``epoch`` is drawn from
    ``numpy.random.default_rng([seed, epoch, index])``, so that any rank, any world size and any resumed
    run draws the same samples for the same indices. Outside the volume, the image is padded with each
    channel's air value and the target with air.
    """

    MAX_CANDIDATES = 400_000

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        *,
        bone_fraction: float,
        seed: int,
        air_target: float,
        air_fraction: float = 0.0,
    ) -> None:
        if not cases:
            raise ConfigError("No training case to sample patches from.")
        self.cases = list(cases)
        self.bone_fraction = float(bone_fraction)
        self.air_fraction = float(air_fraction)
        self.seed = int(seed)
        self.air_target = float(air_target)
        rng = np.random.default_rng([self.seed, 2**31 - 1])
        self._body_idx = []
        self._bone_idx = []
        self._air_idx = []
        self._pad = []
        for case in self.cases:
            body = np.flatnonzero(case.body.ravel())
            if body.size == 0:
                body = np.arange(case.body.size)
            bone = np.flatnonzero(case.bone.ravel())
            if body.size > self.MAX_CANDIDATES:
                body = np.sort(rng.choice(body, self.MAX_CANDIDATES, replace=False))
            if bone.size > self.MAX_CANDIDATES:
                bone = np.sort(rng.choice(bone, self.MAX_CANDIDATES, replace=False))
            self._body_idx.append(body)
            self._bone_idx.append(bone)
            air = np.flatnonzero(case.air.ravel()) if case.air is not None else np.zeros(0, dtype=np.int64)
            if air.size > self.MAX_CANDIDATES:
                air = np.sort(rng.choice(air, self.MAX_CANDIDATES, replace=False))
            self._air_idx.append(air)
            outside = ~case.body
            pad = [float(np.median(ch[outside])) if outside.any() else float(ch.min()) for ch in case.image]
            self._pad.append(pad)

    def rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), int(index)])

    def sample(self, rng: np.random.Generator, size: Sequence[int]) -> Patch:
        """Draw one patch of ``size`` (z, y, x) with ``rng``."""
        k = int(rng.integers(len(self.cases)))
        case = self.cases[k]
        candidates = self._body_idx[k]
        if (
            self.air_fraction <= 0
        ):  # (one draw only when the case has bone: runs without air_fraction stay as they were)
            if self._bone_idx[k].size > 0 and rng.random() < self.bone_fraction:
                candidates = self._bone_idx[k]
        else:
            draw = rng.random()
            if draw < self.bone_fraction and self._bone_idx[k].size > 0:
                candidates = self._bone_idx[k]
            elif self.bone_fraction <= draw < self.bone_fraction + self.air_fraction and self._air_idx[k].size > 0:
                candidates = self._air_idx[k]
        flat = int(candidates[int(rng.integers(candidates.size))])
        centre = np.unravel_index(flat, case.body.shape)
        size = [int(s) for s in size]
        start = [int(c) - s // 2 for c, s in zip(centre, size)]
        image = np.empty((case.image.shape[0], *size), dtype=np.float32)
        for c in range(case.image.shape[0]):
            image[c] = _crop(case.image[c], start, size, self._pad[k][c])
        return Patch(
            image=image,
            target=_crop(case.target, start, size, self.air_target),
            body=_crop(case.body, start, size, False).astype(np.float32),
            bone=_crop(case.bone, start, size, False).astype(np.float32),
            case=case.name,
            centre=tuple(int(c) for c in centre),
            air=_crop(case.air, start, size, False).astype(np.float32)
            if case.air is not None
            else np.zeros(size, dtype=np.float32),
        )


def _crop(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill) -> np.ndarray:
    """``array[start:start+size]``, filled with ``fill`` where the box leaves the array."""
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape):
        lo, hi = max(s, 0), min(s + n, dim)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s, lo - s + max(hi - lo, 0)))
    if all(d.start == 0 and d.stop == n for d, n in zip(dst, size)):
        return np.ascontiguousarray(array[tuple(src)])
    out = np.full(size, fill, dtype=array.dtype)
    out[tuple(dst)] = array[tuple(src)]
    return out
