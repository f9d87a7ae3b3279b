// fused_sam_math.h: the per-element math of the SAM step, shared by the CPU and the CUDA kernels.
//
// Every function here is inline and usable from host and device code (HOST_DEVICE expands to
// __host__ __device__ under nvcc), so the CPU build that CI tests runs exactly the arithmetic the GPU
// runs. No build contracts a multiply-add into an FMA (C++: -ffp-contract=off; nvcc: --fmad=false, no fast
// math): perturb, restore and the updates give the same bits on the CPU and on CUDA from the same inputs
// and scale. Two values come from elsewhere: the squared norm's partials (summed in another order on each
// device), and pow in Adam's bias corrections (glibc's on the CPU, CUDA's math library's on the GPU: both
// within two ulps of the exact double, not always the same one). The formulas follow
// fused_sam/backends/reference.py (itself torch.optim's single-tensor code)
// operation by operation, including the order of roundings: T is the math type (float, or double for
// float64 parameters); every scalar coefficient is computed in double, as Python does, and rounded once to
// T. The per-step values that may live on the device (the step count, GradScaler's scale and found_inf)
// are float32 and read through pointers: on the host by the CPU kernels, inside the kernel on CUDA. So are
// lr and rho when they live on the device (capturable=True: float64, so the double the kernels read is the
// Python float they replace, and every value derived from it is bit for bit the float path's), and the
// scale c of LookSAM's reused direction (float64).
//
// w below is the restore point: the weights (the backup) in their dtype, or with master weights the
// float32 master of bfloat16/float16 weights (T is float then). The kernels choose where w comes from
// and where results go; the math is the same.
//
// The per-element functions take their values as V: T itself (CUDA, and the scalar code), or on the CPU
// at::vec::Vectorized<T>, a SIMD vector of T that the CPU kernels (cpu_kernels.cpp, built once per
// instruction set, CPU_CAPABILITY defined) compute a vector of elements with, lane by lane the same
// operations. Coefficients stay scalars of T. The few operations that are not +, -, * or / (abs, sqrt,
// torch.maximum) are fs_* functions overloaded for both, declared before the templates that call them.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HOST_DEVICE __host__ __device__
#else
#define HOST_DEVICE
#endif

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

#if defined(CPU_CAPABILITY)
#include <ATen/cpu/vec/vec.h>
#endif

// The per-element functions below run once per element in every kernel's hot loop: always inlined, since
// an out-of-line call there costs more than the arithmetic and stops vectorisation (GCC's inliner stops
// inlining some of them once a translation unit has many such loops).
#define ALWAYS_INLINE __attribute__((always_inline))

