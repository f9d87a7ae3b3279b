"""Every Triton kernel variant the triton backend can launch, compiled ahead of time for the GPUs it ships
for, sm_80 (A100) and sm_90 (H100), with Triton's own compiler and a CUDA target: no GPU is needed (the
triton wheel carries ptxas), so a kernel that would fail to compile on an A100 or H100 fails here.

The variants come from the backend's own launch code: its four operations run over meta-device spans for
every combination of what a caller passes (dtype, master weights, perturbation, base update, step scalars,
telemetry sums, a span length just below 2^31 and one of 2^31), with the kernels swapped for recorders, and Triton's JIT
binder turns each recorded launch into the signature and specialization a GPU would compile. The default
run compiles a covering set (every kernel, flag value, argument type and specialization at least once);
``-m slow`` compiles them all.

Every compiled kernel is checked: a cubin and PTX for its architecture, each grid-stride loop over the span
bounded in 64-bit arithmetic (a length below 2^31 arrives as int32, where ceil(numel / BLOCK) wrapped
negative and the loop ran zero times), and no fused multiply-add beyond the kernels' explicit ``tl.fma``.

The compiling runs in worker processes (this file run as a script, the two architectures side by side) with
the interpreter off: where the tests run Triton's interpreter (TRITON_INTERPRET=1 on a machine without a
GPU), Triton's own library functions (``tl.cdiv``, the reductions) are interpreted functions the compiler
cannot take.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import KernelInterface, create_function_from_signature  # noqa: E402

from fused_sam.backends import triton as triton_backend  # noqa: E402
from fused_sam.backends import triton_kernels  # noqa: E402
from fused_sam.backends.base import Perturbation, Span, StepScalars  # noqa: E402
from fused_sam.flat import ALIGN, LOW_PRECISION  # noqa: E402
from fused_sam.updates import AdagradUpdate, AdamUpdate, SGDUpdate  # noqa: E402

# where the workers import fused_sam from: where this process did
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(triton_kernels.__file__))))
ARCHS = (80, 90)  # A100, H100
# The longest span length Triton passes as int32 (inside the range where a 32-bit ceil(numel / BLOCK)
# wrapped) and the shortest it passes as int64; both multiples of ALIGN, as every span's length is.
NUMELS = (2**31 - ALIGN, 2**31)
INTERPRETER_ONLY_FLAGS = {"RTNE_BF16"}  # set only under Triton's interpreter (see triton_kernels.py)
KERNELS = sorted(name for name, value in vars(triton_kernels).items()
                 if isinstance(value, KernelInterface) and not name.startswith("_"))


# --- the launches ---------------------------------------------------------------------------------------

@dataclass
class Launch:
    kernel: str
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` appends a Launch to ``sink``."""

    def __init__(self, name, sink):
        self.name, self.sink = name, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(Launch(self.name, args, kwargs))


def _meta(numel, dtype, offset=0):
    """A meta tensor of ``numel`` elements whose data_ptr is ``offset`` elements past an aligned start."""
    return torch.empty(numel + offset, dtype=dtype, device="meta")[offset:]


def _scalar(dtype, aligned=True):
    """A one-element meta tensor: aligned, or (as a run's step count, a 0-d view into the segment's counts
    at the run's first parameter) one element past an aligned start."""
    return _meta(1, dtype, offset=0 if aligned else 1)[0]


def _span(numel, dtype, master, state=(), reused=False):
    return Span(weights=_meta(numel, dtype), grads=_meta(numel, dtype),
                backup=None if master else _meta(numel, dtype),
                state={name: _meta(numel, torch.float32) for name in state},
                master=_meta(numel, torch.float32) if master else None,
                reused=_meta(numel, torch.float32) if reused else None)


def _perturbation(normalize, adaptive):
    return Perturbation(adaptive=adaptive, eta=0.01, normalize=normalize, eps=1e-12)


def _weights():
    """(dtype, master weights) pairs a span can have."""
    return [(dtype, master) for dtype in triton_backend.SUPPORTED_DTYPES
            for master in (False, True) if not master or dtype in LOW_PRECISION]


