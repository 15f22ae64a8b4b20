"""``syntheticct compare``: image metrics and bone-surface deviation of a synthetic CT against a CT."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict

from SyntheticCTLib.cli.options import add_command
from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.hu import BONE_THRESHOLD_HU
from SyntheticCTLib.kernel.io import read_volume
from SyntheticCTLib.kernel.progress import scaled
from SyntheticCTLib.registration.bone_local import bone_components
from SyntheticCTLib.registration.transforms_io import read_bone_transforms, read_record, read_transform

DESCRIPTION = """\
Compare a synthetic CT with a reference CT of the same patient.

The synthetic CT is resampled onto the reference grid, through --transform when given (an ITK
transform file mapping reference points to synthetic points, as `syntheticct register` writes it).
The per-bone transforms that `syntheticct register --mode bone-local` writes beside it
(T.bone<label>.tfm, listed in T.tfm.json) are picked up too, with the bone labels it used.
Measured: MAE, ME, PSNR and SSIM inside the body (SynthRAD 2023 definitions), the bone Dice, and
the signed point-wise distances between the two bone surfaces (positive: outside the other bone),
per direction, symmetric, and per bone with --bone-labels.
With --uncertainty (the spread map `syntheticct synthesize --uncertainty` wrote beside the sCT) the
spread is sampled on the sCT bone surface (point array Spread_HU), pictured beside the deviation,
and how well it predicts the real error is measured (metrics.json "uncertainty").

