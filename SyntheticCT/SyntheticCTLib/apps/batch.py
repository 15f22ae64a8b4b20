"""Synthesis of a list of cases in one process, and across processes, GPUs or nodes under ``torchrun``.

A case is a ``case.json`` (or the folder holding one) whose ``"mri"`` lists the MRI channel files
relative to it (the phantom's ``case.json`` is one), or a dict ``{"id": ..., "mri": [...]}``.

For a case ``ID`` the outputs in ``out_dir`` are ``ID.nii.gz`` (the sCT), optionally
``ID_uncertainty.nii.gz`` and the DICOM series folder ``ID_dicom/``, and last ``ID.json``, the
case's record (status, the rank that ran it, device, timing, model, outputs). Every file is
written atomically, so an interrupted run leaves finished cases complete and nothing half-written;
with ``skip_existing`` a rerun skips the cases whose record says ``"done"``.

Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set) rank ``r`` of ``w`` takes ``cases[r::w]``: every
case is run by exactly one rank, and no rank talks to another while working. Each rank writes
``synthesis_rank{r}of{w}.json`` (its share and records); when the launcher provides a rendezvous
(``MASTER_ADDR``), the ranks meet at a gloo barrier at the end and rank 0 merges the rank files
into ``synthesis_summary.json`` (a single process writes that file directly). On GPUs, each rank
uses ``cuda:{LOCAL_RANK}``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from SyntheticCTLib import NOT_FOR_DIAGNOSTIC_USE
from SyntheticCTLib.kernel.acquisition import acquisition_for_files, acquisition_from_metadata
from SyntheticCTLib.kernel.errors import Cancelled, InvalidParameterError, SyntheticCTError, VolumeReadError
from SyntheticCTLib.kernel.io import check_mri_channels, check_not_input, read_volume, write_volume
from SyntheticCTLib.kernel.jsonio import write_json
from SyntheticCTLib.kernel.progress import CancelToken, ProgressCallback, no_progress, scaled, with_cancel
from SyntheticCTLib.kernel.types import PathLike
from SyntheticCTLib.phantom.case import MANIFEST, read_manifest
from SyntheticCTLib.synthesis.dicom_export import export_dicom_series
from SyntheticCTLib.synthesis.inference import Synthesizer
from SyntheticCTLib.synthesis.input_check import review_inputs, stamp_warnings

logger = logging.getLogger(__name__)

SUMMARY_FILE = "synthesis_summary.json"
_ID_PATTERN = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class SynthesisCase:
    """One case: an identifier (used in output names) and its MRI channel files, in the model's order."""

    case_id: str
    mri: Tuple[Path, ...]
    source: Optional[Path] = None


@dataclass
class BatchSummary:
    """What :func:`synthesize_cases` did on this rank."""

    rank: int
    world_size: int
    cases: List[str]
    records: List[Dict[str, Any]] = field(default_factory=list)
    rank_file: Optional[Path] = None
    summary_file: Optional[Path] = None

    @property
    def failed(self) -> List[Dict[str, Any]]:
        return [r for r in self.records if r.get("status") == "failed"]


def _safe_id(text: str) -> str:
    cleaned = _ID_PATTERN.sub("_", str(text)).strip("._")
    if not cleaned:
        raise InvalidParameterError(f"Case id {text!r} has no usable characters.")
    return cleaned


def load_case_file(path: PathLike) -> SynthesisCase:
    """Read a ``case.json`` (or a folder holding one): its ``"mri"`` files relative to it, its id.

    The id is the manifest's ``"id"`` (or ``"name"``), else the folder's name for a file named
    ``case.json``, else the file's stem.
    """
    file, manifest = read_manifest(path)
    if not isinstance(manifest.get("mri"), list) or not manifest["mri"]:
        raise VolumeReadError(f"The case file '{file}' needs an \"mri\" list of MRI files (one per channel).")
    default_id = file.parent.name if file.name == MANIFEST else file.stem.replace(".json", "")
    case_id = _safe_id(manifest.get("id") or manifest.get("name") or default_id)
    mri = tuple((file.parent / str(p)) if not Path(str(p)).is_absolute() else Path(str(p)) for p in manifest["mri"])
    return SynthesisCase(case_id, mri, file)


