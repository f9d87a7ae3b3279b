"""Property-based tests (issue 15, item 1): every backend against the reference backend, and FusedSAM against
the classic per-tensor SAM, on inputs that hypothesis generates instead of the hand-picked grids of the
other test files.

Backend operations (``fused_sam.backends.base.Backend``): each CPU backend other than the reference (native
under every instruction set this CPU runs, torch with its default and with a small chunk, triton under its
interpreter) on random spans: awkward sizes, all four dtypes, float32 master weights, values mixing exact
zeros, denormals, tiny and huge magnitudes, random SAM settings, random SGD/Adam settings and step counts,
GradScaler scales and skips, LookSAM's reused direction. Whole optimizer: random float64 models, param
groups, frozen parameters and gradients present in one pass only, against ``ClassicSAM``.

Tolerances. The harness's TOLERANCE / STATE_TOLERANCE give the relative error allowed per dtype; their
fixed atol was sized for O(1) data and would make a comparison of 1e-20-sized values vacuous (and of
1e30-sized ones meaningless). So each element is held to ``rtol * magnitude`` plus a denormal floor, where
``magnitude`` is the formula evaluated in float64 on absolute values (``|w| + |e|``, ``|w| + lr |d|``, ...):
the size of the terms whose roundings can legitimately differ (a fused multiply-add, another association),
which is what allows the harness's atol where ``w + e`` cancels. Inputs whose reference math comes within
2^8 of overflowing the math dtype are discarded (``assume``): there a backend that orders an intermediate
differently may overflow where the reference does not, or the reverse. Overflow on purpose is its own
property (``test_nonfinite_norm_skips_the_perturbation``).

Settings: the hypothesis profiles are registered in conftest.py ("ci", the default, derandomized; "thorough":
``--hypothesis-profile=thorough``, 20x the examples). Per-backend test bodies run an inner ``@given`` so
triton gets a fraction of the examples; a failure prints the falsifying case and a blob for
``@reproduce_failure`` on that inner ``run`` function.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Optional

import pytest
import torch
from torch import nn

pytest.importorskip("hypothesis")
from hypothesis import assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fused_sam.selfcheck import (  # noqa: E402
    REFERENCE, STATE_TOLERANCE, TOLERANCE, as_bits, clone_span, exact_sq_norm, restore_point,
)
from test_optimizer_parity import assert_twins_close  # noqa: E402

import fused_sam  # noqa: E402
from fused_sam import FusedSAM  # noqa: E402
from fused_sam.backends import native as native_module  # noqa: E402
from fused_sam.backends import resolve_backend  # noqa: E402
from fused_sam.backends.base import Perturbation, Span, StepScalars, grad_unscale, math_dtype  # noqa: E402
from fused_sam.backends.torch_ops import NORM_ROW, TorchBackend  # noqa: E402
from fused_sam.classic import ClassicSAM  # noqa: E402
from fused_sam.flat import LOW_PRECISION  # noqa: E402
from fused_sam.updates import AdamUpdate, SGDUpdate  # noqa: E402

CPU = torch.device("cpu")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
HEADROOM = 2.0 ** -8  # inputs whose reference math comes this close to overflowing are discarded

# Triton's interpreter computes in numpy, which warns where the data overflows on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")

# --- candidates: the backends held to the reference ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One backend configuration under test. ``isa``: the native CPU kernels' instruction set;
    ``max_numel`` bounds span sizes; ``share`` is its fraction of the profile's max_examples."""

    id: str
    name: str
    make: object  # () -> Backend
    isa: Optional[str] = None
    max_numel: int = 100_003
    share: float = 1.0
    threads: tuple = (1, 2)
    # dtypes whose weights and gradients are drawn without denormals: a known failure, tested on its own
    no_denormal_inputs: tuple = ()

    @property
    def backend(self):
        return self.make()

    def dtypes(self, master: bool = False) -> list:
        return [dt for dt in DTYPES if self.name in fused_sam.available_backends(CPU, dt, master=master)]

    @contextlib.contextmanager
    def active(self, threads: int):
        """Runs with this candidate's instruction set and ``threads`` intra-op threads; both restored after."""
        before_threads = torch.get_num_threads()
        before_isa = native_module.cpu_capability() if self.isa else None
        try:
            if self.isa:
                native_module.set_cpu_capability(self.isa)
            torch.set_num_threads(threads)
            yield
        finally:
            torch.set_num_threads(before_threads)
            if self.isa:
                native_module.set_cpu_capability(before_isa)


def _native_isa_skip(isa: str) -> Optional[str]:
    """None if the native CPU kernels built for ``isa`` run here, else why not (as test_native_backend.py)."""
    if "native" not in fused_sam.available_backends(CPU, torch.float32):
        return fused_sam.backend_report(CPU)["native"]
    if isa not in native_module._C.CPU_CAPABILITIES_BUILT:
        return f"fused_sam._C has no {isa} CPU kernels"
    if isa not in native_module.cpu_capabilities():
        return f"this CPU cannot run the {isa} CPU kernels (it runs {', '.join(native_module.cpu_capabilities())})"
    return None


def _unavailable(name: str) -> Optional[str]:
    return None if name in fused_sam.available_backends(CPU, torch.float32) else fused_sam.backend_report(CPU)[name]


