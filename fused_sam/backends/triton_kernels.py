"""Triton kernels of the triton backend: one pass over a 1-D span each (see ``triton.py`` for the launches).

Every kernel reads its operands in their storage dtype, does its math in float32 (the squared-norm
partials and their re-reduction in the partials buffer's dtype) and writes back in the storage dtype.
Offsets are int64 (``program id * BLOCK`` is widened before the multiply), and so is the grid-stride loops'
bound (``_block_count``), so every span length works (an int32 bound wrapped just under 2^31). The
launcher compiles without multiply-add contraction (``LAUNCH_OPTIONS`` in ``triton.py``): every operation
rounds as written, on a GPU as under the interpreter; only an explicit ``tl.fma`` fuses.

Hyperparameters are kernel arguments and the per-step values that live on the device (step count,
GradScaler's scale and found_inf, LookSAM's reuse scale) are loaded from their tensors, so a new value
never recompiles and nothing syncs with the host; structure (which options are on) is ``tl.constexpr``.

lr and rho arrive one way in every kernel (``_float64_hyperparameter``): as the bit pattern of a float64
(``lr_bits`` / ``rho_bits``), or with ``LR_ON_DEVICE`` / ``RHO_ON_DEVICE`` (``capturable=True``) loaded
from a float64 tensor (``lr_ptr`` / ``rho_ptr``), so that a replayed CUDA graph sees a scheduler's in-place
update. Everything derived from them (SGD's -lr, Adam's step size, AdamW's 1 - lr * wd) is computed here in
float64 and rounded to float32 where the math needs it, the same operations either way: the same bits.
Without the flag the pointer is a stand-in that is never read.

Triton passes Python floats as float32. Values needed in float64 (lr, rho, Adam's betas and decoupled
weight decay, eps for float64 partials) are passed as their IEEE bit patterns in int64 (``*_bits``, see
``float64_bits`` in ``triton.py``) and bit-cast back here; those arguments are ``do_not_specialize`` so that
a value whose bit pattern is divisible by 16 does not compile a second variant.

The docstring of each kernel counts the bytes it moves per element for float32 weights, gradients and
state (halve the weight/gradient terms for bfloat16 or float16 weights).

``REUSE`` (LookSAM's reuse steps, see ``Span.reused``): the updates add ``reuse_scale * g_v`` to the gradient,
g_v read from ``reused_ptr`` (float32) and the scale loaded from a float64 tensor; without it both pointers
are stand-ins that are never read and the kernels compile as before.

``MASTER`` selects the master-weights variant (bfloat16/float16 weights with a float32 master copy, see
``Span``): the kernels then read w from the master, write the updated master, and write the 16-bit weights
as its rounding; nothing is backed up. It is a ``tl.constexpr``, so the variants without a master compile
exactly as before. ``restore_ptr`` is the restore point: the backup (weights' dtype), or the master.

``TELEMETRY`` (telemetry ``sums``; without it ``sums_ptr`` is a stand-in that is never read and the kernels
compile as before), the launcher running one program per row of sums:
- perturb (``Backend.perturb``) also accumulates e.g1 per lane in float32 from what it holds in registers (e
  the rounding of w + e it writes, back in float32, minus the restore point; g1 as given, scaled) and each
  program writes its sum, in the buffer's dtype, to element ``program_id`` of ``sums_ptr``: no extra bytes.
- the updates (``Backend.restore_and_update``) also read the weights as they are on entry (w + e) before
  writing them, and accumulate e.e, e.g2 and g2.g2 per lane in float32 (the math dtype; e = w - the restore
  point, g2 the unscaled gradient); each program writes its sums, in the buffer's dtype, to row
  ``program_id`` of ``sums_ptr``. It costs 4 bytes per element (2 for 16-bit weights), and a skipped update
  reads the gradient too, as the sums take it whatever found_inf says.

``RTNE_BF16`` is set only under Triton's CPU interpreter and for bfloat16 weights: the interpreter
truncates float32 -> bfloat16 instead of rounding to nearest even as the GPU (and torch) do, so there
the rounding is done with integer ops and CPU tests compare against torch without a spurious ulp. On a
GPU it is False and the hardware conversion is used.
"""
from __future__ import annotations

