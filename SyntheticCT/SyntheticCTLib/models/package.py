"""Model packages: a folder (or a ``.zip`` of one) with ``model.json`` and verified weight files.

``model.json`` describes the network (a registry name and its arguments, never code), the MRI
inputs, the working spacing, normalisation, the HU output mapping, patch size and overlap, training
data and validation metrics, and the SHA-256 of every weight file. Weights are safetensors
(preferred) or a plain state dict that ``torch.load(..., weights_only=True)`` reads; a pickled object
is refused. A ``network_data_format`` block mirrors the MONAI Bundle ``metadata.json`` convention.

Network convention: the network outputs ``y`` (normalised); ``HU = clip(y * scale + offset, *clip)``.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import shutil
import tempfile
import weakref
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, Optional, Tuple

from SyntheticCTLib import NOT_FOR_DIAGNOSTIC_USE
from SyntheticCTLib.kernel.io import replace_folder
from SyntheticCTLib.kernel.types import PathLike
from SyntheticCTLib.models.archive import safe_extract_zip
from SyntheticCTLib.models.errors import ArchitectureError, ChecksumError, ModelPackageError, SchemaVersionError
from SyntheticCTLib.models.hashing import check_sha256, normalize_sha256, sha256_bytes, sha256_file

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""The newest ``model.json`` schema_version this code understands."""
MODEL_CARD = "model.json"
WEIGHT_FORMATS = ("safetensors", "torch")
DIAGNOSTIC_USE = "Not for diagnostic use."
REQUIRED_FIELDS = (
    "schema_version",
    "name",
    "version",
    "architecture",
    "inputs",
    "spacing_mm",
    "normalization",
    "output",
    "patch_size",
    "weights",
)
NORMALIZATION_METHODS = ("percentile", "zscore", "none")
CARD_ORDER = (
    "schema_version",
    "name",
    "version",
    "description",
    "license",
    "intended_use",
    "diagnostic_use",
    "disclaimer",
    "architecture",
    "inputs",
    "spacing_mm",
    "orientation",
    "normalization",
    "output",
    "patch_size",
    "overlap",
    "training_data",
    "validation_metrics",
    "network_data_format",
    "weights",
)


def _fail(source: object, problem: str) -> ModelPackageError:
    return ModelPackageError(f"Model package '{source}': {problem}")