_SMALL_CHUNK = TorchBackend(chunk_numel=8 * NORM_ROW)  # 4096: sizes up to 1e5 cross many chunks
_CANDIDATES = [
    *((Candidate(f"native-{isa}", "native", lambda: resolve_backend("native", CPU, torch.float32), isa),
       _native_isa_skip(isa)) for isa in ("default", "avx2")),
    (Candidate("torch", "torch", lambda: resolve_backend("torch", CPU, torch.float32)), _unavailable("torch")),
    (Candidate("torch-chunk4096", "torch", lambda: _SMALL_CHUNK), None),
    # Triton's interpreter (TRITON_INTERPRET=1, conftest.py) runs every program over a whole BLOCK of 4096
    # elements in numpy: slow, so small spans and a third of the examples (test_triton_backend.py covers the
    # block boundaries); one thread, the interpreter is single-threaded anyway.
    # bfloat16 denormal inputs: see test_triton_interpreter_reads_bfloat16_denormals (xfail).
    (Candidate("triton", "triton", lambda: resolve_backend("triton", CPU, torch.float32), max_numel=300, share=1 / 3,
               threads=(1,), no_denormal_inputs=(torch.bfloat16,)), _unavailable("triton")),
]
# One test item per (backend, dtype), so that every dtype gets its share of examples in every run.
CANDIDATES = [
    pytest.param(cand, dtype, id=f"{cand.id}-{str(dtype).removeprefix('torch.')}",
                 marks=pytest.mark.skipif(skip is not None, reason=str(skip)))
    for cand, skip in _CANDIDATES for dtype in (DTYPES if skip is not None else cand.dtypes())
]


def run_property(cand: Candidate, cases, check) -> None:
    """Runs ``check(backend, case)`` on ``cand`` over the cases hypothesis draws from ``cases``, with the
    candidate's share of the current profile's max_examples (an inner @given: settings cannot differ
    between parametrizations of one decorated test)."""
    examples = max(5, round(settings.default.max_examples * cand.share))

    @settings(max_examples=examples)
    @given(case=cases)
    def run(case):
        with cand.active(case.threads):
            check(cand.backend, case)

    run()


# --- small strategies ------------------------------------------------------------------------------------

# Sizes that break vector loops, chunking and blocks: 1, primes, non-multiples of 16, either side of powers
# of two, of the native CPU norm chunk (32768), of the torch backend's row (512) and small chunk (4096).
AWKWARD_SIZES = (1, 2, 3, 5, 7, 13, 15, 17, 31, 33, 47, 63, 65, 97, 127, 129, 255, 257, 511, 513, 1021, 1023,
                 1025, 4093, 4095, 4097, 8191, 8193, 12289, 32767, 32768, 32769, 65535, 65537, 99991)


def sizes(max_numel: int):
    """Awkward sizes, small ones, sizes either side of a power of two, and (one draw in five) any size up to
    ``max_numel``."""
    near_power = st.tuples(st.integers(0, max(0, max_numel.bit_length() - 1)), st.integers(-2, 2)).map(
        lambda kd: min(max_numel, max(1, 2 ** kd[0] + kd[1])))
    return st.one_of(st.sampled_from([n for n in AWKWARD_SIZES if n <= max_numel]), st.integers(1, min(64, max_numel)),
                     st.integers(1, min(2048, max_numel)), near_power, st.integers(1, max_numel))


# Exponent (base 10) ranges of "huge" values per storage dtype: float16 tops out at 65504.
HUGE_EXPONENTS = {torch.float32: (4, 30), torch.bfloat16: (4, 30), torch.float64: (4, 200), torch.float16: (1, 3)}
FRACTIONS = st.sampled_from([0.0, 0.0, 0.01, 0.2, 1.0])


@dataclasses.dataclass(frozen=True)
class Values:
    """How a tensor is filled: randn * 10**exponent, with the given fractions of the elements replaced (in
    this priority) by signed exact zeros, denormals of the storage dtype, tiny normals (its smallest normal
    times up to 1e3) and huge values (10**huge_exponent times 1..10)."""

    seed: int
    exponent: int
    zeros: float
    denormals: float
    tiny: float
    huge: float
    huge_exponent: int

    def fill(self, numel: int, dtype: torch.dtype, magnitude_only: bool = False) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        f64 = dict(generator=gen, dtype=torch.float64)
        x = torch.randn(numel, **f64) * 10.0 ** self.exponent
        kind, u = torch.rand(numel, **f64), torch.rand(numel, **f64)
        sign = torch.where(torch.rand(numel, **f64) < 0.5, -1.0, 1.0).double()
        info = torch.finfo(dtype)
        cut = 0.0
        for fraction, value in ((self.zeros, 0.0 * sign),
                                (self.denormals, info.smallest_normal * u * sign),
                                (self.tiny, info.smallest_normal * 10.0 ** (3 * u) * sign),
                                (self.huge, 10.0 ** (self.huge_exponent + u) * sign)):
            chosen = (kind >= cut) & (kind < cut + fraction)
            x = torch.where(chosen, value, x)
            cut += fraction
        x = x.clamp(-info.max / 2, info.max / 2)
        return (x.abs() if magnitude_only else x).to(dtype)


def values(dtype: torch.dtype):
    top = 2 if dtype == torch.float16 else 3
    return st.builds(Values, seed=st.integers(0, 2**32 - 1), exponent=st.integers(-3, top),
                     zeros=FRACTIONS, denormals=FRACTIONS, tiny=FRACTIONS, huge=FRACTIONS,
                     huge_exponent=st.integers(*HUGE_EXPONENTS[dtype]))


