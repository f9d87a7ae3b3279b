"""The torch backend: the SAM step as stock torch ops, in place over cache-sized chunks.

The fallback ``auto`` picks on CPU when the compiled extension (fused_sam._C, the native backend) is
missing: a plain ``pip install .`` builds none, since pip's build isolation hides torch from setup.py. It
needs nothing but torch; off the CPU it runs on any device (the chained formulas below).

Why the reference backend is slow, and what this one does instead: the reference writes each formula over
the whole span, so every intermediate is a fresh span-sized tensor (on CPU: a fresh allocation, page
faults, and a full pass through memory per op). Here each operation walks the span in chunks of
``CPU_CHUNK`` elements; on one chunk the whole chain of ops runs in place or into preallocated scratch
(a few chunk-sized slots, cached per thread and dtype), so the intermediates stay in cache and memory sees
about one read of each input and one write of each output per operation, as a fused kernel's would.

Where the chained formulas run (below), the math is the reference's: the same torch ops (mul, addcmul,
lerp, sqrt, ...) in the same order over the same dtypes, and the scalar prologue (the step values on the
device, turned into 0-d tensors) is the reference's code. Off the CPU nothing reads a device value on the
host.

On a CPU, where reading a tensor costs no sync (``host_scalars``), the step's scalars are read on the host:
GradScaler's skip (found_inf) and skip_nonfinite's (a skipped update is a restore; a taken one runs without
a select, which cost ~60% more than the update itself), the perturbation's scale, the step count and lr.
There, for float32/float64 weights (no master weights, no ASAM), the perturbation is w += scale * g in one
op (``add_`` with alpha: one rounding where the reference rounds e first, an ulp of e at most), and the base
update without a GradScaler scale or LookSAM's reuse term is torch's own fused CPU kernel, what torch.optim
runs with ``fused=True`` (``torch._fused_sgd_``, ``_fused_adam_``, ``_fused_adamw_``), on the restored
chunk: 2 ops per chunk where the chained formulas take 5 (SGD) to 10 (AdamW), within a few ulps of the
reference (its own order of the same operations).

Where the chained formulas run (off the CPU, 16-bit weights, ASAM, GradScaler, reuse), and where the
reference selects with ``torch.where`` on a 0-d condition (torch runs that as an unvectorized loop, ~5x a
copy), this backend uses:
- GradScaler's skip (found_inf), and skip_nonfinite's, off the CPU: an exact bitwise select on the integer
  views (``_keep_or``), so a skipped update leaves w the restore point and the state bit for bit, NaNs
  included;
- the non-finite norm: e's bits and-ed with 0 (e = +0.0, as masked_fill_ writes);
- SGD's first step (momentum buffer <- d): the buffer's bits and-ed with a mask that is 0 at step 0 (so
  whatever it held, a NaN too, becomes +0.0), then buf * c1 + d * c2 with 0-d device coefficients, (0, 1)
  at step 0 and (momentum, 1 - dampening) later: buf <- d exactly (-0.0 becomes +0.0). Later steps are
  the reference's bits without dampening, within an ulp with it (addcmul_ for add_(alpha=)).

A fused base update with no chained formulas here (any but SGD and Adam/AdamW) runs the reference's own
formulas chunk by chunk: elementwise, so the reference's bits, with chunk-sized temporaries.

The squared norm writes one partial per chunk: the squares of the 2-norms of the chunk's rows of
``NORM_ROW`` elements, summed. torch splits a row-wise reduction between threads by whole rows and sums the
few row norms of a chunk in one thread, so the partials are the same whatever the thread count.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from ..updates import AdamUpdate, SGDUpdate
from .base import Backend, Perturbation, Span, StepScalars, check_reuse_inputs, grad_unscale, required
from .reference import ReferenceBackend, on_device, perturbation_sums, telemetry_sums

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Elements per chunk on CPU, for the elementwise operations (perturb, restore_and_update). A chain of ops on
# one chunk touches up to ~10 chunk-sized arrays (inputs, state, scratch). With one thread, 1 MiB of
# float32: the intermediates stay in L2/L3 and a torch call (~5 us) is small against an op on a chunk.
# With several threads each op on a chunk is also one fork/join of torch's thread pool, which waits for its
# slowest thread: when other processes share the cores, that is a scheduler time slice per op (classic SAM's
# per-tensor loop pays it too, per op and tensor). So 4 MiB chunks: a quarter of the fork/joins, still in a
# shared L3. Measured with bench/cpu_fallback.py (ResNet-50 shapes, 2 cores; --chunks to redo it): one
# thread: 2^18 = 2^19, 2^20 ~10% slower, 2^16 ~1.5x slower; two threads, idle: 2^19 = 2^20, 2^16 ~1.5x
# slower; two threads, other processes busy: time roughly proportional to the number of chunks.
CPU_CHUNK_ONE_THREAD = 1 << 18
CPU_CHUNK = 1 << 20
# The squared norm's chunk on CPU (one partial each): one streaming pass, so no cache to fit; fixed, so that
# the partials do not depend on the thread count.
NORM_CHUNK = 1 << 20
# On GPUs the chunk only bounds the scratch memory and the number of launches (no cache to fit).
GPU_CHUNK = 1 << 22
# Row length of the squared-norm's row sums (a divisor of both chunk sizes); rows per chunk stay below
# torch's parallel grain size (32768), so the sum of a chunk's rows is never split between threads.
NORM_ROW = 512


def _chunks(t: Optional[torch.Tensor], size: int):
    return None if t is None else t.split(size)


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}
_REFERENCE = ReferenceBackend()


def _mask(cond: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d integer tensor as wide as ``dtype``: all bits set where the 0-d bool ``cond`` holds, else 0."""
    return cond.to(_BITS[dtype]).neg_()


