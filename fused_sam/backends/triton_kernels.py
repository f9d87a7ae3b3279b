"""Triton kernels of the triton backend: one pass over a 1-D span each (see ``triton.py`` for the launches).

Every kernel reads its operands in their storage dtype, does its math in float32 (the squared-norm
partials and their re-reduction in the partials buffer's dtype) and writes back in the storage dtype.
Offsets are int64 (``program id * BLOCK`` is widened before the multiply), so spans of more than 2^31
elements work. Per-step scalars (lr, bias corrections, rho) are float32 kernel arguments, so a new value
never recompiles; structure (which options are on) is ``tl.constexpr``.

The docstring of each kernel counts the bytes it moves per element for float32 weights, gradients and
state (halve the weight/gradient terms for bfloat16 or float16 weights).

``RTNE_BF16`` is set only under Triton's CPU interpreter and for bfloat16 weights: the interpreter
truncates float32 -> bfloat16 instead of rounding to nearest even as the GPU (and torch) do, so there
the rounding is done with integer ops and CPU tests compare against torch without a spurious ulp. On a
GPU it is False and the hardware conversion is used.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _store(ptr, offs, x, mask, RTNE_BF16: tl.constexpr):
    """Store float32 ``x`` into ``ptr``'s dtype, rounding to nearest even (RTNE_BF16: ptr is bfloat16)."""
    if RTNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        tl.store(ptr + offs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def sq_norm_partials_kernel(g_ptr, w_ptr, out_ptr, numel, eta, ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr):
    """out[pid] = sum over this program's blocks of g^2 (ASAM: ((|w| + eta) * g)^2).

    Grid-stride: program ``pid`` of P sums blocks pid, pid + P, ... in a per-lane float32 accumulator and
    reduces it once at the end, so the result is deterministic (fixed order, no atomics) and P, the number
    of partials, is capped independently of the span size. Bytes per element: 4 (read g); ASAM 8 (g, w).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for blk in range(pid, tl.cdiv(numel, BLOCK), nprog):
        offs = tl.cast(blk, tl.int64) * BLOCK + lanes
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ADAPTIVE:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = (tl.abs(w) + eta) * g
        acc += g * g
    tl.store(out_ptr + pid, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


@triton.jit
def perturb_kernel(
    w_ptr, g_ptr, backup_ptr, partials_ptr, count_ptr,
    numel, n_partials, rho, eta, eps,
    HAS_PARTIALS: tl.constexpr, PARTIALS_F64: tl.constexpr, NORMALIZE: tl.constexpr, ADAPTIVE: tl.constexpr,
    HAS_COUNT: tl.constexpr, BLOCK: tl.constexpr, PBLOCK: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """backup <- w exactly; w <- w + e, e = scale * g (ASAM: * (|w| + eta)^2).

    With partials, every program re-reduces the whole partials buffer itself (it is small, and read from
    L2), in the same order, so all programs agree on s = sum; scale = rho / (sqrt(s) + eps) (or rho when
    not normalizing), and e = 0 when s is not finite; program 0 then adds one to ``count_ptr``. Without
    partials (USAM everywhere), scale = rho and nothing is checked. Grid-stride over blocks so the
    re-reduction is amortised over several blocks on large spans.
    Bytes per element: 16 (read w, g; write backup, w), plus 4 or 8 per partial per program.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    scale = tl.cast(rho, tl.float32)
    finite = True
    if HAS_PARTIALS:
        acc = tl.zeros([PBLOCK], dtype=partials_ptr.dtype.element_ty)
        for start in range(0, n_partials, PBLOCK):
            p_offs = start + tl.arange(0, PBLOCK)
            acc += tl.load(partials_ptr + p_offs, mask=p_offs < n_partials, other=0.0)
        total = tl.sum(acc, axis=0)
        finite = tl.abs(total) < float("inf")
        if NORMALIZE:
            if PARTIALS_F64:
                scale = (tl.cast(rho, tl.float64) / (tl.sqrt(total) + tl.cast(eps, tl.float64))).to(tl.float32)
            else:
                scale = tl.div_rn(scale, tl.sqrt_rn(total) + tl.cast(eps, tl.float32))
        if HAS_COUNT:
            tl.atomic_add(count_ptr, 1, mask=(pid == 0) & (~finite))
    lanes = tl.arange(0, BLOCK)
    for blk in range(pid, tl.cdiv(numel, BLOCK), nprog):
        offs = tl.cast(blk, tl.int64) * BLOCK + lanes
        mask = offs < numel
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(backup_ptr + offs, w, mask=mask)
        wf = w.to(tl.float32)
        e = g * scale
        if ADAPTIVE:
            t = tl.abs(wf) + eta
            e = e * (t * t)
        if HAS_PARTIALS:
            e = tl.where(finite, e, 0.0)
        _store(w_ptr, offs, wf + e, mask, RTNE_BF16)


@triton.jit
def copy_kernel(src_ptr, dst_ptr, numel, BLOCK: tl.constexpr):
    """dst <- src bit for bit (restore: w <- backup). Bytes per element: 8 (read backup, write w)."""
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


@triton.jit
def sgd_kernel(
    w_ptr, backup_ptr, g_ptr, buf_ptr, numel,
    neg_lr, weight_decay, momentum, one_minus_dampening,
    MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr,
    NESTEROV: tl.constexpr, BLOCK: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """w <- backup, then torch.optim.SGD's update of w and the momentum buffer, in one pass.

    d = +-g (+ wd * w); buf = d on the first step (FIRST), else momentum * buf + (1 - dampening) * d;
    d = d + momentum * buf (nesterov) or buf; w = w - lr * d.
    Bytes per element: 20 with momentum (read backup, g, buf; write w, buf), 16 on the first step
    (buf not read), 12 without momentum.
    """
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w = tl.load(backup_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        d = -d
    if HAS_WD:
        d = d + weight_decay * w
    if HAS_MOMENTUM:
        if FIRST:
            buf = d
        else:
            buf = tl.load(buf_ptr + offs, mask=mask, other=0.0)
            buf = buf * momentum + one_minus_dampening * d
        tl.store(buf_ptr + offs, buf.to(buf_ptr.dtype.element_ty), mask=mask)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    _store(w_ptr, offs, w + neg_lr * d, mask, RTNE_BF16)


@triton.jit
def adam_kernel(
    w_ptr, backup_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, numel,
    decay, weight_decay, lerp_weight, lerp_weight_complement, beta2, one_minus_beta2,
    bias_correction2_sqrt, eps, neg_step_size,
    MAXIMIZE: tl.constexpr, L2_WD: tl.constexpr, DECOUPLED_WD: tl.constexpr, AMSGRAD: tl.constexpr,
    LERP_SMALL: tl.constexpr, BLOCK: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """w <- backup, then torch.optim.Adam/AdamW's update of w, exp_avg, exp_avg_sq (, max_exp_avg_sq).

    As torch's single-tensor path: AdamW w *= 1 - lr*wd, Adam d += wd*w; m = lerp(m, d, 1 - beta1);
    v = beta2*v + (1 - beta2)*d*d; amsgrad vmax = max(vmax, v); w += -step_size * m / (sqrt(v or vmax) /
    sqrt(bc2) + eps), with the bias corrections computed on the host in double from the step count.
    Bytes per element: 28 (read backup, g, m, v; write w, m, v), 36 with amsgrad (vmax read and written).
    """
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w = tl.load(backup_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    if MAXIMIZE:
        d = -d
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
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    second = v
    if AMSGRAD:
        vmax = tl.load(vmax_ptr + offs, mask=mask, other=0.0)
        vmax = tl.maximum(vmax, v)
        tl.store(vmax_ptr + offs, vmax, mask=mask)
        second = vmax
    denom = tl.div_rn(tl.sqrt_rn(second), tl.cast(bias_correction2_sqrt, tl.float32)) + eps
    update = tl.div_rn(m, denom)
    _store(w_ptr, offs, w + neg_step_size * update, mask, RTNE_BF16)