def _number(value: Any, what: str, source: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(source, f"{what} must be a finite number (got {value!r}).")
    return float(value)


def input_label(entry: Mapping[str, Any], index: int) -> str:
    """A short GUI label for one input, e.g. ``"echo 1 (TE 2.2 ms)"``."""
    if entry.get("label"):
        return str(entry["label"])
    te = entry.get("echo_time_ms")
    if te is not None:
        echo = entry.get("echo", index + 1)
        return f"echo {echo} (TE {float(te):g} ms)"
    name = str(entry.get("name") or f"input {index + 1}")
    sequence = entry.get("sequence")
    return f"{name} ({sequence})" if sequence and str(sequence) not in name else name


def validate_card(card: Any, source: object = "<model.json>") -> Dict[str, Any]:
    """Check a ``model.json`` dict; return a normalised deep copy. Raise :class:`ModelPackageError`.

    Checks the schema version (newer than :data:`SCHEMA_VERSION` -> :class:`SchemaVersionError`), the
    required fields, their types, that there is one normalisation per input, that
    ``architecture.kwargs.in_channels`` (filled in when absent) equals the number of inputs, and that
    every weight entry names a relative file inside the package with a SHA-256.
    The architecture name itself is checked against the registry by :func:`load_model_package`.

    One check after another, in the order of the card's fields: a list a reader scans, kept in one place on purpose.
    """
    if not isinstance(card, dict):
        raise _fail(source, "model.json must hold a JSON object.")
    version = card.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise _fail(source, f"'schema_version' must be an integer (got {version!r}).")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"Model package '{source}' uses model.json schema_version {version}, newer than this version of "
            f"SyntheticCT understands ({SCHEMA_VERSION}). Update SyntheticCT to use this model."
        )
    if version < 1:
        raise _fail(source, f"'schema_version' must be >= 1 (got {version}).")
    missing = [k for k in REQUIRED_FIELDS if k not in card]
    if missing:
        raise _fail(source, f"model.json lacks required field(s): {', '.join(missing)}.")
    card = copy.deepcopy(card)
    for key in ("name", "version"):
        if not isinstance(card[key], str) or not card[key].strip():
            raise _fail(source, f"'{key}' must be a non-empty string (got {card[key]!r}).")
    arch = card["architecture"]
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise _fail(source, '\'architecture\' must be an object {"name": str, "kwargs": {...}}.')
    kwargs = arch.setdefault("kwargs", {})
    if not isinstance(kwargs, dict):
        raise _fail(source, "'architecture.kwargs' must be an object.")
    inputs = card["inputs"]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, dict) for i in inputs):
        raise _fail(source, "'inputs' must be a non-empty list of objects, one per MRI channel.")
    for i, entry in enumerate(inputs):
        if not entry.get("name"):
            raise _fail(source, f"inputs[{i}] lacks a 'name'.")
        if entry.get("echo_time_ms") is not None:
            _number(entry["echo_time_ms"], f"inputs[{i}].echo_time_ms", source)
    n_in = len(inputs)
    if kwargs.setdefault("in_channels", n_in) != n_in:
        raise _fail(source, f"architecture.kwargs.in_channels is {kwargs['in_channels']} but 'inputs' lists {n_in}.")
    _check_protocols(card, n_in, source)
    spacing = card["spacing_mm"]
    if not isinstance(spacing, list) or len(spacing) != 3:
        raise _fail(source, f"'spacing_mm' must be a list of 3 numbers (got {spacing!r}).")
    card["spacing_mm"] = [_number(s, "spacing_mm", source) for s in spacing]
    if any(s <= 0 for s in card["spacing_mm"]):
        raise _fail(source, f"'spacing_mm' must be positive (got {spacing!r}).")
    norm = card["normalization"]
    if not isinstance(norm, list) or len(norm) != n_in or not all(isinstance(n, dict) for n in norm):
        raise _fail(source, f"'normalization' must be a list of {n_in} objects, one per input.")
    for i, spec in enumerate(norm):
        method = spec.get("method")
        if method not in NORMALIZATION_METHODS:
            raise _fail(
                source, f"normalization[{i}].method must be one of {', '.join(NORMALIZATION_METHODS)} (got {method!r})."
            )
        if method == "percentile":
            lo = _number(spec.get("lower"), f"normalization[{i}].lower", source)
            hi = _number(spec.get("upper"), f"normalization[{i}].upper", source)
            if not 0 <= lo < hi <= 100:
                raise _fail(source, f"normalization[{i}] needs 0 <= lower < upper <= 100 (got {lo}, {hi}).")
    out = card["output"]
    if not isinstance(out, dict):
        raise _fail(source, "'output' must be an object {scale, offset, clip}.")
    _number(out.get("scale"), "output.scale", source)
    _number(out.get("offset"), "output.offset", source)
    clip = out.get("clip")
    if not isinstance(clip, list) or len(clip) != 2:
        raise _fail(source, f"'output.clip' must be [low, high] in HU (got {clip!r}).")
    if _number(clip[0], "output.clip", source) >= _number(clip[1], "output.clip", source):
        raise _fail(source, f"'output.clip' must have low < high (got {clip!r}).")
    patch = card["patch_size"]
    if (
        not isinstance(patch, list)
        or len(patch) != 3
        or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch)
    ):
        raise _fail(source, f"'patch_size' must be a list of 3 positive integers (got {patch!r}).")
    overlap = _number(card.setdefault("overlap", 0.5), "overlap", source)
    if not 0 <= overlap < 1:
        raise _fail(source, f"'overlap' must be in [0, 1) (got {overlap}).")
    weights = card["weights"]
    if not isinstance(weights, list) or not weights:
        raise _fail(source, "'weights' must be a non-empty list of {file, sha256, format}.")
    seen = set()
    for i, w in enumerate(weights):
        if not isinstance(w, dict) or not isinstance(w.get("file"), str):
            raise _fail(source, f"weights[{i}] must be an object with a 'file'.")
        rel = w["file"]
        parts = PurePosixPath(rel.replace("\\", "/")).parts
        if not parts or rel.startswith(("/", "\\")) or ".." in parts or (len(rel) > 1 and rel[1] == ":"):
            raise _fail(source, f"weights[{i}].file '{rel}' must be a relative path inside the package.")
        if rel in seen:
            raise _fail(source, f"weights[{i}].file '{rel}' is listed twice.")
        seen.add(rel)
        try:
            w["sha256"] = normalize_sha256(w.get("sha256"), f"weights[{i}].sha256")
        except ModelPackageError as e:
            raise _fail(source, str(e)) from None
        fmt = w.setdefault("format", "safetensors" if rel.endswith(".safetensors") else "torch")
        if fmt not in WEIGHT_FORMATS:
            raise _fail(source, f"weights[{i}].format must be one of {', '.join(WEIGHT_FORMATS)} (got {fmt!r}).")
    return card


