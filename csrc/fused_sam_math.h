// fused_sam_math.h: the per-element math of the SAM step, shared by the CPU and the CUDA kernels.
//
// Every function here is inline and usable from host and device code (HOST_DEVICE expands to
// __host__ __device__ under nvcc), so the CPU build that CI tests runs exactly the arithmetic the GPU
// runs. The formulas follow fused_sam/backends/reference.py (itself torch.optim's single-tensor code)
// operation by operation, including the order of roundings: T is the math type (float, or double for
// float64 parameters); every scalar coefficient is computed in double on the host, as Python does, and
// rounded once to T.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HOST_DEVICE __host__ __device__
#else
#define HOST_DEVICE
#endif

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace fused_sam {

// Squared-norm partials. CPU: one partial per CPU_NORM_CHUNK elements, each chunk summed serially by one
// thread (blocks of CPU_NORM_BLOCK elements in NORM_LANES interleaved lanes, folded in a fixed order and
// accumulated in double), so partials do not depend on the thread count. CUDA: one partial per block of a
// grid whose size depends on numel only.
constexpr int64_t CPU_NORM_CHUNK = 1 << 15;
constexpr int64_t CPU_NORM_BLOCK = 256;
constexpr int NORM_LANES = 16;
// CPU spans of at least this many elements write their output-only buffers with streaming stores.
constexpr int64_t CPU_STREAM_MIN_ELEMS = 1 << 22;
constexpr int64_t CUDA_NORM_BLOCK_ELEMS = 1 << 14;
constexpr int64_t CUDA_NORM_MAX_BLOCKS = 1024;

HOST_DEVICE inline int64_t cpu_partials_len(int64_t numel) {
  return numel <= 0 ? 1 : (numel + CPU_NORM_CHUNK - 1) / CPU_NORM_CHUNK;
}
HOST_DEVICE inline int64_t cuda_partials_len(int64_t numel) {
  int64_t blocks = (numel + CUDA_NORM_BLOCK_ELEMS - 1) / CUDA_NORM_BLOCK_ELEMS;
  return blocks < 1 ? 1 : (blocks > CUDA_NORM_MAX_BLOCKS ? CUDA_NORM_MAX_BLOCKS : blocks);
}

// --- scalar helpers (overloaded for float and double, host and device) ------------------------------
HOST_DEVICE inline float fs_abs(float x) { return fabsf(x); }
HOST_DEVICE inline double fs_abs(double x) { return fabs(x); }
HOST_DEVICE inline float fs_sqrt(float x) { return sqrtf(x); }
HOST_DEVICE inline double fs_sqrt(double x) { return sqrt(x); }
// Finite iff x - x == 0 (inf - inf and NaN - NaN are NaN); needs IEEE semantics (no -ffast-math).
template <typename T>
HOST_DEVICE inline bool fs_isfinite(T x) { return (x - x) == T(0); }
// torch.maximum: NaN if either operand is NaN.
template <typename T>
HOST_DEVICE inline T fs_maximum(T a, T b) {
  // a NaN: a < b is false, so r = a; b NaN: the second select. Two selects keep loops branch-free.
  const T r = a < b ? b : a;
  return (b != b) ? b : r;
}

// --- ASAM scaling ---------------------------------------------------------------------------------
// T = |w| + eta (ASAM), applied to the gradient for the norm and squared for the perturbation.
template <typename T>
HOST_DEVICE inline T asam_scale(T w, T eta) { return fs_abs(w) + eta; }

// One term of ||g||^2, or of ||T g||^2 for ASAM.
template <typename T>
HOST_DEVICE inline T sq_norm_term(T g, T w, bool adaptive, T eta) {
  T x = adaptive ? asam_scale(w, eta) * g : g;
  return x * x;
}

// --- perturbation -----------------------------------------------------------------------------------
// The scale of e = scale * T^2 * g from the summed partials (in the partials' dtype P, as the reference
// computes it: rho / (sqrt(total) + eps) is (sqrt(total) + eps).reciprocal() * rho in torch).
template <typename P>
struct ScaleResult {
  P scale;
  bool finite;
};

template <typename P>
HOST_DEVICE inline ScaleResult<P> perturb_scale(P total, double rho, double eps, bool normalize,
                                                bool check) {
  ScaleResult<P> r;
  r.finite = check ? fs_isfinite(total) : true;
  r.scale = normalize ? (P(1) / (fs_sqrt(total) + P(eps))) * P(rho) : P(rho);
  return r;
}

// w + e with e = g * scale (* (|w| + eta)^2 for ASAM); e = 0 when the norm was not finite.
template <typename T>
HOST_DEVICE inline T perturb_value(T w, T g, T scale, bool adaptive, T eta, bool finite) {
  T e = g * scale;
  if (adaptive) {
    T t = asam_scale(w, eta);
    e = e * (t * t);
  }
  return w + (finite ? e : T(0));
}

// --- SGD (torch.optim.SGD) --------------------------------------------------------------------------
template <typename T>
struct SGDParams {
  T neg_lr, momentum, one_minus_dampening, weight_decay;
  bool has_weight_decay, nesterov, maximize, first_step;
};

template <typename T>
inline SGDParams<T> make_sgd_params(double lr, double momentum, double dampening, double weight_decay,
                                    bool nesterov, bool maximize, bool first_step) {
  SGDParams<T> p;
  p.neg_lr = T(-lr);
  p.momentum = T(momentum);
  p.one_minus_dampening = T(1.0 - dampening);
  p.weight_decay = T(weight_decay);
  p.has_weight_decay = weight_decay != 0.0;
  p.nesterov = nesterov;
  p.maximize = maximize;
  p.first_step = first_step;
  return p;
}

// One SGD update of w (restored from the backup) with gradient g; ``buf`` is the momentum buffer, used
// only when MOMENTUM (momentum != 0). On the first step the buffer becomes the gradient.
template <bool MOMENTUM, typename T>
HOST_DEVICE inline T sgd_update(T w, T g, T* buf, const SGDParams<T>& p) {
  T d = p.maximize ? -g : g;
  d = p.has_weight_decay ? d + p.weight_decay * w : d;
  if (MOMENTUM) {
    T b = p.first_step ? d : (*buf) * p.momentum + p.one_minus_dampening * d;
    *buf = b;
    d = p.nesterov ? d + p.momentum * b : b;
  }
  return w + p.neg_lr * d;
}

// --- Adam / AdamW (torch.optim.Adam, AdamW) ---------------------------------------------------------
template <typename T>
struct AdamParams {
  T lerp_weight;       // 1 - beta1, for exp_avg.lerp_(d, 1 - beta1)
  T beta2, one_minus_beta2;
  T eps, weight_decay, decay;  // decay = 1 - lr * weight_decay (AdamW)
  T neg_step_size;             // -lr / (1 - beta1^step)
  T bias_correction2_sqrt;     // (1 - beta2^step) ** 0.5
  bool l2, decoupled, maximize;
};

template <typename T>
inline AdamParams<T> make_adam_params(double lr, double beta1, double beta2, double eps, double weight_decay,
                                      bool decoupled, bool maximize, double step_size,
                                      double bias_correction2_sqrt) {
  AdamParams<T> p;
  p.lerp_weight = T(1.0 - beta1);
  p.beta2 = T(beta2);
  p.one_minus_beta2 = T(1.0 - beta2);
  p.eps = T(eps);
  p.weight_decay = T(weight_decay);
  p.decay = T(1.0 - lr * weight_decay);
  p.neg_step_size = T(-step_size);
  p.bias_correction2_sqrt = T(bias_correction2_sqrt);
  p.l2 = weight_decay != 0.0 && !decoupled;
  p.decoupled = weight_decay != 0.0 && decoupled;
  p.maximize = maximize;
  return p;
}

// torch.lerp with a scalar weight (ATen/native/Lerp.h).
template <typename T>
HOST_DEVICE inline T lerp(T self, T end, T weight) {
  return fs_abs(weight) < T(0.5) ? self + weight * (end - self) : end - (end - self) * (T(1) - weight);
}

// One Adam/AdamW update of w with gradient g and moments m, v (and vmax for AMSGrad).
template <bool AMSGRAD, typename T>
HOST_DEVICE inline T adam_update(T w, T g, T* m, T* v, T* vmax, const AdamParams<T>& p) {
  T d = p.maximize ? -g : g;
  w = p.decoupled ? w * p.decay : w;
  d = p.l2 ? d + p.weight_decay * w : d;
  T m_new = lerp(*m, d, p.lerp_weight);
  T v_new = (*v) * p.beta2 + p.one_minus_beta2 * d * d;
  *m = m_new;
  *v = v_new;
  T second = v_new;
  if (AMSGRAD) {
    second = fs_maximum(*vmax, v_new);
    *vmax = second;
  }
  T denom = fs_sqrt(second) / p.bias_correction2_sqrt + p.eps;
  return w + p.neg_step_size * (m_new / denom);
}

}  // namespace fused_sam
