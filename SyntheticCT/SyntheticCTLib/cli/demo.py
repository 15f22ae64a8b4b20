"""``syntheticct demo OUT_DIR``: the whole product on a phantom case, with a report and a short summary."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Mapping, Optional, TextIO

from SyntheticCTLib.apps.demo import DEFAULT_SEED, DEFAULT_SIZE, DEFAULT_SPACING_MM, run_demo
from SyntheticCTLib.cli.options import add_command, add_device_option

SUMMARY_ROWS = (
    ("surface_mean_mm", "bone surface mean (mm)", "{:.3f}"),
    ("surface_p95_mm", "bone surface p95 (mm)", "{:.3f}"),
    ("bone_dice", "bone Dice", "{:.3f}"),
    ("mae_hu", "MAE (HU)", "{:.1f}"),
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "demo",
        help="run the whole product on a phantom case: synthesize, register, compare, report",
        description=(
            "Generate a phantom case, move its CT by a random but recorded rigid transform, synthesize a CT "
            "from the MRI with the default model, register it to the moved CT, compare the bone surfaces and "
            "image metrics (beside two non-learning baselines), and write OUT_DIR/report.html and "
            "OUT_DIR/metrics.json. Needs no network. Not for diagnostic use."
        ),
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created; the demo's files in it are replaced)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the phantom and of the CT's move (default: 900, a seed the bundled model never saw in training)",
    )
    add_device_option(p)
    p.add_argument(
        "--size",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=None,
        help="phantom size in voxels (default: 128 128 96)",
    )
    p.add_argument(
        "--spacing",
        type=float,
        default=None,
        metavar="MM",
        help="phantom voxel spacing in mm (default: 1.0, the bundled model's working spacing)",
    )
    p.add_argument(
        "--model",
        default="default",
        help="model name in the catalog, or a package folder/.zip (default: the bundled default model)",
    )
    p.add_argument(
        "--no-uncertainty",
        action="store_true",
        help="one synthesis pass, no spread map (default: two passes, the spread shown on the bone surface)",
    )
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace, report) -> int:

    result = run_demo(
        args.out_dir,
        seed=DEFAULT_SEED if args.seed is None else args.seed,
        size=tuple(args.size) if args.size else DEFAULT_SIZE,
        spacing=args.spacing if args.spacing is not None else DEFAULT_SPACING_MM,
        device=args.device,
        model=args.model,
        uncertainty=not args.no_uncertainty,
        progress=report,
    )
    close = getattr(report, "close", None)
    if close:
        close()
    stream = sys.stdout
    if getattr(args, "progress", "bar") == "json":
        stream = sys.stderr  # stdout carries only JSON lines for a GUI
    write_summary(result.metrics, stream, report_path=str(result.report_path))
    return 0


def _fmt(fmt: str, value: Any) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(float(value))
    except (TypeError, ValueError):
        return str(value)


def summary_lines(metrics: Mapping[str, Any], report_path: Optional[str] = None) -> List[str]:
    """The demo's printed summary: the time per step, then the key figures beside the baselines."""
    lines = [f"SyntheticCT demo (seed {metrics.get('seed')}) - {metrics.get('disclaimer', '')}"]
    steps = metrics.get("steps") or []
    width = max([len(s["name"]) for s in steps] + [5])
    lines.append("time per step:")
    for s in steps:
        lines.append(f"  {s['name']:<{width}}  {s['seconds']:7.1f} s")
    lines.append(f"  {'total':<{width}}  {float(metrics.get('total_seconds', 0.0)):7.1f} s")
    columns: Dict[str, Mapping[str, Any]] = {"model": metrics.get("metrics", {})}
    columns.update(metrics.get("baselines") or {})
    names = list(columns)
    col = max(12, *(len(n) + 2 for n in names))
    label_width = max(len(label) for _, label, _ in SUMMARY_ROWS) + 2
    lines.append(f"{'':<{label_width}}" + "".join(f"{n:>{col}}" for n in names))
    for key, label, fmt in SUMMARY_ROWS:
        lines.append(f"{label:<{label_width}}" + "".join(f"{_fmt(fmt, columns[n].get(key)):>{col}}" for n in names))
    reg = metrics.get("registration", {})
    tre = reg.get("tre_bone", {})
    if tre:
        lines.append(
            f"registration: TRE on bone {_fmt('{:.3f}', tre.get('mean_mm'))} mm mean, "
            f"{_fmt('{:.3f}', tre.get('max_mm'))} mm max; rotation error {_fmt('{:.3f}', reg.get('rotation_error_deg'))}"
            f" deg, {reg.get('iterations', '-')} iterations, {_fmt('{:.1f}', reg.get('elapsed_s'))} s"
        )
    if report_path:
        lines.append(f"report: {report_path}")
    return lines


def write_summary(metrics: Mapping[str, Any], stream: TextIO, report_path: Optional[str] = None) -> None:
    stream.write("\n".join(summary_lines(metrics, report_path)) + "\n")
    stream.flush()