namespace fused_sam {

// Squared-norm partials. CPU: one partial per CPU_NORM_CHUNK elements, each chunk summed serially by one
// thread (blocks of CPU_NORM_BLOCK elements in NORM_LANES interleaved lanes, folded in a fixed order and
// accumulated in double), so partials do not depend on the thread count; nor on the instruction set: the
// 16 lanes are one AVX-512 vector of floats, two of AVX2 (or of the default build's Vectorized), four of
// doubles, all holding the same lanes. CUDA: one partial per block of a grid whose size depends on numel only.
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
HOST_DEVICE ALWAYS_INLINE inline float fs_abs(float x) { return fabsf(x); }
HOST_DEVICE ALWAYS_INLINE inline double fs_abs(double x) { return fabs(x); }
HOST_DEVICE ALWAYS_INLINE inline float fs_sqrt(float x) { return sqrtf(x); }
HOST_DEVICE ALWAYS_INLINE inline double fs_sqrt(double x) { return sqrt(x); }
// Finite iff x - x == 0 (inf - inf and NaN - NaN are NaN); needs IEEE semantics (no -ffast-math).
template <typename T>
HOST_DEVICE ALWAYS_INLINE inline bool fs_isfinite(T x) { return (x - x) == T(0); }
// torch.maximum: NaN if either operand is NaN.
template <typename T>
HOST_DEVICE ALWAYS_INLINE inline T fs_maximum(T a, T b) {
  // a NaN: a < b is false, so r = a; b NaN: the second select. Two selects keep loops branch-free.
  const T r = a < b ? b : a;
  return (b != b) ? b : r;
}

#if defined(CPU_CAPABILITY)
// The same on SIMD vectors (CPU kernels), lane by lane: the comparisons give lane masks, blendv selects.
template <typename T>
ALWAYS_INLINE inline at::vec::Vectorized<T> fs_abs(const at::vec::Vectorized<T>& x) { return x.abs(); }
template <typename T>
ALWAYS_INLINE inline at::vec::Vectorized<T> fs_sqrt(const at::vec::Vectorized<T>& x) { return x.sqrt(); }
template <typename T>
ALWAYS_INLINE inline at::vec::Vectorized<T> fs_maximum(const at::vec::Vectorized<T>& a,
                                                       const at::vec::Vectorized<T>& b) {
  using V = at::vec::Vectorized<T>;
  const V r = V::blendv(a, b, a < b);
  return V::blendv(r, b, b != b);
}
#endif

// A hyperparameter that may live on the device (lr, rho; capturable=True): the float64 the pointer points
// to when given, else the Python float. Resolved once per kernel (per thread or block on CUDA), before the
// element loop; everything downstream is the float path's code, so the results are bit for bit the same.
HOST_DEVICE ALWAYS_INLINE inline double hyperparameter(const double* on_device, double value) {
  return on_device != nullptr ? *on_device : value;
}

// --- ASAM scaling ---------------------------------------------------------------------------------
// T = |w| + eta (ASAM), applied to the gradient for the norm and squared for the perturbation.
template <typename V, typename T>
HOST_DEVICE ALWAYS_INLINE inline V asam_scale(V w, T eta) { return fs_abs(w) + eta; }

// One term of ||g||^2, or of ||T g||^2 for ASAM.
template <typename V, typename T>
HOST_DEVICE ALWAYS_INLINE inline V sq_norm_term(V g, V w, bool adaptive, T eta) {
  V x = adaptive ? asam_scale(w, eta) * g : g;
  return x * x;
}

// --- perturbation -----------------------------------------------------------------------------------
// The scale of e = scale * T^2 * g. Under a GradScaler (grad_scale not null) the gradients, and so the
// partials, carry its factor s; the perturbation is that of the unscaled gradient. ``rho`` below is the
// resolved value (``hyperparameter``: the float64 on the device, if any, else the Python float).

// The scale without a norm (no partials, or not normalizing): rho; un-normalized under a GradScaler,
// (1 / s) * rho in the math type. A normalizing perturbation given no partials keeps rho, as the reference
// does.
template <typename T>
HOST_DEVICE inline T scale_without_norm(double rho, bool normalize, const float* grad_scale) {
  return !normalize && grad_scale != nullptr ? (T(1) / T(*grad_scale)) * T(rho) : T(rho);
}

template <typename T>
struct ScaleResult {
  T scale;
  bool finite;  // the summed partials are finite (else e = 0)
};

// From the summed partials, in their dtype P as the reference computes it (rho / x is x.reciprocal() * rho
// in torch). Normalized, s cancels except against eps, which is scaled with it.
template <typename T, typename P>
HOST_DEVICE inline ScaleResult<T> perturb_scale(P total, double rho, double eps, bool normalize,
                                                const float* grad_scale) {
  ScaleResult<T> r;
  r.finite = fs_isfinite(total);
  if (normalize) {
    const P scaled_eps = grad_scale != nullptr ? P(eps) * P(*grad_scale) : P(eps);
    r.scale = T((P(1) / (fs_sqrt(total) + scaled_eps)) * P(rho));
  } else {
    r.scale = scale_without_norm<T>(rho, normalize, grad_scale);
  }
  return r;
}

// w + e with e = g * scale (* (|w| + eta)^2 for ASAM); e = 0 when the norm was not finite.
template <typename V, typename T>
HOST_DEVICE ALWAYS_INLINE inline V perturb_value(V w, V g, T scale, bool adaptive, T eta, bool finite) {
  V e = g * scale;
  if (adaptive) {
    V t = asam_scale(w, eta);
    e = e * (t * t);
  }
  return w + (finite ? e : V(T(0)));
}

// --- the base update's step values ------------------------------------------------------------------
// Pointers to the float32 step values of one update (grad_scale and found_inf null without a GradScaler),
// to the float64 learning rate when it lives on the device (null: the settings' lr), and to the float64
// scale of LookSAM's reused direction (null: not a reuse step).
struct StepValues {
  const float* step;          // the updates before this one
  const float* grad_scale;    // GradScaler's scale of the gradients
  const float* found_inf;     // GradScaler's inf/NaN flag
  const double* lr;           // capturable=True: replaces UpdateSettings::lr
  const double* reuse_scale;  // c: the update's gradient is g + c * g_v
};

// GradScaler's unscale_ factor: the reciprocal of the scale in double, rounded to float32. 1 without a
// scaler, which leaves the gradient bit for bit as it is.
HOST_DEVICE inline float grad_unscale(const StepValues& v) {
  return v.grad_scale != nullptr ? float(1.0 / double(*v.grad_scale)) : 1.0f;
}

// Skip the update: found_inf is a sum over devices, so any non-zero value (NaN too) means skip.
HOST_DEVICE inline bool update_skipped(const StepValues& v) {
  return v.found_inf != nullptr && *v.found_inf != 0.0f;
}

// LookSAM's c, rounded once to the math type; 0 when not a reuse step (the updates then never read it).
template <typename T>
HOST_DEVICE inline T reuse_scale(const StepValues& v) {
  return v.reuse_scale != nullptr ? T(*v.reuse_scale) : T(0);
}

// The gradient an update uses, before anything else happens to it: g, plus c * g_v in LookSAM's reuse
// steps (REUSE; the sum in the math type, as the reference's addcmul), then unscaled (GradScaler).
template <bool REUSE, typename V, typename T>
HOST_DEVICE ALWAYS_INLINE inline V update_gradient(V g, V g_v, T c, T unscale) {
  return (REUSE ? g + c * g_v : g) * unscale;
}

// --- telemetry (the sums of restore_update and perturb) ----------------------------------------------------
// One element's terms of the telemetry sums e^2, e * g2, g2^2, as fused_sam/backends/reference.py's
// telemetry_sums forms them: e = the weights as the model saw them (w + e, read before the update writes
// them) minus the restore point, g2 = the gradient times GradScaler's unscale factor (1 without a scaler:
// g bit for bit), not negated for maximize and without LookSAM's reused direction.
template <typename V>
struct TelemetryTerms {
  V ee, eg, gg;
};

template <typename V, typename T>
HOST_DEVICE ALWAYS_INLINE inline TelemetryTerms<V> telemetry_terms(V w_now, V point, V g, T unscale) {
  const V e = w_now - point;
  const V g2 = g * unscale;
  return {e * e, e * g2, g2 * g2};
}

// One element's term of perturb's telemetry sum e * g, as fused_sam/backends/reference.py's perturbation_sums
// forms it: e = the weight as perturb writes it (rounded to the weights' dtype, back in the math type) minus
// the restore point (the master, or the weight on entry), g the gradient as given (scaled under a GradScaler).
template <typename V>
HOST_DEVICE ALWAYS_INLINE inline V perturbation_term(V w_written, V point, V g) {
  return (w_written - point) * g;
}

// ===================================== the fused base updates =========================================
// One entry per fused base update, in the order of their codes (``code`` in fused_sam/updates.py): the
// restore_update operator's ``kind`` is the index here. A new base is one entry here plus its struct below.
#define FUSED_SAM_BASE_KINDS(X) X(SGD) X(Adam) X(Adagrad)

// The most state buffers a base keeps, and the most float settings.
constexpr int kMaxStateBuffers = 3;
constexpr int kMaxHyperparameters = 8;

// One update's settings as the Python update object holds them (fused_sam/updates.py): its float settings
// in declaration order (``hyperparameters()``), its bool settings as bits (``flags()``, the i-th in bit i),
// and lr (unused when StepValues::lr is given).
struct UpdateSettings {
  double lr;
  double hyper[kMaxHyperparameters];
  int64_t flags;

