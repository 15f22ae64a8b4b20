"""``syntheticct convert``: write one volume of a file or DICOM folder exactly as read (NIfTI, NRRD, MHA)."""

from __future__ import annotations

import argparse
import json
import sys

from SyntheticCTLib.cli.options import add_command

EPILOG = """\
examples:
  syntheticct convert MRI_DICOM_DIR -o echo1.nii.gz --volume 2_e1
  syntheticct convert ct.nrrd -o ct.mha

`syntheticct inspect PATH` lists the volume ids. Voxel values, pixel type and geometry are written as read.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "convert",
        help="write one volume of a file or DICOM folder as NIfTI, NRRD or MHA, exactly as read",
    )
    p.epilog = EPILOG
    p.add_argument("input", metavar="INPUT", help="a volume file, a DICOM file or a DICOM folder")
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="output volume (.nii.gz, .nii, .nrrd, .mha, .mhd)"
    )
    p.add_argument(
        "--volume", metavar="ID", help="the volume to write (see `syntheticct inspect`); needed when there are several"
    )
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace, report) -> int:
    from SyntheticCTLib.kernel.dicom_series import read_any
    from SyntheticCTLib.kernel.errors import VolumeWriteError
    from SyntheticCTLib.kernel.io import check_not_input, volume_suffix, write_volume

    if not volume_suffix(args.output):
        raise VolumeWriteError(f"-o '{args.output}': unknown volume format; use .nii.gz, .nii, .nrrd, .mha or .mhd.")
    check_not_input(args.output, [args.input])
    report(0.0, "reading", str(args.input))
    image = read_any(args.input, args.volume)
    report(0.7, "writing", str(args.output))
    written = write_volume(image, args.output, inputs=[args.input])
    report(1.0, "done", str(written))
    line = {
        "output": str(written),
        "size": list(image.GetSize()),
        "spacing": list(image.GetSpacing()),
        "pixel_type": image.GetPixelIDTypeAsString(),
    }
    sys.stdout.write(json.dumps(line) + "\n")
    return 0