def _check_protocols(card: Mapping[str, Any], n_in: int, source: object) -> None:
    """``training_data.protocols``, when given: a list of {field_strength_t, echo_times_ms (one per input), ...}."""
    training = card.get("training_data")
    if not isinstance(training, dict) or "protocols" not in training:
        return
    protocols = training["protocols"]
    if not isinstance(protocols, list) or not all(isinstance(p, dict) for p in protocols):
        raise _fail(source, "'training_data.protocols' must be a list of objects {field_strength_t, echo_times_ms}.")
    for i, protocol in enumerate(protocols):
        where = f"training_data.protocols[{i}]"
        tes = protocol.get("echo_times_ms")
        if not isinstance(tes, list) or len(tes) != n_in:
            raise _fail(source, f"{where}.echo_times_ms must list {n_in} echo time(s), one per input (got {tes!r}).")
        for te in tes:
            if _number(te, f"{where}.echo_times_ms", source) <= 0:
                raise _fail(source, f"{where}.echo_times_ms must be positive (got {tes!r}).")
        for key in ("field_strength_t", "tr_ms", "flip_angle_deg"):
            if protocol.get(key) is not None and _number(protocol[key], f"{where}.{key}", source) <= 0:
                raise _fail(source, f"{where}.{key} must be positive (got {protocol[key]!r}).")