  HOST_DEVICE bool flag(int i) const { return (flags >> i) & 1; }
};

// Each base is a struct with:
//   kHyperparameters, kFlags: how many float and bool settings it takes;
//   valid_state_count(n): whether it runs with n state buffers (those ``needed_state()`` names, in order);
//   Params<T>: its coefficients in the math type T, built once per call by params<T>(settings, values)
//     (on CUDA by one thread per block), with every scalar computed in double and rounded once to T;
//   update<NSTATE, REUSE>(w, g, g_v, state, p): one element's update of w (the restore point) with gradient
//     g (plus c * g_v when REUSE) and its NSTATE state values ``state[0..NSTATE)``, read and written.

// --- SGD (torch.optim.SGD): state momentum_buffer (when momentum != 0) ---------------------------------
struct SGD {
  // hyper: momentum, dampening, weight_decay; flags: nesterov, maximize
  static constexpr int kHyperparameters = 3, kFlags = 2;
  HOST_DEVICE static constexpr bool valid_state_count(int n) { return n == 0 || n == 1; }

  template <typename T>
  struct Params {
    T neg_lr, momentum, one_minus_dampening, weight_decay;
    T reuse_scale;  // LookSAM's c (reuse steps only)
    T unscale;      // grad_unscale: the gradient is multiplied by it first
    bool has_weight_decay, nesterov, maximize, first_step;
  };