def _updates():
    sgd = [SGDUpdate(momentum=momentum, weight_decay=wd, nesterov=nesterov, maximize=maximize)
           for momentum, nesterov in ((0.0, False), (0.9, False), (0.9, True))  # nesterov needs momentum
           for wd in (0.0, 1e-4) for maximize in (False, True)]
    adam = [AdamUpdate(beta1=beta1, weight_decay=wd, decoupled=decoupled, amsgrad=amsgrad, maximize=maximize)
            for beta1 in (0.9, 0.3)  # torch.lerp's two formulas: weight 1 - beta1 below 0.5 or not
            for wd, decoupled in ((0.0, False), (1e-2, False), (1e-2, True))
            for amsgrad in (False, True) for maximize in (False, True)]
    adagrad = [AdagradUpdate(weight_decay=wd, maximize=maximize) for wd in (0.0, 1e-2) for maximize in (False, True)]
    return sgd + adam + adagrad


def _run_every_operation(backend):
    """Call each of the backend's operations with every combination of its inputs' options. Pointers are
    16-byte aligned (spans start on ALIGN-element boundaries; GradScaler's scale and found_inf, a tensor lr
    or rho and the counters are taken as allocations of their own) except where the optimizer passes views
    at any offset: a span's slice of the partials buffer and a run's step count."""
    bools = (False, True)
    for numel, (dtype, master) in itertools.product(NUMELS, _weights()):
        for adaptive, partials_dtype, aligned in itertools.product(bools, (torch.float32, torch.float64), bools):
            span = _span(numel, dtype, master)
            n = backend.partials_len(span)  # a span's slice of the device's partials buffer, at any offset
            backend.sq_norm_partials(span, _perturbation(True, adaptive),
                                     _meta(n, partials_dtype, offset=0 if aligned else 1))
        # the whole partials buffer: one element (a variant's plain step), a multiple of 16 or not
        partials_options = [None] + [_meta(length, partials_dtype) for partials_dtype in (torch.float32, torch.float64)
                                     for length in (1, 32, 33)]
        for normalize, adaptive, partials, count, grad_scale, rho_on_device in itertools.product(
                bools, bools, partials_options, bools, bools, bools):
            scalars = StepScalars(rho=_scalar(torch.float64) if rho_on_device else 0.05,
                                  grad_scale=_scalar(torch.float32) if grad_scale else None)
            # telemetry sums: none, or a span's elements of a device's buffer: float32 at its start, or (with
            # rho on the device, so the variants only double) float64 one element in
            for sums in (None, (torch.float64, 1) if rho_on_device else (torch.float32, 0)):
                span = _span(numel, dtype, master)
                if sums is not None:
                    sums = _meta(backend.partials_len(span), sums[0], offset=sums[1])
                backend.perturb(span, _perturbation(normalize, adaptive), partials,
                                _meta(1, torch.int32) if count else None, scalars, sums)
        backend.restore(_span(numel, dtype, master))
        for lr_on_device, grad_scale, found_inf, reused, step_aligned in itertools.product(bools, repeat=5):
            # telemetry sums: none, or a span's rows of a device's (rows, 3) buffer: float32 at its start, or
            # (with the unaligned step count, so the variants only double) float64 one row in, 24 bytes
            sums_options = (None, (torch.float32, 0) if step_aligned else (torch.float64, 3))
            for update, sums in itertools.product(_updates(), sums_options):
                span = _span(numel, dtype, master, update.needed_state(), reused)
                scalars = StepScalars(step=_scalar(torch.float32, step_aligned),
                                      grad_scale=_scalar(torch.float32) if grad_scale else None,
                                      found_inf=_scalar(torch.float32) if found_inf else None,
                                      lr=_scalar(torch.float64) if lr_on_device else 0.01,
                                      reuse_scale=_scalar(torch.float64) if reused else None)
                if sums is not None:
                    rows = backend.partials_len(span)
                    sums = _meta(3 * rows, sums[0], offset=sums[1]).view(rows, 3)
                backend.restore_and_update(span, update, scalars, sums)


