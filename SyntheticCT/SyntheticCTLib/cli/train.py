"""``syntheticct train --config CONFIG.(yaml|json) [--resume]``: train a synthesis model and export its package.

Under ``torchrun --nproc_per_node N -m SyntheticCTLib train ...`` (or ``torchrun ... $(which syntheticct)``)
it trains with DistributedDataParallel: gloo on the CPU, NCCL on GPUs; multi-node through torchrun's
usual ``--nnodes``/``--rdzv-*`` arguments. Only rank 0 writes checkpoints, logs and the package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from SyntheticCTLib.cli.options import add_command, add_device_option


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "train",
        help="train a synthesis model on MRI/CT pairs (or phantom cases) from a YAML/JSON config",
        description=(
            "Train a synthesis model as a YAML or JSON configuration says: cases (explicit MRI/CT lists, folders of "
            "phantom cases, or phantom seeds), validation split, architecture, patches, schedule, loss, augmentation "
            "and output folder. Writes checkpoints, metrics.csv, learning_curves.png, training_summary.json and the "
            "model package OUTPUT_DIR/model, which `syntheticct models add` accepts as it is.\n\n"
            "Distributed: torchrun --nproc_per_node N -m SyntheticCTLib train --config C.yaml"
        ),
    )
    p.add_argument("--config", required=True, metavar="CONFIG", help="training configuration (.yaml, .yml or .json)")
    p.add_argument(
        "--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/last.pt at its exact step"
    )
    add_device_option(p, default=None, help="override training.device of the configuration")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="override training.num_threads")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace, report) -> int:
    from SyntheticCTLib.kernel.errors import InvalidParameterError
    from SyntheticCTLib.training.config import load_config
    from SyntheticCTLib.training.loop import train

    config = load_config(args.config)
    if args.device:
        config.training.device = args.device
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidParameterError(f"--threads must be >= 1 (got {args.threads}).")
        config.training.num_threads = args.threads
    rank = int(os.environ.get("RANK", "0"))
    result = train(config, resume=args.resume, progress=report if rank == 0 else None)
    if rank == 0 and result.package_dir is not None:
        close = getattr(report, "close", None)
        if close:
            close()
        line = {
            "package": str(result.package_dir),
            "steps": result.steps,
            "best_epoch": result.best_epoch,
            "best_validation": result.best_metrics,
            "wall_time_s": round(result.elapsed_s, 1),
        }
        sys.stdout.write(json.dumps(line) + "\n")
    return 0