  // The momentum buffer starts as the gradient on step 0.
  template <typename T>
  HOST_DEVICE static Params<T> params(const UpdateSettings& s, const StepValues& v) {
    const double lr = hyperparameter(v.lr, s.lr);
    const double momentum = s.hyper[0], dampening = s.hyper[1], weight_decay = s.hyper[2];
    Params<T> p;
    p.neg_lr = T(-lr);
    p.momentum = T(momentum);
    p.one_minus_dampening = T(1.0 - dampening);
    p.weight_decay = T(weight_decay);
    p.reuse_scale = reuse_scale<T>(v);
    p.unscale = T(grad_unscale(v));
    p.has_weight_decay = weight_decay != 0.0;
    p.nesterov = s.flag(0);
    p.maximize = s.flag(1);
    p.first_step = *v.step == 0.0f;
    return p;
  }

  template <int NSTATE, bool REUSE, typename V, typename T>
  HOST_DEVICE ALWAYS_INLINE static V update(V w, V g, V g_v, V* state, const Params<T>& p) {
    g = update_gradient<REUSE>(g, g_v, p.reuse_scale, p.unscale);
    V d = p.maximize ? -g : g;
    d = p.has_weight_decay ? d + p.weight_decay * w : d;
    if constexpr (NSTATE == 1) {  // momentum
      V b = p.first_step ? d : state[0] * p.momentum + p.one_minus_dampening * d;
      state[0] = b;
      d = p.nesterov ? d + p.momentum * b : b;
    }
    return w + p.neg_lr * d;
  }
};

// torch.lerp with a scalar weight (ATen/native/Lerp.h).
template <typename V, typename T>
HOST_DEVICE ALWAYS_INLINE inline V fs_lerp(V self, V end, T weight) {
  return fs_abs(weight) < T(0.5) ? self + weight * (end - self) : end - (end - self) * (T(1) - weight);
}

// --- Adam / AdamW (torch.optim.Adam, AdamW): state exp_avg, exp_avg_sq (, max_exp_avg_sq: AMSGrad) -------
struct Adam {
  // hyper: beta1, beta2, eps, weight_decay; flags: decoupled, amsgrad, maximize
  static constexpr int kHyperparameters = 4, kFlags = 3;
  HOST_DEVICE static constexpr bool valid_state_count(int n) { return n == 2 || n == 3; }

  template <typename T>
  struct Params {
    T lerp_weight;       // 1 - beta1, for exp_avg.lerp_(d, 1 - beta1)
    T beta2, one_minus_beta2;
    T eps, weight_decay, decay;  // decay = 1 - lr * weight_decay (AdamW)
    T neg_step_size;             // -lr / (1 - beta1^t), t = step + 1
    T bias_correction2_sqrt;     // (1 - beta2^t) ** 0.5
    T reuse_scale;               // LookSAM's c (reuse steps only)
    T unscale;                   // grad_unscale: the gradient is multiplied by it first
    bool l2, decoupled, maximize;
  };

  // The bias corrections use t = step + 1, in double as torch.optim computes them in Python.
  template <typename T>
  HOST_DEVICE static Params<T> params(const UpdateSettings& s, const StepValues& v) {
    const double t = double(*v.step) + 1.0;
    const double lr = hyperparameter(v.lr, s.lr);
    const double beta1 = s.hyper[0], beta2 = s.hyper[1], eps = s.hyper[2], weight_decay = s.hyper[3];
    const bool decoupled = s.flag(0);
    Params<T> p;
    p.lerp_weight = T(1.0 - beta1);
    p.beta2 = T(beta2);
    p.one_minus_beta2 = T(1.0 - beta2);
    p.eps = T(eps);
    p.weight_decay = T(weight_decay);
    p.decay = T(1.0 - lr * weight_decay);
    p.neg_step_size = T(-(lr / (1.0 - pow(beta1, t))));
    p.bias_correction2_sqrt = T(sqrt(1.0 - pow(beta2, t)));
    p.reuse_scale = reuse_scale<T>(v);
    p.unscale = T(grad_unscale(v));
    p.l2 = weight_decay != 0.0 && !decoupled;
    p.decoupled = weight_decay != 0.0 && decoupled;
    p.maximize = s.flag(2);
    return p;
  }

