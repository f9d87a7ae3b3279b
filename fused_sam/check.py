"""fused-sam check: holds every backend this machine can run to the reference backend, on its own device.

Each backend (reference, torch and native on the CPU, native under each instruction set the CPU runs; on each
CUDA device triton and native) runs every operation of a SAM step (the norm, the perturbation, the restore,
every fused base update: SGD with momentum and nesterov, Adam, AdamW with AMSGrad, with master weights, under
a GradScaler, skipped, with lr and rho from device tensors, LookSAM's reuse) over every dtype and awkward
sizes, compared with the reference on the same device; then a short SAM run of a small model against the
same run on the reference. One table, a row per backend, and an exit status that is non-zero on any failure.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import torch

from . import FusedSAM
from . import selfcheck
from .backends import available_backends, resolve_backend

# Sizes for the operation checks: one element, around a SIMD step, a ragged CPU norm block, past Triton's block.
SIZES = (1, 63, 100, 255, 4099)
TWIN_STEPS = 5
# Relative distance of the twin runs' weights (largest |difference| over the largest |weight|), per dtype.
TWIN_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@dataclass
class Row:
    backend: str
    device: str
    variant: str  # the CPU instruction set or the GPU's architecture
    cases: int = 0
    worst: float = 0.0  # largest error seen in a passing comparison, as a fraction of its tolerance
    failures: List[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures


def _case(row: Row, what: str, run: Callable[[], None]) -> None:
    row.cases += 1
    selfcheck.reset_worst_error()
    try:
        run()
    except AssertionError as exc:
        row.failures.append(f"{what}: {str(exc).splitlines()[0]}")
    except Exception as exc:  # a kernel that raises is as wrong as one that computes wrongly
        row.failures.append(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    row.worst = max(row.worst, selfcheck.worst_error())


def _twin_model(dtype: torch.dtype, device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 5))
    return model.to(device=device, dtype=dtype)


TWIN_BASES = (
    ("SGD-momentum nesterov", torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    ("AdamW amsgrad", torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
)


def _twin_run(backend: str, device, dtype: torch.dtype, master: bool, base, kwargs) -> List[torch.Tensor]:
    """The weights after TWIN_STEPS SAM steps of a small model (float32 masters where there are some)."""
    model = _twin_model(dtype, device)
    opt = FusedSAM(model.parameters(), base, rho=0.05, master_weights=master, backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(TWIN_STEPS):
        x = torch.randn(16, 13, generator=gen).to(device=device, dtype=dtype)
        y = torch.randn(16, 5, generator=gen).to(device=device, dtype=dtype)
        for half in (opt.first_step, opt.second_step):
            torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
            half(zero_grad=True)
    if master:
        return [entry["sam_master_weight"] for entry in opt.state_dict()["state"].values()]
    return [p.detach() for p in model.parameters()]


def _check_twin(backend: str, device, dtype: torch.dtype, master: bool, name: str, base, kwargs) -> None:
    got = _twin_run(backend, device, dtype, master, base, kwargs)
    want = _twin_run("reference", device, dtype, master, base, kwargs)
    scale = max(float(w.detach().abs().max()) for w in want)
    distance = max(float((g.double() - w.double()).abs().max()) for g, w in zip(got, want)) / scale
    tolerance = TWIN_TOLERANCE[torch.float32 if master else dtype]
    assert distance <= tolerance, (f"{TWIN_STEPS} SAM steps with {name}: weights {distance:.2e} (relative) from "
                                   f"the reference's, tolerance {tolerance:.0e}")
    selfcheck.note_error(distance / tolerance)


def check_backend(name: str, device: torch.device, variant: str, sizes=SIZES) -> Row:
    """Every operation over every dtype the backend runs on ``device`` and ``sizes``, then the twin runs."""
    row = Row(name, str(device), variant)
    start = time.perf_counter()
    configs = [(dtype, master) for dtype, master in selfcheck.dtype_configs()
               if name in available_backends(device, dtype, master)]
    for dtype, master in configs:
        backend = resolve_backend(name, device, dtype, master)
        label = f"{str(dtype).replace('torch.', '')}{' + master weights' if master else ''}"
        for numel in sizes:
            _case(row, f"{label}, {numel} elements",
                  lambda: selfcheck.check_all_ops(backend, numel, dtype, device, seed=numel, master=master))
        _case(row, f"{label}, lr and rho from device tensors",
              lambda: selfcheck.check_device_hyperparameters(backend, sizes[-1], dtype, device, master=master))
        if master:
            _case(row, f"{label}, roundings", lambda: selfcheck.check_master_roundings(backend, device, dtype))
        if dtype in (torch.float32, torch.float64) or master:
            for base_name, base, kwargs in TWIN_BASES:
                _case(row, f"{label}, SAM run with {base_name}",
                      lambda: _check_twin(name, device, dtype, master, base_name, base, kwargs))
    if name == "native" and device.type == "cuda":
        def same_bits_as_cpu():
            disagreement = selfcheck.cuda_cpu_disagreement(device)
            assert disagreement is None, f"not the native CPU kernels' bits: {disagreement}"

        _case(row, "elementwise operations bit for bit those of the native CPU kernels", same_bits_as_cpu)
    row.seconds = time.perf_counter() - start
    return row


def _targets():
    """(backend, device, variant, set up) for every backend this machine runs."""
    cpu = torch.device("cpu")
    for name in available_backends(cpu, torch.float32):
        if name != "native":
            yield name, cpu, platform.machine(), None
            continue
        from .backends import native

        for isa in native.cpu_capabilities():
            yield name, cpu, isa, (lambda isa=isa: native.set_cpu_capability(isa))
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        device = torch.device("cuda", index)
        major, minor = torch.cuda.get_device_capability(device)
        for name in available_backends(device, torch.float32):
            yield name, device, f"sm_{major}{minor} {torch.cuda.get_device_name(device)}", None


def run_checks(device_filter: Optional[str] = None, backends: Optional[List[str]] = None, progress=None) -> List[Row]:
    rows = []
    from .backends import native

    before = native.cpu_capability() if native.extension_unavailable_reason() is None else None
    try:
        for name, device, variant, set_up in _targets():
            if (device_filter and device.type != device_filter) or (backends and name not in backends):
                continue
            if progress:
                progress(f"checking {name} on {device} ({variant}) ...")
            if set_up:
                set_up()
            rows.append(check_backend(name, device, variant))
    finally:
        if before is not None:
            native.set_cpu_capability(before)
    return rows


def _advice(row: Row) -> str:
    if row.backend == "native" and row.device == "cpu" and row.variant != "default":
        return (f"the native CPU kernels built for {row.variant} are wrong here: FUSED_SAM_CPU_CAPABILITY=default "
                "uses the default build, or FusedSAM(..., backend='torch')")
    if row.backend == "reference":
        return "the reference backend itself disagrees with float64 truth: torch on this machine computes wrongly"
    if row.device == "cpu":
        other = "'native'" if row.backend == "torch" else "'torch'"
    else:
        other = "'native'" if row.backend == "triton" else "'triton'"
    return (f"backend {row.backend!r} is wrong on {row.device}: pass FusedSAM(..., backend={other}) or "
            "backend='reference' (auto passes over a compiled CUDA backend that fails its own check)")


def format_table(rows: List[Row]) -> str:
    header = f"{'backend':<10} {'device':<7} {'ISA / GPU':<24} {'cases':>5} {'worst/tol':>9} {'time':>6}  result"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row.backend:<10} {row.device:<7} {row.variant[:24]:<24} {row.cases:>5} {row.worst:>9.2g} "
                     f"{row.seconds:>5.1f}s  {'PASS' if row.passed else f'FAIL ({len(row.failures)})'}")
    for row in rows:
        for failure in row.failures[:5]:
            lines.append(f"FAIL {row.backend} on {row.device} ({row.variant}): {failure}")
        if row.failures:
            lines.append(f"     what to do: {_advice(row)}")
    lines.append("worst/tol: the largest error of a passing comparison as a fraction of its tolerance (0: bit for bit)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fused-sam check",
        description="Hold every backend this machine runs to the reference backend: every operation of a SAM "
                    "step over every dtype and awkward sizes, then a short SAM run of a small model. Exits "
                    "non-zero if any backend fails, and says how to avoid it.")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="check only the backends of this device type")
    parser.add_argument("--backend", action="append", metavar="NAME",
                        help="check only this backend (repeat for several; default: every one available here)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = run_checks(args.device, args.backend, progress=lambda message: print(message, file=sys.stderr, flush=True))
    print(format_table(rows))
    failed = [row for row in rows if not row.passed]
    verdict = f"{len(failed)} of {len(rows)} backends FAIL" if failed else f"all {len(rows)} backends PASS"
    print(f"{verdict} ({time.perf_counter() - start:.0f} s, torch {torch.__version__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": [dict(asdict(row), passed=row.passed) for row in rows]},
                      f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
