"""Benchmark: sliding-window synthesis on the CPU (or a GPU), ours beside MONAI's, eager and accelerated.

Same network (UNet3D as the bundled model: its card when installed, else depth 3, width 16, instance
norm; seeded weights), same patch size and overlap, Gaussian blending, same batch size, same
normalised input, on two inputs:

- ``phantom``: a torso-like 3-echo MRI, 256x256x160 at 1 mm (``--size``);
- ``real``: ``../shared/data/real/mri/niivue_chris_t1.nii.gz`` (a head T1 with air around it), resampled to
  the model's 1 mm outside the timing, its one channel given three times (the bundled network takes three;
  the output is meaningless as a CT, the work is real).

Each measurement runs in its own child process, so that each peak memory is its own:

- ``window-eager`` / ``window``: :class:`SyntheticCTLib.synthesis.sliding_window.SlidingWindow` on the
  whole field of view (no body mask: exactly MONAI's work), with the network as loaded (``accelerate=False``,
  the code before issue 17) and with the accelerated inference copy (batch norms folded, channels-last);
- ``monai``: ``monai.inferers.sliding_window_inference(..., mode="gaussian")`` with the network as loaded;
- ``synthesize-eager`` / ``synthesize``: the full :meth:`SyntheticCTLib.synthesis.inference.Synthesizer.run`
  from ``sitk`` images (body mask, normalisation, patches outside the body skipped, HU, int16);
- ``synthesize-tta``: the same with the test-time flips (what ``--uncertainty`` runs: the identity and all axes
  flipped, two passes; goal: at most twice a plain run).

Printed: wall and CPU seconds, peak resident memory, the ratios, and the largest HU difference between
the accelerated and the eager output (window: network output x the card's scale of 1000 HU; synthesis:
the int16 sCT). Wall times on a shared machine are noisy; ratios of CPU times measured in the same run
are steadier.

``--large`` measures instead the peak memory of ``synthesize`` on a 512x512x300 input on the CPU
(goal < 3 GB; slow: it runs every body patch). ``--device cuda`` times a GPU.

Run: ``python Testing/benchmarks/bench_inference.py [--size X Y Z] [--inputs phantom real] [--large]``,
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
REAL_MRI = ROOT.parent / "shared" / "data" / "real" / "mri" / "niivue_chris_t1.nii.gz"
DEFAULT_SIZE = (256, 256, 160)  # x, y, z
LARGE_SIZE = (512, 512, 300)
GOAL_LARGE_GIB = 3.0
HU_SCALE = 1000.0
METHODS = ("window-eager", "window", "monai", "synthesize-eager", "synthesize", "synthesize-tta")


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


def load_real_mri(path=REAL_MRI, n_channels: int = 3):
    """The real MRI resampled to 1 mm (linear), as float32 arrays ``(z, y, x)``, its channel repeated."""
    import SimpleITK as sitk

    from SyntheticCTLib.kernel.geometry import grid_with_spacing, resample_like

    image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    image = resample_like(image, grid_with_spacing(image, (1.0, 1.0, 1.0)), pixel_type=sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    return [array.copy() for _ in range(n_channels)]


def _channels(source: str, size):
    return load_real_mri() if source == "real" else make_mri(size)


def worker(name: str, source: str, size, device: str, batch: int, out_npy: str) -> dict:
    import torch

    cfg = network_config()
    channels = _channels(source, size)
    voxels = int(np.prod(channels[0].shape))
    accelerate = not name.endswith("-eager")
    if name.startswith(("window", "monai")):
        volume = _normalised(channels)
        del channels
        net = _network(volume.shape[0], cfg).to(device)
        with torch.inference_mode():  # warm-up (oneDNN / cuDNN kernel selection), untimed, for both methods
            net(torch.zeros((batch, volume.shape[0]) + tuple(cfg["patch"]), device=device))
        baseline = _current_rss_mib()
        net = _timed(net, device)
        if name.startswith("window"):
            from SyntheticCTLib.synthesis.sliding_window import SlidingWindow

            runner = SlidingWindow(net, device, batch_size=batch, accelerate=accelerate)
            # Warm the network that will run (the accelerated copy is made on first use), untimed as above.
            runner.predict(np.zeros((volume.shape[0],) + tuple(cfg["patch"]), np.float32), cfg["patch"], 0.0)
            runner._inference_network().seconds = 0.0
            c0, t0 = _cpu_seconds(), time.perf_counter()
            result = runner.predict(volume, cfg["patch"], cfg["overlap"])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            output = result.output[0]
            network_seconds = runner._inference_network().seconds  # the accelerated copy timed itself
            extra = {"patches": result.n_run, "path": result.path}
        else:
            from monai.inferers import sliding_window_inference

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
            network_seconds = net.seconds
            extra = {"path": "eager"}
        np.save(out_npy, output)
        return {
            "method": name,
            "seconds": seconds,
            "cpu_seconds": cpu,
            "voxels_per_s": voxels / seconds,
            "peak_rss_mib": _peak_rss_mib(),
            "rss_before_mib": baseline,
            "overhead_seconds": seconds - network_seconds,
            **extra,
        }
    # synthesize / large: the full pipeline from sitk images through a real model package.
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
        "output": {"scale": HU_SCALE, "offset": 0.0, "clip": [-1024, 3071]},
        "patch_size": cfg["patch"],
        "overlap": cfg["overlap"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        package = load_model_package(write_model_package(Path(tmp) / "bench", card, net.state_dict()))
        del net
        baseline = _current_rss_mib()
        window = {"batch_size": batch, "accelerate": accelerate}
        synthesizer = Synthesizer(package, device=device, window=window)
        c0, t0 = _cpu_seconds(), time.perf_counter()
        result = synthesizer.run(images, tta=name.endswith("-tta"))
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
        "path": result.path,
    }


def _run_worker(name: str, source: str, size, device: str, batch: int, out_npy: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--source", source]
    command += ["--device", device, "--batch", str(batch), "--out-npy", out_npy, "--size"] + [str(s) for s in size]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} on {source} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _abs_diff(a: np.ndarray, b: np.ndarray, scale: float = 1.0) -> dict:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64)) * scale
    return {"mean": float(d.mean()), "max": float(d.max())}


def run_benchmark(source: str = "phantom", size=DEFAULT_SIZE, device: str = "cpu", batch: int = 2, methods=METHODS):
    """Every method in ``methods`` on one input, in its own process; the outputs compared."""
    results = {"source": source, "size": list(size), "device": device, "batch": batch, "network": network_config()}
    try:
        import monai  # noqa: F401
    except ImportError:
        methods = [m for m in methods if m != "monai"]
        results["monai"] = None
    with tempfile.TemporaryDirectory() as tmp:
        npy = {m: str(Path(tmp) / f"{m}.npy") for m in methods}
        for m in methods:
            results[m] = _run_worker(m, source, size, device, batch, npy[m])
        loaded = {m: np.load(npy[m]) for m in methods if Path(npy[m]).is_file()}
    if "window" in loaded and "window-eager" in loaded:
        results["window_accelerated_vs_eager_hu"] = _abs_diff(loaded["window"], loaded["window-eager"], HU_SCALE)
    if "synthesize" in loaded and "synthesize-eager" in loaded:
        results["synthesize_accelerated_vs_eager_hu"] = _abs_diff(loaded["synthesize"], loaded["synthesize-eager"])
    if "window" in loaded and "monai" in loaded:
        results["ours_vs_monai_abs_diff"] = dict(
            _abs_diff(loaded["window"], loaded["monai"]), output_std=float(loaded["monai"].std())
        )
    return results


def _ratio(results: dict, a: str, b: str, key: str) -> str:
    if not results.get(a) or not results.get(b):
        return "n/a"
    return f"{results[a][key] / results[b][key]:.3f}"


def report(results: dict) -> str:
    size = results["size"] if results["source"] == "phantom" else "real MRI at 1 mm"
    cfg = results["network"]
    lines = [
        f"sliding-window inference on {results['source']} ({size}), 3 channels, on {results['device']}; "
        f"UNet3D {cfg['kwargs']} ({cfg['source']}), patch {cfg['patch']}, overlap {cfg['overlap']}, "
        f"batch {results['batch']}"
    ]
    for key in METHODS:
        if key not in results:
            continue
        r = results[key]
        if r is None:
            lines.append(f"  {key:17s} not run (monai not installed)")
            continue
        more = f", {r['patches']} patches" if "patches" in r else ""
        if "patches_total" in r:
            more += f" of {r['patches_total']}"
        if "overhead_seconds" in r:
            more += f"; outside the network {r['overhead_seconds']:.2f} s"
        lines.append(
            f"  {key:17s} {r['seconds']:7.1f} s (CPU {r['cpu_seconds']:6.1f} s) {r['voxels_per_s'] / 1e6:6.3f} Mvoxel/s "
            f"peak RSS {r['peak_rss_mib']:6.0f} MiB (before {r['rss_before_mib']:.0f}), {r.get('path', '?')}{more}"
        )
    pairs = [
        ("window", "monai", "ours accelerated window / MONAI"),
        ("synthesize", "monai", "ours accelerated full synthesis / MONAI"),
        ("window-eager", "monai", "ours eager window / MONAI (before)"),
        ("synthesize-eager", "monai", "ours eager full synthesis / MONAI (before)"),
        ("window", "window-eager", "accelerated / eager window"),
        ("synthesize", "synthesize-eager", "accelerated / eager synthesis"),
        ("synthesize-tta", "synthesize", "with the TTA flips (--uncertainty) / plain synthesis (goal <= 2)"),
    ]
    for a, b, what in pairs:
        if results.get(a) and results.get(b):
            lines.append(
                f"  ratio {what}: CPU {_ratio(results, a, b, 'cpu_seconds')}, wall {_ratio(results, a, b, 'seconds')}"
            )
    for key, what in (
        ("window_accelerated_vs_eager_hu", "window"),
        ("synthesize_accelerated_vs_eager_hu", "synthesis (int16 sCT)"),
    ):
        if key in results:
            d = results[key]
            lines.append(f"  |accelerated - eager| {what}: mean {d['mean']:.4f} HU, max {d['max']:.4f} HU")
    if results.get("ours_vs_monai_abs_diff"):
        d = results["ours_vs_monai_abs_diff"]
        lines.append(
            f"  |ours - MONAI| on the network output: mean {d['mean']:.2e}, max {d['max']:.2e} (output std "
            f"{d['output_std']:.3f}; the blends differ by design near patch corners and volume edges)"
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
    return _run_worker("synthesize", "phantom", LARGE_SIZE, device, batch, "")


def report_large(r: dict) -> str:
    gib = r["peak_rss_mib"] / 1024
    return (
        f"synthesize {LARGE_SIZE[0]}x{LARGE_SIZE[1]}x{LARGE_SIZE[2]} (3 float32 channels, 1 mm) on {r['device']}, "
        f"{r['path']}: {r['seconds']:.0f} s (CPU {r['cpu_seconds']:.0f} s), {r['patches']} of {r['patches_total']} "
        f"patches, peak RSS {gib:.2f} GiB (inputs alone {r['rss_before_mib'] / 1024:.2f} GiB); goal < "
        f"{GOAL_LARGE_GIB:g} GB: {'met' if r['peak_rss_mib'] * 2**20 < GOAL_LARGE_GIB * 1e9 else 'NOT met'}"
    )


@pytest.mark.benchmark
def test_bench_inference():
    results = run_benchmark("phantom", size=(128, 128, 96))
    print("\n" + report(results))
    assert all(results[m]["seconds"] > 0 for m in METHODS if results.get(m))
    assert results["window"]["path"] == "accelerated" and results["window-eager"]["path"] == "eager"
    d = results["window_accelerated_vs_eager_hu"]
    assert d["mean"] < 1.0 and d["max"] < 10.0
    if results.get("monai"):  # the same network on the same patches: the blends agree closely on average
        assert results["ours_vs_monai_abs_diff"]["mean"] < 0.1 * results["ours_vs_monai_abs_diff"]["output_std"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=list(DEFAULT_SIZE), metavar=("X", "Y", "Z"))
    parser.add_argument("--inputs", nargs="+", default=["phantom", "real"], choices=["phantom", "real"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2, help="patches per batch, for all (default 2)")
    parser.add_argument("--large", action="store_true", help="only the 512x512x300 peak-memory run (slow)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--source", default="phantom", help=argparse.SUPPRESS)
    parser.add_argument("--out-npy", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.source, tuple(args.size), args.device, args.batch, args.out_npy)))
        return 0
    if args.large:
        print(report_large(run_large(args.device, args.batch)))
        return 0
    everything = []
    for source in args.inputs:
        if source == "real" and not REAL_MRI.is_file():
            print(f"real MRI {REAL_MRI} is absent; skipped")
            continue
        results = run_benchmark(source, tuple(args.size), args.device, args.batch, args.methods)
        everything.append(results)
        print(report(results), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