@dataclasses.dataclass(frozen=True)
class SpanCase:
    """A span: its size and dtype, master weights (bf16/fp16), where it starts in its buffers (spans start
    on 16-element boundaries: 32 bytes for 16-bit dtypes, not a full vector), and its values."""

    numel: int
    dtype: torch.dtype
    master: bool
    offset: int
    weights: Values
    grads: Values
    threads: int

    def build(self, state: dict = (), reused: Optional[Values] = None) -> Span:
        """The span; ``state`` maps state names to Values (exp_avg_sq and max_exp_avg_sq non-negative);
        every tensor a view at ``offset`` into a buffer whose head is NaN; the backup poisoned with NaN."""
        m = math_dtype(self.dtype)

        def place(v: Values, dtype, magnitude_only=False):
            buf = torch.full((self.offset + self.numel,), math.nan, dtype=dtype)
            buf[self.offset:] = v.fill(self.numel, dtype, magnitude_only)
            return buf[self.offset:]

        def poisoned():
            return torch.full((self.offset + self.numel,), math.nan, dtype=self.dtype)[self.offset:]

        state = {name: place(v, m, name in ("exp_avg_sq", "max_exp_avg_sq")) for name, v in dict(state).items()}
        g_v = None if reused is None else place(reused, m)
        if self.master:
            masters = place(self.weights, torch.float32)
            weights = poisoned()
            weights.copy_(masters)
            return Span(weights=weights, grads=place(self.grads, self.dtype), backup=None, state=state,
                        master=masters, reused=g_v)
        return Span(weights=place(self.weights, self.dtype), grads=place(self.grads, self.dtype), backup=poisoned(),
                    state=state, reused=g_v)


@st.composite
def span_cases(draw, cand: Candidate, dtype: torch.dtype):
    master = dtype in LOW_PRECISION and dtype in cand.dtypes(master=True) and draw(st.booleans(), label="master")
    weights, grads = draw(values(dtype)), draw(values(dtype))
    if dtype in cand.no_denormal_inputs:
        weights, grads = (dataclasses.replace(v, denormals=0.0) for v in (weights, grads))
    # master weights: float32 values in the parameters' range (a float16 model's weights stay below 65504)
    return SpanCase(numel=draw(sizes(cand.max_numel), label="numel"), dtype=dtype, master=master,
                    offset=draw(st.sampled_from([0, 16])), weights=weights, grads=grads,
                    threads=draw(st.sampled_from(cand.threads)))


def unit_floats(lo: float, hi: float, *typical):
    """Floats in [lo, hi] (rates: momentum, betas, dampening), the usual values and the low end drawn often
    (shrinking to the first usual one)."""
    return st.one_of(st.sampled_from((*typical, lo)), st.floats(lo, hi))


def log_floats(lo: float, hi: float, *typical):
    """Scales (lr, rho, eps, weight decay) spread evenly in log10 over [lo, hi], plus the usual values (which
    may include 0)."""
    return st.one_of(st.sampled_from(typical), st.floats(math.log10(lo), math.log10(hi)).map(lambda x: 10.0 ** x))


rhos = log_floats(1e-3, 2.0, 0.05, 0.5, 0.0)
perturbations = st.builds(
    Perturbation, adaptive=st.booleans(),
    eta=log_floats(1e-4, 1.0, 0.01, 0.0), normalize=st.booleans(), eps=log_floats(1e-12, 1e-3, 1e-12, 1e-8),
)
grad_scales = st.one_of(st.none(), st.sampled_from([65536.0, 1024.0, 2.0**-3, 3.0]),
                        st.integers(-8, 24).map(lambda k: 2.0**k))
found_infs = st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.0, math.nan]))  # non-zero (NaN too) skips
step_counts = st.one_of(st.sampled_from([0, 1, 2, 9]), st.integers(0, 10**6))
learning_rates = log_floats(1e-5, 1.0, 0.1, 1e-3, 0.0)
weight_decays = log_floats(1e-6, 0.5, 0.0, 5e-4, 1e-2)


@st.composite
def sgd_updates(draw):
    momentum = draw(unit_floats(0.0, 0.99, 0.9))
    nesterov = momentum > 0 and draw(st.booleans())  # torch.optim's rule: nesterov needs dampening 0
    return SGDUpdate(momentum=momentum,
                     dampening=0.0 if nesterov else draw(unit_floats(0.0, 1.0, 0.1)),
                     weight_decay=draw(weight_decays), nesterov=nesterov, maximize=draw(st.booleans()))


adam_updates = st.builds(
    AdamUpdate, beta1=unit_floats(0.0, 0.99, 0.9), beta2=unit_floats(0.5, 0.9999, 0.999),
    eps=log_floats(1e-12, 1e-3, 1e-8), weight_decay=weight_decays, decoupled=st.booleans(),
    amsgrad=st.booleans(), maximize=st.booleans(),
)


# --- comparing within the magnitude of the terms ---------------------------------------------------------


def denormal_floor(dtype: torch.dtype) -> float:
    """Two ulps in ``dtype``'s denormal range: a product rounded there (or not, under a fused multiply-add)."""
    info = torch.finfo(dtype)
    return 2 * info.smallest_normal * info.eps