def card_protocols(card: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The acquisition protocols a model was trained on: ``[{"field_strength_t", "echo_times_ms", ...}]``.

    ``training_data.protocols`` when the card has it; else one protocol from the inputs' ``echo_time_ms``
    (and ``field_strength_t``, when every input that gives one agrees); else ``[]`` (nothing known).
    A field strength of None means "not stated". Malformed entries are skipped (:func:`validate_card` refuses them).
    """
    training = card.get("training_data")
    listed = training.get("protocols") if isinstance(training, Mapping) else None
    out: List[Dict[str, Any]] = []
    if isinstance(listed, list) and listed:
        for protocol in listed:
            if not isinstance(protocol, Mapping) or not isinstance(protocol.get("echo_times_ms"), list):
                continue
            try:
                tes = [float(t) for t in protocol["echo_times_ms"]]
                b0 = protocol.get("field_strength_t")
                entry = {"field_strength_t": float(b0) if b0 is not None else None, "echo_times_ms": tes}
            except (TypeError, ValueError):
                continue
            for key in ("tr_ms", "flip_angle_deg"):
                if protocol.get(key) is not None:
                    entry[key] = protocol[key]
            out.append(entry)
        return out
    inputs = [e for e in card.get("inputs") or [] if isinstance(e, Mapping)]
    tes = [e.get("echo_time_ms") for e in inputs]
    if not inputs or all(t is None for t in tes):
        return []
    fields = {float(e["field_strength_t"]) for e in inputs if e.get("field_strength_t") is not None}
    return [
        {
            "field_strength_t": fields.pop() if len(fields) == 1 else None,
            "echo_times_ms": [float(t) if t is not None else None for t in tes],
        }
    ]


NATIVE_ORIENTATIONS = ("", "INPUT", "NATIVE", "INDEX", "ANY", "NONE")
"""Card ``orientation`` values meaning "the network runs on the input's own index axes"."""


def _orientation_code(value: Any, what: str) -> Optional[str]:
    code = str(value if value is not None else "").strip().upper()
    if code in NATIVE_ORIENTATIONS:
        return None
    axis_of = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    if len(code) != 3 or sorted(axis_of.get(c, -1) for c in code) != [0, 1, 2]:
        raise ValueError(f"{what} is {value!r}; expected 'input' or a 3-letter code such as 'LPS' or 'RAS'")
    return code


def card_orientation(card: Mapping[str, Any]) -> Tuple[Optional[str], Optional[str]]:
    """The ``(training, inference)`` orientation codes of a card's ``orientation``; ``None`` means "input".

    Codes are ITK/DICOM's: the direction in which each index axis increases (``"LPS"`` is the identity
    direction). The card's value is one of:

    - ``"input"`` (the default; also ``"native"``, ``"index"``, ``"any"``): the network runs on the
      input's own index axes, and nothing is known of the training volumes' orientation: ``(None, None)``;
    - a code such as ``"LPS"``: the inference flips every input losslessly to it (``sitk.DICOMOrient``),
      the orientation of the training volumes: ``("LPS", "LPS")``;
    - ``{"training": "LPS", "inference": "input"}``: each given separately (a missing key is "input").

    Raises
    ------
    ValueError
        A value that is none of these, with the reason.
    """
    value = card.get("orientation", "input")
    if isinstance(value, Mapping):
        training = _orientation_code(value.get("training"), "orientation.training")
        return training, _orientation_code(value.get("inference"), "orientation.inference")
    code = _orientation_code(value, "orientation")
    return code, code


def network_data_format(card: Mapping[str, Any]) -> Dict[str, Any]:
    """A MONAI-Bundle-style ``network_data_format`` block describing the network's inputs and output."""
    inputs = card["inputs"]
    out = card["output"]
    patch = list(card["patch_size"])
    return {
        "inputs": {
            "image": {
                "type": "image",
                "format": "magnitude",
                "modality": "MR",
                "num_channels": len(inputs),
                "spatial_shape": patch,
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {str(i): input_label(e, i) for i, e in enumerate(inputs)},
            }
        },
        "outputs": {
            "pred": {
                "type": "image",
                "format": "hounsfield",
                "modality": "CT",
                "num_channels": 1,
                "spatial_shape": patch,
                "dtype": "float32",
                "value_range": [
                    (out["clip"][0] - out["offset"]) / out["scale"],
                    (out["clip"][1] - out["offset"]) / out["scale"],
                ],
                "is_patch_data": True,
                "channel_def": {
                    "0": f"synthetic CT, normalised: HU = clip(y * {out['scale']:g} + {out['offset']:g}, "
                    f"{out['clip'][0]:g}, {out['clip'][1]:g})"
                },
            }
        },
    }


def _load_state_dict_bytes(data: bytes, fmt: str, name: str) -> Dict[str, Any]:
    """Deserialise weights from bytes already hashed; never unpickle arbitrary objects."""
    import torch

    if fmt == "safetensors":
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as e:  # safetensors raises its own SafetensorError (not exported by every version)
            raise ModelPackageError(f"Weight file '{name}' is not a valid safetensors file: {e}") from e
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses any pickled object (UnpicklingError and friends)
        raise ModelPackageError(
            f"Weight file '{name}' was refused: it is not a plain state dict of tensors that torch.load(..., "
            f"weights_only=True) accepts ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Pickled objects are never loaded."
        ) from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ModelPackageError(
            f"Weight file '{name}' holds a {type(obj).__name__}, not a state dict mapping names to tensors."
        )
    return obj