@functools.lru_cache(maxsize=None)
def recorded_launches():
    launches = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_backend, "_k", SimpleNamespace(**{name: _Recorder(name, launches) for name in KERNELS}))
        _run_every_operation(triton_backend.TritonBackend())
    return launches


# --- specialization and compilation (in a worker, with the interpreter off) -----------------------------------

@functools.lru_cache(maxsize=None)
def _target_and_backend(arch):
    target = GPUTarget("cuda", arch, 32)
    return target, make_backend(target)


@functools.lru_cache(maxsize=None)
def _binder(fn, arch):
    return create_function_from_signature(fn.signature, fn.params, _target_and_backend(arch)[1])


def _bind(fn, args, kwargs, arch):
    """What Triton's JIT compiles for ``fn[grid](*args, **kwargs)`` on sm_``arch``: (options, signature,
    constexprs, attrs), from the JIT's own binder (argument types, constexprs, and the specialization of
    integers and pointers on divisibility by 16)."""
    bound_args, specialization, options = _binder(fn, arch)(*args, **kwargs)
    return fn._pack_args(_target_and_backend(arch)[1], dict(kwargs), bound_args, specialization, options)


def compile_for(fn, args, kwargs, arch):
    options, signature, constexprs, attrs = _bind(fn, args, kwargs, arch)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=_target_and_backend(arch)[0],
                          options=options.__dict__)


@dataclass(eq=False)
class Variant:
    """One kernel as the compiler sees it; ``launch`` is the first recorded launch that gives it."""
    launch: Launch
    signature: dict  # parameter: type ("constexpr" for a flag)
    key: tuple  # ((parameter, type, constexpr value or specialization hint), ..., (option, value), ...)

    def __post_init__(self):
        self.features = frozenset((self.launch.kernel, item) for item in self.key)

    @property
    def kernel(self):
        return self.launch.kernel

    def __str__(self):
        arguments = ", ".join(f"{name} {kind}" + (f" {hint}" if hint not in ("", "None") else "")
                              for name, kind, hint in self.key[:len(self.signature)] if kind != "constexpr")
        flags = " ".join(name for name, kind, value in self.key[:len(self.signature)] if value == "True")
        return f"{self.kernel}({arguments}; {flags or 'no flag'})"

    def compile(self, arch):
        return compile_for(getattr(triton_kernels, self.kernel), self.launch.args, self.launch.kwargs, arch)


@functools.lru_cache(maxsize=None)
def launchable_variants():
    """Every distinct variant of the recorded launches, in their order (their specialization is the same
    for both architectures)."""
    variants = {}
    for launch in recorded_launches():
        fn = getattr(triton_kernels, launch.kernel)
        _, specialization, options = _binder(fn, ARCHS[-1])(*launch.args, **launch.kwargs)
        # (type, value) of a constexpr, (type, hint) of an argument, e.g. ("i32", "D"): divisible by 16
        key = tuple((param.name, *map(str, spec)) for param, spec in zip(fn.params, specialization))
        key += tuple(sorted(options.items()))
        signature = {param.name: spec[0] for param, spec in zip(fn.params, specialization)}
        variants.setdefault((launch.kernel, key), Variant(launch, signature, key))
    return list(variants.values())


@functools.lru_cache(maxsize=None)
def covering_variants():
    """Few variants that together hold every feature (kernel, parameter type, flag value, specialization)
    of the launchable ones: greedily the one adding the most features not yet held, until none is left."""
    variants = launchable_variants()
    uncovered = frozenset().union(*(v.features for v in variants))
    chosen = []
    while uncovered:
        best = max(variants, key=lambda v: len(v.features & uncovered))
        chosen.append(best)
        uncovered -= best.features
    return chosen


_SSA_DEFINITION = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)? = (.*)$")
_SSA_NAME = re.compile(r"%[\w.$-]+")
_FOR = re.compile(r"scf\.for %[\w.$-]+ = %[\w.$-]+ to (%[\w.$-]+) step .*: (i\d+) \{")


