"""scripts.evaluate.tta's gate sweep: its shortcut (gated = full-TTA answer where the gate opens, identity
answer elsewhere) equals running ``classify`` with the gate, and the choice rule keeps full TTA's accuracy."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scripts.evaluate import tta as evaluate
from tests.conftest import TinyCNN


@pytest.fixture(scope="module")
def swept(tiny_spec):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    spec = dataclasses.replace(tiny_spec, temperature=0.5)
    sets = {name: (torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)))
            for name, n in (("calib", 40), ("holdout", 50), ("calib_photos", 30), ("holdout_photos", 60))}
    combos = [(("identity",), "mean_prob"), (tuple(spec.tta), "mean_prob")]
    rows, probs = evaluate.evaluate_policies(model, spec, sets, combos, resamples=50)
    gates = evaluate.sweep_gates(spec, sets, probs, tuple(spec.tta), "mean_prob")
    return model, spec, sets, rows, gates


def test_every_gate_of_the_sweep_answers_like_classify_with_that_gate(swept):
    model, spec, sets, _, gates = swept
    for row in gates[:: max(1, len(gates) // 5)]:
        checked = evaluate.verify_gate(model, spec, sets, tuple(spec.tta), "mean_prob",
                                       evaluate.Gate(row["metric"], row["below"]), row)
        assert all(v["same_as_sweep"] for v in checked.values())


def test_the_share_augmented_grows_with_the_gate_and_the_extremes_are_off_and_full(swept):
    _, _, sets, rows, gates = swept
    full = next(r for r in rows if r["n_views"] > 1)
    off = next(r for r in rows if r["n_views"] == 1)
    for metric in ("top1", "margin"):
        shares = [r["holdout"]["augmented"] for r in gates if r["metric"] == metric]
        assert shares == sorted(shares)
    for name in sets:
        for r in gates:
            if r[name]["augmented"] == 0.0:
                assert r[name]["accuracy"] == off[name]["accuracy"]
            if r[name]["augmented"] == 1.0:
                assert r[name]["accuracy"] == full[name]["accuracy"] and r[name]["delta_full"] == 0.0


def test_the_chosen_gate_is_the_cheapest_within_tolerance_of_full_tta_on_every_set(swept):
    gates = swept[4]
    chosen = evaluate.choose_gate(gates)
    ok = [r for r in gates if all(r[n]["delta_full"] >= -evaluate.GATE_TOLERANCE for n in evaluate.SETS)]
    assert chosen in ok

    def pooled(r):
        return sum(r[n]["augmented"] * r[n]["n"] for n in evaluate.SETS) / sum(r[n]["n"] for n in evaluate.SETS)

    assert pooled(chosen) <= min(pooled(r) for r in ok) + 1e-4
