"""Training configuration: YAML or JSON, parsed into dataclasses and validated with clear errors.

A configuration names the cases (explicit MRI/CT lists, folders of phantom cases, or phantom seeds to
generate), the validation split, the architecture, patches, schedule, loss, augmentation and the
output folder. Relative paths are resolved against the configuration file's folder. Every error is
a :class:`ConfigError` naming the file and the offending key, e.g.
``train.yaml: training.batch_size must be an integer >= 1 (got 0)``.

Minimal example (YAML)::

    output_dir: runs/my-model
    data:
      cases:
        - {name: p01, mri: [p01/echo1.nii.gz, p01/echo2.nii.gz], ct: p01/ct.nii.gz}
        - {name: p02, mri: [p02/echo1.nii.gz, p02/echo2.nii.gz], ct: p02/ct.nii.gz}
      validation_cases: [p02]
      align: rigid
      spacing_mm: 1.0
    model: {name: my-model, architecture: unet3d, kwargs: {depth: 3, width: 16}}
    training: {patch_size: 64, batch_size: 2, epochs: 10, steps_per_epoch: 200}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from SyntheticCTLib.kernel.devices import check_device
from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.hu import BONE_THRESHOLD_HU, CT_MAX_HU, CT_MIN_HU
from SyntheticCTLib.models.errors import ArchitectureError

ALIGN_MODES = ("none", "rigid", "affine")
FLIP_AXES = {"x": 2, "y": 1, "z": 0}  # numpy (z, y, x) array axis of each patient axis


class ConfigError(InvalidParameterError):
    """A training configuration is malformed, names missing files, or has values out of range."""


# ----------------------------------------------------------------------------------------------------------------
# Dataclasses
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CaseSpec:
    """One training case: MRI channel files and the CT of the same patient."""

    name: str
    mri: List[Path]
    ct: Path
    bone_labels: Optional[Path] = None
    manifest: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PhantomSpec:
    """Phantom cases generated from seeds by :func:`SyntheticCTLib.phantom.make_phantom`."""

    train_seeds: List[int]
    validation_seeds: List[int]
    size: Tuple[int, int, int] = (128, 128, 96)
    spacing: float = 1.0
    options: Dict[str, Any] = field(default_factory=dict)
    folder: str = "phantom_cases"
    name: str = ""


@dataclass
class DataConfig:
    cases: List[CaseSpec] = field(default_factory=list)
    case_folders: List[Path] = field(default_factory=list)
    phantoms: List[PhantomSpec] = field(default_factory=list)
    validation_cases: List[str] = field(default_factory=list)
    validation_fraction: float = 0.0
    align: str = "none"
    spacing_mm: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    outlier_z: float = 3.5
    drop_outliers: bool = False


@dataclass
class ModelConfig:
    name: str = "my-model"
    version: str = "1.0.0"
    description: str = ""
    architecture: str = "unet3d"
    kwargs: Dict[str, Any] = field(default_factory=dict)
    inputs: List[Dict[str, Any]] = field(default_factory=list)
    normalization: Optional[List[Dict[str, Any]]] = None
    output_scale: float = 1000.0
    output_offset: float = 0.0
    output_clip: Tuple[float, float] = (CT_MIN_HU, CT_MAX_HU)
    patch_size: Optional[Tuple[int, int, int]] = None
    overlap: float = 0.5
    init_weights: Optional[Path] = None


@dataclass
class TrainingSection:
    patch_size: Tuple[int, int, int] = (64, 64, 64)
    batch_size: int = 2
    epochs: int = 10
    steps_per_epoch: int = 100
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    bone_fraction: float = 0.5
    air_fraction: float = 0.0
    amp: bool = True
    checkpoint_every: int = 100
    bn_recalibration_batches: int = 40
    device: str = "auto"
    num_threads: Optional[int] = None


@dataclass
class LossConfig:
    bone_weight: float = 1.0
    gradient_weight: float = 0.0
    background_weight: float = 0.1
    bone_threshold_hu: float = BONE_THRESHOLD_HU
    air_weight: float = 0.0


@dataclass
class AugmentConfig:
    enabled: bool = True
    bias_field_probability: float = 0.5
    bias_field_strength: float = 0.3
    gamma_probability: float = 0.3
    gamma_range: Tuple[float, float] = (0.8, 1.25)
    noise_probability: float = 0.3
    noise_std: float = 0.03
    scaling_probability: float = 0.5
    scaling_range: Tuple[float, float] = (0.9, 1.1)
    rotation_probability: float = 0.5
    rotation_degrees: float = 8.0
    flip_probability: float = 0.5
    flip_axes: Tuple[str, ...] = ("x",)


SELECT_BY = ("surface_p95", "goals")
"""The epoch-selection rules of ``validation.select_by``."""


@dataclass
class ValidationConfig:
    every_epochs: int = 1
    overlap: Optional[float] = None
    bone_threshold_hu: float = BONE_THRESHOLD_HU
    surfaces: bool = True
    select_by: str = "surface_p95"
    """How the kept epoch is chosen: ``surface_p95`` (lowest mean bone-surface p95) or ``goals`` (the lowest
    worst ratio to the release goals, surface mean, p95, Dice and MAE alike)."""


@dataclass
class ExportConfig:
    license: str = "Apache-2.0"
    intended_use: str = "Research and demonstration only. Not for diagnostic use."
    anatomy: str = ""
    sequence: str = ""


@dataclass
class TrainingConfig:
    """A validated training configuration (see the module docstring for the file format)."""

    source: Path
    output_dir: Path
    seed: int
    data: DataConfig
    model: ModelConfig
    training: TrainingSection
    loss: LossConfig
    augmentation: AugmentConfig
    validation: ValidationConfig
    export: ExportConfig
    raw: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """The configuration as plain JSON-able data (paths as strings)."""

        def _plain(value):
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, dict):
                return {k: _plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [_plain(v) for v in value]
            return value

        out = {k: _plain(v) for k, v in asdict(self).items() if k != "raw"}
        return out


# ----------------------------------------------------------------------------------------------------------------
# Parsing helpers
# ----------------------------------------------------------------------------------------------------------------


class _Reader:
    """Reads typed values from a mapping, raising :class:`ConfigError` naming the file and key."""

    def __init__(self, source: Path, mapping: Any, where: str) -> None:
        self.source = source
        self.where = where
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, dict):
            self.fail(f"{where or 'the top level'} must be a mapping (got {type(mapping).__name__})")
        self.mapping = mapping
        self.used: set = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, message: str) -> None:
        raise ConfigError(f"{self.source}: {message}")

    def has(self, name: str) -> bool:
        return name in self.mapping and self.mapping[name] is not None

    def raw(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        value = self.mapping.get(name, default)
        return default if value is None else value

    def sub(self, name: str) -> _Reader:
        return _Reader(self.source, self.raw(name, {}), self.key(name))

    def integer(self, name: str, default: Any, *, minimum: Optional[int] = None) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            self.fail(f"{self.key(name)} must be an integer (got {value!r})")
        value = int(value)
        if minimum is not None and value < minimum:
            self.fail(f"{self.key(name)} must be an integer >= {minimum} (got {value})")
        return value

    def optional_integer(self, name: str, *, minimum: Optional[int] = None) -> Optional[int]:
        if not self.has(name):
            self.used.add(name)
            return None
        return self.integer(name, None, minimum=minimum)

    def number(
        self,
        name: str,
        default: Any,
        *,
        minimum: Optional[float] = None,
        maximum: Optional[float] = None,
        exclusive_minimum: bool = False,
    ) -> float:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            self.fail(f"{self.key(name)} must be a finite number (got {value!r})")
        value = float(value)
        if minimum is not None and (value < minimum or (exclusive_minimum and value == minimum)):
            bound = ">" if exclusive_minimum else ">="
            self.fail(f"{self.key(name)} must be {bound} {minimum:g} (got {value:g})")
        if maximum is not None and value > maximum:
            self.fail(f"{self.key(name)} must be <= {maximum:g} (got {value:g})")
        return value

    def probability(self, name: str, default: float) -> float:
        return self.number(name, default, minimum=0.0, maximum=1.0)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            self.fail(f"{self.key(name)} must be true or false (got {value!r})")
        return value

    def string(self, name: str, default: str, *, choices: Optional[Sequence[str]] = None) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str):
            self.fail(f"{self.key(name)} must be a string (got {value!r})")
        if choices is not None and value not in choices:
            self.fail(f"{self.key(name)} must be one of {', '.join(choices)} (got {value!r})")
        return value

    def triple(self, name: str, default: Any, *, integer: bool, minimum: float) -> tuple:
        value = self.raw(name, default)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * 3
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            self.fail(f"{self.key(name)} must be a number or a list of 3 numbers (got {value!r})")
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                self.fail(f"{self.key(name)} must hold numbers (got {value!r})")
            if integer and float(v) != int(v):
                self.fail(f"{self.key(name)} must hold integers (got {value!r})")
            if v < minimum:
                self.fail(f"{self.key(name)} values must be >= {minimum:g} (got {value!r})")
            out.append(int(v) if integer else float(v))
        return tuple(out)

    def pair(self, name: str, default: Any, *, minimum: Optional[float] = None) -> Tuple[float, float]:
        value = self.raw(name, default)
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)
        ):
            self.fail(f"{self.key(name)} must be a list of 2 numbers [low, high] (got {value!r})")
        low, high = float(value[0]), float(value[1])
        if low > high:
            self.fail(f"{self.key(name)} must be [low, high] with low <= high (got {value!r})")
        if minimum is not None and low < minimum:
            self.fail(f"{self.key(name)} values must be >= {minimum:g} (got {value!r})")
        return low, high

    def string_list(self, name: str) -> List[str]:
        value = self.raw(name, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
            self.fail(f"{self.key(name)} must be a list of names (got {value!r})")
        return [str(v) for v in value]

    def int_list(self, name: str) -> List[int]:
        value = self.raw(name, [])
        if isinstance(value, dict) and set(value) <= {"start", "stop"}:
            value = list(range(int(value.get("start", 0)), int(value["stop"])))
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            self.fail(f"{self.key(name)} must be a list of integers or {{start, stop}} (got {value!r})")
        return [int(v) for v in value]

    def mapping_value(self, name: str) -> Dict[str, Any]:
        value = self.raw(name, {})
        if not isinstance(value, dict):
            self.fail(f"{self.key(name)} must be a mapping (got {value!r})")
        return dict(value)

    def finish(self) -> None:
        unknown = sorted(set(self.mapping) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            self.fail(
                f"unknown key(s) {', '.join(self.key(k) for k in unknown)}; "
                f"{self.where or 'the top level'} accepts: {known}"
            )


def _resolve(base: Path, value: Any, reader: _Reader, key: str) -> Path:
    if not isinstance(value, str) or not value:
        reader.fail(f"{key} must be a file path (got {value!r})")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def read_config_file(path: Path) -> Dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON file into a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"No configuration file at '{path}'.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (ValueError, Exception) as e:  # yaml.YAMLError and json.JSONDecodeError
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping at the top level.")
    return data


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------


def _parse_cases(reader: _Reader, base: Path) -> List[CaseSpec]:
    items = reader.raw("cases", [])
    if not isinstance(items, list):
        reader.fail(f"{reader.key('cases')} must be a list of cases")
    cases = []
    for i, item in enumerate(items):
        where = f"{reader.key('cases')}[{i}]"
        case = _Reader(reader.source, item, where)
        mri = case.raw("mri", None)
        if isinstance(mri, str):
            mri = [mri]
        if not isinstance(mri, list) or not mri:
            case.fail(f"{where}.mri must list the MRI channel files (one per channel)")
        mri_paths = [_resolve(base, m, case, f"{where}.mri") for m in mri]
        ct = _resolve(base, case.raw("ct", None), case, f"{where}.ct")
        bone = case.raw("bone_labels", None)
        bone_path = _resolve(base, bone, case, f"{where}.bone_labels") if bone is not None else None
        name = case.string("name", mri_paths[0].parent.name or f"case{i}")
        case.finish()
        cases.append(CaseSpec(name=name, mri=mri_paths, ct=ct, bone_labels=bone_path))
    return cases


def _parse_phantoms(reader: _Reader) -> List[PhantomSpec]:
    """``data.phantoms``: one group (a mapping) or several (a list of mappings, each with a ``name``)."""
    value = reader.raw("phantoms", None)
    if value is None:
        return []
    groups = value if isinstance(value, list) else [value]
    specs: List[PhantomSpec] = []
    seen: Dict[int, str] = {}
    for i, group in enumerate(groups):
        where = reader.key("phantoms") + (f"[{i}]" if isinstance(value, list) else "")
        ph = _Reader(reader.source, group, where)
        default_name = "" if not isinstance(value, list) else f"group{i + 1}"
        spec = PhantomSpec(
            train_seeds=ph.int_list("train_seeds"),
            validation_seeds=ph.int_list("validation_seeds"),
            size=ph.triple("size", (128, 128, 96), integer=True, minimum=8),
            spacing=ph.number("spacing", 1.0, minimum=0.0, exclusive_minimum=True),
            options=ph.mapping_value("options"),
            folder=ph.string("folder", "phantom_cases"),
            name=ph.string("name", default_name),
        )
        ph.finish()
        if spec.name and not spec.name.replace("-", "").replace("_", "").isalnum():
            ph.fail(f"{ph.key('name')} must be letters, digits, '-' or '_' (got {spec.name!r})")
        for seed in spec.train_seeds + spec.validation_seeds:
            if seed in seen:
                ph.fail(
                    f"phantom seed {seed} is used twice ({seen[seed]} and {where}); every seed must be used once, "
                    "so that validation and held-out seeds never meet training seeds"
                )
            seen[seed] = where
        specs.append(spec)
    if specs and not any(s.train_seeds for s in specs):
        reader.fail(f"{reader.key('phantoms')} must list at least one training seed (train_seeds)")
    if len({s.name for s in specs}) != len(specs):
        reader.fail(f"{reader.key('phantoms')}: every group needs its own name")
    return specs


def _parse_data(reader: _Reader, base: Path) -> DataConfig:
    data = DataConfig()
    data.cases = _parse_cases(reader, base)
    folders = reader.raw("case_folders", [])
    if isinstance(folders, str):
        folders = [folders]
    if not isinstance(folders, list):
        reader.fail(f"{reader.key('case_folders')} must be a list of folders")
    data.case_folders = [_resolve(base, f, reader, reader.key("case_folders")) for f in folders]
    data.phantoms = _parse_phantoms(reader)
    data.validation_cases = reader.string_list("validation_cases")
    data.validation_fraction = reader.number("validation_fraction", 0.0, minimum=0.0, maximum=0.9)
    data.align = reader.string("align", "none", choices=ALIGN_MODES)
    data.spacing_mm = reader.triple("spacing_mm", 1.0, integer=False, minimum=0.05)
    data.outlier_z = reader.number("outlier_z", 3.5, minimum=0.0, exclusive_minimum=True)
    data.drop_outliers = reader.boolean("drop_outliers", False)
    reader.finish()
    if not data.cases and not data.case_folders and not data.phantoms:
        reader.fail("data must name training cases: data.cases, data.case_folders or data.phantoms")
    return data


def _parse_model(reader: _Reader, base: Path) -> ModelConfig:
    m = ModelConfig()
    m.name = reader.string("name", m.name)
    m.version = reader.string("version", m.version)
    m.description = reader.string("description", "")
    m.architecture = reader.string("architecture", m.architecture)
    m.kwargs = reader.mapping_value("kwargs")
    inputs = reader.raw("inputs", [])
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        reader.fail(f"{reader.key('inputs')} must be a list of mappings (one per MRI channel)")
    m.inputs = [dict(i) for i in inputs]
    norm = reader.raw("normalization", None)
    if norm is not None:
        if isinstance(norm, dict):
            norm = [norm]
        if not isinstance(norm, list) or not all(isinstance(n, dict) for n in norm):
            reader.fail(f"{reader.key('normalization')} must be a mapping or a list of mappings")
        m.normalization = [dict(n) for n in norm]
    out = reader.sub("output")
    m.output_scale = out.number("scale", 1000.0)
    if m.output_scale == 0:
        out.fail(f"{out.key('scale')} must not be 0")
    m.output_offset = out.number("offset", 0.0)
    m.output_clip = out.pair("clip", (CT_MIN_HU, CT_MAX_HU))
    out.finish()
    if reader.has("patch_size"):
        m.patch_size = reader.triple("patch_size", None, integer=True, minimum=8)
    else:
        reader.used.add("patch_size")
    m.overlap = reader.number("overlap", 0.5, minimum=0.0, maximum=0.9)
    if reader.has("init_weights"):
        m.init_weights = _resolve(base, reader.raw("init_weights"), reader, reader.key("init_weights"))
    else:
        reader.used.add("init_weights")
    reader.finish()
    return m


def _parse_training(reader: _Reader) -> TrainingSection:
    t = TrainingSection()
    t.patch_size = reader.triple("patch_size", 64, integer=True, minimum=8)
    t.batch_size = reader.integer("batch_size", t.batch_size, minimum=1)
    t.epochs = reader.integer("epochs", t.epochs, minimum=1)
    t.steps_per_epoch = reader.integer("steps_per_epoch", t.steps_per_epoch, minimum=1)
    t.learning_rate = reader.number("learning_rate", t.learning_rate, minimum=0.0, exclusive_minimum=True)
    t.weight_decay = reader.number("weight_decay", t.weight_decay, minimum=0.0)
    t.warmup_steps = reader.integer("warmup_steps", t.warmup_steps, minimum=0)
    t.min_lr_ratio = reader.number("min_lr_ratio", t.min_lr_ratio, minimum=0.0, maximum=1.0)
    t.grad_clip = reader.number("grad_clip", t.grad_clip, minimum=0.0)
    t.bone_fraction = reader.probability("bone_fraction", t.bone_fraction)
    t.air_fraction = reader.probability("air_fraction", t.air_fraction)
    if t.bone_fraction + t.air_fraction > 1.0:
        reader.fail(
            f"training.bone_fraction + training.air_fraction must be <= 1 (got {t.bone_fraction:g} + {t.air_fraction:g})"
        )
    t.amp = reader.boolean("amp", t.amp)
    t.checkpoint_every = reader.integer("checkpoint_every", t.checkpoint_every, minimum=1)
    t.bn_recalibration_batches = reader.integer("bn_recalibration_batches", t.bn_recalibration_batches, minimum=0)
    t.device = reader.string("device", t.device)
    try:
        t.device = check_device(t.device)
    except InvalidParameterError as error:
        reader.fail(f"{reader.key('device')}: {error}")
    t.num_threads = reader.optional_integer("num_threads", minimum=1)
    reader.finish()
    return t


def _parse_loss(reader: _Reader) -> LossConfig:
    loss = LossConfig()
    loss.bone_weight = reader.number("bone_weight", loss.bone_weight, minimum=0.0)
    loss.gradient_weight = reader.number("gradient_weight", loss.gradient_weight, minimum=0.0)
    loss.background_weight = reader.number("background_weight", loss.background_weight, minimum=0.0)
    loss.bone_threshold_hu = reader.number("bone_threshold_hu", loss.bone_threshold_hu)
    loss.air_weight = reader.number("air_weight", loss.air_weight, minimum=0.0)
    reader.finish()
    return loss


def _parse_augmentation(reader: _Reader) -> AugmentConfig:
    a = AugmentConfig()
    a.enabled = reader.boolean("enabled", True)
    bias = reader.sub("bias_field")
    a.bias_field_probability = bias.probability("probability", a.bias_field_probability)
    a.bias_field_strength = bias.number("strength", a.bias_field_strength, minimum=0.0, maximum=2.0)
    bias.finish()
    gamma = reader.sub("gamma")
    a.gamma_probability = gamma.probability("probability", a.gamma_probability)
    a.gamma_range = gamma.pair("range", a.gamma_range, minimum=0.05)
    gamma.finish()
    noise = reader.sub("noise")
    a.noise_probability = noise.probability("probability", a.noise_probability)
    a.noise_std = noise.number("std", a.noise_std, minimum=0.0, maximum=1.0)
    noise.finish()
    scaling = reader.sub("scaling")
    a.scaling_probability = scaling.probability("probability", a.scaling_probability)
    a.scaling_range = scaling.pair("range", a.scaling_range, minimum=0.01)
    scaling.finish()
    rotation = reader.sub("rotation")
    a.rotation_probability = rotation.probability("probability", a.rotation_probability)
    a.rotation_degrees = rotation.number("max_degrees", a.rotation_degrees, minimum=0.0, maximum=30.0)
    rotation.finish()
    flip = reader.sub("flip")
    a.flip_probability = flip.probability("probability", a.flip_probability)
    axes = flip.string_list("axes") if flip.has("axes") else list(a.flip_axes)
    flip.used.add("axes")
    bad = [ax for ax in axes if ax not in FLIP_AXES]
    if bad:
        flip.fail(f"{flip.key('axes')} must name axes among x, y, z (got {bad})")
    a.flip_axes = tuple(axes)
    flip.finish()
    reader.finish()
    return a


def _parse_validation(reader: _Reader) -> ValidationConfig:
    v = ValidationConfig()
    v.every_epochs = reader.integer("every_epochs", 1, minimum=1)
    v.overlap = reader.number("overlap", 0.5, minimum=0.0, maximum=0.9) if reader.has("overlap") else None
    reader.used.add("overlap")
    v.bone_threshold_hu = reader.number("bone_threshold_hu", BONE_THRESHOLD_HU)
    v.surfaces = reader.boolean("surfaces", True)
    v.select_by = reader.string("select_by", v.select_by, choices=SELECT_BY)
    reader.finish()
    return v


def _parse_export(reader: _Reader) -> ExportConfig:
    e = ExportConfig()
    e.license = reader.string("license", e.license)
    e.intended_use = reader.string("intended_use", e.intended_use)
    e.anatomy = reader.string("anatomy", "")
    e.sequence = reader.string("sequence", "")
    reader.finish()
    return e


def check_architecture(config: TrainingConfig, in_channels: Optional[int] = None) -> None:
    """Check that the architecture is registered and accepts the kwargs and ``in_channels``.

    Raises
    ------
    ConfigError
        Unknown architecture (the message lists the known ones), bad keyword arguments, or an
        ``in_channels`` in ``model.kwargs`` that differs from the number of MRI channels of the cases.
    """
    from SyntheticCTLib.models.architectures import build_network

    kwargs = dict(config.model.kwargs)
    if in_channels is not None:
        declared = kwargs.get("in_channels")
        if declared is not None and int(declared) != int(in_channels):
            raise ConfigError(
                f"{config.source}: model.kwargs.in_channels is {declared} but the cases have {in_channels} MRI "
                f"channel(s); the architecture's in_channels must equal the number of MRI channels per case."
            )
        if config.model.inputs and len(config.model.inputs) != in_channels:
            raise ConfigError(
                f"{config.source}: model.inputs describes {len(config.model.inputs)} channel(s) but the cases have "
                f"{in_channels} MRI channel(s)."
            )
        if config.model.normalization and len(config.model.normalization) not in (1, in_channels):
            raise ConfigError(
                f"{config.source}: model.normalization has {len(config.model.normalization)} entries; give one, "
                f"or one per MRI channel ({in_channels})."
            )
        kwargs["in_channels"] = int(in_channels)
    kwargs.setdefault("in_channels", 1)
    try:
        network = build_network(config.model.architecture, **kwargs)
    except ArchitectureError as e:
        raise ConfigError(f"{config.source}: model.architecture: {e}") from e
    multiple = int(getattr(network, "size_multiple", 1))
    for key, patch in (
        ("training.patch_size", config.training.patch_size),
        ("model.patch_size", config.model.patch_size),
    ):
        if patch is not None and any(p % multiple for p in patch):
            raise ConfigError(
                f"{config.source}: {key} {list(patch)} must be divisible by {multiple} for "
                f"{config.model.architecture} with {config.model.kwargs}."
            )


def parse_config(data: Dict[str, Any], source: Path, *, base: Optional[Path] = None) -> TrainingConfig:
    """Validate a configuration mapping read from ``source``; relative paths resolve against ``base``."""
    source = Path(source)
    base = Path(base) if base is not None else source.resolve().parent
    top = _Reader(source, data, "")
    if not top.has("output_dir"):
        top.fail("output_dir is required (the folder for checkpoints, logs and the exported model)")
    output_dir = _resolve(base, top.raw("output_dir"), top, "output_dir")
    seed = top.integer("seed", 0, minimum=0)
    if not top.has("data"):
        top.fail("data is required (the training cases)")
    data_cfg = _parse_data(top.sub("data"), base)
    if not top.has("model"):
        top.fail("model is required (name and architecture)")
    config = TrainingConfig(
        source=source,
        output_dir=output_dir,
        seed=seed,
        data=data_cfg,
        model=_parse_model(top.sub("model"), base),
        training=_parse_training(top.sub("training")),
        loss=_parse_loss(top.sub("loss")),
        augmentation=_parse_augmentation(top.sub("augmentation")),
        validation=_parse_validation(top.sub("validation")),
        export=_parse_export(top.sub("export")),
        raw=data,
    )
    top.finish()
    _check_files(config)
    check_architecture(config, explicit_channel_count(config))
    return config


def explicit_channel_count(config: TrainingConfig) -> Optional[int]:
    """The number of MRI channels of the explicit cases (None when there are none); they must agree."""
    counts = {c.name: len(c.mri) for c in config.data.cases}
    if not counts:
        return None
    if len(set(counts.values())) > 1:
        raise ConfigError(
            f"{config.source}: the cases have different numbers of MRI channels ({counts}); every case "
            "must give the same channels in the same order."
        )
    return next(iter(counts.values()))


def _check_files(config: TrainingConfig) -> None:
    for case in config.data.cases:
        for path in [*case.mri, case.ct] + ([case.bone_labels] if case.bone_labels else []):
            if not path.exists():
                raise ConfigError(f"{config.source}: case '{case.name}': file not found: '{path}'.")
    init = config.model.init_weights
    if init is not None and not init.exists():
        raise ConfigError(
            f"{config.source}: model.init_weights: no model package, checkpoint or configuration at '{init}'."
        )
    for folder in config.data.case_folders:
        if not folder.exists():
            raise ConfigError(f"{config.source}: data.case_folders: no such folder or case.json: '{folder}'.")
    names = [c.name for c in config.data.cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{config.source}: duplicate case names in data.cases: {duplicates}.")


def load_config(path) -> TrainingConfig:
    """Read and validate a training configuration from a YAML or JSON file.

    Raises
    ------
    ConfigError
        The file is missing or malformed, a key is unknown, a value is out of range, a case file is
        missing, or the architecture is unknown or does not accept its arguments.
    """
    path = Path(path)
    return parse_config(read_config_file(path), path)