class ModelPackage:
    """A loaded, validated model package (weights verified against ``model.json`` when loaded).

    Attributes
    ----------
    root
        The package folder (for a ``.zip``, a temporary extraction removed with the object).
    card
        The validated ``model.json`` content.
    source
        What was loaded (the folder or the ``.zip``).
    """

    def __init__(self, root: Path, card: Dict[str, Any], source: Optional[Path] = None) -> None:
        self.root = Path(root)
        self.card = card
        self.source = Path(source) if source is not None else self.root
        self._cleanup: Optional[weakref.finalize] = None
        self.catalog_source: Optional[str] = None
        """Where a catalog lookup found this package (set by the catalog), for the record of a run."""

    def __repr__(self) -> str:
        return f"ModelPackage(name={self.name!r}, version={self.version!r}, root='{self.root}')"

    # -- card properties -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def version(self) -> str:
        return self.card["version"]

    @property
    def description(self) -> str:
        return str(self.card.get("description", ""))

    @property
    def architecture(self) -> Tuple[str, Dict[str, Any]]:
        """``(name, kwargs)`` of the registered architecture."""
        return self.card["architecture"]["name"], dict(self.card["architecture"]["kwargs"])

    @property
    def inputs(self) -> List[Dict[str, Any]]:
        return self.card["inputs"]

    @property
    def in_channels(self) -> int:
        return len(self.card["inputs"])

    @property
    def input_names(self) -> List[str]:
        """GUI labels of the inputs, e.g. ``["echo 1 (TE 2.2 ms)", ...]``."""
        return [input_label(e, i) for i, e in enumerate(self.card["inputs"])]

    @property
    def spacing_mm(self) -> Tuple[float, float, float]:
        return tuple(float(s) for s in self.card["spacing_mm"])

    @property
    def patch_size(self) -> Tuple[int, int, int]:
        return tuple(int(p) for p in self.card["patch_size"])

    @property
    def overlap(self) -> float:
        return float(self.card.get("overlap", 0.5))

    @property
    def normalization(self) -> List[Dict[str, Any]]:
        return self.card["normalization"]

    @property
    def output(self) -> Dict[str, Any]:
        """``{"scale", "offset", "clip": [low, high]}``: HU = clip(y * scale + offset, low, high)."""
        return self.card["output"]

    @property
    def weight_files(self) -> List[Path]:
        return [self.root / w["file"] for w in self.card["weights"]]

    # -- integrity and weights -------------------------------------------------------------------
    def _weight_path(self, rel: str) -> Path:
        path = self.root / rel
        root = self.root.resolve()
        resolved = path.resolve()
        if os.path.commonpath([str(root), str(resolved)]) != str(root):
            raise ModelPackageError(f"Weight file '{path}' resolves outside the package folder '{self.root}'.")
        if not path.is_file():
            raise ModelPackageError(f"Model package '{self.source}': weight file '{rel}' is missing.")
        return path

    def verify(self) -> None:
        """Re-hash every weight file; raise :class:`ChecksumError` naming the file on a mismatch."""
        for w in self.card["weights"]:
            path = self._weight_path(w["file"])
            check_sha256(sha256_file(path), w["sha256"], str(path))

    def load_state_dict(self) -> Dict[str, Any]:
        """The weights as one state dict (several files are shards and are merged), hash-checked as read."""
        state: Dict[str, Any] = {}
        for w in self.card["weights"]:
            path = self._weight_path(w["file"])
            data = path.read_bytes()  # hash exactly the bytes that get deserialised
            check_sha256(sha256_bytes(data), w["sha256"], str(path))
            part = _load_state_dict_bytes(data, w["format"], str(path))
            overlap = set(state) & set(part)
            if overlap:
                raise ModelPackageError(f"Weight file '{path}' repeats tensors of another file: {sorted(overlap)[:5]}.")
            state.update(part)
        return state

    def build_network(self, device: Any = "cpu"):
        """The network with its verified weights loaded, on ``device``, in eval mode."""
        from SyntheticCTLib.models.architectures import build_network

        name, kwargs = self.architecture
        network = build_network(name, **kwargs)
        load_weights(network, self.load_state_dict(), str(self.source))
        return network.to(device).eval()

    def to_hu(self, y):
        """Map network output ``y`` (numpy array or tensor) to HU: ``clip(y * scale + offset, *clip)``."""
        out = self.output
        hu = y * float(out["scale"]) + float(out["offset"])
        lo, hi = float(out["clip"][0]), float(out["clip"][1])
        return hu.clip(lo, hi) if hasattr(hu, "clip") else min(max(hu, lo), hi)


def load_weights(network, state_dict: Mapping[str, Any], source: str = "<weights>") -> None:
    """``network.load_state_dict(state_dict, strict=True)``; a mismatch raises :class:`ArchitectureError`."""
    try:
        network.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = " ".join(lines[1:4]) if len(lines) > 1 else str(e)
        raise ArchitectureError(
            f"The weights of '{source}' do not match the architecture {type(network).__name__}: {detail[:600]}"
        ) from e