def assert_within(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, rtol: float, floor,
                  what: str) -> None:
    """|actual - expected| <= rtol * magnitude + floor element by element (``floor`` a number or per element;
    equal values pass, infinities included; a NaN on either side fails)."""
    a, e, magnitude = actual.double().reshape(-1), expected.double().reshape(-1), magnitude.double().reshape(-1)
    floor = torch.as_tensor(floor, dtype=torch.float64).reshape(-1).expand_as(a)
    ok = (a == e) | ((a - e).abs() <= rtol * magnitude + floor)
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten()
        i = int(bad[0])
        raise AssertionError(f"{what}: {bad.numel()} of {a.numel()} elements differ beyond rtol {rtol:g} x magnitude "
                             f"+ {floor[i].item():g}; first at {i}: actual {a[i].item()!r}, expected {e[i].item()!r}, "
                             f"magnitude {magnitude[i].item()!r}")


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit for bit (NaN payloads and the sign of zero included)."""
    assert actual.dtype == expected.dtype and torch.equal(as_bits(actual), as_bits(expected)), what


def near_overflow(dtype: torch.dtype, *tensors, headroom: float = HEADROOM) -> bool:
    """Any value above ``headroom`` times ``dtype``'s largest (NaN counts: an intermediate overflowed). The
    math dtype gets 2^-8: a backend may associate a product differently (g T^2 rho, d d (1 - beta2)); a
    result stored in the parameters' dtype gets 1/2: only its final rounding may go either way."""
    limit = torch.finfo(dtype).max * headroom
    return any(bool(((t.abs() > limit) | t.isnan()).any()) for t in tensors if isinstance(t, torch.Tensor))


class OnSpan:
    """A case over one drawn span: it runs with the span's thread count."""

    @property
    def threads(self):
        return self.span.threads


# --- 1. the squared-norm partials ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NormCase(OnSpan):
    span: SpanCase
    adaptive: bool
    eta: float


@st.composite
def norm_cases(draw, cand, dtype):
    return NormCase(draw(span_cases(cand, dtype)), draw(st.booleans()), draw(log_floats(1e-4, 1.0, 0.01, 0.0)))


def check_norm(backend, case: NormCase) -> None:
    span = case.span.build()
    p = Perturbation(adaptive=case.adaptive, eta=case.eta, normalize=True, eps=1e-12)
    m = span.state_dtype
    exact = exact_sq_norm(span, p)
    out = torch.full((backend.partials_len(span),), math.nan, dtype=m)
    backend.sq_norm_partials(span, p, out)
    note(f"exact {exact.item()!r}, partials {out.tolist()[:8]}")
    assert not out.isnan().any(), "sq_norm_partials left partials unwritten (NaN poison survived)"
    assert bool((out >= 0).all()), "a negative partial sum of squares"
    total = out.double().sum()
    if exact > torch.finfo(m).max / HEADROOM:  # overflows for certain: the sum must say so
        assert total.isinf(), f"||g||^2 = {exact.item():g} overflows {m}, but the partials sum to {total.item()!r}"
        return
    assume(exact < torch.finfo(m).max * HEADROOM)  # in between, whether it overflows depends on the order
    # float32 accumulation: the harness's rtol (check_sq_norm); each square may underflow, hence the atol
    rtol = 1e-10 if m == torch.float64 else 1e-5
    assert_within(total, exact, exact, rtol, span.numel * torch.finfo(m).smallest_normal, "squared norm")


@pytest.mark.parametrize(("cand", "dtype"), CANDIDATES)
def test_norm_partials_sum_to_the_squared_norm(cand, dtype):
    """sum(partials) = ||g||^2 (ASAM: ||(|w| + eta) g||^2) in float64, to float32 accumulation error; every
    partial written; a norm that must overflow the math dtype sums to inf."""
    run_property(cand, norm_cases(cand, dtype), check_norm)


# --- 2. perturb ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PerturbCase(OnSpan):
    span: SpanCase
    perturbation: Perturbation
    with_partials: bool  # False: no group normalizes (partials=None); only when this one does not
    extra_partial: float  # another span's share of the norm: 0, or a non-finite one
    grad_scale: Optional[float]
    rho: float

    def scalars(self) -> StepScalars:
        scale = None if self.grad_scale is None else torch.tensor([self.grad_scale], dtype=torch.float32)
        return StepScalars(rho=self.rho, grad_scale=scale)


@st.composite
def perturb_cases(draw, cand, dtype):
    p = draw(perturbations, label="perturbation")
    return PerturbCase(draw(span_cases(cand, dtype)), p, p.normalize or draw(st.booleans()),
                       draw(st.sampled_from([0.0, 0.0, 0.0, math.inf, math.nan])), draw(grad_scales),
                       draw(rhos, label="rho"))


def expected_e(span: Span, p: Perturbation, rho: float, partials, grad_scale) -> Optional[torch.Tensor]:
    """e in float64 from the span's values (None: a non-finite norm, e = 0), or reject the case if the
    reference's math comes near overflow."""
    m = span.state_dtype
    w = (span.master if span.master is not None else span.weights).double()
    g = span.grads.double()
    scale = torch.tensor(rho, dtype=torch.float64)
    if partials is not None:
        if not bool(partials.sum().isfinite()):  # as the reference sums them: in the math dtype
            return None
        total = partials.double().sum()
        assume(total < torch.finfo(m).max * HEADROOM)
        if p.normalize:
            scale = rho / (total.sqrt() + p.eps * (grad_scale or 1.0))
    if not p.normalize and grad_scale is not None:
        scale = scale / grad_scale
    t2 = (w.abs() + p.eta).square() if p.adaptive else torch.ones(())
    e = g * scale * t2
    assume(not near_overflow(m, g * scale, t2, e, w.abs() + e.abs()))
    assume(not near_overflow(span.weights.dtype, w.abs() + e.abs(), headroom=0.5))
    return e


