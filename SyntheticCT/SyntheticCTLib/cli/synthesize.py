"""``syntheticct synthesize``: MRI in, synthetic CT out (one case, or a batch of cases, also under torchrun)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from SyntheticCTLib.cli.options import add_command, add_device_option
from SyntheticCTLib.kernel.errors import InvalidParameterError, VolumeWriteError
from SyntheticCTLib.kernel.progress import scaled
from SyntheticCTLib.models.catalog import resolve_model
from SyntheticCTLib.models.hashing import sha256_file
from SyntheticCTLib.synthesis.dicom_export import check_dicom_target, export_dicom_series

EPILOG = """\
one case:
  syntheticct synthesize -i echo1.nii.gz -i echo2.nii.gz -i echo3.nii.gz -o sct.nii.gz
  syntheticct synthesize -i MRI_DICOM_DIR -o sct.nrrd --dicom-out SCT_DICOM_DIR --uncertainty spread.nii.gz

a batch (case.json files or their folders; outputs ID.nii.gz, ID.json, ... in OUT_DIR):
  syntheticct synthesize --case cases/a --case cases/b -o OUT_DIR
  syntheticct synthesize --case-list cases.txt -o OUT_DIR --dicom
  torchrun --nproc_per_node 4 -m SyntheticCTLib synthesize --case-list cases.txt -o OUT_DIR