def _find_card_root(folder: Path, source: Path) -> Path:
    if (folder / MODEL_CARD).is_file():
        return folder
    entries = [p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / MODEL_CARD).is_file():
        return entries[0]
    raise ModelPackageError(
        f"Model package '{source}' has no {MODEL_CARD} (looked at its top level"
        f"{' and in its single folder' if len(entries) == 1 else ''})."
    )


def read_card(root: Path, source: object = None) -> Dict[str, Any]:
    """Read and validate ``root/model.json`` (no weight checks, no torch)."""
    path = Path(root) / MODEL_CARD
    source = source or root
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelPackageError(f"Model package '{source}' has no {MODEL_CARD}.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelPackageError(f"Cannot read '{path}': {e}") from e
    return validate_card(parse_card_json(text, path), source)


MAX_CARD_BYTES = 16 * 1024**2
"""The largest ``model.json`` read (a card is a few kB; training statistics make it larger)."""
MAX_PARAMETERS = 1_000_000_000
"""The most parameters a model package's network may have (4 GB of float32 weights)."""
MAX_UNET_DEPTH = 12


def parse_card_json(text: str, path: object) -> Any:
    """``json.loads`` for a ``model.json``, with one-line errors (also for absurdly deep nesting)."""
    if len(text) > MAX_CARD_BYTES:
        raise ModelPackageError(f"'{path}' is {len(text)} bytes; a model.json is at most {MAX_CARD_BYTES}.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelPackageError(f"'{path}' is not valid JSON: {e}") from e
    except RecursionError:
        raise ModelPackageError(f"'{path}' is not usable JSON: it is nested too deeply.") from None


def _int_arg(kwargs: Mapping[str, Any], key: str, default: int, source: object) -> int:
    value = kwargs.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, f"architecture.kwargs.{key} must be an integer (got {value!r}).")
    return value


def unet3d_parameter_count(kwargs: Mapping[str, Any], source: object = "<model.json>") -> int:
    """The exact number of parameters of ``UNet3D(**kwargs)``, computed without building it."""
    in_ch = _int_arg(kwargs, "in_channels", 1, source)
    out_ch = _int_arg(kwargs, "out_channels", 1, source)
    depth = _int_arg(kwargs, "depth", 3, source)
    width = _int_arg(kwargs, "width", 16, source)
    norm = kwargs.get("norm", "instance")
    residual = bool(kwargs.get("residual", True))
    if not 1 <= depth <= MAX_UNET_DEPTH:
        raise _fail(source, f"architecture.kwargs.depth is {depth}; it must be from 1 to {MAX_UNET_DEPTH}.")
    if width < 1 or in_ch < 1 or out_ch < 1:
        raise _fail(source, "architecture.kwargs width, in_channels and out_channels must be >= 1.")
    bias = 1 if norm == "none" else 0
    norm_params = 0 if norm == "none" else 2

    def block(c_in: int, c_out: int) -> int:
        n = 27 * c_in * c_out + bias * c_out + norm_params * c_out
        n += 27 * c_out * c_out + bias * c_out + norm_params * c_out
        if residual and c_in != c_out:
            n += c_in * c_out + bias * c_out + norm_params * c_out
        return n

    widths = [width * 2**i for i in range(depth)]
    total, prev = 0, in_ch
    for level, ch in enumerate(widths):
        total += block(prev, ch)
        if level < depth - 1:
            total += 8 * ch * ch + ch
        prev = ch
    for level in range(depth - 2, -1, -1):
        total += 8 * widths[level + 1] * widths[level] + widths[level]
        total += block(2 * widths[level], widths[level])
    return total + widths[0] * out_ch + out_ch


def check_architecture_size(card: Mapping[str, Any], source: object = "<model.json>") -> int:
    """The parameter count of the card's network, refused above :data:`MAX_PARAMETERS`.

    Computed from the arguments (never by allocating the network), so that a card asking for a
    network of terabytes is refused when the package is added, not when it runs.
    """
    name = card["architecture"]["name"]
    kwargs = card["architecture"].get("kwargs", {})
    if name == "unet3d":
        count = unet3d_parameter_count(kwargs, source)
    else:  # another registered architecture: count on the meta device (no memory)
        import torch

        from SyntheticCTLib.models.architectures import build_network

        with torch.device("meta"):
            network = build_network(name, **kwargs)
        count = sum(p.numel() for p in network.parameters())
    if count > MAX_PARAMETERS:
        raise ArchitectureError(
            f"Model package '{source}': architecture '{name}' with {dict(kwargs)} has {count:.3g} parameters, "
            f"more than the {MAX_PARAMETERS:.3g} allowed ({count * 4 / 1e9:.3g} GB of weights)."
        )
    return count


def _zip_card_root(names: List[str], archive: Path) -> str:
    """The folder prefix (``""`` or ``"dir/"``) of ``model.json`` in a zip's member names."""
    top = {n.split("/", 1)[0] for n in names if n and not n.split("/", 1)[0].startswith((".", "__MACOSX"))}
    if MODEL_CARD in names:
        return ""
    if len(top) == 1:
        prefix = next(iter(top)) + "/"
        if prefix + MODEL_CARD in names:
            return prefix
    raise ModelPackageError(
        f"Model package '{archive}' has no {MODEL_CARD} (looked at its top level"
        f"{' and in its single folder' if len(top) == 1 else ''})."
    )


def extract_package_zip(archive: PathLike, target: PathLike) -> Path:
    """Extract a model package ``.zip`` into the new folder ``target``: ``model.json`` and the weight files it
    names, nothing else. Returns the package folder (``target`` or its single sub-folder)."""

    archive, target = Path(archive), Path(target)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [i.filename.replace("\\", "/") for i in zf.infolist()]
            if len(names) > len(set(names)):
                from SyntheticCTLib.models.errors import UnsafeArchiveError

                twice = sorted({n for n in names if names.count(n) > 1})
                raise UnsafeArchiveError(f"'{archive}': member(s) {', '.join(twice)} are in the archive twice.")
            prefix = _zip_card_root(names, archive)
            info = zf.getinfo(prefix + MODEL_CARD)
            if info.file_size > MAX_CARD_BYTES:
                raise ModelPackageError(f"'{archive}': its {MODEL_CARD} is {info.file_size} bytes; too large.")
            text = zf.read(info).decode("utf-8")
    except (zipfile.BadZipFile, EOFError, KeyError, UnicodeDecodeError) as e:
        raise ModelPackageError(f"'{archive}' is not a readable model package zip: {e}") from e
    except OSError as e:
        if isinstance(e, ModelPackageError):
            raise
        raise ModelPackageError(f"Cannot read '{archive}': {e.strerror or e}.") from e
    card = validate_card(parse_card_json(text, f"{archive}:{prefix}{MODEL_CARD}"), archive)
    wanted = [prefix + MODEL_CARD] + [prefix + w["file"].replace("\\", "/") for w in card["weights"]]
    safe_extract_zip(archive, target, members=wanted)
    return target / prefix.rstrip("/") if prefix else target


def load_model_package(path: PathLike, *, verify: bool = True, extract_dir: Optional[PathLike] = None) -> ModelPackage:
    """Load a model package from a folder or a ``.zip``; validate ``model.json`` and check weight hashes.

    Parameters
    ----------
    path
        A folder holding ``model.json`` (directly or in its single sub-folder), or a ``.zip`` of one.
    verify
        Re-hash the weight files now (they are hashed again whenever they are loaded).
    extract_dir
        Where a ``.zip`` is extracted (a temporary folder inside it, removed with the package);
        default: the system temporary folder.

    Raises
    ------
    ModelPackageError
        Missing or malformed ``model.json`` or weights, unsafe archive (:class:`UnsafeArchiveError`),
        newer schema (:class:`SchemaVersionError`), unknown architecture
        (:class:`UnknownArchitectureError`), hash mismatch (:class:`ChecksumError`).
    """
    path = Path(path)
    if not path.exists():
        raise ModelPackageError(f"No model package at '{path}'.")
    tmp: Optional[Path] = None
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise ModelPackageError(f"'{path}' is neither a model folder nor a .zip archive of one.")
        base = Path(extract_dir) if extract_dir is not None else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="syntheticct-model-", dir=base))
        try:
            folder = extract_package_zip(path, tmp / "package")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        folder = path
    try:
        root = _find_card_root(folder, path)
        card = read_card(root, path)
        check_architecture_size(card, path)
        from SyntheticCTLib.models.architectures import ARCHITECTURES, known_architectures
        from SyntheticCTLib.models.errors import UnknownArchitectureError

        arch = card["architecture"]["name"]
        if arch not in ARCHITECTURES:
            raise UnknownArchitectureError(
                f"Model package '{path}' needs architecture '{arch}', which this version of SyntheticCT does not "
                f"know; known architectures: {', '.join(known_architectures())}."
            )
        package = ModelPackage(root, card, source=path)
        if verify:
            package.verify()
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tmp is not None:
        package._cleanup = weakref.finalize(package, shutil.rmtree, str(tmp), True)
    return package