def loops_bounded_by_numel(ttir):
    """The integer type of each ``scf.for`` in the TTIR whose upper bound is computed from ``%numel``."""
    operands = {}
    for line in ttir.splitlines():
        match = _SSA_DEFINITION.match(line)
        if match:
            operands[match.group(1)] = _SSA_NAME.findall(match.group(2))

    @functools.lru_cache(maxsize=None)
    def from_numel(name):
        return name == "%numel" or any(from_numel(o) for o in operands.get(name, ()) if o != name)

    return [match.group(2) for match in _FOR.finditer(ttir) if from_numel(match.group(1))]


def problems_of(name, arch, compiled):
    """What is wrong with kernel ``name`` compiled for sm_``arch``, as sentences (an empty list: nothing)."""
    problems = []
    ptx = compiled.asm.get("ptx", "")
    if not compiled.asm.get("cubin"):
        problems.append("no cubin")
    if not re.search(rf"^\.target sm_{arch}a?\b", ptx, re.MULTILINE) or f".entry {name}" not in ptx:
        problems.append(f"the PTX is not an sm_{arch} entry point {name}")
    narrow = [kind for kind in loops_bounded_by_numel(compiled.asm["ttir"]) if kind != "i64"]
    if narrow:
        problems.append(f"a loop over the span is bounded in {narrow[0]}, which wraps for lengths just under 2^31")
    written, fused = compiled.asm["ttir"].count("math.fma"), len(re.findall(r"\bfma\.rn", ptx))
    if fused > written:
        problems.append(f"{fused} fma in the PTX, {written} written: the compiler contracted multiply-adds")
    return problems


def compile_all(variants, arch):
    failures = []
    for variant in variants:
        try:
            problems = problems_of(variant.kernel, arch, variant.compile(arch))
        except Exception as exc:  # a compile error is what this test is for: report it with its variant
            problems = [f"{type(exc).__name__}: {str(exc).strip()[:2000]}"]
        failures += [f"{variant} on sm_{arch}: {problem}" for problem in problems]
    return failures


def enumeration_problems():
    """Where the enumeration falls behind the kernels: a kernel never launched, a boolean flag never given
    one of its values (a new flag set from an option the enumeration does not vary), numel never passed as
    int32 (the 2^31 edge) or as int64."""
    variants = launchable_variants()
    problems = [f"{name} is never launched" for name in set(KERNELS) - {v.kernel for v in variants}]
    for name in KERNELS:
        launched = [v for v in variants if v.kernel == name]
        numel_types = {v.signature["numel"] for v in launched}
        if numel_types != {"i32", "i64"}:
            problems.append(f"{name}: numel only as {sorted(numel_types)}")
        for param in getattr(triton_kernels, name).params:
            if param.is_constexpr and param.name not in ("BLOCK", "PBLOCK"):
                values = {v.launch.kwargs[param.name] for v in launched}
                expected = {False} if param.name in INTERPRETER_ONLY_FLAGS else {False, True}
                if values != expected:
                    problems.append(f"{name}: {param.name} takes {sorted(values)}, not {sorted(expected)}")
    return problems


@triton.jit
def _loop_with_int32_bound(out_ptr, numel, BLOCK: tl.constexpr):
    """The grid-stride loop as it was: ``tl.cdiv`` of an int32 numel, an int32 bound."""
    count = 0
    for _ in range(tl.program_id(0), tl.cdiv(numel, BLOCK), tl.num_programs(0)):
        count += 1
    tl.store(out_ptr, count)


@triton.jit
def _multiply_add(out_ptr, a, b, c):
    tl.store(out_ptr, a * b + c)