import struct

import triton
import triton.language as tl


def _f32(x: float) -> float:
    """``x`` rounded to float32, as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def float64_bits(x: float) -> int:
    """The IEEE bit pattern of float64 ``x`` as a signed integer: how a float64 scalar reaches a kernel."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def _rounded_for(ptr, x, RTNE_BF16: tl.constexpr):
    """float32 ``x`` converted to ``ptr``'s dtype, rounding to nearest even (RTNE_BF16: ptr is bfloat16)."""
    if RTNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _float64_from_bits(bits):
    """The float64 whose bit pattern is ``bits`` (an int32 when the value is 0.0, else an int64)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _pow_float64(base, exponent):
    """base ** exponent for a float64 base and an int64 exponent >= 0, by binary exponentiation.

    Only float64 multiplies (Triton lowers float64 exp2/pow differently per backend and version, float64
    multiplication everywhere); at most 2 * bit_length(exponent) roundings, so a relative error of a few
    1e-15 for exponents up to 2^24, where float32 step counts stop being exact.
    """
    result = tl.full([], 1.0, tl.float64)
    while exponent > 0:
        result = tl.where((exponent & 1) != 0, result * base, result)
        base = base * base
        exponent = exponent >> 1
    return result


@triton.jit
def _float64_hyperparameter(ptr, bits, ON_DEVICE: tl.constexpr):
    """A float64 hyperparameter: loaded from ``ptr`` (ON_DEVICE, a float64 tensor), else decoded from ``bits``."""
    if ON_DEVICE:
        return tl.load(ptr)
    return _float64_from_bits(bits)


@triton.jit
def _update_controls(grad_scale_ptr, found_inf_ptr, reuse_scale_ptr, HAS_GRAD_SCALE: tl.constexpr,
                     HAS_FOUND_INF: tl.constexpr, REUSE: tl.constexpr):
    """(apply, inv_scale, reuse_scale) of a base update: whether it runs (found_inf == 0: any non-zero
    value, NaN included since it compares unequal, skips it), the float32 factor that unscales the
    gradient, float32(1 / float64(grad_scale)) as GradScaler's ``unscale_`` computes it, and the float64
    reuse scale rounded once to float32. All are tensors in every variant (true, 1.0 and 0.0 without
    found_inf, a scale or REUSE) so the helper returns one type everywhere."""
    apply = tl.full([], True, tl.int1)
    inv_scale = tl.full([], 1.0, tl.float32)
    reuse_scale = tl.full([], 0.0, tl.float32)
    if HAS_FOUND_INF:
        apply = tl.load(found_inf_ptr) == 0
    if HAS_GRAD_SCALE:
        inv_scale = (1.0 / tl.load(grad_scale_ptr).to(tl.float64)).to(tl.float32)
    if REUSE:
        reuse_scale = tl.load(reuse_scale_ptr).to(tl.float32)
    return apply, inv_scale, reuse_scale


@triton.jit
def _load_gradient(g_ptr, offs, mask, live, TELEMETRY: tl.constexpr):
    """The gradient in float32. Lanes outside ``live`` (a skipped update) are 0 and not read, except under
    TELEMETRY, whose sums take the gradient whatever found_inf says (as the reference's do)."""
    if TELEMETRY:
        return tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.load(g_ptr + offs, mask=live, other=0.0).to(tl.float32)


@triton.jit
def _descent_direction(g, reused_ptr, offs, live, inv_scale, reuse_scale, MAXIMIZE: tl.constexpr,
                       HAS_GRAD_SCALE: tl.constexpr, REUSE: tl.constexpr):
    """The unscaled gradient (REUSE: of g + reuse_scale * g_v, both carrying the grad scale), negated when
    maximizing, in float32, from ``g`` (float32, as ``_load_gradient`` gives it); g_v is read in ``live``."""
    d = g
    if REUSE:
        d = d + reuse_scale * tl.load(reused_ptr + offs, mask=live, other=0.0)
    if HAS_GRAD_SCALE:
        d = d * inv_scale
    if MAXIMIZE:
        d = -d
    return d


@triton.jit
def _store_updated(w_ptr, restore_ptr, offs, mask, live, apply, restore_point, updated,
                   MASTER: tl.constexpr, RTNE_BF16: tl.constexpr):
    """The last writes of a base update: w <- ``updated`` (float32) in w's dtype, or where skipped (not
    ``apply``) w <- the restore point: the backup bit for bit, or the master's rounding. MASTER: the master
    <- ``updated`` where the update runs (``live``), so a skipped update leaves it untouched."""
    if MASTER:
        tl.store(restore_ptr + offs, updated, mask=live)
        tl.store(w_ptr + offs, _rounded_for(w_ptr, tl.where(apply, updated, restore_point), RTNE_BF16), mask=mask)
    else:
        w = _rounded_for(w_ptr, updated, RTNE_BF16)
        tl.store(w_ptr + offs, tl.where(apply, w, restore_point), mask=mask)


@triton.jit
def _telemetry_zeros(BLOCK: tl.constexpr):
    """The three per-lane float32 accumulators of the telemetry sums (e.e, e.g2, g2.g2), zero."""
    return tl.zeros([BLOCK], dtype=tl.float32), tl.zeros([BLOCK], dtype=tl.float32), tl.zeros([BLOCK], dtype=tl.float32)


@triton.jit
def _telemetry_add(ee, eg, gg, w_ptr, offs, mask, restore_point, g, inv_scale, HAS_GRAD_SCALE: tl.constexpr):
    """The telemetry accumulators plus one block's terms: e = w as on entry (the perturbed weights, read
    before the update writes them) - the restore point, g2 = g unscaled (not negated for maximize, without
    a reused direction); float32, as the math. Lanes outside ``mask`` add 0 (both loads give 0 there)."""
    e = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) - restore_point.to(tl.float32)
    if HAS_GRAD_SCALE:
        g = g * inv_scale
    return ee + e * e, eg + e * g, gg + g * g