The synthetic CT is not for diagnostic use.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Long because it is only argparse declarations, one per option."""
    p = add_command(
        subparsers,
        "synthesize",
        help="synthesize a CT from MRI with a model package (not for diagnostic use)",
        description="Synthesize a CT (int16 HU, on the MRI's exact grid) from one or more MRI channels, in the "
        "order the model lists them (`syntheticct models list`). Every output is checked before the inference "
        "(writable, not an input, not a folder, not being written by another run: a lock file beside it), and "
        "all are moved into place together at the end: an error, Ctrl-C or SIGTERM leaves no partial file.",
    )
    p.epilog = EPILOG
    p.add_argument(
        "-i",
        "--input",
        dest="inputs",
        action="append",
        metavar="MRI",
        default=[],
        help="an MRI channel: a volume file or a DICOM series folder; repeat for each channel",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="the sCT volume (.nii.gz, .nrrd, .mha, ...); with --case/--case-list, the output folder",
    )
    p.add_argument(
        "--case",
        dest="cases",
        action="append",
        metavar="CASE",
        default=[],
        help='batch mode: a case.json (or its folder) listing the MRI files under "mri"; repeatable',
    )
    p.add_argument(
        "--case-list",
        metavar="FILE",
        help="batch mode: a file with one case path a line, or a JSON list of paths or {id, mri} objects",
    )
    p.add_argument(
        "--model",
        default="default",
        metavar="NAME|PATH",
        help="a catalog model name, a model folder or .zip (default: the bundled default model)",
    )
    add_device_option(p)
    p.add_argument(
        "--dicom-out",
        metavar="DIR",
        help="also write the sCT as a DICOM CT series into this new folder (patient/study tags from "
        "the MRI when it is DICOM)",
    )
    p.add_argument(
        "--uncertainty",
        metavar="OUT",
        help="also write the per-voxel spread (HU) of flip test-time augmentation (implies --tta)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="make every warning of the input check (channels, voxel size, field of view, orientation, "
        "intensities, what each channel holds, echo times and field strength against the protocols the "
        "model was trained on) an error, before any model runs",
    )
    p.add_argument(
        "--resample-channels",
        action="store_true",
        help="resample MRI channels that are not on the first channel's grid onto it (by default such channels "
        "are refused; they must still cover most of its field of view)",
    )
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation (4 passes: slower, smoother)")
    p.add_argument("--dicom", action="store_true", help="batch mode: also write ID_dicom/ per case")
    p.add_argument(
        "--uncertainty-maps",
        action="store_true",
        help="batch mode: also write ID_uncertainty.nii.gz per case (implies --tta)",
    )
    p.add_argument("--skip-existing", action="store_true", help="batch mode: skip cases whose ID.json says done")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"), help="override the model's patch size")
    p.add_argument("--overlap", type=float, help="override the model's patch overlap, in [0, 1)")
    p.add_argument("--batch-size", type=int, help="patches per batch (default: from the memory budget)")
    p.set_defaults(run=run)
    return p


def _resolve_model(name_or_path: str, report):

    return resolve_model(name_or_path, progress=scaled(report, 0.0, 0.05))


def _window(args: argparse.Namespace):
    window = {}
    if args.patch_size:
        window["patch_size"] = tuple(args.patch_size)
    if args.overlap is not None:
        window["overlap"] = args.overlap
    if args.batch_size is not None:
        window["batch_size"] = args.batch_size
    return window or None


def run(args: argparse.Namespace, report) -> int:

    batch = bool(args.cases or args.case_list)
    if batch and args.inputs:
        raise InvalidParameterError("Give either -i MRI ... (one case) or --case/--case-list (a batch), not both.")
    if not batch and not args.inputs:
        raise InvalidParameterError("No input: give -i MRI (repeat for each channel), or --case/--case-list.")
    if batch and (args.dicom_out or args.uncertainty):
        raise InvalidParameterError("In batch mode use --dicom and --uncertainty-maps (outputs go into the -o folder).")
    if not batch and (args.dicom or args.uncertainty_maps or args.skip_existing):
        raise InvalidParameterError("--dicom, --uncertainty-maps and --skip-existing are for batch mode (--case).")
    return _run_batch(args, report) if batch else _run_one(args, report)


def _run_one(args: argparse.Namespace, report) -> int:

    from SyntheticCTLib.kernel.io import (
        OutputLock,
        StagedOutputs,
        check_mri_channels,
        check_output_file,
        read_volume,
        sweep_stale_partials,
        write_volume,
    )
    from SyntheticCTLib.synthesis.inference import Synthesizer
    from SyntheticCTLib.synthesis.input_check import review_inputs, stamp_warnings

    inputs = [Path(p) for p in args.inputs]
    output = Path(args.output)
    uncertainty = Path(args.uncertainty) if args.uncertainty else None
    dicom_out = Path(args.dicom_out) if args.dicom_out else None
    # Check every output before the long work: format, not a folder, not an input, writable, not taken.
    check_output_file(output, inputs, what="-o output")
    if uncertainty is not None:
        check_output_file(uncertainty, inputs, what="--uncertainty output")
        if uncertainty.resolve() == output.resolve():
            raise VolumeWriteError("--uncertainty must differ from -o.")
    if dicom_out is not None:
        check_dicom_target(dicom_out, inputs + [output], overwrite=False)
    targets = [output] + [p for p in (uncertainty, dicom_out) if p is not None]
    for folder in {p.parent for p in targets}:
        sweep_stale_partials(folder)

    with OutputLock(targets), StagedOutputs() as staged:
        if dicom_out is not None:  # checked again under the lock: another run may have just written it
            check_dicom_target(dicom_out, inputs + [output], overwrite=False)
        model = _resolve_model(args.model, report)
        _announce_model(model)
        from SyntheticCTLib.kernel.dicom_series import is_dicom_file

        # One DICOM folder or multi-frame file: its echoes, in echo-time order.
        dicom_dir = len(inputs) == 1 and (inputs[0].is_dir() or is_dicom_file(inputs[0]))
        if len(inputs) != model.in_channels and not dicom_dir:  # fail before reading anything
            from SyntheticCTLib.synthesis.inference import check_inputs

            check_inputs([None] * len(inputs), model)
        images = []
        if dicom_dir:
            from SyntheticCTLib.kernel.dicom_series import read_model_echoes

            report(0.05, "reading", str(inputs[0]))
            expected = [e.get("echo_time_ms") for e in model.card.get("inputs", [])]
            images, acquisition = read_model_echoes(inputs[0], expected)
        else:
            from SyntheticCTLib.kernel.acquisition import acquisition_for_files, acquisition_from_metadata

            acquisition = acquisition_for_files(inputs)  # a malformed JSON sidecar fails here, before the work
        for k, path in enumerate(inputs if not dicom_dir else []):
            report(0.05 + 0.05 * k / len(inputs), "reading", str(path))
            images.append(read_volume(path))
        if acquisition is None:  # DICOM tags kept on the volumes (e.g. NRRD written by `syntheticct convert`)
            acquisition = acquisition_from_metadata(images, "the volumes' DICOM tags")
        sources = [str(inputs[0])] * len(images) if dicom_dir else [str(p) for p in inputs]
        names = [f"{p} ({n})" for p, n in zip(sources, _input_names(model))]
        check_mri_channels(images, names, resample=args.resample_channels)
        input_warnings = review_inputs(images, model.card, strict=args.strict, progress=report, acquisition=acquisition)
        want_uncertainty = uncertainty is not None
        synthesizer = Synthesizer(model, device=args.device, window=_window(args))
        result = synthesizer.run(images, progress=scaled(report, 0.1, 0.85), tta=args.tta or want_uncertainty)
        stamp_warnings(result.image, input_warnings)
        report(0.85, "writing", str(output))
        write_volume(result.image, staged.file(output), inputs=inputs)
        if want_uncertainty:
            write_volume(result.uncertainty, staged.file(uncertainty), inputs=inputs)
        exported = None
        if dicom_out is not None:
            exported = export_dicom_series(
                result.image,
                staged.folder(dicom_out),
                source=images[0],
                inputs=inputs,
                progress=scaled(report, 0.9, 1.0),
            )
            check_dicom_target(dicom_out, inputs + [output], overwrite=False)
        staged.commit()  # every output, or none
    report(1.0, "done", f"{output}")
    line = {"output": str(output), **result.to_dict(), **_model_provenance(model), "input_warnings": input_warnings}
    if want_uncertainty:
        line["uncertainty_output"] = str(uncertainty)
    if exported is not None:
        line["dicom_out"] = str(dicom_out)
        line["series_instance_uid"] = exported.series_instance_uid
    sys.stdout.write(json.dumps(line) + "\n")
    return 0


def _input_names(model) -> list:
    names = list(getattr(model, "input_names", []) or [])
    return names + [f"input {i + 1}" for i in range(len(names), int(model.in_channels))]


def _model_provenance(model) -> dict:
    """Which model ran: name, version, where it came from, and the SHA-256 of its model.json."""

    card = getattr(model, "root", None)
    try:
        digest = sha256_file(card / "model.json") if card is not None else None
    except OSError:
        digest = None
    return {
        "model_source": str(getattr(model, "catalog_source", None) or getattr(model, "source", "")),
        "model_path": str(getattr(model, "source", "")),
        "model_sha256": digest,
    }


def _announce_model(model) -> None:

    info = _model_provenance(model)
    logging.getLogger("SyntheticCTLib").info(
        "Model '%s' %s from %s (%s; model.json SHA-256 %s)",
        model.name,
        model.version,
        info["model_source"],
        info["model_path"],
        info["model_sha256"],
    )


def _run_batch(args: argparse.Namespace, report) -> int:
    from SyntheticCTLib.apps.batch import iter_case_paths, read_case_list, synthesize_cases

    cases = iter_case_paths(args.cases)
    if args.case_list:
        cases += read_case_list(args.case_list)
    model = _resolve_model(args.model, report)
    _announce_model(model)
    summary = synthesize_cases(
        cases,
        model,
        args.output,
        device=args.device,
        tta=args.tta,
        uncertainty=args.uncertainty_maps,
        dicom=args.dicom,
        window=_window(args),
        skip_existing=args.skip_existing,
        resample_channels=args.resample_channels,
        strict=args.strict,
        progress=report,
    )
    done = sum(1 for r in summary.records if r.get("status") == "done")
    line = {
        "rank": summary.rank,
        "world_size": summary.world_size,
        "cases": summary.cases,
        "done": done,
        "failed": [r["case"] for r in summary.failed],
        "out_dir": str(args.output),
        "summary": str(summary.summary_file) if summary.summary_file else None,
    }
    sys.stdout.write(json.dumps(line) + "\n")
    if summary.failed:
        sys.stderr.write(
            f"syntheticct synthesize: error: {len(summary.failed)} case(s) failed: "
            f"{', '.join(r['case'] + ' (' + r['error'] + ')' for r in summary.failed)}\n"
        )
        return 1
    return 0
