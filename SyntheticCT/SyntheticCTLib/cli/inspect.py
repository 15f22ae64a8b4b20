"""``syntheticct inspect``: what a file or folder holds, one entry per volume, before anything runs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List

from SyntheticCTLib.cli.options import add_command

EPILOG = """\
examples:
  syntheticct inspect MRI_DICOM_DIR
  syntheticct inspect MRI_DICOM_DIR --json
  syntheticct inspect ct.nii.gz

A DICOM series is split into volumes by echo, image type (magnitude, phase, real, imaginary, field map),
orientation and time point; `syntheticct convert DIR --volume ID -o out.nii.gz` writes one of them.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "inspect",
        help="list the volumes a file or DICOM folder holds (echoes, image types, geometry, warnings)",
    )
    p.epilog = EPILOG
    p.add_argument("path", metavar="PATH", help="a volume file (.nii.gz, .nrrd, .mha, ...), a DICOM file or folder")
    p.add_argument("--json", action="store_true", help='print {"volumes": [...]} as JSON on stdout')
    p.set_defaults(run=run)
    return p


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}g}"


def format_table(volumes: List[Dict[str, Any]]) -> str:
    """A readable table: one line per volume, warnings indented below it."""
    header = ("ID", "TYPE", "TE ms", "ECHO", "SIZE", "SPACING mm", "MODALITY", "DESCRIPTION")
    rows = []
    for v in volumes:
        rows.append(
            (
                v["id"],
                v["image_type"],
                _num(v["echo_time_ms"], 4),
                "-" if v["echo_number"] is None else str(v["echo_number"]),
                "x".join(str(s) for s in v["size"]),
                " x ".join(f"{s:.3g}" for s in v["spacing"]),
                v["modality"] or "-",
                v["series_description"] or "-",
            )
        )
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    for v, r in zip(volumes, rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        for message in v["warnings"]:
            lines.append(
                f"    {'refused' if not v.get('readable', True) and message == v['warnings'][-1] else 'note'}: {message}"
            )
    n_files = len({f for v in volumes for f in v["files"]})
    lines.append(f"{len(volumes)} volume(s) from {n_files} file(s).")
    return "\n".join(lines)


def run(args: argparse.Namespace, report) -> int:
    from SyntheticCTLib.kernel.dicom_series import describe_path

    volumes = describe_path(args.path)  # quick: headers only, no progress bar
    if args.json:
        sys.stdout.write(json.dumps({"volumes": volumes}) + "\n")
    else:
        sys.stdout.write(format_table(volumes) + "\n")
    return 0