@triton.jit
def _store_sum(ptr, acc):
    """``*ptr`` <- the sum of the per-lane accumulator ``acc``, in the buffer's dtype."""
    tl.store(ptr, tl.sum(acc, axis=0).to(ptr.dtype.element_ty))


@triton.jit
def _store_telemetry_row(sums_ptr, row, ee, eg, gg):
    """Row ``row`` of the (rows, 3) sums <- the accumulators' sums, in the buffer's dtype."""
    base = sums_ptr + tl.cast(row, tl.int64) * 3
    _store_sum(base, ee)
    _store_sum(base + 1, eg)
    _store_sum(base + 2, gg)


@triton.jit
def _block_count(numel, BLOCK: tl.constexpr):
    """ceil(numel / BLOCK) in int64, the bound of the grid-stride loops. Triton passes a length below 2^31
    as int32, where ``tl.cdiv(numel, BLOCK)`` computes numel + BLOCK - 1 in int32: that wraps negative for
    the last BLOCK - 1 lengths below 2^31 and the loop would run zero times, without an error."""
    return tl.cdiv(tl.cast(numel, tl.int64), BLOCK)


@triton.jit
def sq_norm_partials_kernel(g_ptr, w_ptr, out_ptr, numel, eta, ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr):
    """out[pid] = sum over this program's blocks of g^2 (ASAM: ((|w| + eta) * g)^2).

    Grid-stride: program ``pid`` of P sums blocks pid, pid + P, ... in a per-lane float32 accumulator and
    reduces it once at the end, so the result is deterministic (fixed order, no atomics) and P, the number
    of partials, is capped independently of the span size. Bytes per element: 4 (read g); ASAM 8 (g, w).
    ``w_ptr`` is the weights, or the float32 master where there is one (the launcher picks).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for blk in range(pid, _block_count(numel, BLOCK), nprog):
        offs = tl.cast(blk, tl.int64) * BLOCK + lanes
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ADAPTIVE:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = (tl.abs(w) + eta) * g
        acc += g * g
    tl.store(out_ptr + pid, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["rho_bits", "eps_bits"])
def perturb_kernel(
    w_ptr, g_ptr, restore_ptr, partials_ptr, count_ptr, grad_scale_ptr, rho_ptr, sums_ptr,
    numel, n_partials, rho_bits, eta, eps_bits,
    HAS_PARTIALS: tl.constexpr, NORMALIZE: tl.constexpr, ADAPTIVE: tl.constexpr, HAS_COUNT: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, RHO_ON_DEVICE: tl.constexpr, MASTER: tl.constexpr, TELEMETRY: tl.constexpr,
    BLOCK: tl.constexpr, PBLOCK: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """backup <- w exactly; w <- w + e, e = scale * g (ASAM: * (|w| + eta)^2). MASTER: w is read from the
    master (left unchanged) and the weights receive the rounding of w + e; no backup.

    With partials, every program re-reduces the whole partials buffer itself (it is small, and read from
    L2), in the same order, so all programs agree on the sum S; normalizing, scale = (1 / (sqrt(S) + eps *
    s)) * rho in the partials' dtype (s the GradScaler scale, 1 without one; the reference's rounding), and
    e = 0 when S is not finite; program 0 then adds one to ``count_ptr``. Not normalizing, scale = (1 / s) *
    rho in float32 (just rho without partials, where nothing is checked). rho is float64: decoded from
    ``rho_bits``, or (RHO_ON_DEVICE) loaded from ``rho_ptr``. Grid-stride over blocks so the
    re-reduction is amortised over several blocks on large spans.
    Bytes per element: 16 (read w, g; write backup, w), plus 4 or 8 per partial per program; MASTER
    with 16-bit weights 8 (read master, g; write w).
    TELEMETRY: see the module's docstring (no extra bytes per element).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    rho = _float64_hyperparameter(rho_ptr, rho_bits, RHO_ON_DEVICE)
    scale = rho.to(tl.float32)
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr)
        if not NORMALIZE:
            scale = tl.div_rn(1.0, grad_scale) * scale
    finite = True
    if HAS_PARTIALS:
        partial_dtype = partials_ptr.dtype.element_ty
        acc = tl.zeros([PBLOCK], dtype=partial_dtype)
        for start in range(0, n_partials, PBLOCK):
            p_offs = start + tl.arange(0, PBLOCK)
            acc += tl.load(partials_ptr + p_offs, mask=p_offs < n_partials, other=0.0)
        total = tl.sum(acc, axis=0)
        finite = tl.abs(total) < float("inf")
        if NORMALIZE:
            eps = _float64_from_bits(eps_bits).to(partial_dtype)
            if HAS_GRAD_SCALE:
                eps = grad_scale.to(partial_dtype) * eps
            if partial_dtype == tl.float64:  # float64 sqrt and division round correctly (IEEE)
                inv_norm = 1.0 / (tl.sqrt(total) + eps)
            else:  # float32 ``sqrt`` and ``/`` are approximate on GPUs: ask for correct rounding
                inv_norm = tl.div_rn(1.0, tl.sqrt_rn(total) + eps)
            scale = (inv_norm * rho.to(partial_dtype)).to(tl.float32)
        if HAS_COUNT:
            tl.atomic_add(count_ptr, 1, mask=(pid == 0) & (~finite))
    if TELEMETRY:
        eg = tl.zeros([BLOCK], dtype=tl.float32)
    lanes = tl.arange(0, BLOCK)
    for blk in range(pid, _block_count(numel, BLOCK), nprog):
        offs = tl.cast(blk, tl.int64) * BLOCK + lanes
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MASTER:
            wf = tl.load(restore_ptr + offs, mask=mask, other=0.0)
        else:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
            tl.store(restore_ptr + offs, w, mask=mask)
            wf = w.to(tl.float32)
        e = g * scale
        if ADAPTIVE:
            t = tl.abs(wf) + eta
            e = e * (t * t)
        if HAS_PARTIALS:
            e = tl.where(finite, e, 0.0)
        w_out = w_ptr + offs  # the address before the value, as without telemetry: the same compiled code
        perturbed = _rounded_for(w_ptr, wf + e, RTNE_BF16)
        tl.store(w_out, perturbed, mask=mask)
        if TELEMETRY:  # masked lanes: w, g and so e * g are 0
            eg += (perturbed.to(tl.float32) - wf) * g
    if TELEMETRY:
        _store_sum(sums_ptr + pid, eg)