def _keep_or(out: torch.Tensor, other: torch.Tensor, keep: torch.Tensor) -> None:
    """out <- out where ``keep`` (a ``_mask``) is all ones, else ``other``, bit for bit (NaN and -0.0 too).

    torch.where with a 0-d condition works, but runs an unvectorized loop (~5x a copy); three in-place
    bitwise ops on the integer views are vectorized: ((out ^ other) & keep) ^ other."""
    o, x = out.view(keep.dtype), other.view(keep.dtype)
    o.bitwise_xor_(x).bitwise_and_(keep).bitwise_xor_(x)


class TorchBackend(Backend):
    name = "torch"
    supports_master_weights = True

    def __init__(self, chunk_numel: Optional[int] = None, host_scalars: Optional[bool] = None):
        # chunk_numel: elements per chunk, for every device (tests use a small one); None: per device type.
        # host_scalars: read the step's scalars on the host and take the host path (module docstring); None:
        # on CPU devices. False runs the device path on a CPU too (tests).
        if chunk_numel is not None and (chunk_numel <= 0 or chunk_numel % NORM_ROW):
            raise ValueError(f"chunk_numel must be a positive multiple of {NORM_ROW}, got {chunk_numel}")
        self.chunk_override = chunk_numel
        self.host_scalars = host_scalars
        self._scratch = threading.local()  # CPU scratch per thread: concurrent steps never share it

    @classmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if dtype not in _SUPPORTED_DTYPES:
            return f"the torch backend supports float32, float64, bfloat16 and float16 parameters, not {dtype}"
        return None

    # --- chunks and scratch ------------------------------------------------------------------------------

    def _on_host(self, span: Span) -> bool:
        """Whether this span's step reads its scalars on the host (a CPU span, unless host_scalars says)."""
        return span.device.type == "cpu" if self.host_scalars is None else self.host_scalars

    def _plain_weights(self, span: Span) -> bool:
        """Host path, weights in the math dtype and no master: the fused torch ops apply."""
        return self._on_host(span) and span.master is None and span.weights.dtype == span.state_dtype

    def chunk_numel(self, device: torch.device) -> int:
        """Elements per chunk of the elementwise operations (perturb, restore_and_update) on ``device``."""
        if self.chunk_override is not None:
            return self.chunk_override
        if device.type != "cpu":
            return GPU_CHUNK
        return CPU_CHUNK_ONE_THREAD if torch.get_num_threads() == 1 else CPU_CHUNK

    def norm_chunk_numel(self, device: torch.device) -> int:
        """Elements per squared-norm partial on ``device`` (whatever the thread count)."""
        if self.chunk_override is not None:
            return self.chunk_override
        return NORM_CHUNK if device.type == "cpu" else GPU_CHUNK

    def _slots(self, span: Span, count: int, size: int):
        """``count`` scratch buffers of ``size`` elements (fewer for a span smaller than that), in the span's
        math dtype. On CPU, views of one buffer cached per thread and dtype, grown on demand (a fresh CPU
        allocation of this size would cost page faults at every call; at most 7 slots: 28 MiB of float32);
        elsewhere fresh from the device's caching allocator, which keeps them safe across streams and CUDA
        graph capture."""
        size = min(size, -(-span.numel // NORM_ROW) * NORM_ROW)  # room for whole norm rows
        if span.device.type != "cpu":
            buf = torch.empty(count * size, dtype=span.state_dtype, device=span.device)
        else:
            cache = self._scratch.__dict__.setdefault("buffers", {})  # this thread's
            buf = cache.get(span.state_dtype)
            if buf is None or buf.numel() < count * size:
                buf = cache[span.state_dtype] = torch.empty(count * size, dtype=span.state_dtype)
        return [buf[i * size:(i + 1) * size] for i in range(count)]

    # --- the squared norm --------------------------------------------------------------------------------

    def partials_len(self, span: Span) -> int:
        return max(1, -(-span.numel // self.norm_chunk_numel(span.device)))

    def sq_norm_partials(self, span: Span, perturbation: Perturbation, out: torch.Tensor) -> None:
        md = span.state_dtype
        size = self.norm_chunk_numel(span.device)
        # norms[k, r]: the 2-norm of row r of chunk k (rows of NORM_ROW elements; a chunk's last, shorter row
        # its own row); squared and summed per chunk at the end. Unused entries stay zero.
        norms = torch.zeros(self.partials_len(span), size // NORM_ROW, dtype=md, device=span.device)
        # (no op below mixes dtypes: on CPU torch would allocate a converted copy for each such op)
        low = span.grads.dtype != md
        x_s, g_s = self._slots(span, 2, size) if perturbation.adaptive or low else (None, None)
        w_src = span.master if span.master is not None else span.weights
        for k, (g, w) in enumerate(zip(span.grads.split(size), w_src.split(size))):
            n = g.numel()
            x = g if not low else g_s[:n].copy_(g)
            if perturbation.adaptive:  # T * g, T = |w| + eta
                t = x_s[:n]
                torch.abs(w, out=t) if w.dtype == md else t.copy_(w).abs_()
                t.add_(perturbation.eta)
                x = t.mul_(x)
            full = n // NORM_ROW
            if full:
                torch.linalg.vector_norm(x[:full * NORM_ROW].view(full, NORM_ROW), dim=1, out=norms[k, :full])
            if full * NORM_ROW < n:
                torch.linalg.vector_norm(x[full * NORM_ROW:], out=norms[k, full])
        out.copy_(norms.square_().sum(dim=1))

    # --- perturb and restore -----------------------------------------------------------------------------

    def perturb(
        self,
        span: Span,
        perturbation: Perturbation,
        partials: Optional[torch.Tensor],
        nonfinite_count: Optional[torch.Tensor],
        scalars: StepScalars,
        sums: Optional[torch.Tensor] = None,
    ) -> None:
        self._perturb(span, perturbation, partials, nonfinite_count, scalars)
        if sums is not None:
            self._by_norm_chunk(span, perturbation_sums, sums)

    def _perturb(self, span: Span, perturbation: Perturbation, partials: Optional[torch.Tensor],
                 nonfinite_count: Optional[torch.Tensor], scalars: StepScalars) -> None:
        md = span.state_dtype
        grad_scale = scalars.grad_scale
        # The scale of e, as the reference computes it (0-d device tensors).
        rho = on_device(required(scalars, "rho"), span.device)
        scale = rho.to(md)
        if not perturbation.normalize and grad_scale is not None:
            scale = grad_scale.to(md).reciprocal() * scale  # (1 / s) * rho in the math dtype
        finite_bits = None
        if partials is not None:
            total = partials.sum()
            finite = torch.isfinite(total)
            if perturbation.normalize:
                eps = perturbation.eps if grad_scale is None else grad_scale.to(total.dtype) * perturbation.eps
                scale = rho.to(total.dtype) / (total.sqrt() + eps)
            if nonfinite_count is not None:
                nonfinite_count.add_(~finite)
            finite_bits = _mask(finite, md)
        scale = scale.to(md)  # what g * scale in the math dtype rounds it to

        size = self.chunk_numel(span.device)
        if not perturbation.adaptive and self._plain_weights(span):
            self._perturb_on_host(span, scale, finite_bits, size)
            return
        low = span.master is None and span.weights.dtype != md  # 16-bit weights without a master
        e_s, t_s = (self._slots(span, 2, size) if perturbation.adaptive or low
                    else (self._slots(span, 1, size)[0], None))
        count = -(-span.numel // size)
        masters = _chunks(span.master, size) or [None] * count
        backups = _chunks(span.backup, size) or [None] * count
        for w, g, b, m in zip(span.weights.split(size), span.grads.split(size), backups, masters):
            n = w.numel()
            if m is None:
                b.copy_(w)
            e = e_s[:n]
            if g.dtype == md:
                torch.mul(g, scale, out=e)
            else:
                e.copy_(g).mul_(scale)
            if perturbation.adaptive:  # e *= (|w| + eta)^2
                t = t_s[:n]
                src = m if m is not None else w
                torch.abs(src, out=t) if src.dtype == md else t.copy_(src).abs_()
                t.add_(perturbation.eta)
                t.mul_(t)
                e.mul_(t)
            if finite_bits is not None:  # e <- 0 (+0.0) unless the total is finite, as masked_fill_ does
                e.view(finite_bits.dtype).bitwise_and_(finite_bits)
            # w + e in the math dtype (e + w: the same bits), rounded once to the weights' dtype
            if m is not None:
                w.copy_(e.add_(m))
            elif low:
                w.copy_(e.add_(t_s[:n].copy_(w)))
            else:
                w.add_(e)

    @staticmethod
    def _perturb_on_host(span: Span, scale: torch.Tensor, finite_bits: Optional[torch.Tensor], size: int) -> None:
        """backup <- w, w += scale * g, chunk by chunk (the scale read on the host). A non-finite norm adds
        +0.0, as the reference's zeroed e does (-0.0 becomes +0.0)."""
        finite = finite_bits is None or bool(finite_bits)
        alpha = scale.item()  # exact: the math dtype's value, converted back by add_
        for w, g, b in zip(span.weights.split(size), span.grads.split(size), span.backup.split(size)):
            b.copy_(w)
            if finite:
                w.add_(g, alpha=alpha)
            else:
                w.add_(0.0)

    def restore(self, span: Span) -> None:
        span.weights.copy_(span.master if span.master is not None else span.backup)

    # --- restore and update ------------------------------------------------------------------------------

    def restore_and_update(self, span: Span, update, scalars: StepScalars, sums: Optional[torch.Tensor] = None) -> None:
        if sums is not None:  # before the update overwrites w + e
            self._by_norm_chunk(span, lambda chunk, rows: telemetry_sums(chunk, scalars.grad_scale, rows), sums)
        if type(update) not in (SGDUpdate, AdamUpdate):
            self._update_by_reference(span, update, scalars)
            return
        check_reuse_inputs(span, scalars)
        md = span.state_dtype
        device = span.device
        lr = on_device(required(scalars, "lr"), device)
        reuse = None if span.reused is None else scalars.reuse_scale.reshape(()).to(md)
        unscale = None if scalars.grad_scale is None else grad_unscale(scalars.grad_scale).to(md)
        skip = None if scalars.found_inf is None else scalars.found_inf.reshape(()) != 0
        if skip is not None and self._on_host(span):
            if bool(skip):  # skipped: the weights become the restore point; nothing else is written
                self.restore(span)
                return
            skip = None
        if unscale is None and reuse is None and self._plain_weights(span):
            self._fused_update(span, update, scalars.step, lr.item())
            return
        if skip is not None:
            skip, run = _mask(skip, md), _mask(~skip, md)  # keep-masks: the old values, the new ones
        step = scalars.step.reshape(())
        master = span.master
        low = master is None and span.weights.dtype != md  # 16-bit weights, backup in 16 bits: w in scratch

        if isinstance(update, SGDUpdate):
            momentum = update.momentum != 0
            consts = {"neg_lr": (-lr).to(md)}
            if momentum:
                # buf * momentum + (1 - dampening) * d, except d at step 0: there the coefficients are 0 and 1
                first = step == 0
                consts["momentum"] = torch.where(first, 0.0, on_device(update.momentum, device)).to(md)
                consts["d_weight"] = torch.where(first, 1.0, on_device(1 - update.dampening, device)).to(md)
                consts["later"] = _mask(~first, md)
            names = ["d"] + (["buf"] if momentum and skip is not None else [])
        else:
            t = step.double() + 1
            consts = {
                "neg_step_size": (-lr / (1 - torch.pow(update.beta1, t))).to(md),
                "bc2_sqrt": (1 - torch.pow(update.beta2, t)).sqrt().to(md),
            }
            if update.weight_decay != 0 and update.decoupled:
                consts["decay"] = (1 - lr * update.weight_decay).to(md)
            names = ["d", "q"] + (["m", "v"] + (["vmax"] if update.amsgrad else []) if skip is not None else [])
        if low:
            names.append("w")
        if low or skip is not None:
            names.append("out")

        size = self.chunk_numel(device)
        slots = dict(zip(names, self._slots(span, len(names), size)))
        count = -(-span.numel // size)
        restore_points = _chunks(master, size) if master is not None else _chunks(span.backup, size)
        state = {name: buf.split(size) for name, buf in span.state.items()}
        reused = _chunks(span.reused, size) or [None] * count
        for k, (w_out, g, r, gv) in enumerate(zip(span.weights.split(size), span.grads.split(size),
                                                  restore_points, reused)):
            n = w_out.numel()
            s = {name: slot[:n] for name, slot in slots.items()}
            # w: the restore point in the math dtype
            w = s["w"].copy_(r) if low else r
            # d: the gradient (+ c * g_v), unscaled, negated for maximize; in scratch once written
            d = g
            if d.dtype != md:
                d = s["d"].copy_(d)
            if gv is not None:
                d = torch.addcmul(d, gv, reuse, out=s["d"])
            if unscale is not None:
                d = torch.mul(d, unscale, out=s["d"])
            if update.maximize:
                d = torch.neg(d, out=s["d"])
            # where the new w goes: straight into its home (the master, or float32/float64 weights) when no
            # skip may have to undo it, else into scratch
            if skip is not None or low:
                target = s["out"]
            else:
                target = r if master is not None else w_out
            chunk_state = {name: bufs[k] for name, bufs in state.items()}
            if isinstance(update, SGDUpdate):
                self._sgd(w, d, target, chunk_state, s, update, consts, skip)
            else:
                self._adam(w, d, target, chunk_state, s, update, consts, skip)
            if skip is not None:
                _keep_or(target, w, run)
            if master is not None:
                if target is not r:
                    r.copy_(target)
                w_out.copy_(r)  # the weights: the master's rounding
            elif target is not w_out:
                w_out.copy_(target)

    def _by_norm_chunk(self, span: Span, sums_of, sums: torch.Tensor) -> None:
        """The reference's telemetry sums (``sums_of(chunk, rows)``), one row per chunk of the squared norm
        (``partials_len`` rows): an extra pass over the chunk's buffers."""
        size = self.norm_chunk_numel(span.device)
        for k, start in enumerate(range(0, span.numel, size)):
            part = slice(start, start + size)
            chunk = Span(span.weights[part], span.grads[part], None if span.backup is None else span.backup[part],
                         master=None if span.master is None else span.master[part])
            sums_of(chunk, sums[k:k + 1])

    def _update_by_reference(self, span: Span, update, scalars: StepScalars) -> None:
        """A base update without chained formulas here: the reference's own, chunk by chunk (so its
        temporaries are chunk-sized; elementwise, so the reference's bits)."""
        size = self.chunk_numel(span.device)
        count = -(-span.numel // size)
        buffers = [_chunks(t, size) or [None] * count
                   for t in (span.weights, span.grads, span.backup, span.master, span.reused)]
        state = {name: buf.split(size) for name, buf in span.state.items()}
        for k, (w, g, b, m, gv) in enumerate(zip(*buffers)):
            chunk = Span(w, g, b, {name: bufs[k] for name, bufs in state.items()}, m, gv)
            _REFERENCE.restore_and_update(chunk, update, scalars)

    def _fused_update(self, span: Span, u, step: torch.Tensor, lr: float) -> None:
        """w <- backup, then torch's fused CPU update of w in place, chunk by chunk (the chunk restored is
        still in cache when the update reads it)."""
        size = self.chunk_numel(span.device)
        state = {name: buf.split(size) for name, buf in span.state.items()}
        in_place = span.backup.data_ptr() == span.weights.data_ptr()  # a plain step: the restore point is w
        if isinstance(u, SGDUpdate):
            settings = dict(weight_decay=u.weight_decay, momentum=u.momentum, lr=lr, dampening=u.dampening,
                            nesterov=u.nesterov, maximize=u.maximize, is_first_step=bool(step.reshape(()) == 0))
        else:
            fused = torch._fused_adamw_ if u.decoupled else torch._fused_adam_
            settings = dict(lr=lr, beta1=u.beta1, beta2=u.beta2, weight_decay=u.weight_decay, eps=u.eps,
                            amsgrad=u.amsgrad, maximize=u.maximize)
            t = [step.reshape(()).to(torch.float32) + 1]  # the fused kernels read the count after this update
        for k, (w, b, g) in enumerate(zip(span.weights.split(size), span.backup.split(size), span.grads.split(size))):
            if not in_place:
                w.copy_(b)
            if isinstance(u, SGDUpdate):
                bufs = [state["momentum_buffer"][k]] if u.momentum != 0 else []
                torch._fused_sgd_([w], [g], bufs, **settings)
            else:
                vmax = [state["max_exp_avg_sq"][k]] if u.amsgrad else []
                fused([w], [g], [state["exp_avg"][k]], [state["exp_avg_sq"][k]], vmax, t, **settings)

    @staticmethod
    def _sgd(w, d, target, state, s, u: SGDUpdate, consts, skip) -> None:
        if u.weight_decay != 0:
            d = torch.add(d, w, alpha=u.weight_decay, out=s["d"])
        if u.momentum != 0:
            buf = state["momentum_buffer"]
            new = buf if skip is None else s["buf"]
            later = consts["later"]
            torch.bitwise_and(buf.view(later.dtype), later, out=new.view(later.dtype))  # step 0: +0.0
            new.mul_(consts["momentum"]).addcmul_(d, consts["d_weight"])
            if skip is not None:
                _keep_or(buf, new, skip)
            d = torch.add(d, new, alpha=u.momentum, out=s["d"]) if u.nesterov else new
        torch.addcmul(w, d, consts["neg_lr"], out=target)

    @staticmethod
    def _adam(w, d, target, state, s, u: AdamUpdate, consts, skip) -> None:
        if u.weight_decay != 0:
            if u.decoupled:
                w = torch.mul(w, consts["decay"], out=target)
            else:
                d = torch.add(d, w, alpha=u.weight_decay, out=s["d"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if skip is None:
            m = exp_avg.lerp_(d, 1 - u.beta1)
            v = exp_avg_sq.mul_(u.beta2).addcmul_(d, d, value=1 - u.beta2)
        else:
            m = torch.lerp(exp_avg, d, 1 - u.beta1, out=s["m"])
            v = torch.mul(exp_avg_sq, u.beta2, out=s["v"]).addcmul_(d, d, value=1 - u.beta2)
        second = v
        if u.amsgrad:
            vmax = state["max_exp_avg_sq"]
            second = torch.maximum(vmax, v, out=vmax if skip is None else s["vmax"])
        q = torch.sqrt(second, out=s["q"]).div_(consts["bc2_sqrt"]).add_(u.eps)  # denom
        torch.div(m, q, out=q).mul_(consts["neg_step_size"])
        torch.add(w, q, out=target)
        if skip is not None:
            _keep_or(exp_avg, m, skip)
            _keep_or(exp_avg_sq, v, skip)
            if u.amsgrad:
                _keep_or(state["max_exp_avg_sq"], second, skip)
