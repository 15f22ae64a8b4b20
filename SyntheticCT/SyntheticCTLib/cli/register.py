"""``syntheticct register``: align a synthetic CT, CT or MRI (moving) with a CT (fixed); write the transform."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List

from SyntheticCTLib.cli.options import add_command
from SyntheticCTLib.kernel.hu import BONE_THRESHOLD_HU

DESCRIPTION = """\
Register the moving image (synthetic CT, CT or MRI) to the fixed image (normally the CT).

The transform file (.tfm, .txt or .h5) maps points of the FIXED image to the MOVING image (ITK
resampling convention). In 3D Slicer, load it and make it the parent transform of the moving volume:
the moving volume then appears aligned with the fixed one (Slicer keeps the file as the "from parent"
transform; its "to parent" transform, moving -> fixed points, is the inverse).

A JSON summary (metric value, iterations, time, mode, metric, initialization, per-bone results) is
written beside the transform as TRANSFORM.json unless --json names another file. In bone-local mode
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
        choices=("rigid", "affine", "deformable", "bone-local"),
        default="rigid",
        help="rigid (default), affine, deformable (B-spline over affine) or bone-local (rigid per bone)",
    )
    p.add_argument(
        "--metric",
        choices=("auto", "correlation", "meansquares", "mattes"),
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
        choices=("auto", "geometry", "moments", "none"),
        default="auto",
        help="initialization: auto (default), geometry, moments, or none (trust the physical space)",
    )
    p.add_argument(
        "--initial-transform",
        metavar="T",
        help="start from this linear transform (fixed -> moving points, as the output; e.g. a rough manual "
        "alignment saved from Slicer) instead of --initialize; its rigid part is used",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the metric's random samples")
    p.add_argument("--json", metavar="OUT", help="JSON summary file (default: TRANSFORM.json)")
    p.set_defaults(run=run)
    return p


def bone_transform_path(transform_path: Path, label: int) -> Path:
    """Where bone ``label``'s transform goes: ``T.tfm`` -> ``T.bone<label>.tfm``."""
    return transform_path.with_name(f"{transform_path.stem}.bone{int(label)}{transform_path.suffix}")


def run(args: argparse.Namespace, report) -> int:
    from SyntheticCTLib.kernel.errors import InvalidParameterError
    from SyntheticCTLib.kernel.io import atomic_output, check_not_input, read_volume, volume_suffix, write_volume
    from SyntheticCTLib.registration.engine import DEFAULT_SEED
    from SyntheticCTLib.registration.registration import register, resample_moving
    from SyntheticCTLib.registration.transforms_io import (
        TRANSFORM_SUFFIXES,
        read_transform,
        transform_suffix,
        write_transform,
    )

    transform_path = Path(args.output)
    json_path = Path(args.json) if args.json else transform_path.with_name(transform_path.name + ".json")
    resampled_path = Path(args.resampled) if args.resampled else None
    given = (args.fixed, args.moving, args.fixed_mask, args.moving_mask, args.bone_labels, args.initial_transform)
    inputs = [Path(p) for p in given if p]
    if not transform_suffix(transform_path):
        raise InvalidParameterError(
            f"The transform '{transform_path}' must end with one of {', '.join(TRANSFORM_SUFFIXES)}."
        )
    if resampled_path is not None and not volume_suffix(resampled_path):
        raise InvalidParameterError(
            f"The resampled image '{resampled_path}' needs a volume suffix (.nii.gz, .nrrd, .mha...)."
        )
    if json_path.suffix.lower() != ".json":
        raise InvalidParameterError(f"The JSON summary '{json_path}' must end with .json.")
    outputs = [transform_path, json_path] + ([resampled_path] if resampled_path else [])
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise InvalidParameterError("The transform, JSON and resampled outputs must be different files.")
    for out in outputs:
        check_not_input(out, inputs)

    report(0.0, "reading", "reading images")
    fixed = read_volume(args.fixed)
    moving = read_volume(args.moving)
    fixed_mask = read_volume(args.fixed_mask) if args.fixed_mask else None
    moving_mask = read_volume(args.moving_mask) if args.moving_mask else None
    bone_labels = read_volume(args.bone_labels) if args.bone_labels else None
    initial_transform = read_transform(args.initial_transform) if args.initial_transform else None
    if bone_labels is not None and args.mode != "bone-local":
        raise InvalidParameterError("--bone-labels is only used with --mode bone-local.")

    from SyntheticCTLib.kernel.progress import scaled

    result = register(
        fixed,
        moving,
        mode=args.mode,
        metric=args.metric,
        fixed_mask=fixed_mask,
        moving_mask=moving_mask,
        bone_labels=bone_labels,
        initialize=args.initialize,
        initial_transform=initial_transform,
        bone_threshold_hu=args.bone_threshold,
        seed=DEFAULT_SEED if args.seed is None else int(args.seed),
        progress=scaled(report, 0.02, 0.9),
    )
    resampled = resample_moving(moving, fixed, result.transform) if resampled_path else None

    # Write everything, or nothing: on a failure, remove what this run already wrote.
    written: List[Path] = []
    try:
        report(0.9, "writing", f"transform {transform_path.name}")
        written.append(write_transform(result.transform, transform_path, inputs=inputs))
        summary = result.to_dict()
        for bone, entry in zip(result.per_bone, summary["per_bone"]):
            path = bone_transform_path(transform_path, bone["label"])
            check_not_input(path, inputs)
            written.append(write_transform(bone["transform"], path, inputs=inputs))
            entry["file"] = path.name
        if resampled is not None:
            report(0.95, "writing", f"resampled image {resampled_path.name}")
            written.append(write_volume(resampled, resampled_path, inputs=inputs))
        summary.update(
            fixed=str(args.fixed),
            moving=str(args.moving),
            transform_file=str(transform_path),
            resampled_file=str(resampled_path) if resampled_path else None,
        )
        with atomic_output(json_path) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        written.append(json_path)
    except BaseException:
        for path in written:
            try:
                path.unlink()
            except OSError:
                pass
        raise
    report(1.0, "done", f"metric {result.metric_value:.5g}")

    if args.progress != "json":
        out = sys.stdout
        out.write(f"transform ({result.mode}, fixed -> moving points): {transform_path}\n")
        out.write(
            f"metric {result.metric} = {result.metric_value:.6g}, {result.iterations} iterations, "
            f"{result.elapsed_s:.1f} s{'' if result.converged else ' (check: not converged)'}\n"
        )
        if resampled_path:
            out.write(f"resampled moving image: {resampled_path}\n")
        for bone in result.per_bone:
            out.write(
                f"bone {bone['label']}: {bone['voxels']} voxels, {bone['shift_from_global_mm']:.2f} mm from "
                f"the global transform\n"
            )
        out.write(f"summary: {json_path}\n")
    return 0