def control_problems():
    """Where a check misses what it looks for, on kernels that have it."""
    problems = []
    loop = compile_for(_loop_with_int32_bound, (_meta(1, torch.int32), NUMELS[0]), dict(BLOCK=4096), 90)
    if not any("wraps" in p for p in problems_of("_loop_with_int32_bound", 90, loop)):
        problems.append("the loop check passes tl.cdiv of an int32 numel")
    args = (_meta(1, torch.float32), 1.5, 2.5, 3.5)
    fused = compile_for(_multiply_add, args, {}, 90)  # Triton's default options: contracted
    if not any("contracted" in p for p in problems_of("_multiply_add", 90, fused)):
        problems.append("the fma check passes a contracted a * b + c")
    plain = problems_of("_multiply_add", 90, compile_for(_multiply_add, args, triton_backend.LAUNCH_OPTIONS, 90))
    problems += [f"a * b + c with the backend's launch options: {p}" for p in plain]
    return problems


def main(argv):
    """The worker: ``check`` (the enumeration and the checks), or ``ARCH covering|KERNEL`` (compile the
    covering set, or every variant of one kernel); prints one line of JSON."""
    start = time.perf_counter()
    if argv == ["check"]:
        result = dict(enumeration=enumeration_problems(), controls=control_problems(),
                      launches=len(recorded_launches()), variants=len(launchable_variants()),
                      covering=len(covering_variants()))
    else:
        arch, selection = int(argv[0]), argv[1]
        variants = (covering_variants() if selection == "covering"
                    else [v for v in launchable_variants() if v.kernel == selection])
        result = dict(variants=len(variants), failures=compile_all(variants, arch))
    print(json.dumps(dict(result, seconds=round(time.perf_counter() - start, 1))))


# --- tests ------------------------------------------------------------------------------------------------

def run_workers(jobs, cache_dir):
    """Run the workers side by side, Triton's interpreter off and its cache fresh; their JSON results."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache_dir),
               PYTHONPATH=os.pathsep.join(p for p in (SOURCE_ROOT, os.environ.get("PYTHONPATH")) if p))
    env.pop("TRITON_INTERPRET", None)
    processes = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *job], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for job in jobs]
    results = []
    for job, process in zip(jobs, processes):
        out, err = process.communicate()
        assert process.returncode == 0, f"worker {job} failed:\n{err[-5000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    jobs = [["check"]] + [[str(arch), "covering"] for arch in ARCHS]
    check, *compiled = run_workers(jobs, tmp_path_factory.mktemp("triton_cache"))
    return dict(check=check, compiled=dict(zip(ARCHS, compiled)))


def test_enumeration_keeps_up_with_the_kernels(default_run):
    assert default_run["check"]["enumeration"] == []


def test_checks_catch_an_int32_loop_bound_and_contracted_multiply_adds(default_run):
    assert default_run["check"]["controls"] == []


@pytest.mark.parametrize("arch", ARCHS)
def test_covering_set_compiles_for_the_gpus_we_ship_for(default_run, arch):
    result = default_run["compiled"][arch]
    assert result["variants"] == default_run["check"]["covering"] > 0
    assert result["failures"] == [], "\n".join(result["failures"])


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_launchable_variant_compiles(kernel, tmp_path):
    for arch, result in zip(ARCHS, run_workers([[str(arch), kernel] for arch in ARCHS], tmp_path)):
        assert result["variants"] > 0
        assert result["failures"] == [], "\n".join(result["failures"])


# --- the loop bound at the 2^31 edge, run ---------------------------------------------------------------------

@triton.jit
def _block_counts(out_ptr, numel, BLOCK: tl.constexpr):
    tl.store(out_ptr, triton_kernels._block_count(numel, BLOCK))


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a GPU or Triton's interpreter")
def test_block_count_at_the_2_31_edge():
    """The grid-stride loops' bound, run where the tests run the kernels (the interpreter passes a length
    below 2^31 as int32, as a GPU launch does): ceil(numel / 4096) just under, at and past 2^31."""
    numels = [2**31 - 4095, 2**31 - ALIGN, 2**31 - 1, 2**31, 2**32 + 5]
    out = torch.zeros(len(numels), dtype=torch.int64, device="cuda" if torch.cuda.is_available() else "cpu")
    for i, numel in enumerate(numels):
        _block_counts[(1,)](out[i:], numel, BLOCK=4096)
    assert out.tolist() == [-(-numel // 4096) for numel in numels]


if __name__ == "__main__":
    main(sys.argv[1:])