@triton.jit
def copy_kernel(src_ptr, dst_ptr, numel, BLOCK: tl.constexpr, RTNE_BF16: tl.constexpr):
    """dst <- src in dst's dtype: bit for bit when the dtypes match (restore: w <- backup), else rounded to
    nearest even (w <- the rounding of the float32 master). Bytes per element: 8 (read backup, write w);
    6 from a master to 16-bit weights."""
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    tl.store(dst_ptr + offs, _rounded_for(dst_ptr, tl.load(src_ptr + offs, mask=mask), RTNE_BF16), mask=mask)


@triton.jit(do_not_specialize=["lr_bits"])
def sgd_kernel(
    w_ptr, restore_ptr, g_ptr, reused_ptr, buf_ptr, step_ptr, grad_scale_ptr, found_inf_ptr, lr_ptr,
    reuse_scale_ptr, sums_ptr, numel, lr_bits, weight_decay, momentum, one_minus_dampening,
    MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, LR_ON_DEVICE: tl.constexpr, REUSE: tl.constexpr,
    MASTER: tl.constexpr, TELEMETRY: tl.constexpr, BLOCK: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """w <- backup, then torch.optim.SGD's update of w and the momentum buffer, in one pass (MASTER: w is
    the master, and the update writes the master and its rounding to the weights; a skipped one only the
    master's rounding to the weights).

    d = +-g / grad_scale (+ wd * w), REUSE: g + reuse_scale * g_v in place of g; buf = d on the first step
    (step == 0), else momentum * buf + (1 - dampening) * d; d = d + momentum * buf (nesterov) or buf;
    w = w - lr * d. When found_inf is non-zero, w <- backup bit for bit and nothing else is read or
    written. lr: float64, from ``lr_bits`` or (LR_ON_DEVICE) ``lr_ptr``; -lr rounded to float32 here.
    Grid-stride like perturb (the launcher caps the programs).
    Bytes per element: 20 with momentum (read backup, g, buf; write w, buf), 16 on the first step (buf
    not read), 12 without momentum; a skipped update 8 (read backup, write w). MASTER with 16-bit weights:
    20 with momentum (read master, g, buf; write master, w, buf); a skipped update 6 (read master, write w).
    REUSE: 4 more where the update runs (read g_v). TELEMETRY: see the module's docstring.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    apply, inv_scale, reuse_scale = _update_controls(grad_scale_ptr, found_inf_ptr, reuse_scale_ptr, HAS_GRAD_SCALE,
                                                     HAS_FOUND_INF, REUSE)
    neg_lr = (-_float64_hyperparameter(lr_ptr, lr_bits, LR_ON_DEVICE)).to(tl.float32)
    # Lengths rather than scalar flags and-ed into the masks (which the interpreter mishandles): a skipped
    # update reads no gradient or state, the first step no momentum buffer.
    first = tl.load(step_ptr) == 0
    live_numel = tl.where(apply, numel, 0)
    momentum_numel = tl.where(first, 0, live_numel)
    if TELEMETRY:
        ee, eg, gg = _telemetry_zeros(BLOCK)
    lanes = tl.arange(0, BLOCK)
    for blk in range(pid, _block_count(numel, BLOCK), nprog):
        offs = tl.cast(blk, tl.int64) * BLOCK + lanes
        mask = offs < numel
        live = offs < live_numel
        restore_point = tl.load(restore_ptr + offs, mask=mask, other=0.0)
        w = restore_point.to(tl.float32)
        g = _load_gradient(g_ptr, offs, mask, live, TELEMETRY)
        if TELEMETRY:
            ee, eg, gg = _telemetry_add(ee, eg, gg, w_ptr, offs, mask, restore_point, g, inv_scale, HAS_GRAD_SCALE)
        d = _descent_direction(g, reused_ptr, offs, live, inv_scale, reuse_scale, MAXIMIZE, HAS_GRAD_SCALE, REUSE)
        if HAS_WD:
            d = d + weight_decay * w
        if HAS_MOMENTUM:
            buf = tl.load(buf_ptr + offs, mask=offs < momentum_numel, other=0.0)
            buf = tl.where(first, d, buf * momentum + one_minus_dampening * d)
            tl.store(buf_ptr + offs, buf.to(buf_ptr.dtype.element_ty), mask=live)
            if NESTEROV:
                d = d + momentum * buf
            else:
                d = buf
        _store_updated(w_ptr, restore_ptr, offs, mask, live, apply, restore_point, w + neg_lr * d, MASTER, RTNE_BF16)
    if TELEMETRY:
        _store_telemetry_row(sums_ptr, pid, ee, eg, gg)


@triton.jit(do_not_specialize=["lr_bits", "beta1_bits", "beta2_bits", "weight_decay_bits"])
def adam_kernel(
    w_ptr, restore_ptr, g_ptr, reused_ptr, m_ptr, v_ptr, vmax_ptr, step_ptr, grad_scale_ptr, found_inf_ptr, lr_ptr,
    reuse_scale_ptr, sums_ptr, numel, lr_bits, beta1_bits, beta2_bits, weight_decay, weight_decay_bits, lerp_weight,
    lerp_weight_complement, eps,
    MAXIMIZE: tl.constexpr, L2_WD: tl.constexpr, DECOUPLED_WD: tl.constexpr, AMSGRAD: tl.constexpr,
    LERP_SMALL: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr, REUSE: tl.constexpr, MASTER: tl.constexpr, TELEMETRY: tl.constexpr,
    BLOCK: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """w <- backup, then torch.optim.Adam/AdamW's update of w, exp_avg, exp_avg_sq (, max_exp_avg_sq)
    (MASTER: w is the master, and the update writes the master and its rounding to the weights; a skipped
    one only the master's rounding to the weights).

    As torch's single-tensor path: d = +-g / grad_scale (REUSE: g + reuse_scale * g_v in place of g);
    AdamW w *= 1 - lr*wd, Adam d += wd*w; m = lerp(m, d, 1 - beta1); v = beta2*v + (1 - beta2)*d*d;
    amsgrad vmax = max(vmax, v); w += -step_size * m / (sqrt(v or vmax) / sqrt(bc2) + eps). The bias
    corrections come from the step count on the device, t = step + 1: step_size = lr / (1 - beta1^t),
    sqrt(bc2) = sqrt(1 - beta2^t), in float64 as torch.optim computes them in Python, each rounded once to
    float32. When found_inf is non-zero, w <- backup bit for bit and nothing else is read or written.
    lr is float64: decoded from ``lr_bits``, or (LR_ON_DEVICE) loaded from ``lr_ptr``; AdamW's decay
    (1 - lr * wd, float32) is computed here from it and ``weight_decay_bits`` (wd in float64).
    Grid-stride (the launcher caps the programs) so the float64 scalar work, a few dozen operations per
    program, is amortised over several blocks on large spans.
    Bytes per element: 28 (read backup, g, m, v; write w, m, v), 36 with amsgrad (vmax read and written);
    a skipped update 8. MASTER with 16-bit weights: 28 (read master, g, m, v; write master, w, m, v); a
    skipped update 6. REUSE: 4 more where the update runs (read g_v). TELEMETRY: see the module's docstring.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    apply, inv_scale, reuse_scale = _update_controls(grad_scale_ptr, found_inf_ptr, reuse_scale_ptr, HAS_GRAD_SCALE,
                                                     HAS_FOUND_INF, REUSE)
    beta2_f64 = _float64_from_bits(beta2_bits)
    t = tl.load(step_ptr).to(tl.int64) + 1
    lr = _float64_hyperparameter(lr_ptr, lr_bits, LR_ON_DEVICE)
    neg_step_size = (-lr / (1.0 - _pow_float64(_float64_from_bits(beta1_bits), t))).to(tl.float32)
    if DECOUPLED_WD:
        # Python's 1 - lr * wd: two float64 roundings. fma(lr, wd, +0.0) is lr * wd rounded once (the +0.0
        # addend only turns a -0.0 product into +0.0, which 1 - p does not see) and, unlike a multiply, is
        # never contracted with the subtraction into one fused rounding.
        decay = (1.0 - tl.fma(lr, _float64_from_bits(weight_decay_bits), 0.0)).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(1.0 - _pow_float64(beta2_f64, t)).to(tl.float32)
    beta2 = beta2_f64.to(tl.float32)
    one_minus_beta2 = (1.0 - beta2_f64).to(tl.float32)
    live_numel = tl.where(apply, numel, 0)  # a skipped update reads and writes no gradient or state
    if TELEMETRY:
        ee, eg, gg = _telemetry_zeros(BLOCK)
    lanes = tl.arange(0, BLOCK)
    for blk in range(pid, _block_count(numel, BLOCK), nprog):
        offs = tl.cast(blk, tl.int64) * BLOCK + lanes
        mask = offs < numel
        live = offs < live_numel
        restore_point = tl.load(restore_ptr + offs, mask=mask, other=0.0)
        w = restore_point.to(tl.float32)
        g = _load_gradient(g_ptr, offs, mask, live, TELEMETRY)
        if TELEMETRY:
            ee, eg, gg = _telemetry_add(ee, eg, gg, w_ptr, offs, mask, restore_point, g, inv_scale, HAS_GRAD_SCALE)
        d = _descent_direction(g, reused_ptr, offs, live, inv_scale, reuse_scale, MAXIMIZE, HAS_GRAD_SCALE, REUSE)
        m = tl.load(m_ptr + offs, mask=live, other=0.0)
        v = tl.load(v_ptr + offs, mask=live, other=0.0)
        if DECOUPLED_WD:
            w = w * decay
        if L2_WD:
            d = d + weight_decay * w
        # torch.lerp: start + weight * (end - start) for |weight| < 0.5, else end - (end - start) * (1 - weight)
        if LERP_SMALL:
            m = m + lerp_weight * (d - m)
        else:
            m = d - (d - m) * lerp_weight_complement
        v = v * beta2 + one_minus_beta2 * d * d
        tl.store(m_ptr + offs, m, mask=live)
        tl.store(v_ptr + offs, v, mask=live)
        second = v
        if AMSGRAD:
            vmax = tl.load(vmax_ptr + offs, mask=live, other=0.0)
            vmax = tl.maximum(vmax, v)
            tl.store(vmax_ptr + offs, vmax, mask=live)
            second = vmax
        denom = tl.div_rn(tl.sqrt_rn(second), bias_correction2_sqrt) + eps
        updated = w + neg_step_size * tl.div_rn(m, denom)
        _store_updated(w_ptr, restore_ptr, offs, mask, live, apply, restore_point, updated, MASTER, RTNE_BF16)
    if TELEMETRY:
        _store_telemetry_row(sums_ptr, pid, ee, eg, gg)


@triton.jit(do_not_specialize=["lr_bits", "lr_decay_bits"])
def adagrad_kernel(
    w_ptr, restore_ptr, g_ptr, reused_ptr, sum_ptr, step_ptr, grad_scale_ptr, found_inf_ptr, lr_ptr, reuse_scale_ptr,
    sums_ptr, numel, lr_bits, lr_decay_bits, weight_decay, eps,
    MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr, REUSE: tl.constexpr, MASTER: tl.constexpr, TELEMETRY: tl.constexpr,
    BLOCK: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """w <- backup, then torch.optim.Adagrad's update of w and its sum, in one pass (MASTER as in adam_kernel).

    d = +-g / grad_scale (REUSE: g + reuse_scale * g_v in place of g) + wd * w; sum += d * d;
    w += (-clr * d) / (sqrt(sum) + eps), clr = lr / (1 + step * lr_decay) in float64 from the step count on the
    device (the updates before this one), rounded once to float32. When found_inf is non-zero, w <- backup bit
    for bit and nothing else is read or written.
    Bytes per element: 20 (read backup, g, sum; write w, sum); a skipped update 8. REUSE: 4 more. TELEMETRY:
    see the module's docstring.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    apply, inv_scale, reuse_scale = _update_controls(grad_scale_ptr, found_inf_ptr, reuse_scale_ptr, HAS_GRAD_SCALE,
                                                     HAS_FOUND_INF, REUSE)
    lr = _float64_hyperparameter(lr_ptr, lr_bits, LR_ON_DEVICE)
    step = tl.load(step_ptr).to(tl.float64)
    neg_clr = (-(lr / (1.0 + step * _float64_from_bits(lr_decay_bits)))).to(tl.float32)
    live_numel = tl.where(apply, numel, 0)  # a skipped update reads and writes no gradient or state
    if TELEMETRY:
        ee, eg, gg = _telemetry_zeros(BLOCK)
    lanes = tl.arange(0, BLOCK)
    for blk in range(pid, _block_count(numel, BLOCK), nprog):
        offs = tl.cast(blk, tl.int64) * BLOCK + lanes
        mask = offs < numel
        live = offs < live_numel
        restore_point = tl.load(restore_ptr + offs, mask=mask, other=0.0)
        w = restore_point.to(tl.float32)
        g = _load_gradient(g_ptr, offs, mask, live, TELEMETRY)
        if TELEMETRY:
            ee, eg, gg = _telemetry_add(ee, eg, gg, w_ptr, offs, mask, restore_point, g, inv_scale, HAS_GRAD_SCALE)
        d = _descent_direction(g, reused_ptr, offs, live, inv_scale, reuse_scale, MAXIMIZE, HAS_GRAD_SCALE, REUSE)
        if HAS_WD:
            d = d + weight_decay * w
        total = tl.load(sum_ptr + offs, mask=live, other=0.0) + d * d
        tl.store(sum_ptr + offs, total, mask=live)
        updated = w + tl.div_rn(neg_clr * d, tl.sqrt_rn(total) + eps)
        _store_updated(w_ptr, restore_ptr, offs, mask, live, apply, restore_point, updated, MASTER, RTNE_BF16)
    if TELEMETRY:
        _store_telemetry_row(sums_ptr, pid, ee, eg, gg)


# --- the base updates' launch arguments -----------------------------------------------------------------------
# Each update kernel takes (w, restore point, g, g_v, its state pointers, step, grad_scale, found_inf, lr,
# reuse_scale, sums, numel, lr_bits, its settings..., its flags and the launch's variant flags as constexprs). Per fused
# base update (its ``name``), a function of (update, its needed state buffers, a stand-in for pointers never
# read) gives (kernel name, state pointers, settings, flags): the launcher (triton.py) adds the rest.

def _sgd_arguments(u, state, unused) -> tuple:
    has_momentum = u.momentum != 0
    return ("sgd_kernel", (state[0] if has_momentum else unused,),
            (float(u.weight_decay), float(u.momentum), 1.0 - float(u.dampening)),
            dict(MAXIMIZE=bool(u.maximize), HAS_WD=u.weight_decay != 0, HAS_MOMENTUM=has_momentum,
                 NESTEROV=bool(u.nesterov)))


def _adam_arguments(u, state, unused) -> tuple:
    lerp_weight = _f32(1 - u.beta1)  # torch.lerp takes its scalar weight in float32 and picks its formula on it
    return ("adam_kernel", (state[0], state[1], state[2] if u.amsgrad else state[1]),
            (float64_bits(u.beta1), float64_bits(u.beta2), float(u.weight_decay), float64_bits(u.weight_decay),
             lerp_weight, _f32(1.0 - lerp_weight), float(u.eps)),
            dict(MAXIMIZE=bool(u.maximize), L2_WD=u.weight_decay != 0 and not u.decoupled,
                 DECOUPLED_WD=u.weight_decay != 0 and bool(u.decoupled), AMSGRAD=bool(u.amsgrad),
                 LERP_SMALL=abs(lerp_weight) < 0.5))


def _adagrad_arguments(u, state, unused) -> tuple:
    return ("adagrad_kernel", (state[0],), (float64_bits(u.lr_decay), float(u.weight_decay), float(u.eps)),
            dict(MAXIMIZE=bool(u.maximize), HAS_WD=u.weight_decay != 0))


UPDATE_ARGUMENTS = {"sgd": _sgd_arguments, "adam": _adam_arguments, "adagrad": _adagrad_arguments}