def check_perturb(backend, case: PerturbCase) -> None:
    span = case.span.build()
    p = case.perturbation
    partials = None
    if case.with_partials:
        partials = torch.empty(1, dtype=span.state_dtype)
        REFERENCE.sq_norm_partials(span, p, partials)  # the reference's norm for both: perturb alone is compared
        partials = torch.cat([partials, torch.tensor([case.extra_partial], dtype=partials.dtype)])
    e = expected_e(span, p, case.rho, partials, case.grad_scale)
    cand, ref = clone_span(span), clone_span(span)
    counts = [torch.zeros(1, dtype=torch.int32) for _ in range(2)]
    backend.perturb(cand, p, partials, counts[0], case.scalars())
    REFERENCE.perturb(ref, p, partials, counts[1], case.scalars())
    assert torch.equal(counts[0], counts[1]), f"non-finite counter {counts[0].item()} != {counts[1].item()}"
    if span.master is not None:
        assert_bits_equal(cand.master, span.master, "perturb changed the master weights")
    else:
        assert_bits_equal(cand.backup, span.weights, "perturb: the backup is not a bitwise copy of w")
    dtype = span.weights.dtype
    if e is None:  # a non-finite norm: e = 0, w stays (the master's rounding)
        assert torch.equal(cand.weights, restore_point(ref).to(dtype)), "a non-finite norm still perturbed"
        return
    w = (span.master if span.master is not None else span.weights).double()
    assert_within(cand.weights, ref.weights, w.abs() + e.abs(), TOLERANCE[dtype][0], denormal_floor(dtype),
                  f"w + e ({p}, grad_scale {case.grad_scale})")


@pytest.mark.parametrize(("cand", "dtype"), CANDIDATES)
def test_perturb_matches_reference(cand, dtype):
    """w + e matches the reference to the dtype's rtol of |w| + |e| (plain, ASAM, USAM; with a GradScaler's
    scale; with another span's non-finite partial), the backup is a bitwise copy (or the master is kept), the
    non-finite counter counts alike."""
    run_property(cand, perturb_cases(cand, dtype), check_perturb)


# --- 3. perturb, then restore ----------------------------------------------------------------------------


def check_roundtrip(backend, case: PerturbCase) -> None:
    span = case.span.build()
    before = span.weights.clone()
    partials = None
    if case.with_partials:
        partials = torch.full((backend.partials_len(span),), math.nan, dtype=span.state_dtype)
        backend.sq_norm_partials(span, case.perturbation, partials)
    backend.perturb(span, case.perturbation, partials, None, case.scalars())
    backend.restore(span)
    assert_bits_equal(span.weights, before, "restore after perturb did not give back w bit for bit")


@pytest.mark.parametrize(("cand", "dtype"), CANDIDATES)
def test_restore_after_perturb_is_exact(cand, dtype):
    """perturb then restore gives w back bit for bit (signed zeros, denormals and huge values included), with
    the backend's own norm, whatever e was (also an overflowing or NaN one)."""
    run_property(cand, perturb_cases(cand, dtype), check_roundtrip)


# --- 4. restore_and_update -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UpdateCase(OnSpan):
    span: SpanCase
    update: object  # SGDUpdate | AdamUpdate
    state: dict  # state name -> Values
    step: int
    grad_scale: Optional[float]
    found_inf: Optional[float]
    reuse: Optional[tuple]  # (c, Values of g_v): LookSAM's d = g + c g_v
    in_place: bool  # backup is the weights tensor (a step that perturbed nothing)
    lr: float

    @property
    def skipped(self) -> bool:
        return self.found_inf is not None and self.found_inf != 0


@st.composite
def update_cases(draw, cand, dtype):
    span = draw(span_cases(cand, dtype))
    update = draw(st.one_of(sgd_updates(), adam_updates), label="update")
    m = math_dtype(span.dtype)
    state = {name: draw(values(m), label=name) for name in update.needed_state()}
    reuse = draw(st.none() | st.tuples(log_floats(1e-3, 3.0e4, 0.7310585786300049, 0.0), values(m)), label="reuse")
    return UpdateCase(span, update, state, draw(step_counts), draw(grad_scales), draw(found_infs), reuse,
                      not span.master and draw(st.booleans()), draw(learning_rates, label="lr"))


