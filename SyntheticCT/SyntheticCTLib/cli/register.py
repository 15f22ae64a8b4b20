"""``syntheticct register``: align a synthetic CT, CT or MRI (moving) with a CT (fixed); write the transform."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from SyntheticCTLib.cli.options import add_command
from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.hu import BONE_THRESHOLD_HU
from SyntheticCTLib.kernel.io import read_volume
from SyntheticCTLib.kernel.progress import scaled
from SyntheticCTLib.registration import INITIALIZATIONS, METRICS, MODES
from SyntheticCTLib.registration.engine import DEFAULT_SEED
from SyntheticCTLib.registration.output import plan_outputs, write_registration
from SyntheticCTLib.registration.registration import register
from SyntheticCTLib.registration.transforms_io import read_transform

DESCRIPTION = """\
Register the moving image (synthetic CT, CT or MRI) to the fixed image (normally the CT).

The transform file (.tfm, .txt or .h5) maps points of the FIXED image to the MOVING image (ITK
resampling convention). In 3D Slicer, load it and make it the parent transform of the moving volume:
the moving volume then appears aligned with the fixed one (Slicer keeps the file as the "from parent"
transform; its "to parent" transform, moving -> fixed points, is the inverse).

A JSON summary (metric value, iterations, time, mode, metric, initialization, per-bone results and
the grade) is written beside the transform as TRANSFORM.json unless --json names another file.

