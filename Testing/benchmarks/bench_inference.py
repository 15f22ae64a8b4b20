"""Benchmark: sliding-window synthesis of a 256x256x160, 3-channel MRI at 1 mm, ours beside MONAI's.

Same network (UNet3D as the bundled model: its card when installed, else depth 3, width 16, instance
norm; seeded weights), same patch size and overlap, Gaussian blending, same batch size, same
normalised input. Printed per method: seconds, voxels per second, peak resident memory, and the
ratio ours/MONAI (below 1: ours faster). Three measurements, each in its own child process so that
each peak memory is its own:

- ``ours-window``: :class:`SyntheticCTLib.synthesis.sliding_window.SlidingWindow` on the whole field of view
  (no body mask: exactly MONAI's work);
- ``monai``: ``monai.inferers.sliding_window_inference(..., mode="gaussian")``;
- ``ours-synthesize``: the full :func:`SyntheticCTLib.synthesis.inference.synthesize` from ``sitk`` images
  (body mask, normalisation, patches outside the body skipped, HU, int16 on the input grid).

``--large`` measures instead the peak memory of ``synthesize`` on a 512x512x300 input on the CPU
(goal < 3 GB; slow: it runs every body patch). ``--device cuda`` times a GPU.

Run: ``python Testing/benchmarks/bench_inference.py [--size X Y Z] [--large] [--device cpu|cuda]``,
or ``pytest Testing/benchmarks/bench_inference.py -m benchmark -s`` (a smaller volume).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "SyntheticCT" / "SyntheticCTLib" / "Resources" / "models" / "phantom-spine-megre" / "model.json"
DEFAULT_SIZE = (256, 256, 160)  # x, y, z
LARGE_SIZE = (512, 512, 300)
GOAL_LARGE_GIB = 3.0


def _peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _current_rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")


def network_config() -> dict:
    """Architecture kwargs, patch size and overlap: the bundled model's when installed, else the assumed default."""
    if BUNDLED.is_file():
        card = json.loads(BUNDLED.read_text())
        kwargs = dict(card["architecture"]["kwargs"])
        kwargs.pop("in_channels", None)
        return {
            "kwargs": kwargs,
            "patch": list(card["patch_size"]),
            "overlap": float(card.get("overlap", 0.5)),
            "source": str(BUNDLED.relative_to(ROOT)),
        }
    return {
        "kwargs": {"depth": 3, "width": 16, "norm": "instance"},
        "patch": [64, 64, 64],
        "overlap": 0.5,
        "source": "assumed default (no bundled model installed)",
    }


def make_mri(size_xyz, n_channels: int = 3, seed: int = 0):
    """A torso-like 3-echo MRI (float32 arrays, z y x): body ellipse with fat rim, spine, bias field, noise.

    Filled slab by slab, so that making it needs no memory beyond the arrays themselves.
    """
    nx, ny, nz = size_xyz
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:ny, :nx].astype(np.float32)
    cx, cy = nx / 2, ny / 2
    r = ((x - cx) / (0.42 * nx)) ** 2 + ((y - cy) / (0.33 * ny)) ** 2
    body = r < 1
    fat = body & (r > 0.75)
    spine = ((x - cx) / (0.05 * nx)) ** 2 + ((y - cy - 0.18 * ny) / (0.05 * ny)) ** 2 < 1
    bias = 0.7 + 0.6 * x / nx
    channels = [np.empty((nz, ny, nx), np.float32) for _ in range(n_channels)]
    for k, arr in enumerate(channels):
        decay = np.exp(-k * 0.35)
        plane = np.where(body, 500.0 * decay, 0.0).astype(np.float32)
        plane[fat] = 900.0 * (0.85**k)
        plane[spine] = 250.0 * decay
        plane *= bias
        for z in range(nz):
            arr[z] = np.abs(plane + rng.normal(0, 12, plane.shape).astype(np.float32))
    return channels


def _network(in_channels: int, cfg: dict):
    import torch

    from SyntheticCTLib.models.architectures import build_network

    torch.manual_seed(0)
    return build_network("unet3d", in_channels=in_channels, **cfg["kwargs"]).eval()


