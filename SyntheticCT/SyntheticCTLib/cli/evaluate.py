"""``syntheticct evaluate --model M --cases CASES... -o OUT_DIR``: a model beside two baselines, on cases with a CT."""

from __future__ import annotations

import argparse
import json
import sys

from SyntheticCTLib.cli.options import add_command, add_device_option
from SyntheticCTLib.kernel.hu import BONE_THRESHOLD_HU


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "evaluate",
        help="evaluate a model and two baselines on cases with a CT (metrics JSON/CSV, PNGs)",
        description=(
            "Run a model on each case, compare its synthetic CT with the case's CT (MAE, ME, PSNR, SSIM in the body; "
            "bone Dice; bone-surface distances), beside two non-learning baselines on the same cases: 'inversion' "
            "(inverted, rescaled MRI) and 'bulk density' (air / soft tissue / bone at fixed HU). Writes metrics.json, "
            "metrics.csv, summary.csv, images/<case>.png and index.html in OUT_DIR.\n\n"
            "A case is a case.json (as `syntheticct phantom` writes), a folder holding one, or a folder of such "
            "folders at any depth. Cases in groups (a phantom set, `syntheticct phantom --set`, or sub-folders) "
            "are also summarised per group against the goals, and the worst group is named."
        ),
    )
    p.add_argument(
        "--model",
        default="default",
        help="model name from the catalog, a package folder or .zip (default: the bundled model)",
    )
    p.add_argument("--cases", nargs="+", required=True, metavar="CASE", help="case.json files or case folders")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output folder")
    add_device_option(p)
    p.add_argument(
        "--align",
        choices=("none", "rigid", "affine"),
        default="none",
        help="register the MRI to the CT first (default: none, the CT is already aligned)",
    )
    p.add_argument(
        "--bone-threshold",
        type=float,
        default=BONE_THRESHOLD_HU,
        metavar="HU",
        help="bone threshold in HU for Dice and surfaces (default 200)",
    )
    p.add_argument(
        "--bone-labels", action="store_true", help="use each case's bone label map for per-bone surface distances"
    )
    p.add_argument("--no-baselines", action="store_true", help="evaluate the model only")
    p.add_argument("--no-images", action="store_true", help="skip the per-case PNGs")
    p.add_argument("--save-sct", action="store_true", help="also write every sCT under OUT_DIR/sct/")
    p.add_argument(
        "--uncertainty",
        action="store_true",
        help="also compute the model's spread map and measure how well it predicts the real error "
        "(HU Spearman, surface AUROC); the sCT is unchanged",
    )
    p.add_argument(
        "--record-in-card",
        metavar="LABEL",
        default=None,
        help="write the summary means into the evaluated package's model.json, under "
        "held_out_evaluation.LABEL (a package folder only; the weights and their hashes are not touched)",
    )
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace, report) -> int:
    from SyntheticCTLib.apps.evaluation import evaluate, find_evaluation_cases

    cases = find_evaluation_cases(args.cases)
    result = evaluate(
        args.model,
        cases,
        args.output,
        baselines=not args.no_baselines,
        align=args.align,
        bone_threshold=args.bone_threshold,
        use_bone_labels=args.bone_labels,
        device=args.device,
        images=not args.no_images,
        save_sct=args.save_sct,
        uncertainty=args.uncertainty,
        progress=report,
    )
    if args.record_in_card:
        from SyntheticCTLib.apps.evaluation import record_in_card

        record_in_card(args.model, result, label=args.record_in_card)
    close = getattr(report, "close", None)
    if close:
        close()
    lines = {
        m: {
            k: round(v["mean"], 4)
            for k, v in s.items()
            if k in ("mae_hu", "bone_dice", "surface_mean_mm", "surface_p95_mm")
        }
        for m, s in result.summary.items()
    }
    document = {"out_dir": str(result.out_dir), "summary": lines}
    if result.groups:
        document["groups_meeting_goals"] = sorted(n for n, g in result.groups.items() if g["all_goals_met"])
        document["worst_group"] = result.worst_group
    sys.stdout.write(json.dumps(document) + "\n")
    return 0
