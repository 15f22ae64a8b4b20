"""``syntheticct compare``: image metrics and bone-surface deviation of a synthetic CT against a CT."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict

from SyntheticCTLib.cli.options import add_command
from SyntheticCTLib.kernel.hu import BONE_THRESHOLD_HU

DESCRIPTION = """\
Compare a synthetic CT with a reference CT of the same patient.

The synthetic CT is resampled onto the reference grid, through --transform when given (an ITK
transform file mapping reference points to synthetic points, as `syntheticct register` writes it).
Measured: MAE, ME, PSNR and SSIM inside the body (SynthRAD 2023 definitions), the bone Dice, and
the signed point-wise distances between the two bone surfaces (positive: outside the other bone),
per direction, symmetric, and per bone with --bone-labels.

OUT_DIR receives metrics.json, synthetic_surface.vtp and reference_surface.vtp (point array
SignedDistance_mm), distance_histogram.csv, PNG pictures and report.html (self-contained).
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
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder (created if needed)")
    p.set_defaults(run=run)
    return p


def _read_transform(path: str, what: str):
    import SimpleITK as sitk

    from SyntheticCTLib.kernel.errors import VolumeReadError

    file = Path(path)
    if not file.is_file():
        raise VolumeReadError(f"No {what} file at '{file}'.")
    try:
        transform = sitk.ReadTransform(str(file))
    except RuntimeError as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown cause"
        raise VolumeReadError(f"Could not read the {what} '{file}': not a readable ITK transform ({last}).") from e
    if transform.GetDimension() != 3:
        raise VolumeReadError(f"The {what} '{file}' is {transform.GetDimension()}D; a 3D transform is required.")
    return transform


def _bone_transforms(items, has_labels: bool) -> Dict[int, object]:
    from SyntheticCTLib.kernel.errors import InvalidParameterError

    if items and not has_labels:
        raise InvalidParameterError("--bone-transform needs --bone-labels (the label of each bone).")
    result: Dict[int, object] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label.strip().isdigit() or int(label) < 1 or not path:
            raise InvalidParameterError(
                f"--bone-transform expects LABEL=FILE with LABEL a positive integer; got '{item}'."
            )
        result[int(label)] = _read_transform(path, f"transform of bone {int(label)}")
    return result


def run(args: argparse.Namespace, report) -> int:
    from SyntheticCTLib.comparison.compare import compare, write_comparison
    from SyntheticCTLib.kernel.errors import InvalidParameterError
    from SyntheticCTLib.kernel.io import read_volume
    from SyntheticCTLib.kernel.progress import scaled

    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidParameterError(f"The output '{out_dir}' exists and is not a folder.")
    inputs = [Path(p) for p in (args.reference, args.synthetic, args.transform, args.bone_labels) if p]
    inputs += [Path(item.partition("=")[2]) for item in args.bone_transform if "=" in item]

    report(0.0, "reading", "reading images")
    reference = read_volume(args.reference)
    synthetic = read_volume(args.synthetic)
    transform = _read_transform(args.transform, "transform") if args.transform else None
    labels = read_volume(args.bone_labels) if args.bone_labels else None
    bone_transforms = _bone_transforms(args.bone_transform, labels is not None)

    result = compare(
        reference,
        synthetic,
        transform=transform,
        bone_threshold=args.bone_threshold,
        bone_labels=labels,
        bone_transforms=bone_transforms or None,
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
    )
    return 0
