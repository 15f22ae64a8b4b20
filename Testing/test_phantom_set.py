"""Phantom sets (groups of seeds and parameters) and the evaluation per group against the goals.

The bundled model's held-out set (``Resources/models/phantom-heldout.yaml``) must span the phantom's
parameter space and share no seed with any training or validation seed of the model's configurations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from SyntheticCTLib.apps.evaluation import evaluate, find_evaluation_cases, held_out_block
from SyntheticCTLib.cli.main import main
from SyntheticCTLib.comparison.metric_registry import GOALS, goal_check
from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.phantom.sets import parse_phantom_set, read_phantom_set, write_phantom_set
from SyntheticCTLib.training.config import load_config

MODELS = Path(__file__).resolve().parents[1] / "SyntheticCT" / "SyntheticCTLib" / "Resources" / "models"
HELD_OUT = MODELS / "phantom-heldout.yaml"
TRAINING_CONFIGS = sorted(MODELS.glob("phantom-spine-megre.*.yaml"))


def test_the_held_out_set_spans_the_parameter_space():
    spec = read_phantom_set(HELD_OUT)
    groups = {g.name: g for g in spec.groups}
    assert groups["default"].size == (192, 192, 128) and groups["default"].spacing == 1.0
    assert {g.spacing for g in spec.groups} == {1.0, 1.5}
    assert any(g.options.get("field_strength") == 1.5 for g in spec.groups)
    assert {g.options.get("lesion") for g in spec.groups} >= {"none", "sclerotic", "lytic"}
    assert {g.options.get("bowel_gas") for g in spec.groups} >= {True, False}
    snrs = [g.options["snr"] for g in spec.groups if "snr" in g.options]
    assert min(snrs) < 25 and max(snrs) > 60  # outside the default draw of 25..60 on both sides
    assert sum("echo_times_ms" in g.options for g in spec.groups) >= 2
    assert [g.name for g in spec.groups if g.expect == "warning"] == ["protocol-far"]


def test_held_out_seeds_never_train_or_select():
    held_out = set(read_phantom_set(HELD_OUT).seeds)
    assert len(TRAINING_CONFIGS) >= 3
    for path in TRAINING_CONFIGS:
        config = load_config(path)
        used = {s for spec in config.data.phantoms for s in spec.train_seeds + spec.validation_seeds}
        assert used and not (used & held_out), f"{path.name} uses held-out seeds {sorted(used & held_out)}"


def test_bad_sets_are_refused_with_the_reason(tmp_path):
    base = {"groups": [{"name": "a", "seeds": [1, 2]}, {"name": "b", "seeds": [2]}]}
    with pytest.raises(InvalidParameterError, match=r"seed may appear once; repeated: \[2\]"):
        parse_phantom_set(base)
    with pytest.raises(InvalidParameterError, match="unknown phantom option"):
        parse_phantom_set({"groups": [{"name": "a", "seeds": [1], "options": {"snr_db": 3}}]})
    with pytest.raises(InvalidParameterError, match="expect must be one of"):
        parse_phantom_set({"groups": [{"name": "a", "seeds": [1], "expect": "maybe"}]})
    with pytest.raises(InvalidParameterError, match="usable as a folder name"):
        parse_phantom_set({"groups": [{"name": "../a", "seeds": [1]}]})
    broken = tmp_path / "set.yaml"
    broken.write_text("groups: [name: a\n")
    with pytest.raises(InvalidParameterError, match=str(broken)):
        read_phantom_set(broken)


def test_goal_check_by_hand():
    summary = {
        "surface_mean_mm": {"mean": 0.15},
        "surface_p95_mm": {"mean": 1.4},
        "bone_dice": {"mean": 0.95},
        "mae_hu": {"mean": math.nan},
    }
    goals = goal_check(summary)
    assert set(goals) == set(GOALS)
    assert goals["surface_mean_mm"]["met"] and goals["surface_mean_mm"]["ratio"] == pytest.approx(0.5)
    assert not goals["surface_p95_mm"]["met"] and goals["surface_p95_mm"]["ratio"] == pytest.approx(2.0)
    assert goals["bone_dice"]["met"] and goals["bone_dice"]["ratio"] == pytest.approx(1.0)
    assert not goals["mae_hu"]["met"]  # not measured is not met
    # Training's epoch selection on the goals ranks by the worst ratio: p95 at twice its goal here.
    from SyntheticCTLib.training.validation import selection_score

    flat = {k: v["mean"] for k, v in summary.items()}
    assert selection_score({**flat, "mae_hu": 20.0}, "goals") == pytest.approx(2.0, abs=1e-5)
    islands = {"surface_mean_mm": 0.8, "surface_p95_mm": 0.47, "bone_dice": 0.98, "mae_hu": 22.0}
    clean = {"surface_mean_mm": 0.25, "surface_p95_mm": 0.6, "bone_dice": 0.97, "mae_hu": 25.0}
    assert selection_score(islands) < selection_score(clean)  # p95 alone keeps the epoch with false islands
    assert selection_score(islands, "goals") > selection_score(clean, "goals")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom_set")
    spec_file = root / "set.yaml"
    spec_file.write_text(
        "name: tiny\n"
        "defaults: {size: [48, 48, 32], spacing: 2.0}\n"
        "groups:\n"
        "  - {name: plain, seeds: [501, 502]}\n"
        "  - {name: low-snr, seeds: [503], options: {snr: 8.0, lesion: lytic}}\n"
        "  - {name: far, seeds: [504], options: {echo_times_ms: [1.2, 2.4, 3.6]}, expect: warning}\n"
    )
    out = root / "cases"
    code = main(["phantom", str(out), "--set", str(spec_file), "--progress", "none"])
    assert code == 0
    return root, spec_file, out


def test_a_set_is_written_in_group_folders_and_a_rerun_keeps_it(tiny_set):
    root, spec_file, out = tiny_set
    manifests = sorted(out.glob("*/seed*/case.json"))
    assert [m.relative_to(out).parent.as_posix() for m in manifests] == [
        "far/seed504",
        "low-snr/seed503",
        "plain/seed501",
        "plain/seed502",
    ]
    low = json.loads((out / "low-snr" / "seed503" / "case.json").read_text())
    assert low["group"] == "low-snr" and low["expect"] == "served"
    assert low["parameters"]["snr"] == 8.0 and low["parameters"]["lesion"] == "lytic"
    far = json.loads((out / "far" / "seed504" / "case.json").read_text())
    assert far["expect"] == "warning" and far["echo_times_ms"] == [1.2, 2.4, 3.6]
    stamps = {m: m.stat().st_mtime_ns for m in manifests}
    write_phantom_set(read_phantom_set(spec_file), out)
    assert {m: m.stat().st_mtime_ns for m in manifests} == stamps  # nothing rewritten


def test_evaluation_summarises_each_group_and_names_the_worst(tiny_set, tmp_path):
    _, _, out = tiny_set
    cases = find_evaluation_cases([out])
    assert {c.name: (c.group, c.expect) for c in cases} == {
        "seed501": ("plain", "served"),
        "seed502": ("plain", "served"),
        "seed503": ("low-snr", "served"),
        "seed504": ("far", "warning"),
    }
    result = evaluate("default", cases, tmp_path / "eval", images=False, device="cpu")
    assert set(result.groups) == {"plain", "low-snr", "far"}
    plain = result.groups["plain"]
    values = [result.cases[c]["model"]["mae_hu"] for c in ("seed501", "seed502")]
    assert plain["summary"]["model"]["mae_hu"]["mean"] == pytest.approx(np.mean(values))
    # The worst group is the served group farthest from a goal; the warned group is never it.
    ratios = {n: max(g["ratio"] for g in result.groups[n]["goals"].values()) for n in ("plain", "low-snr")}
    assert all(math.isfinite(r) for r in ratios.values()) and ratios["plain"] != ratios["low-snr"]
    assert result.worst_group == max(ratios, key=ratios.get)
    document = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert document["worst_group"] == result.worst_group
    assert {c["name"]: c["group"] for c in document["cases"]}["seed504"] == "far"
    served = [result.cases[c]["model"]["mae_hu"] for c in ("seed501", "seed502", "seed503")]
    assert document["summary_served"]["model"]["mae_hu"]["mean"] == pytest.approx(np.mean(served))
    # The far echo times are warned (the bundled card's protocol is TE 2.2 / 3.4 / 4.6 ms at 3 T); the rest not.
    assert result.groups["far"]["warned"] == 1 and result.groups["far"]["expectation_met"]
    assert any("TE 1.2, 2.4, 3.6 ms" in w for w in result.input_warnings["seed504"])
    block = held_out_block(result)
    assert block["worst_group"] == result.worst_group and block["groups"]["far"]["expect"] == "warning"


def test_evaluation_measures_the_spread_map_against_the_error(tiny_set, tmp_path):
    _, _, out = tiny_set
    case = [c for c in find_evaluation_cases([out]) if c.name == "seed501"]
    plain = evaluate("default", case, tmp_path / "plain", images=False, device="cpu", baselines=False)
    result = evaluate(
        "default", case, tmp_path / "spread", images=False, device="cpu", baselines=False, uncertainty=True
    )
    quality = result.uncertainty["seed501"]
    assert -1.0 <= quality["hu_spearman"] <= 1.0 and quality["n_voxels"] > 1000 and quality["n_surface_points"] > 100
    # The spread is measured beside the sCT, not instead of it: the metrics are those of the plain run.
    assert result.cases["seed501"]["model"]["mae_hu"] == pytest.approx(plain.cases["seed501"]["model"]["mae_hu"])
    document = json.loads((tmp_path / "spread" / "metrics.json").read_text())
    assert document["cases"][0]["uncertainty"]["n_voxels"] == quality["n_voxels"]
    assert held_out_block(result)["uncertainty"]["hu_spearman"] == pytest.approx(quality["hu_spearman"], abs=1e-4)
