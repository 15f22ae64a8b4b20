"""Benchmark: time and peak memory to generate a 192x192x128 phantom case at 1 mm (goal: under 10 s on 2 cores).

Run as a script (``python Testing/benchmarks/bench_phantom.py [--repeats N] [--write]``) or through pytest
(``pytest Testing/benchmarks/bench_phantom.py -m benchmark -s``). Peak memory is the Python-heap peak
(tracemalloc, which counts numpy buffers) of one generation, and the process's maximum resident set.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import tracemalloc

import pytest

GOAL_S = 10.0
SIZE = (192, 192, 128)
SPACING_MM = 1.0


def _max_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def run_benchmark(repeats: int = 3, write: bool = False) -> dict:
    """Generate the default case ``repeats`` times; return the timings (s) and peak memory (MiB)."""
    from SyntheticCTLib.phantom import make_phantom, write_phantom

    make_phantom(0, size=(32, 32, 24), spacing=4.0)  # warm up imports and caches
    times = []
    for seed in range(repeats):
        start = time.perf_counter()
        phantom = make_phantom(seed, size=SIZE, spacing=SPACING_MM)
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    make_phantom(0, size=SIZE, spacing=SPACING_MM)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    result = {
        "times_s": times,
        "best_s": min(times),
        "median_s": sorted(times)[len(times) // 2],
        "peak_traced_mib": peak / 2**20,
        "max_rss_mib": _max_rss_mib(),
    }
    if write:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_phantom(phantom, tmp)
            result["write_s"] = time.perf_counter() - start
    return result


def report(result: dict) -> str:
    lines = [
        f"phantom {SIZE[0]}x{SIZE[1]}x{SIZE[2]} at {SPACING_MM:g} mm, 3 echoes",
        "  generation: " + ", ".join(f"{t:.2f}" for t in result["times_s"]) + " s"
        f"  (best {result['best_s']:.2f} s, median {result['median_s']:.2f} s; goal < {GOAL_S:g} s: "
        f"{'met' if result['median_s'] < GOAL_S else 'NOT met'})",
        f"  peak memory: {result['peak_traced_mib']:.0f} MiB traced (numpy + Python), "
        f"process max RSS {result['max_rss_mib']:.0f} MiB",
    ]
    if "write_s" in result:
        lines.append(f"  writing the case (7 .nii.gz + case.json): {result['write_s']:.2f} s")
    return "\n".join(lines)


@pytest.mark.benchmark
def test_bench_phantom():
    result = run_benchmark(repeats=2)
    print("\n" + report(result))
    assert result["median_s"] < 3 * GOAL_S  # a guard against a gross regression, not the goal itself


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="also time writing the case to disk")
    args = parser.parse_args(argv)
    print(report(run_benchmark(args.repeats, args.write)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