def update_magnitudes(span: Span, case: UpdateCase):
    """The update evaluated in float64 on absolute values, the bound on what roundings can move:
    (|w| + lr |direction|, {state name: magnitude}, the absolute floor of w's error). Adam's denominator is a
    divisor, so it enters with its exact value, and the step's magnitude with the relative error the second
    moment can carry (its terms' magnitude over its value). The floor: torch's fused Adam (the torch backend's)
    forms lr / bc1 * exp_avg before dividing by the denominator, and that product may be subnormal, rounded to
    half a subnormal ulp, which the division then scales by 1 / denom. Rejects the case if the reference's
    math comes near overflow."""
    u, m = case.update, span.state_dtype
    w_signed = (span.master if span.master is not None else span.weights).double()
    w, g_signed = w_signed.abs(), span.grads.double()
    if case.reuse is not None:
        c = float(torch.tensor(case.reuse[0], dtype=m))  # rounded once to the math dtype, as the kernels do
        g_signed, g = g_signed + c * span.reused.double(), g_signed.abs() + abs(c) * span.reused.double().abs()
    else:
        g = g_signed.abs()
    if case.grad_scale is not None:
        unscale = grad_unscale(torch.tensor(case.grad_scale)).double()
        g, g_signed = g * unscale, g_signed * unscale
    if u.maximize:
        g_signed = -g_signed
    state = {}
    if isinstance(u, SGDUpdate):
        d = g + u.weight_decay * w
        if u.momentum != 0:
            old = span.state["momentum_buffer"].double().abs()
            buf = d if case.step == 0 else u.momentum * old + abs(1 - u.dampening) * d
            state["momentum_buffer"] = buf
            d = d + u.momentum * buf if u.nesterov else buf
        new_w = w + case.lr * d
        assume(not near_overflow(m, d, new_w, *state.values()))
        floor = torch.zeros(())
    else:
        d, d_signed = (g, g_signed) if u.decoupled else (g + u.weight_decay * w, g_signed + u.weight_decay * w_signed)
        state["exp_avg"] = u.beta1 * span.state["exp_avg"].double().abs() + (1 - u.beta1) * d
        state["exp_avg_sq"] = u.beta2 * span.state["exp_avg_sq"].double() + (1 - u.beta2) * d * d
        second_exact = u.beta2 * span.state["exp_avg_sq"].double() + (1 - u.beta2) * d_signed * d_signed
        second = state["exp_avg_sq"]
        if u.amsgrad:
            second = state["max_exp_avg_sq"] = torch.maximum(span.state["max_exp_avg_sq"].double(), second)
            second_exact = torch.maximum(span.state["max_exp_avg_sq"].double(), second_exact)
        t = case.step + 1
        bc1, bc2_sqrt = 1 - u.beta1**t, math.sqrt(1 - u.beta2**t)
        denom = second_exact.sqrt() / bc2_sqrt + u.eps
        amplification = torch.where(second_exact > 0, second / second_exact, torch.ones_like(second))
        ratio = state["exp_avg"] * (1 + amplification) / denom  # exp_avg / denom: overflows even with lr = 0
        step = case.lr / bc1 * ratio
        new_w = w * max(1.0, abs(1 - case.lr * u.weight_decay)) + step
        floor = torch.finfo(m).smallest_normal * torch.finfo(m).eps / denom
        assume(not near_overflow(m, d * d, ratio, new_w, step, *state.values()))
    assume(not near_overflow(span.weights.dtype, new_w, headroom=0.5))
    return new_w, state, floor


def check_update(backend, case: UpdateCase) -> None:
    span = case.span.build(case.state, None if case.reuse is None else case.reuse[1])
    if span.backup is not None:
        span.backup.copy_(span.weights)
    scalars = StepScalars(
        step=torch.tensor([7.0, case.step], dtype=torch.float32)[1],  # a 0-d view, as the optimizer passes it
        lr=case.lr,
        grad_scale=None if case.grad_scale is None else torch.tensor(case.grad_scale, dtype=torch.float32),
        found_inf=None if case.found_inf is None else torch.tensor(case.found_inf, dtype=torch.float32),
        reuse_scale=None if case.reuse is None else torch.tensor([case.reuse[0]], dtype=torch.float64),
    )
    cand, ref = clone_span(span), clone_span(span)
    if case.in_place:
        cand = dataclasses.replace(cand, backup=cand.weights)
    else:
        cand.weights.fill_(math.nan)
    ref.weights.fill_(math.nan)
    what = f"{case.update}, step {case.step}, grad_scale {case.grad_scale}, found_inf {case.found_inf}"
    if case.skipped:  # w the restore point and the state as it was, bit for bit, whatever the math would give
        backend.restore_and_update(cand, case.update, scalars)
        assert_bits_equal(cand.weights, restore_point(span).to(span.weights.dtype),
                          f"a skipped update changed w: {what}")
        for name, value in span.state.items():
            assert_bits_equal(cand.state[name], value, f"a skipped update changed {name}: {what}")
        if span.master is not None:
            assert_bits_equal(cand.master, span.master, f"a skipped update changed the master: {what}")
        return
    w_mag, state_mag, w_floor = update_magnitudes(span, case)
    backend.restore_and_update(cand, case.update, scalars)
    REFERENCE.restore_and_update(ref, case.update, scalars)
    if span.reused is not None:
        assert_bits_equal(cand.grads, span.grads, f"the update wrote the gradients: {what}")
    dtype = span.weights.dtype
    if span.master is not None:
        assert_within(cand.master, ref.master, w_mag, TOLERANCE[torch.float32][0],
                      denormal_floor(torch.float32) + w_floor, f"master after {what}")
        assert_bits_equal(cand.weights, cand.master.to(dtype), f"weights are not the master's rounding: {what}")
    assert_within(cand.weights, ref.weights, w_mag, TOLERANCE[dtype][0], denormal_floor(dtype) + w_floor,
                  f"w after {what}")
    for name, value in ref.state.items():
        assert_within(cand.state[name], value, state_mag[name], STATE_TOLERANCE[value.dtype][0],
                      denormal_floor(value.dtype), f"{name} after {what}")


@pytest.mark.parametrize(("cand", "dtype"), CANDIDATES)
def test_restore_and_update_matches_reference(cand, dtype):
    """One base update (random SGD / Adam / AdamW settings, step count, GradScaler scale, LookSAM's reused
    direction, a backup that is w itself) matches the reference to the rtol of its terms' magnitude, weights
    and state; a skipped one (found_inf non-zero, NaN too) leaves w and the state bit for bit."""
    run_property(cand, update_cases(cand, dtype), check_update)


# --- 5. a non-finite norm --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NonfiniteCase(OnSpan):
    span: SpanCase
    perturbation: Perturbation
    poison: str  # what goes into the gradient (or, under ASAM, the weights): inf, -inf, nan, overflow
    in_weights: bool
    positions: tuple  # fractions of the span where it goes
    grad_scale: Optional[float]
    rho: float