def as_case(item: Union[SynthesisCase, Mapping[str, Any], PathLike], index: int = 0) -> SynthesisCase:
    """A :class:`SynthesisCase` from a case, a ``{"id", "mri"}`` dict, or a case file/folder path."""
    if isinstance(item, SynthesisCase):
        return item
    if isinstance(item, Mapping):
        mri = item.get("mri")
        if not isinstance(mri, (list, tuple)) or not mri:
            raise InvalidParameterError(f'Case {index + 1} needs an "mri" list of files.')
        return SynthesisCase(_safe_id(item.get("id") or f"case{index + 1:04d}"), tuple(Path(p) for p in mri))
    return load_case_file(item)


def read_case_list(path: PathLike) -> List[SynthesisCase]:
    """Cases from a list file: a JSON list (of case paths or ``{"id", "mri"}`` dicts) or one case path a line.

    Relative paths are relative to the list file; empty lines and lines starting with ``#`` are skipped.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise VolumeReadError(f"Cannot read the case list '{path}': {e}") from e
    base = path.parent

    def _abs(p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else base / q

    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise VolumeReadError(f"The case list '{path}' is not valid JSON: {e}") from e
        cases = []
        for i, item in enumerate(items):
            if isinstance(item, Mapping):
                item = dict(item, mri=[str(_abs(str(p))) for p in item.get("mri") or []])
                cases.append(as_case(item, i))
            else:
                cases.append(load_case_file(_abs(str(item))))
        return cases
    lines = [ln.strip() for ln in text.splitlines()]
    return [load_case_file(_abs(ln)) for ln in lines if ln and not ln.startswith("#")]


def distributed_context() -> Tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the ``torchrun`` environment (0, 1, 0 outside it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise InvalidParameterError(f"Bad RANK/WORLD_SIZE/LOCAL_RANK environment: {e}") from e
    if world < 1 or not 0 <= rank < world:
        raise InvalidParameterError(f"Bad torchrun environment: RANK={rank}, WORLD_SIZE={world}.")
    return rank, world, local


def case_outputs(out_dir: Path, case_id: str, *, uncertainty: bool = False, dicom: bool = False) -> Dict[str, Path]:
    """The output paths of one case."""
    out = {"sct": out_dir / f"{case_id}.nii.gz", "record": out_dir / f"{case_id}.json"}
    if uncertainty:
        out["uncertainty"] = out_dir / f"{case_id}_uncertainty.nii.gz"
    if dicom:
        out["dicom"] = out_dir / f"{case_id}_dicom"
    return out


def _is_done(record_path: Path) -> bool:
    try:
        return json.loads(record_path.read_text(encoding="utf-8")).get("status") == "done"
    except (OSError, ValueError, AttributeError):
        return False


def _device_for_rank(device: str, local_rank: int, world: int) -> str:
    if world <= 1 or device not in ("auto", "cuda"):
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def _barrier_and_merge(out_dir: Path, rank: int, world: int) -> Optional[Path]:
    """Meet the other ranks at a gloo barrier; rank 0 merges the rank files. None without a rendezvous."""
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return None
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        # Long timeout: ranks finishing early wait for the slowest; torchrun ends all ranks if one fails.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        created = True
    try:
        dist.barrier()
        if rank != 0:
            return None
        merged: Dict[str, Any] = {"world_size": world, "ranks": [], "records": [], "notice": NOT_FOR_DIAGNOSTIC_USE}
        for r in range(world):
            rank_file = out_dir / f"synthesis_rank{r}of{world}.json"
            data = json.loads(rank_file.read_text(encoding="utf-8"))
            merged["ranks"].append({"rank": r, "cases": data["cases"]})
            merged["records"].extend(data["records"])
        path = out_dir / SUMMARY_FILE
        write_json(path, merged)
        return path
    finally:
        if created:
            dist.destroy_process_group()


def synthesize_cases(
    cases: Sequence[Union[SynthesisCase, Mapping[str, Any], PathLike]],
    model: Any,
    out_dir: PathLike,
    *,
    device: str = "auto",
    tta: bool = False,
    uncertainty: bool = False,
    dicom: bool = False,
    window: Any = None,
    skip_existing: bool = False,
    resample_channels: bool = False,
    strict: bool = False,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> BatchSummary:
    """Synthesise every case (this rank's share under ``torchrun``) into ``out_dir``.

    Parameters
    ----------
    cases
        :class:`SynthesisCase` objects, ``{"id", "mri"}`` dicts, or case file/folder paths. Ids must be unique.
    model
        A loaded model package; its network is built once and reused for every case.
    uncertainty
        Also write the TTA spread (implies ``tta``).
    dicom
        Also write a DICOM CT series per case (patient/study tags from the first MRI when it is DICOM).
    skip_existing
        Skip cases whose ``ID.json`` record says ``"done"``.
    resample_channels
        Resample MRI channels that are not on the first channel's grid (by default such a case fails).
    rank, world_size
        Default: from the environment (:func:`distributed_context`).

    A case that fails with a :class:`~SyntheticCTLib.kernel.errors.SyntheticCTError` (bad input) is recorded
    as ``"failed"`` and the others go on; cancellation stops at once (finished cases stay complete).
    """

    report = with_cancel(progress or no_progress, cancel)
    env_rank, env_world, local_rank = distributed_context()
    rank = env_rank if rank is None else int(rank)
    world = env_world if world_size is None else int(world_size)
    if world < 1 or not 0 <= rank < world:
        raise InvalidParameterError(f"rank must be in [0, world_size) (got {rank} of {world}).")
    all_cases = [as_case(c, i) for i, c in enumerate(cases)]
    ids = [c.case_id for c in all_cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InvalidParameterError(f"Case ids must be unique; repeated: {', '.join(duplicates)}.")
    out_dir = Path(out_dir)
    _check_batch_outputs(all_cases, out_dir, world, uncertainty=uncertainty, dicom=dicom)
    mine = all_cases[rank::world]
    logger.info(
        "Rank %d of %d: %d of %d case(s): %s",
        rank,
        world,
        len(mine),
        len(all_cases),
        ", ".join(c.case_id for c in mine) or "none",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = BatchSummary(rank=rank, world_size=world, cases=[c.case_id for c in mine])
    run = _CaseRun(
        model=model,
        device=_device_for_rank(device, local_rank, world),
        window=window,
        tta=tta or uncertainty,
        uncertainty=uncertainty,
        dicom=dicom,
        resample_channels=resample_channels,
        strict=strict,
        rank=rank,
        world=world,
        cancel=cancel,
    )
    for i, case in enumerate(mine):
        outputs = case_outputs(out_dir, case.case_id, uncertainty=uncertainty, dicom=dicom)
        step = scaled(report, i / max(len(mine), 1), (i + 1) / max(len(mine), 1))
        if skip_existing and _is_done(outputs["record"]):
            logger.info("Case %s is done already; skipped.", case.case_id)
            summary.records.append({"case": case.case_id, "status": "skipped", "rank": rank})
            continue
        step(0.0, "case", f"{case.case_id} ({i + 1} of {len(mine)})")
        record = run.case(case, outputs, step)
        write_json(outputs["record"], record)
        summary.records.append(record)
        step(1.0, "case", f"{case.case_id}: {record['status']}")
    return _write_summaries(summary, out_dir, rank, world)


def _check_batch_outputs(
    cases: Sequence[SynthesisCase], out_dir: Path, world: int, *, uncertainty: bool, dicom: bool
) -> None:
    """No output may replace any input of any case: its MRI files, or the case file itself.

    (``--case case -o case`` would otherwise write case/case.json over the case's own case.json.)
    """
    every_input = [p for c in cases for p in (*c.mri, *((c.source,) if c.source is not None else ()))]
    shared = [out_dir / SUMMARY_FILE] + [out_dir / f"synthesis_rank{r}of{world}.json" for r in range(world)]
    for case in cases:
        for path in case_outputs(out_dir, case.case_id, uncertainty=uncertainty, dicom=dicom).values():
            check_not_input(path, every_input)
    for path in shared:
        check_not_input(path, every_input)


@dataclass
class _CaseRun:
    """What every case of a batch shares; the network is built at the first case and reused."""

    model: Any
    device: str
    window: Any
    tta: bool
    uncertainty: bool
    dicom: bool
    resample_channels: bool
    strict: bool
    rank: int
    world: int
    cancel: Optional[CancelToken]
    synthesizer: Any = None

    def case(self, case: SynthesisCase, outputs: Dict[str, Path], step: ProgressCallback) -> Dict[str, Any]:
        """Synthesise one case into ``outputs``; its record, ``"done"`` or ``"failed"`` (bad input)."""
        t0 = time.perf_counter()
        head = {"case": case.case_id, "rank": self.rank, "world_size": self.world, "mri": [str(p) for p in case.mri]}
        try:
            record = {**head, "status": "done", **self._synthesize(case, outputs, step)}
        except (Cancelled, KeyboardInterrupt):
            raise
        except SyntheticCTError as e:
            logger.error("Case %s failed: %s", case.case_id, e)
            record = {**head, "status": "failed", "error": str(e)}
        record["elapsed_s"] = round(time.perf_counter() - t0, 3)
        return record

    def _synthesize(self, case: SynthesisCase, outputs: Dict[str, Path], step: ProgressCallback) -> Dict[str, Any]:
        manifest = read_manifest(case.source)[1] if case.source is not None else None
        acquisition = acquisition_for_files(case.mri, manifest, str(case.source))
        images = [read_volume(p) for p in case.mri]
        if acquisition is None:
            acquisition = acquisition_from_metadata(images, "the volumes' DICOM tags")
        check_mri_channels(images, [str(p) for p in case.mri], resample=self.resample_channels)
        input_warnings = review_inputs(
            images, self.model.card, strict=self.strict, progress=step, source=case.case_id, acquisition=acquisition
        )
        if self.synthesizer is None:
            self.synthesizer = Synthesizer(self.model, device=self.device, window=self.window)
        result = self.synthesizer.run(images, progress=scaled(step, 0.0, 0.85), cancel=self.cancel, tta=self.tta)
        stamp_warnings(result.image, input_warnings)
        write_volume(result.image, outputs["sct"], inputs=case.mri)
        if self.uncertainty and result.uncertainty is not None:
            write_volume(result.uncertainty, outputs["uncertainty"], inputs=case.mri)
        if self.dicom:
            export_dicom_series(
                result.image,
                outputs["dicom"],
                source=images[0],
                inputs=case.mri,
                overwrite=True,
                progress=scaled(step, 0.85, 1.0),
                cancel=self.cancel,
            )
        return {
            "outputs": {k: v.name for k, v in outputs.items() if k != "record"},
            "input_warnings": input_warnings,
            **result.to_dict(),
        }


def _write_summaries(summary: BatchSummary, out_dir: Path, rank: int, world: int) -> BatchSummary:
    """The summary file (one rank), or this rank's file and, on rank 0, the merged summary (torchrun)."""
    if world == 1:
        summary.summary_file = out_dir / SUMMARY_FILE
        write_json(
            summary.summary_file,
            {
                "world_size": 1,
                "ranks": [{"rank": 0, "cases": summary.cases}],
                "records": summary.records,
                "notice": NOT_FOR_DIAGNOSTIC_USE,
            },
        )
        return summary
    summary.rank_file = out_dir / f"synthesis_rank{rank}of{world}.json"
    write_json(
        summary.rank_file,
        {
            "rank": rank,
            "world_size": world,
            "cases": summary.cases,
            "records": summary.records,
            "notice": NOT_FOR_DIAGNOSTIC_USE,
        },
    )
    summary.summary_file = _barrier_and_merge(out_dir, rank, world)
    return summary


def iter_case_paths(items: Iterable[PathLike]) -> List[SynthesisCase]:
    """Cases from paths given on a command line (case files or folders)."""
    return [load_case_file(p) for p in items]


__all__ = [
    "BatchSummary",
    "SynthesisCase",
    "as_case",
    "case_outputs",
    "distributed_context",
    "iter_case_paths",
    "load_case_file",
    "read_case_list",
    "synthesize_cases",
]