def _save_weights(state_dict: Mapping[str, Any], path: Path, fmt: str) -> None:
    import torch

    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ModelPackageError(f"state_dict entry {key!r} is not a tensor; a state dict maps names to tensors.")
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(tensors, str(path))


def write_model_package(
    out_dir: PathLike,
    card: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    *,
    weights_format: str = "safetensors",
    overwrite: bool = False,
) -> Path:
    """Write a model package folder: the weights, their SHA-256 and ``model.json``, atomically.

    ``card`` is ``model.json`` without its ``weights`` (any given are replaced); ``schema_version``,
    ``diagnostic_use``, ``overlap``, ``architecture.kwargs.in_channels`` and ``network_data_format`` are
    filled in when absent. The state dict must fit the architecture exactly (checked by building it).
    The folder is assembled beside ``out_dir`` and renamed into place; with ``overwrite`` an existing
    package there is replaced, else it is an error. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if weights_format not in WEIGHT_FORMATS:
        raise ModelPackageError(f"weights_format must be one of {', '.join(WEIGHT_FORMATS)} (got {weights_format!r}).")
    if out_dir.exists() and not overwrite:
        raise ModelPackageError(f"'{out_dir}' already exists; pass overwrite=True to replace the package there.")
    card = copy.deepcopy(dict(card))
    card.setdefault("schema_version", SCHEMA_VERSION)
    card.setdefault("diagnostic_use", DIAGNOSTIC_USE)
    card.setdefault("disclaimer", NOT_FOR_DIAGNOSTIC_USE)
    weights_file = "model.safetensors" if weights_format == "safetensors" else "model.pt"
    card["weights"] = [{"file": weights_file, "sha256": "0" * 64, "format": weights_format}]
    card = validate_card(card, out_dir)
    card.setdefault("orientation", "input")
    card.setdefault("network_data_format", network_data_format(card))
    card = {**{k: card[k] for k in CARD_ORDER if k in card}, **card}

    from SyntheticCTLib.models.architectures import build_network

    name, kwargs = card["architecture"]["name"], card["architecture"]["kwargs"]
    network = build_network(name, **kwargs)
    load_weights(network, state_dict, f"state_dict for {out_dir}")
    multiple = int(getattr(network, "size_multiple", 1))
    if any(p % multiple for p in card["patch_size"]):
        raise ModelPackageError(
            f"patch_size {card['patch_size']} must be divisible by {multiple} for architecture '{name}' with {kwargs}."
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".writing", dir=out_dir.parent))
    try:
        _save_weights(state_dict, tmp / weights_file, weights_format)
        card["weights"][0]["sha256"] = sha256_file(tmp / weights_file)
        (tmp / MODEL_CARD).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            if not (out_dir / MODEL_CARD).is_file():
                raise ModelPackageError(f"Refusing to replace '{out_dir}': it is not a model package folder.")
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Wrote model package '%s' (%s %s).", out_dir, card["name"], card["version"])
    return out_dir


__all__ = [
    "SCHEMA_VERSION",
    "MODEL_CARD",
    "ModelPackage",
    "ChecksumError",
    "load_model_package",
    "write_model_package",
    "validate_card",
    "read_card",
    "input_label",
    "card_protocols",
    "network_data_format",
    "load_weights",
]