@st.composite
def nonfinite_cases(draw, cand, dtype):
    span = draw(span_cases(cand, dtype))
    p = dataclasses.replace(draw(perturbations), normalize=True)
    # float16 gradients cannot overflow a float32 sum of squares (65504^2 * 1e5 < 3.4e38): no "overflow"
    kinds = ["inf", "-inf", "nan"] + ([] if span.dtype == torch.float16 and not span.master else ["overflow"])
    return NonfiniteCase(span, p, draw(st.sampled_from(kinds)), p.adaptive and draw(st.booleans()),
                         tuple(draw(st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=3))),
                         draw(grad_scales), draw(rhos, label="rho"))


def check_nonfinite(backend, case: NonfiniteCase) -> None:
    span = case.span.build()
    target = (span.master if span.master is not None else span.weights) if case.in_weights else span.grads
    m = span.state_dtype
    value = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan,
             "overflow": 4 * math.sqrt(torch.finfo(m).max)}[case.poison]  # its square overflows the math dtype
    weights = span.master if span.master is not None else span.weights
    for f in case.positions:
        i = int(f * span.numel)
        target[i] = value
        if case.poison == "overflow":  # its partner in (|w| + eta) g set to 1, so the product overflows too
            (span.grads if case.in_weights else weights)[i] = 1.0
    if span.master is not None:
        span.weights.copy_(span.master)
    before = span.weights.clone()
    partials = torch.full((backend.partials_len(span),), math.nan, dtype=m)
    backend.sq_norm_partials(span, case.perturbation, partials)
    assert not bool(partials.sum().isfinite()), f"a {case.poison} {'weight' if case.in_weights else 'gradient'} " \
                                                f"gave a finite squared norm {partials.sum().item()!r}"
    count = torch.zeros(1, dtype=torch.int32)
    scale = None if case.grad_scale is None else torch.tensor([case.grad_scale], dtype=torch.float32)
    backend.perturb(span, case.perturbation, partials, count, StepScalars(rho=case.rho, grad_scale=scale))
    assert count.item() == 1, f"non-finite counter {count.item()} after one non-finite norm"
    # e = 0: w + 0 (a -0.0 may come back +0.0, as in the reference; NaN weights stay NaN)
    torch.testing.assert_close(span.weights, before, rtol=0, atol=0, equal_nan=True,
                               msg=lambda msg: f"a non-finite norm moved w: {msg}")


@pytest.mark.parametrize(("cand", "dtype"), CANDIDATES)
def test_nonfinite_norm_skips_the_perturbation(cand, dtype):
    """An inf or NaN gradient (under ASAM also weight), or one whose square overflows, makes the backend's own
    partials non-finite; perturb with them leaves w as it is and counts one non-finite step."""
    run_property(cand, nonfinite_cases(cand, dtype), check_nonfinite)


# --- known failures, each with its minimal reproducer ------------------------------------------------------

TRITON_INTERPRETING = _unavailable("triton") is None and not torch.cuda.is_available()


@pytest.mark.skipif(not TRITON_INTERPRETING, reason="the triton backend on CPU tensors, under Triton's interpreter")
@pytest.mark.xfail(strict=True, reason=(
    "Triton's interpreter converts bfloat16 denormals to float32 wrongly (triton/runtime/interpreter.py, "
    "_convert_float renormalizes them and then clamps the exponent), so the triton backend on CPU reads a "
    "bfloat16 denormal weight, backup or gradient as another number: bf16 w = 3.4897e-39 (bits 0x0026), "
    "perturbed with e = 0, comes back 2.2041e-39; 1.0102e-39 comes back 4.4081e-39. Found by "
    "test_perturb_matches_reference[triton-bfloat16]. The kernels already round float32 -> bfloat16 stores by "
    "hand under the interpreter (RTNE_BF16); loads would need the same (bits << 16). GPUs convert exactly."))
def test_triton_interpreter_reads_bfloat16_denormals():
    """A perturbation of zero (USAM, g = 0) leaves bfloat16 denormal weights as they are."""
    weights = torch.tensor([3.489748854003666e-39, 1.0101904577379033e-39, 1.1020259538958945e-38, 1.0],
                           dtype=torch.bfloat16)
    span = Span(weights=weights.clone(), grads=torch.zeros(4, dtype=torch.bfloat16),
                backup=torch.empty(4, dtype=torch.bfloat16))
    backend = resolve_backend("triton", CPU, torch.bfloat16)
    backend.perturb(span, Perturbation(adaptive=False, eta=0.0, normalize=False, eps=1e-12), None, None,
                    StepScalars(rho=0.05))
    assert torch.equal(span.weights, weights), f"{span.weights.tolist()} != {weights.tolist()}"


# --- 6. the whole optimizer against the classic oracle ---------------------------------------------------


class RandomNet(nn.Module):
    """A tanh MLP of the given widths; optional side branches reached only in the pass at w
    (``only_at_w``) or only in the pass at w + e (``only_at_perturbed``), as in test_training_loops.py."""

    def __init__(self, widths, only_at_w: bool, only_at_perturbed: bool, seed: int):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
            self.only_at_w = nn.Linear(widths[-2], widths[-1]) if only_at_w else None
            self.only_at_perturbed = nn.Linear(widths[-2], widths[-1]) if only_at_perturbed else None
        self.to(torch.float64)
        self.at_perturbed = False

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        side = self.only_at_perturbed if self.at_perturbed else self.only_at_w
        return self.layers[-1](x) + (side(x) if side is not None else 0)


@dataclasses.dataclass(frozen=True)
class TrainingCase:
    widths: tuple
    only_at_w: bool
    only_at_perturbed: bool
    frozen: tuple  # per parameter (model.parameters() order)
    group_of: tuple  # per parameter: its param group
    groups: tuple  # per group: overrides (lr, weight_decay, rho, adaptive, eta, normalize)
    base: str
    base_kwargs: dict
    sam_kwargs: dict
    backend: str
    steps: int
    seed: int


