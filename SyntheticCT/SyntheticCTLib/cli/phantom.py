"""``syntheticct phantom``: write a paired multi-echo MRI / CT phantom case."""

from __future__ import annotations

import argparse
import sys

from SyntheticCTLib.cli.options import add_command
from SyntheticCTLib.kernel.progress import scaled


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "phantom",
        help="write a paired MRI/CT digital phantom (lumbar spine) with labels",
        description="Write a paired multi-echo MRI / CT phantom of a lumbar-spine-like torso section "
        "into OUT_DIR: mri_echo*.nii.gz, ct.nii.gz, labels.nii.gz, bone_labels.nii.gz and "
        "case.json. The same seed gives the same files.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created if needed)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--size",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=[192, 192, 128],
        help="grid size in voxels (default 192 192 128)",
    )
    p.add_argument("--spacing", type=float, default=1.0, metavar="MM", help="isotropic voxel spacing (default 1 mm)")
    p.add_argument(
        "--field-strength",
        type=float,
        default=3.0,
        metavar="T",
        help="1.5 or 3 tesla (default 3): relaxation times and the default protocol",
    )
    p.add_argument(
        "--echo-times",
        type=float,
        nargs="+",
        metavar="MS",
        default=None,
        help="echo times in ms (default: the field strength's 3-echo preset)",
    )
    p.add_argument("--tr", type=float, default=None, metavar="MS", help="repetition time in ms (default: preset)")
    p.add_argument("--flip-angle", type=float, default=None, metavar="DEG", help="flip angle (default: preset)")
    p.add_argument("--snr", type=float, default=None, help="MRI signal-to-noise ratio (default: random 25..60)")
    p.add_argument("--vertebrae", type=int, default=None, metavar="N", help="number of vertebrae (default: random)")
    p.add_argument(
        "--lesion",
        choices=("random", "none", "sclerotic", "lytic"),
        default="random",
        help="vertebral lesion (default: random)",
    )
    p.add_argument(
        "--set",
        metavar="FILE",
        default=None,
        help="write every case of a phantom set file instead (groups of seeds and parameters, e.g. "
        "Resources/models/phantom-heldout.yaml) under OUT_DIR/<group>/seed<N>; the other options are ignored",
    )
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace, report) -> int:
    from SyntheticCTLib.phantom import make_phantom, write_phantom

    if args.set:
        return _write_set(args, report)
    options = {
        "echo_times_ms": args.echo_times,
        "tr_ms": args.tr,
        "flip_angle_deg": args.flip_angle,
        "snr": args.snr,
        "n_vertebrae": args.vertebrae,
        "lesion": args.lesion,
    }
    phantom = make_phantom(
        args.seed,
        size=tuple(args.size),
        spacing=args.spacing,
        field_strength=args.field_strength,
        progress=scaled(report, 0.0, 0.7),
        **{k: v for k, v in options.items() if v is not None},
    )
    manifest = write_phantom(phantom, args.out_dir, progress=scaled(report, 0.7, 1.0))
    params = phantom.params
    sys.stdout.write(
        f"Wrote phantom (seed {params['seed']}, {params['n_vertebrae']} vertebrae, "
        f"{len(phantom.mri)} echoes, lesion {params['lesion']}) to {manifest}\n"
    )
    return 0


def _write_set(args: argparse.Namespace, report) -> int:
    from SyntheticCTLib.phantom.sets import read_phantom_set, write_phantom_set

    spec = read_phantom_set(args.set)
    paths = write_phantom_set(spec, args.out_dir, progress=report)
    sys.stdout.write(
        f"Wrote phantom set '{spec.name}': {len(paths)} cases in {len(spec.groups)} groups "
        f"({', '.join(g.name for g in spec.groups)}) under {args.out_dir}\n"
    )
    return 0
