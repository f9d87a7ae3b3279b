"""fused-sam check: every backend this machine runs, held to the reference; a wrong one fails the command
with what to do about it."""
from __future__ import annotations

import json

import pytest
import torch

import fused_sam.backends as registry
from fused_sam import check
from fused_sam.backends.reference import ReferenceBackend
from fused_sam.cli import main as cli


@pytest.fixture
def small_sizes(monkeypatch):
    monkeypatch.setattr(check, "SIZES", (1, 100))


# Triton runs on a CPU only under its interpreter here (TRITON_INTERPRET=1, conftest.py): minutes, not seconds.
COMPILED_HERE = [name for name in registry.available_backends("cpu", torch.float32) if name != "triton"]


def test_every_backend_here_passes(small_sizes, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert cli(["check", "--device", "cpu", "--json", str(out)] + [f"--backend={n}" for n in COMPILED_HERE]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    expected = {(name, "cpu") for name in COMPILED_HERE}
    assert {(row["backend"], row["device"]) for row in rows} == expected
    if "native" in registry.available_backends("cpu", torch.float32):
        from fused_sam.backends import native

        assert sorted(row["variant"] for row in rows if row["backend"] == "native") == sorted(native.cpu_capabilities())
    for row in rows:
        assert row["passed"] and row["cases"] >= 20 and 0 <= row["worst"] <= 1, row
    assert f"all {len(rows)} backends PASS" in printed
    assert max(len(line) for line in printed.splitlines()[:len(rows) + 2]) <= 100


class _SgdSignFlipped(ReferenceBackend):
    """The reference with SGD's maximize ignored: a plausible kernel bug."""

    name = "sgd-maximize-ignored"

    def restore_and_update(self, span, update, scalars, sums=None):
        if getattr(update, "maximize", False):
            update = type(update)(**dict(vars(update), maximize=False))
        super().restore_and_update(span, update, scalars, sums)


def test_a_wrong_backend_fails_the_command_with_what_to_do(small_sizes, monkeypatch, capsys):
    backend = _SgdSignFlipped()
    monkeypatch.setitem(registry._instances, backend.name, backend)
    monkeypatch.setitem(registry._REGISTRY, backend.name, ("unused", "unused"))
    assert cli(["check", "--device", "cpu", "--backend", backend.name, "--backend", "reference"]) == 1
    printed = capsys.readouterr().out
    assert f"{backend.name:<10} cpu" in printed and "FAIL (" in printed
    failures = [line for line in printed.splitlines() if line.startswith(f"FAIL {backend.name} on cpu")]
    assert failures and all("maximize=True" in line for line in failures), failures
    assert f"what to do: backend '{backend.name}' is wrong on cpu: pass FusedSAM(..., backend=" in printed
    assert "reference  cpu" in printed and "1 of 2 backends FAIL" in printed