@st.composite
def training_cases(draw):
    widths = tuple(draw(st.lists(st.integers(1, 12), min_size=2, max_size=4), label="widths"))
    only_at_w, only_at_perturbed = draw(st.booleans()), draw(st.booleans())
    n_main = 2 * (len(widths) - 1)  # the layers' parameters come first in model.parameters()
    n_params = n_main + 2 * (only_at_w + only_at_perturbed)
    frozen = draw(st.lists(st.sampled_from([False, False, False, True]), min_size=n_params, max_size=n_params))
    if all(frozen[:n_main]):  # the classic class needs a gradient at w (it stacks the norms of the ones there)
        frozen[n_main - 1] = False
    frozen = tuple(frozen)
    n_groups = draw(st.integers(2, 3))  # a group that gets no parameter is left out
    group_of = tuple(draw(st.lists(st.integers(0, n_groups - 1), min_size=n_params, max_size=n_params)))
    base = draw(st.sampled_from(["sgd", "adam", "adamw"]))
    if base == "sgd":
        momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
        nesterov = momentum > 0 and draw(st.booleans())
        base_kwargs = dict(lr=draw(log_floats(1e-3, 0.2, 0.05)), momentum=momentum, nesterov=nesterov,
                           dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.1])),
                           weight_decay=draw(st.sampled_from([0.0, 5e-4, 1e-2])), maximize=draw(st.booleans()))
    else:
        base_kwargs = dict(lr=draw(log_floats(1e-4, 0.05, 1e-3)), betas=(draw(unit_floats(0.0, 0.95, 0.9)),
                                                                          draw(unit_floats(0.9, 0.9999, 0.999))),
                           eps=draw(st.sampled_from([1e-8, 1e-6])),
                           weight_decay=draw(st.sampled_from([0.0, 1e-2, 0.1])),
                           amsgrad=draw(st.booleans()), maximize=draw(st.booleans()))
    sam_kwargs = dict(rho=draw(log_floats(1e-3, 0.5, 0.05, 0.0)), adaptive=draw(st.booleans()),
                      eta=draw(st.sampled_from([0.0, 0.01])), normalize=draw(st.booleans(), label="normalize"))
    overrides = st.fixed_dictionaries({}, optional=dict(
        lr=st.floats(1e-4, 0.1), weight_decay=st.sampled_from([0.0, 1e-3]), rho=st.floats(0.0, 0.3),
        adaptive=st.booleans(), eta=st.sampled_from([0.0, 0.01]), normalize=st.booleans()))
    groups = tuple(draw(st.lists(overrides, min_size=n_groups, max_size=n_groups)))
    backend = draw(st.sampled_from([b for b in ("reference", "native", "torch")
                                    if b in fused_sam.available_backends(CPU, torch.float64)]))
    return TrainingCase(widths, only_at_w, only_at_perturbed, frozen, group_of, groups, base, base_kwargs, sam_kwargs,
                        backend, draw(st.integers(1, 5)), draw(st.integers(0, 2**16)))


BASE_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def param_groups(model: RandomNet, case: TrainingCase) -> list:
    params = list(model.parameters())
    for p, frozen in zip(params, case.frozen):
        p.requires_grad_(not frozen)
    groups = [dict(overrides, params=[p for p, gi in zip(params, case.group_of) if gi == k])
              for k, overrides in enumerate(case.groups)]
    return [g for g in groups if g["params"]]


@contextlib.contextmanager
def one_thread():
    """One intra-op thread (as test_long_runs.py: a tiny model's step is slower and noisier with two on a
    shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(model: RandomNet, opt, case: TrainingCase) -> None:
    """SAM steps with model.zero_grad() (set_to_none) before each pass, so a branch not reached in a pass
    has .grad None there, in both optimizers (test_training_loops.py's branchy loop)."""
    gen = torch.Generator().manual_seed(case.seed)
    for _ in range(case.steps):
        x = torch.randn(8, case.widths[0], generator=gen, dtype=torch.float64)
        y = torch.randn(8, case.widths[-1], generator=gen, dtype=torch.float64)
        for at_perturbed, half in ((False, opt.first_step), (True, opt.second_step)):
            model.zero_grad()
            model.at_perturbed = at_perturbed
            loss = (model(x) - y).square().mean()
            if loss.requires_grad:  # every parameter frozen: no backward, no gradients
                loss.backward()
            half()


@given(case=training_cases())
def test_optimizer_matches_classic_sam(case):
    """FusedSAM (reference, native and torch backends, float64) ends a few SAM steps at the classic
    per-tensor SAM's weights (rtol 1e-10), over random widths, param groups with their own lr, weight decay
    and SAM settings, frozen parameters, branches with a gradient in one pass only, SGD and Adam(W) bases."""
    classic_model = RandomNet(case.widths, case.only_at_w, case.only_at_perturbed, case.seed)
    fused_model = copy.deepcopy(classic_model)
    cls = BASE_CLASSES[case.base]
    classic = ClassicSAM(param_groups(classic_model, case), cls, **case.sam_kwargs, **case.base_kwargs)
    fused = FusedSAM(param_groups(fused_model, case), cls, backend=case.backend, **case.sam_kwargs, **case.base_kwargs)
    with one_thread():
        train(classic_model, classic, case)
        train(fused_model, fused, case)
    assert_twins_close(classic_model, fused_model, torch.float64)