Every registration is graded "good", "doubtful" or "failed" ("quality" in the JSON): the result is
compared with the best right-angle poses turned away from it, and the body and (CT to CT) bone
overlaps after alignment are measured. A doubtful grade prints a warning line, a failed one an error
line; the exit status stays 0 unless --strict. In bone-local mode
each bone's rigid transform is also written as TRANSFORM_STEM.bone<label><suffix>.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "register",
        help="register an sCT, CT or MRI to a CT; write an ITK transform",
        description=DESCRIPTION,
    )
    p.add_argument("--fixed", required=True, metavar="CT", help="fixed image (the CT): a volume file or DICOM folder")
    p.add_argument("--moving", required=True, metavar="IMG", help="moving image (sCT, CT or MRI)")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="TRANSFORM",
        help="transform file to write (.tfm, .txt or .h5), fixed -> moving points",
    )
    p.add_argument("--resampled", metavar="OUT", help="also write the moving image resampled onto the fixed grid")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="rigid",
        help="rigid (default), affine, deformable (B-spline over affine) or bone-local (rigid per bone)",
    )
    p.add_argument(
        "--metric",
        choices=METRICS,
        default="auto",
        help="similarity metric; auto: correlation for CT/sCT pairs, Mattes mutual information otherwise",
    )
    p.add_argument("--fixed-mask", metavar="M", help="mask of the fixed image (nonzero = use)")
    p.add_argument("--moving-mask", metavar="M", help="mask of the moving image (nonzero = use)")
    p.add_argument(
        "--bone-labels",
        metavar="L",
        help="bone label map in the fixed space for bone-local mode (default: CT bone components)",
    )
    p.add_argument(
        "--bone-threshold",
        type=float,
        default=BONE_THRESHOLD_HU,
        metavar="HU",
        help="HU threshold of the bone components in bone-local mode (default: 200)",
    )
    p.add_argument(
        "--initialize",
        choices=INITIALIZATIONS,
        default="auto",
        help="initialization: auto (default), geometry, moments, or none (trust the physical space)",
    )
    p.add_argument(
        "--initial-transform",
        metavar="T",
        help="start from this linear transform (fixed -> moving points, as the output; e.g. a rough manual "
        "alignment saved from Slicer) instead of --initialize; its rigid part is used",
    )
    p.add_argument(
        "--no-pose-search",
        action="store_true",
        help="do not try the 24 right-angle poses first (by default they are tried when the fixed image is a CT: "
        "scans turned over between them, prone/supine or head/feet first, need no manual start)",
    )
    p.add_argument(
        "--inverse-check",
        action="store_true",
        help="grade also by registering the other way from the inverse (rigid/affine; about doubles the time)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 3 when the registration is graded 'doubtful' or 'failed' (files are still written)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the metric's random samples")
    p.add_argument("--json", metavar="OUT", help="JSON summary file (default: TRANSFORM.json)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace, report) -> int:

    given = (args.fixed, args.moving, args.fixed_mask, args.moving_mask, args.bone_labels, args.initial_transform)
    inputs = [Path(p) for p in given if p]
    outputs = plan_outputs(args.output, record=args.json, resampled=args.resampled, inputs=inputs)
    if args.bone_labels and args.mode != "bone-local":
        raise InvalidParameterError("--bone-labels is only used with --mode bone-local.")

    report(0.0, "reading", "reading images")
    fixed = read_volume(args.fixed)
    moving = read_volume(args.moving)
    result = register(
        fixed,
        moving,
        mode=args.mode,
        metric=args.metric,
        fixed_mask=read_volume(args.fixed_mask) if args.fixed_mask else None,
        moving_mask=read_volume(args.moving_mask) if args.moving_mask else None,
        bone_labels=read_volume(args.bone_labels) if args.bone_labels else None,
        initialize=args.initialize,
        initial_transform=read_transform(args.initial_transform) if args.initial_transform else None,
        bone_threshold_hu=args.bone_threshold,
        pose_search=False if args.no_pose_search else None,
        inverse_check=args.inverse_check,
        seed=DEFAULT_SEED if args.seed is None else int(args.seed),
        progress=scaled(report, 0.02, 0.9),
    )
    write_registration(
        result,
        outputs,
        fixed=fixed,
        moving=moving,
        sources=_sources(args),
        inputs=inputs,
        progress=scaled(report, 0.9, 1.0),
    )
    report(1.0, "done", f"metric {result.metric_value:.5g}")
    if args.progress != "json":
        _print_summary(result, outputs, sys.stdout)
    verdict = _print_grade(result.quality, sys.stderr)
    return STRICT_EXIT if args.strict and verdict in ("doubtful", "failed") else 0


STRICT_EXIT = 3
"""Exit status of ``--strict`` when the registration is graded doubtful or failed (1 is an error, 2 a usage error)."""


def _print_grade(quality, err) -> str:
    """A warning line for "doubtful", an error line for "failed" (on stderr); returns the verdict."""
    if quality is None:
        return "not graded"
    reasons = "; ".join(quality.reasons)
    if quality.verdict == "failed":
        err.write(f"syntheticct register: error: the registration is graded FAILED: {reasons}. Do not use it.\n")
    elif quality.verdict == "doubtful":
        err.write(f"syntheticct register: warning: the registration is graded doubtful: {reasons}. Check it.\n")
    return quality.verdict


def _sources(args: argparse.Namespace) -> dict:
    """What the record says about the inputs (for bone-local: where its bone labels came from)."""
    sources = {"fixed": str(args.fixed), "moving": str(args.moving)}
    if args.mode == "bone-local":
        sources["bone_labels"] = str(Path(args.bone_labels).resolve()) if args.bone_labels else None
        sources["bone_threshold_hu"] = float(args.bone_threshold)
    return sources


def _print_summary(result, outputs, out) -> None:
    out.write(f"transform ({result.mode}, fixed -> moving points): {outputs.transform}\n")
    out.write(
        f"metric {result.metric} = {result.metric_value:.6g}, {result.iterations} iterations, "
        f"{result.elapsed_s:.1f} s{'' if result.converged else ' (check: not converged)'}\n"
    )
    if result.quality is not None:
        m = result.quality.measures
        numbers = [
            f"{label} {m[key]:.{digits}f}"
            for key, label, digits in (("body_dice", "body Dice", 3), ("bone_dice", "bone Dice", 3))
            if m.get(key) is not None
        ]
        if m.get("pose_margin") is not None:
            numbers.append(
                f"{100 * m['pose_margin']:.0f} % better than a pose turned by {m['rival_rotation_deg']:.0f} deg"
            )
        if m.get("inverse_residual_mm") is not None:
            numbers.append(f"inverse residual {m['inverse_residual_mm']:.2f} mm")
        out.write(f"quality: {result.quality.verdict} ({', '.join(numbers) or 'no measure'})\n")
    if outputs.resampled:
        out.write(f"resampled moving image: {outputs.resampled}\n")
    for bone in result.per_bone:
        out.write(
            f"bone {bone['label']}: {bone['voxels']} voxels, {bone['shift_from_global_mm']:.2f} mm from "
            f"the global transform\n"
        )
    out.write(f"summary: {outputs.record}\n")