  template <int NSTATE, bool REUSE, typename V, typename T>
  HOST_DEVICE ALWAYS_INLINE static V update(V w, V g, V g_v, V* state, const Params<T>& p) {
    g = update_gradient<REUSE>(g, g_v, p.reuse_scale, p.unscale);
    V d = p.maximize ? -g : g;
    w = p.decoupled ? w * p.decay : w;
    d = p.l2 ? d + p.weight_decay * w : d;
    V m_new = fs_lerp(state[0], d, p.lerp_weight);
    V v_new = state[1] * p.beta2 + p.one_minus_beta2 * d * d;
    state[0] = m_new;
    state[1] = v_new;
    V second = v_new;
    if constexpr (NSTATE == 3) {  // AMSGrad
      second = fs_maximum(state[2], v_new);
      state[2] = second;
    }
    V denom = fs_sqrt(second) / p.bias_correction2_sqrt + p.eps;
    return w + p.neg_step_size * (m_new / denom);
  }
};

// --- Adagrad (torch.optim.Adagrad): state sum ----------------------------------------------------------
struct Adagrad {
  // hyper: lr_decay, weight_decay, initial_accumulator_value (the sum's start, set by the caller), eps;
  // flags: maximize
  static constexpr int kHyperparameters = 4, kFlags = 1;
  HOST_DEVICE static constexpr bool valid_state_count(int n) { return n == 1; }

  template <typename T>
  struct Params {
    T neg_clr;  // -lr / (1 + step * lr_decay), step the updates before this one
    T weight_decay, eps;
    T reuse_scale;  // LookSAM's c (reuse steps only)
    T unscale;      // grad_unscale: the gradient is multiplied by it first
    bool has_weight_decay, maximize;
  };

  // torch.optim's clr = lr / (1 + (step - 1) * lr_decay) after its step += 1, in double as Python computes it.
  template <typename T>
  HOST_DEVICE static Params<T> params(const UpdateSettings& s, const StepValues& v) {
    const double lr = hyperparameter(v.lr, s.lr);
    const double lr_decay = s.hyper[0], weight_decay = s.hyper[1], eps = s.hyper[3];
    Params<T> p;
    p.neg_clr = T(-(lr / (1.0 + double(*v.step) * lr_decay)));
    p.weight_decay = T(weight_decay);
    p.eps = T(eps);
    p.reuse_scale = reuse_scale<T>(v);
    p.unscale = T(grad_unscale(v));
    p.has_weight_decay = weight_decay != 0.0;
    p.maximize = s.flag(0);
    return p;
  }

  // sum += d * d; w += (-clr * d) / (sqrt(sum) + eps), as torch's addcmul_ and addcdiv_ round it.
  template <int NSTATE, bool REUSE, typename V, typename T>
  HOST_DEVICE ALWAYS_INLINE static V update(V w, V g, V g_v, V* state, const Params<T>& p) {
    g = update_gradient<REUSE>(g, g_v, p.reuse_scale, p.unscale);
    V d = p.maximize ? -g : g;
    d = p.has_weight_decay ? d + p.weight_decay * w : d;
    const V sum = state[0] + d * d;
    state[0] = sum;
    return w + (p.neg_clr * d) / (fs_sqrt(sum) + p.eps);
  }
};

// --- dispatch over the bases -----------------------------------------------------------------------

#define FUSED_SAM_KIND_CODE(K) kKind##K,
enum BaseKindCode : int64_t { FUSED_SAM_BASE_KINDS(FUSED_SAM_KIND_CODE) kBaseKindCount };
#undef FUSED_SAM_KIND_CODE

// f(Kind{}) for the base of code ``kind`` (checked by the operator: 0 <= kind < kBaseKindCount).
template <typename F>
inline void with_base_kind(int64_t kind, const F& f) {
  switch (kind) {
#define FUSED_SAM_KIND_CASE(K) \
  case kKind##K:               \
    return f(K{});
    FUSED_SAM_BASE_KINDS(FUSED_SAM_KIND_CASE)
#undef FUSED_SAM_KIND_CASE
    default:
      return;
  }
}

// f(std::integral_constant<int, n>{}) for a state count ``n`` the base ``Kind`` runs with (checked by the
// operator), so that each count compiles its own loop (which buffers it loads and stores).
template <typename Kind, typename F>
inline void with_state_count(int n, const F& f) {
  static_assert(kMaxStateBuffers == 3, "one case per state count below");
  switch (n) {
    case 0:
      if constexpr (Kind::valid_state_count(0)) f(std::integral_constant<int, 0>{});
      return;
    case 1:
      if constexpr (Kind::valid_state_count(1)) f(std::integral_constant<int, 1>{});
      return;
    case 2:
      if constexpr (Kind::valid_state_count(2)) f(std::integral_constant<int, 2>{});
      return;
    case 3:
      if constexpr (Kind::valid_state_count(3)) f(std::integral_constant<int, 3>{});
      return;
    default:
      return;
  }
}

}  // namespace fused_sam
