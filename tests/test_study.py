"""`fused-sam study --quick`: every method trains on both tasks and the costs are counted as the variants
say (the accuracy numbers are the study's to report, not this test's to judge)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")

from fused_sam.study import main  # noqa: E402


def test_quick_study_runs_every_method_and_counts_its_backward_passes(tmp_path):
    assert main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "study.json").read_text())
    assert (tmp_path / "study.md").read_text().count("| sam |") == 2
    for task in ("digits", "noisy"):
        cost = {m: s["gradient_evaluations_per_epoch"]["mean"] for m, s in result["summary"][task].items()}
        steps = cost["sgd"]  # one backward per step
        assert cost["sam"] == 2 * steps
        for every_fifth in ("every-5", "looksam-5"):  # SAM on steps 0, 5, 10, ... of the run
            assert steps * 1.2 - 1 <= cost[every_fifth] <= steps * 1.2 + 1, (task, every_fifth, cost)
        assert steps < cost["randomly-0.2"] < 2 * steps and steps < cost["whensharp"] <= 2 * steps
        assert cost["momentum-sam"] == steps
        for method, s in result["summary"][task].items():
            assert 0 <= s["test_acc"]["min"] <= 1, (task, method)