def _normalised(channels):
    from SyntheticCTLib.kernel.masks import mri_body_mask
    from SyntheticCTLib.synthesis.normalization import normalize_channels

    body = mri_body_mask(channels)
    spec = {"method": "percentile", "lower": 0.5, "upper": 99.5, "mask": "body"}
    return normalize_channels(channels, body, [spec] * len(channels))


def _timed(network, device: str):
    """The network in a wrapper that sums the wall time of its forward passes (synchronised on a GPU)."""
    import torch

    class Timed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.seconds = inner, 0.0
            self.size_multiple = getattr(inner, "size_multiple", 1)

        def forward(self, x):
            t = time.perf_counter()
            y = self.inner(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t
            return y

    return Timed(network)


def worker(name: str, size, device: str, batch: int, out_npy: str) -> dict:
    import torch

    cfg = network_config()
    channels = make_mri(size)
    voxels = int(np.prod(size))
    if name in ("ours-window", "monai"):
        volume = _normalised(channels)
        del channels
        net = _network(volume.shape[0], cfg).to(device)
        with torch.inference_mode():  # warm-up (oneDNN / cuDNN kernel selection), untimed, for both methods
            net(torch.zeros((batch, volume.shape[0]) + tuple(cfg["patch"]), device=device))
        baseline = _current_rss_mib()
        net = _timed(net, device)
        if name == "ours-window":
            from SyntheticCTLib.synthesis.sliding_window import SlidingWindow

            runner = SlidingWindow(net, device, batch_size=batch)
            c0, t0 = _cpu_seconds(), time.perf_counter()
            result = runner.predict(volume, cfg["patch"], cfg["overlap"])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            output = result.output[0]
            extra = {"patches": result.n_run}
        else:
            from monai.inferers import sliding_window_inference

            net = net.to(device)
            x = torch.from_numpy(volume)[None]
            c0, t0 = _cpu_seconds(), time.perf_counter()
            with torch.inference_mode():
                y = sliding_window_inference(
                    x.to(device), cfg["patch"], batch, net, overlap=cfg["overlap"], mode="gaussian", sigma_scale=0.125
                )
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            output = y[0, 0].float().cpu().numpy()
            extra = {}
        np.save(out_npy, output)
        return {
            "method": name,
            "seconds": seconds,
            "cpu_seconds": cpu,
            "voxels_per_s": voxels / seconds,
            "peak_rss_mib": _peak_rss_mib(),
            "rss_before_mib": baseline,
            "network_seconds": net.seconds,
            "overhead_seconds": seconds - net.seconds,
            **extra,
        }
    # ours-synthesize / large: the full pipeline from sitk images through a real model package.
    import SimpleITK as sitk

    from SyntheticCTLib.models.package import load_model_package, write_model_package
    from SyntheticCTLib.synthesis.inference import Synthesizer

    images = []
    while channels:  # one numpy copy at a time, so that the set-up does not set the peak
        images.append(sitk.GetImageFromArray(channels.pop(0)))
    net = _network(len(images), cfg)
    card = {
        "name": "bench",
        "version": "0",
        "architecture": {"name": "unet3d", "kwargs": dict(cfg["kwargs"])},
        "inputs": [{"name": f"echo {k + 1}"} for k in range(len(images))],
        "spacing_mm": [1.0, 1.0, 1.0],
        "normalization": [{"method": "percentile", "lower": 0.5, "upper": 99.5, "mask": "body"}] * len(images),
        "output": {"scale": 1000.0, "offset": 0.0, "clip": [-1024, 3071]},
        "patch_size": cfg["patch"],
        "overlap": cfg["overlap"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        package = load_model_package(write_model_package(Path(tmp) / "bench", card, net.state_dict()))
        del net
        baseline = _current_rss_mib()
        synthesizer = Synthesizer(package, device=device, window={"batch_size": batch})
        c0, t0 = _cpu_seconds(), time.perf_counter()
        result = synthesizer.run(images)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    if out_npy:
        np.save(out_npy, sitk.GetArrayViewFromImage(result.image))
    return {
        "method": name,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "voxels_per_s": voxels / seconds,
        "peak_rss_mib": _peak_rss_mib(),
        "rss_before_mib": baseline,
        "patches": result.n_run,
        "patches_total": result.n_patches,
        "device": result.device,
    }


def _run_worker(name: str, size, device: str, batch: int, out_npy: str) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--device",
        device,
        "--batch",
        str(batch),
        "--out-npy",
        out_npy,
        "--size",
    ] + [str(s) for s in size]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_benchmark(
    size=DEFAULT_SIZE, device: str = "cpu", batch: int = 2, with_monai: bool = True, monai_default_batch: bool = False
) -> dict:
    cfg = network_config()
    results = {"size": list(size), "device": device, "batch": batch, "network": cfg}
    with tempfile.TemporaryDirectory() as tmp:
        ours = _run_worker("ours-window", size, device, batch, str(Path(tmp) / "ours.npy"))
        results["ours-window"] = ours
        if with_monai:
            try:
                import monai  # noqa: F401
            except ImportError:
                results["monai"] = None
            else:
                monai_r = _run_worker("monai", size, device, batch, str(Path(tmp) / "monai.npy"))
                results["monai"] = monai_r
                a, b = np.load(Path(tmp) / "ours.npy"), np.load(Path(tmp) / "monai.npy")
                results["ours_vs_monai_abs_diff"] = {
                    "mean": float(np.abs(a - b).mean()),
                    "max": float(np.abs(a - b).max()),
                    "output_std": float(b.std()),
                }
                if monai_default_batch and batch != 1:  # MONAI out of the box: sw_batch_size=1
                    results["monai-batch1"] = _run_worker("monai", size, device, 1, str(Path(tmp) / "monai1.npy"))
        results["ours-synthesize"] = _run_worker("ours-synthesize", size, device, batch, "")
    return results


def run_alternating(size, device: str = "cpu", batch: int = 2, repeats: int = 3) -> dict:
    """Ours and MONAI's sliding window in turn (order swapped each time), ``repeats`` times each; medians."""
    runs = {"ours-window": [], "monai": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for name in list(runs)[:: 1 if i % 2 == 0 else -1]:  # swap the order every repetition
                runs[name].append(_run_worker(name, size, device, batch, str(Path(tmp) / f"{name}.npy")))
    return {
        name: {
            key: float(np.median([r[key] for r in rs]))
            for key in ("seconds", "cpu_seconds", "peak_rss_mib", "overhead_seconds")
        }
        for name, rs in runs.items()
    }


def report_alternating(size, result: dict, repeats: int) -> str:
    o, m = result["ours-window"], result["monai"]
    return (
        f"alternating runs, {size[0]}x{size[1]}x{size[2]}, median of {repeats}: ours {o['seconds']:.1f} s "
        f"(CPU {o['cpu_seconds']:.1f} s), MONAI {m['seconds']:.1f} s (CPU {m['cpu_seconds']:.1f} s); ratio ours/MONAI "
        f"wall {o['seconds'] / m['seconds']:.3f}, CPU {o['cpu_seconds'] / m['cpu_seconds']:.3f}; time outside the "
        f"network (the sliding-window machinery itself): ours {o['overhead_seconds']:.2f} s, MONAI "
        f"{m['overhead_seconds']:.2f} s"
    )


def report(results: dict) -> str:
    size = results["size"]
    cfg = results["network"]
    lines = [
        f"sliding-window inference, {size[0]}x{size[1]}x{size[2]} at 1 mm, 3 channels, on {results['device']}; "
        f"UNet3D {cfg['kwargs']} ({cfg['source']}), patch {cfg['patch']}, overlap {cfg['overlap']}, "
        f"batch {results['batch']}"
    ]
    for key in ("ours-window", "monai", "monai-batch1", "ours-synthesize"):
        if key not in results:
            continue
        r = results[key]
        if r is None:
            lines.append(f"  {key:16s} not run (monai not installed)")
            continue
        more = f", {r['patches']} patches" if "patches" in r else ""
        if "overhead_seconds" in r:
            more += f"; outside the network {r['overhead_seconds']:.2f} s"
        if "patches_total" in r:
            more += f" of {r['patches_total']}" + (
                " (the others hold no body voxel)" if r["patches"] < r["patches_total"] else ""
            )
        lines.append(
            f"  {key:16s} {r['seconds']:8.1f} s (CPU {r['cpu_seconds']:.0f} s)  {r['voxels_per_s'] / 1e6:6.3f} "
            "Mvoxel/s  peak RSS "
            f"{r['peak_rss_mib']:6.0f} MiB (before the run {r['rss_before_mib']:.0f}){more}"
        )
    if results.get("monai"):
        m, mc = results["monai"]["seconds"], results["monai"]["cpu_seconds"]
        ours, full = results["ours-window"], results["ours-synthesize"]
        lines.append(
            f"  ratio ours/MONAI: wall time: window {ours['seconds'] / m:.3f}, full synthesis {full['seconds'] / m:.3f}; "
            f"CPU time: window {ours['cpu_seconds'] / mc:.3f}, full synthesis {full['cpu_seconds'] / mc:.3f} "
            "(below 1: ours faster)"
        )
        if results.get("monai-batch1"):
            m1 = results["monai-batch1"]
            lines.append(
                f"  ratio ours (batch {results['batch']}, our CPU default) / MONAI (its default sw_batch_size=1): "
                f"wall {ours['seconds'] / m1['seconds']:.3f}, CPU {ours['cpu_seconds'] / m1['cpu_seconds']:.3f}"
            )
        d = results["ours_vs_monai_abs_diff"]
        lines.append(
            f"  |ours - MONAI| on the network output: mean {d['mean']:.2e}, max {d['max']:.2e} "
            f"(output std {d['output_std']:.3f}; MONAI clamps the 3D weight map at 1e-3, so near patch corners a "
            "patch border, which lacks context, weighs as much as a patch centre; ours keeps the Gaussian "
            "ratio there and trusts a patch fully up to a volume edge it touches)"
        )
    try:
        lines.append(
            f"  load average after the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work on the "
            "machine inflates wall times; CPU times are steadier)"
        )
    except OSError:
        pass
    return "\n".join(lines)


def run_large(device: str = "cpu", batch: int = 2) -> dict:
    return _run_worker("large", LARGE_SIZE, device, batch, "")


def report_large(r: dict) -> str:
    gib = r["peak_rss_mib"] / 1024
    return (
        f"synthesize {LARGE_SIZE[0]}x{LARGE_SIZE[1]}x{LARGE_SIZE[2]} (3 float32 channels, 1 mm) on {r['device']}: "
        f"{r['seconds']:.0f} s (CPU {r['cpu_seconds']:.0f} s), {r['patches']} of {r['patches_total']} patches, peak RSS {gib:.2f} GiB "
        f"(inputs alone {r['rss_before_mib'] / 1024:.2f} GiB); goal < {GOAL_LARGE_GIB:g} GB: "
        f"{'met' if r['peak_rss_mib'] * 2**20 < GOAL_LARGE_GIB * 1e9 else 'NOT met'}"
    )


@pytest.mark.benchmark
def test_bench_inference():
    results = run_benchmark(size=(128, 128, 96))
    print("\n" + report(results))
    assert results["ours-window"]["seconds"] > 0 and results["ours-synthesize"]["seconds"] > 0
    if results.get("monai"):  # the same network on the same patches: the blends agree closely on average
        assert results["ours_vs_monai_abs_diff"]["mean"] < 0.1 * results["ours_vs_monai_abs_diff"]["output_std"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=list(DEFAULT_SIZE), metavar=("X", "Y", "Z"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2, help="patches per batch, for both (default 2)")
    parser.add_argument("--no-monai", action="store_true")
    parser.add_argument(
        "--monai-default-batch", action="store_true", help="also time MONAI with its default sw_batch_size=1"
    )
    parser.add_argument("--large", action="store_true", help="only the 512x512x300 peak-memory run (slow)")
    parser.add_argument(
        "--alternate", type=int, default=0, metavar="N", help="only ours vs MONAI, alternating N times (medians)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out-npy", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, tuple(args.size), args.device, args.batch, args.out_npy)))
        return 0
    if args.alternate:
        print(
            report_alternating(
                args.size, run_alternating(tuple(args.size), args.device, args.batch, args.alternate), args.alternate
            )
        )
        return 0
    if args.large:
        print(report_large(run_large(args.device, args.batch)))
        return 0
    results = run_benchmark(tuple(args.size), args.device, args.batch, not args.no_monai, args.monai_default_batch)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