OUT_DIR receives metrics.json, synthetic_surface.vtp and reference_surface.vtp (point array
SignedDistance_mm; with --uncertainty also Spread_HU), distance_histogram.csv, PNG pictures and
report.html (self-contained).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "compare",
        help="compare a synthetic CT with a CT: image metrics, bone Dice, bone-surface distances, report",
        description=DESCRIPTION,
    )
    p.add_argument("--reference", required=True, metavar="CT", help="reference CT: a volume file or DICOM folder")
    p.add_argument("--synthetic", required=True, metavar="SCT", help="synthetic CT: a volume file or DICOM folder")
    p.add_argument(
        "--transform",
        metavar="T",
        help="ITK transform file (.tfm, .txt, .h5) mapping reference points to synthetic points",
    )
    p.add_argument(
        "--bone-threshold",
        type=float,
        default=BONE_THRESHOLD_HU,
        metavar="HU",
        help="bone threshold in HU for both images (default: 200)",
    )
    p.add_argument(
        "--bone-labels",
        metavar="L",
        help="bone label map in the reference space (0 = none, k = bone k) for per-bone statistics",
    )
    p.add_argument(
        "--bone-transform",
        action="append",
        default=[],
        metavar="LABEL=T",
        help="with --bone-labels: the transform of one bone (bone-local registration); repeatable",
    )
    p.add_argument(
        "--uncertainty",
        metavar="SPREAD",
        help="the sCT's spread map (HU, on the sCT's grid, from `syntheticct synthesize --uncertainty`): "
        "shown on the bone surface and measured against the real error",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder (created if needed)")
    p.set_defaults(run=run)
    return p


def _bone_transforms(items, has_labels: bool) -> Dict[int, object]:

    if items and not has_labels:
        raise InvalidParameterError("--bone-transform needs --bone-labels (the label of each bone).")
    result: Dict[int, object] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label.strip().isdigit() or int(label) < 1 or not path:
            raise InvalidParameterError(
                f"--bone-transform expects LABEL=FILE with LABEL a positive integer; got '{item}'."
            )
        result[int(label)] = read_transform(path)
    return result


def _registration_grade(transform_path: Path) -> dict:
    """The grade of the registration that wrote ``transform_path`` (its record's ``quality``), said on stderr
    when it is not good: every figure below depends on that transform. ``{}`` when there is no record."""

    quality = (read_record(transform_path) or {}).get("quality") or {}
    verdict = quality.get("verdict")
    if verdict in ("doubtful", "failed"):
        reasons = "; ".join(quality.get("reasons") or [])
        kind = "error" if verdict == "failed" else "warning"
        sys.stderr.write(
            f"syntheticct compare: {kind}: the registration {transform_path.name} is graded {verdict} ({reasons}); "
            "the figures that depend on it (surface distances, Dice, MAE) may be meaningless.\n"
        )
    return quality


def _bone_local_beside(transform_path: Path, reference, labels):
    """The per-bone transforms written beside ``transform_path`` by bone-local registration, with their labels.

    The labels are ``labels`` when given, else the label map the registration was given (its record's
    ``bone_labels``), else the reference CT's bone components above the record's threshold, as the
    registration made them from the same CT.
    """

    bones = read_bone_transforms(transform_path)
    if not bones or labels is not None:
        return bones, labels
    record = read_record(transform_path) or {}
    if record.get("bone_labels"):
        labels = read_volume(record["bone_labels"])
    else:
        threshold = float(record.get("bone_threshold_hu") or BONE_THRESHOLD_HU)
        labels = bone_components(reference, threshold_hu=threshold)
    print(f"per-bone transforms of {len(bones)} bones found beside {transform_path.name}")
    return bones, labels


def run(args: argparse.Namespace, report) -> int:
    from SyntheticCTLib.comparison.compare import compare, write_comparison
    from SyntheticCTLib.comparison.uncertainty import check_spread

    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidParameterError(f"The output '{out_dir}' exists and is not a folder.")
    inputs = [
        Path(p) for p in (args.reference, args.synthetic, args.transform, args.bone_labels, args.uncertainty) if p
    ]
    inputs += [Path(item.partition("=")[2]) for item in args.bone_transform if "=" in item]

    report(0.0, "reading", "reading images")
    reference = read_volume(args.reference)
    synthetic = read_volume(args.synthetic)
    transform = read_transform(args.transform) if args.transform else None
    quality = _registration_grade(Path(args.transform)) if args.transform else {}
    grade = quality.get("verdict")
    labels = read_volume(args.bone_labels) if args.bone_labels else None
    spread = (
        check_spread(read_volume(args.uncertainty), synthetic, name=f"The spread map '{args.uncertainty}'")
        if args.uncertainty
        else None
    )
    bone_transforms = _bone_transforms(args.bone_transform, labels is not None)
    if args.transform and not bone_transforms:
        bone_transforms, labels = _bone_local_beside(Path(args.transform), reference, labels)

    result = compare(
        reference,
        synthetic,
        transform=transform,
        bone_threshold=args.bone_threshold,
        bone_labels=labels,
        bone_transforms=bone_transforms or None,
        registration_quality=quality,
        spread=spread,
        progress=scaled(report, 0.05, 0.8),
    )
    written = write_comparison(result, out_dir, inputs=inputs, progress=scaled(report, 0.8, 1.0))
    m = result.metrics.to_dict()

    def fmt(value, digits):
        return "n/a" if value is None else f"{value:.{digits}f}"

    print(
        f"MAE {fmt(m['mae_hu'], 1)} HU, ME {fmt(m['me_hu'], 1)} HU, PSNR {fmt(m['psnr_db'], 2)} dB, "
        f"SSIM {fmt(m['ssim'], 4)}, bone Dice {fmt(m['bone_dice'], 4)}; bone surface: mean "
        f"{fmt(m['surface_mean_mm'], 2)} mm, p95 {fmt(m['surface_p95_mm'], 2)} mm, max {fmt(m['surface_max_mm'], 2)} mm, "
        f"{100 * (m['surface_within_1mm'] or 0):.1f}% within 1 mm. Report: {written['report']}"
        + (f" (registration graded {grade})" if grade else "")
    )
    if m.get("uncertainty"):
        print(m["uncertainty"].get("reading", ""))
    return 0
