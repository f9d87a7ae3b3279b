// cpu_kernels.cpp: CPU implementations of the fused_sam operators.
//
// One pass over the flat buffers per operation, split across threads with at::parallel_for; the inner
// loops are plain loops over raw pointers that the compiler vectorises (built with -O3
// -fno-math-errno). The per-element math comes from fused_sam_math.h, shared with the CUDA kernels.
//
// Determinism: the squared norm is written as one partial per CPU_NORM_CHUNK elements, each chunk summed by
// one thread (blocks of NORM_LANES interleaved lanes folded in a fixed order, accumulated in double), so
// partials are bitwise identical whatever the thread count. perturb sums the partials serially, in index order.
// The step values (step, grad_scale, found_inf) and lr / rho given as tensors (capturable=True) are CPU
// tensors here, read on the host before the loops.
// Master weights: each loop has a MASTER variant (compiled for bfloat16/float16 only) reading w from the
// float32 master; the weights then only receive roundings, so they are written like any output-only buffer.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "fused_sam_math.h"
#include "op_checks.h"

namespace fused_sam {
namespace {

// Elements per at::parallel_for task, at least: below ~128k elements (tens of microseconds) a second thread
// costs more than it saves, and on a busy machine waiting for it can cost far more.
constexpr int64_t kGrain = 1 << 17;

template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

#define FUSED_SAM_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// --- element I/O ----------------------------------------------------------------------------------------
// The loops read and write bfloat16/float16 as raw uint16_t bits with branch-free conversions (GCC does
// not vectorise loads of c10's wrapper structs, nor c10's branchy fallbacks). Both round to nearest even,
// exactly like c10's conversions.

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

template <typename scalar_t>
struct IO {
  using raw = scalar_t;
  using T = scalar_t;
  static inline T load(raw x) { return x; }
  static inline raw store(T x) { return x; }
};

template <>
struct IO<c10::BFloat16> {
  using raw = uint16_t;
  using T = float;
  static inline float load(uint16_t x) { return bits_to_f32(static_cast<uint32_t>(x) << 16); }
  static inline uint16_t store(float f) {
    const uint32_t u = f32_to_bits(f);
    const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    return (f != f) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  }
};

// IEEE half <-> float, the branch-free algorithms of the FP16 library (which c10 uses without F16C).
template <>
struct IO<c10::Half> {
  using raw = uint16_t;
  using T = float;
  static inline float load(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    // Comparisons on small non-negative int32 values: SSE2 has no unsigned vector compare.
    const bool subnormal = static_cast<int32_t>(two_w >> 27) == 0;  // two_w < 1 << 27
    const uint32_t result = sign | (subnormal ? f32_to_bits(denormalized) : f32_to_bits(normalized));
    return bits_to_f32(result);
  }
  static inline uint16_t store(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = static_cast<int32_t>(shl1_w >> 24) < 0x71 ? 0x71000000u : bias;  // bias < 0x71000000
    base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    const bool nan = static_cast<int32_t>(shl1_w >> 1) > 0x7F800000;  // shl1_w > 0xFF000000
    return static_cast<uint16_t>((sign >> 16) | (nan ? 0x7E00u : nonsign));
  }
};

template <typename scalar_t>
using raw_t = typename IO<scalar_t>::raw;

template <typename scalar_t>
inline raw_t<scalar_t>* raw_ptr(const at::Tensor& t) {
  return reinterpret_cast<raw_t<scalar_t>*>(t.data_ptr());
}

// The restore point as the loops read it (see point_t): the backup's raw bits, or a float32 master.
template <typename scalar_t, bool MASTER>
using raw_point_t = point_t<raw_t<scalar_t>, MASTER>;

template <typename scalar_t, bool MASTER>
inline math_t<scalar_t> load_point(raw_point_t<scalar_t, MASTER> x) {
  if constexpr (MASTER) {
    return x;
  } else {
    return IO<scalar_t>::load(x);
  }
}

// --- streaming stores -----------------------------------------------------------------------------------
// A buffer the operation only writes (the backup in perturb, the weights after an update, the weights in
// every operation with master weights) is written with non-temporal stores when the span is far larger
// than the caches: that skips reading each line before overwriting it (8 of the 40 bytes per parameter a
// SAM step would otherwise move). Results are computed tile by tile into a small on-stack buffer (plain
// vectorised loops) and then streamed out.
constexpr int64_t kTile = 2048;               // elements per staged tile

template <typename R>
inline void stream_copy(R* __restrict__ dst, const R* __restrict__ src, int64_t n) {
#if defined(__SSE2__)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0; ++i) dst[i] = src[i];
  constexpr int64_t per = 16 / static_cast<int64_t>(sizeof(R));
  for (; i + per <= n; i += per) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  }
  for (; i < n; ++i) dst[i] = src[i];
#else
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(R));
#endif
}

// Orders this thread's streaming stores before whatever follows (the end of a parallel task).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

inline bool use_streaming(int64_t n) {
#if defined(__SSE2__)
  return n >= CPU_STREAM_MIN_ELEMS;
#else
  return false;
#endif
}

// Writes the output-only buffer out[0, n) in parallel tasks: ``fill(dst, i, len)`` computes elements
// [i, i + len) into dst, which is out + i, or for large spans a tile on the stack that is then streamed out.
template <typename R, typename Fill>
void write_output(R* out, int64_t n, const Fill& fill) {
  const bool stream = use_streaming(n);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    if (!stream) {
      fill(out + b, b, e - b);
      return;
    }
    alignas(64) R tile[kTile];
    for (int64_t t = b; t < e; t += kTile) {
      const int64_t len = std::min(e, t + kTile) - t;
      fill(tile, t, len);
      stream_copy(out + t, tile, len);
    }
    stream_fence();
  });
}

// --- squared-norm partials ------------------------------------------------------------------------------

// ASAM's T reads w from the weights, or from the master (MASTER).
template <bool ADAPTIVE, bool MASTER, typename scalar_t, typename out_t>
void sq_norm_chunks(const raw_t<scalar_t>* __restrict__ g, const raw_point_t<scalar_t, MASTER>* __restrict__ w,
                    int64_t n, math_t<scalar_t> eta, out_t* __restrict__ out, int64_t nchunks) {
  using T = math_t<scalar_t>;
  static_assert(CPU_NORM_CHUNK % CPU_NORM_BLOCK == 0 && CPU_NORM_BLOCK % NORM_LANES == 0, "norm blocking");
  at::parallel_for(0, nchunks, std::max<int64_t>(1, kGrain / CPU_NORM_CHUNK), [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t start = c * CPU_NORM_CHUNK;
      const int64_t stop = std::min(n, start + CPU_NORM_CHUNK);
      // Blocks of CPU_NORM_BLOCK elements: NORM_LANES interleaved lanes in the math type (vectorised),
      // folded in a fixed order and added to a double total, block after block.
      double total = 0.0;
      for (int64_t b = start; b < stop; b += CPU_NORM_BLOCK) {
        const int64_t bstop = std::min(stop, b + CPU_NORM_BLOCK);
        T acc[NORM_LANES] = {};
        if (bstop - b == CPU_NORM_BLOCK) {  // a full block: a fixed trip count the compiler vectorises
          for (int64_t k = 0; k < CPU_NORM_BLOCK; k += NORM_LANES) {
            for (int j = 0; j < NORM_LANES; ++j) {
              const int64_t i = b + k + j;
              const T wi = ADAPTIVE ? load_point<scalar_t, MASTER>(w[i]) : T(0);
              acc[j] += sq_norm_term<T>(IO<scalar_t>::load(g[i]), wi, ADAPTIVE, eta);
            }
          }
        } else {
          for (int64_t i = b; i < bstop; ++i) {
            const T wi = ADAPTIVE ? load_point<scalar_t, MASTER>(w[i]) : T(0);
            acc[(i - b) % NORM_LANES] += sq_norm_term<T>(IO<scalar_t>::load(g[i]), wi, ADAPTIVE, eta);
          }
        }
        for (int width = NORM_LANES / 2; width > 0; width /= 2) {
          for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
        }
        total += static_cast<double>(acc[0]);
      }
      out[c] = static_cast<out_t>(total);
    }
  });
}

void sq_norm_partials_cpu(const at::Tensor& grads, const at::Tensor& weights,
                          const std::optional<at::Tensor>& master, bool adaptive, double eta, const at::Tensor& out) {
  const int64_t n = weights.numel();
  const int64_t nchunks = cpu_partials_len(n);
  check_sq_norm_args(grads, weights, master, out, nchunks);
  FUSED_SAM_DISPATCH(weights.scalar_type(), "fused_sam::sq_norm_partials", [&] {
    using T = math_t<scalar_t>;
    const auto* g = raw_ptr<scalar_t>(grads);
    auto run = [&](auto* o) {
      if (!adaptive) {  // w is not read
        sq_norm_chunks<false, false, scalar_t>(g, nullptr, n, static_cast<T>(eta), o, nchunks);
        return;
      }
      with_master<scalar_t>(master.has_value(), [&](auto has_master) {
        constexpr bool MASTER = decltype(has_master)::value;
        sq_norm_chunks<true, MASTER, scalar_t>(g, point_ptr<raw_t<scalar_t>, MASTER>(weights, master), n,
                                               static_cast<T>(eta), o, nchunks);
      });
    };
    if (out.scalar_type() == at::kDouble) {
      run(out.mutable_data_ptr<double>());
    } else {
      run(out.mutable_data_ptr<float>());
    }
  });
}

// --- perturb ---------------------------------------------------------------------------------------------

// The perturbation's scale from the partials, summed serially in index order.
template <typename T, typename P>
ScaleResult<T> scale_from_partials(const P* partials, int64_t len, double rho, double eps, bool normalize,
                                   const float* grad_scale) {
  double total = 0.0;
  for (int64_t i = 0; i < len; ++i) total += static_cast<double>(partials[i]);
  return perturb_scale<T>(static_cast<P>(total), rho, eps, normalize, grad_scale);
}

// w[i] <- w[i] + e (and backup[i] <- w[i] when WRITE_BACKUP) for len elements.
template <bool ADAPTIVE, bool WRITE_BACKUP, typename scalar_t>
inline void perturb_span(raw_t<scalar_t>* __restrict__ w, const raw_t<scalar_t>* __restrict__ g,
                         raw_t<scalar_t>* __restrict__ backup, int64_t len, math_t<scalar_t> scale,
                         math_t<scalar_t> eta, bool finite) {
  using T = math_t<scalar_t>;
  for (int64_t i = 0; i < len; ++i) {
    const raw_t<scalar_t> wi = w[i];
    if (WRITE_BACKUP) backup[i] = wi;
    w[i] = IO<scalar_t>::store(
        perturb_value<T>(IO<scalar_t>::load(wi), IO<scalar_t>::load(g[i]), scale, ADAPTIVE, eta, finite));
  }
}

// out[i] <- the rounding of master[i] + e for len elements; the master is left as it is.
template <bool ADAPTIVE, typename scalar_t>
inline void perturb_master_span(raw_t<scalar_t>* __restrict__ out, const float* __restrict__ master,
                                const raw_t<scalar_t>* __restrict__ g, int64_t len, float scale, float eta,
                                bool finite) {
  for (int64_t i = 0; i < len; ++i) {
    out[i] = IO<scalar_t>::store(
        perturb_value<float>(master[i], IO<scalar_t>::load(g[i]), scale, ADAPTIVE, eta, finite));
  }
}

// Without a master: backup <- w, w <- w + e. With one (MASTER): w <- the rounding of master + e, and the
// weights are output only.
template <bool ADAPTIVE, bool MASTER, typename scalar_t>
void perturb_loop(raw_t<scalar_t>* __restrict__ w, const raw_t<scalar_t>* __restrict__ g,
                  raw_t<scalar_t>* __restrict__ backup, const float* __restrict__ master,
                  int64_t n, math_t<scalar_t> scale, math_t<scalar_t> eta, bool finite) {
  if constexpr (MASTER) {
    write_output(w, n, [&](raw_t<scalar_t>* out, int64_t i, int64_t len) {
      perturb_master_span<ADAPTIVE, scalar_t>(out, master + i, g + i, len, scale, eta, finite);
    });
  } else {
    const bool stream = use_streaming(n);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      if (!stream) {
        perturb_span<ADAPTIVE, true, scalar_t>(w + b, g + b, backup + b, e - b, scale, eta, finite);
        return;
      }
      for (int64_t t = b; t < e; t += kTile) {  // stream the backup out, then update the tile (now cached)
        const int64_t len = std::min(e, t + kTile) - t;
        stream_copy(backup + t, w + t, len);
        perturb_span<ADAPTIVE, false, scalar_t>(w + t, g + t, nullptr, len, scale, eta, finite);
      }
      stream_fence();
    });
  }
}

void perturb_cpu(const at::Tensor& weights, const at::Tensor& grads, const std::optional<at::Tensor>& backup,
                 const std::optional<at::Tensor>& master, const std::optional<at::Tensor>& partials,
                 const std::optional<at::Tensor>& nonfinite_count, const std::optional<at::Tensor>& grad_scale,
                 double rho_arg, bool adaptive, double eta, bool normalize, double eps,
                 const std::optional<at::Tensor>& rho_tensor) {
  check_perturb_args(weights, grads, backup, master, partials, nonfinite_count, grad_scale, rho_tensor);
  const float* scale_of_grads = optional_float_ptr(grad_scale);
  const double rho = hyperparameter(optional_double_ptr(rho_tensor), rho_arg);
  FUSED_SAM_DISPATCH(weights.scalar_type(), "fused_sam::perturb", [&] {
    using T = math_t<scalar_t>;
    ScaleResult<T> r{scale_without_norm<T>(rho, normalize, scale_of_grads), true};
    if (partials.has_value()) {
      if (partials->scalar_type() == at::kDouble) {
        r = scale_from_partials<T>(partials->const_data_ptr<double>(), partials->numel(), rho, eps, normalize,
                                   scale_of_grads);
      } else {
        r = scale_from_partials<T>(partials->const_data_ptr<float>(), partials->numel(), rho, eps, normalize,
                                   scale_of_grads);
      }
      if (!r.finite && nonfinite_count.has_value()) {
        nonfinite_count->mutable_data_ptr<int32_t>()[0] += 1;
      }
    }
    auto* w = raw_ptr<scalar_t>(weights);
    const auto* g = raw_ptr<scalar_t>(grads);
    auto* bk = backup.has_value() ? raw_ptr<scalar_t>(*backup) : nullptr;
    const float* m = optional_float_ptr(master);
    const int64_t n = weights.numel();
    with_master<scalar_t>(master.has_value(), [&](auto has_master) {
      constexpr bool MASTER = decltype(has_master)::value;
      if (adaptive) {
        perturb_loop<true, MASTER, scalar_t>(w, g, bk, m, n, r.scale, static_cast<T>(eta), r.finite);
      } else {
        perturb_loop<false, MASTER, scalar_t>(w, g, bk, m, n, r.scale, static_cast<T>(eta), r.finite);
      }
    });
  });
}

// --- restore ---------------------------------------------------------------------------------------------

// w <- backup bit for bit.
void copy_backup(const at::Tensor& weights, const at::Tensor& backup) {
  auto* dst = static_cast<char*>(weights.mutable_data_ptr());
  const auto* src = static_cast<const char*>(backup.const_data_ptr());
  const int64_t item = weights.element_size();
  const bool stream = use_streaming(weights.numel());
  at::parallel_for(0, weights.numel(), kGrain, [&](int64_t b, int64_t e) {
    if (stream) {
      stream_copy(dst + b * item, src + b * item, (e - b) * item);
      stream_fence();
    } else {
      std::memcpy(dst + b * item, src + b * item, static_cast<size_t>((e - b) * item));
    }
  });
}

// out[i] <- the rounding of master[i] for len elements.
template <typename scalar_t>
inline void round_master_span(raw_t<scalar_t>* __restrict__ out, const float* __restrict__ master, int64_t len) {
  for (int64_t i = 0; i < len; ++i) out[i] = IO<scalar_t>::store(master[i]);
}

// w <- the restore point: the backup bit for bit, or the rounding of the master. Also what a skipped
// update does.
void restore_weights(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                     const std::optional<at::Tensor>& master) {
  if (backup.has_value()) {
    copy_backup(weights, *backup);
    return;
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(weights.scalar_type(), "fused_sam::restore", [&] {
    const float* m = master->const_data_ptr<float>();
    write_output(raw_ptr<scalar_t>(weights), weights.numel(), [&](raw_t<scalar_t>* out, int64_t i, int64_t len) {
      round_master_span<scalar_t>(out, m + i, len);
    });
  });
}

void restore_cpu(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                 const std::optional<at::Tensor>& master) {
  check_restore_args(weights, backup, master);
  restore_weights(weights, backup, master);
}

// --- restore + update: the output ---------------------------------------------------------------------------

// The updated w: written back to the master (MASTER), and its rounding to the weights.
template <bool MASTER, typename scalar_t>
inline void write_updated(raw_t<scalar_t>* __restrict__ out, raw_point_t<scalar_t, MASTER>* __restrict__ point,
                          math_t<scalar_t> w) {
  if constexpr (MASTER) *point = w;
  *out = IO<scalar_t>::store(w);
}

// --- restore + SGD ---------------------------------------------------------------------------------------

template <bool MOMENTUM, bool MASTER, typename scalar_t>
inline void sgd_span(raw_t<scalar_t>* __restrict__ out, raw_point_t<scalar_t, MASTER>* __restrict__ point,
                     const raw_t<scalar_t>* __restrict__ g, math_t<scalar_t>* __restrict__ buf, int64_t len,
                     const SGDParams<math_t<scalar_t>> p) {  // by value: the coefficients stay in registers
  using T = math_t<scalar_t>;
  for (int64_t i = 0; i < len; ++i) {
    T* bi = MOMENTUM ? buf + i : nullptr;
    write_updated<MASTER, scalar_t>(
        out + i, point + i,
        sgd_update<MOMENTUM, T>(load_point<scalar_t, MASTER>(point[i]), IO<scalar_t>::load(g[i]), bi, p));
  }
}

void restore_sgd_cpu(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                     const std::optional<at::Tensor>& master, const at::Tensor& grads,
                     const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& step,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                     double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                     bool maximize, const std::optional<at::Tensor>& lr_tensor) {
  check_sgd_args(weights, backup, master, grads, momentum_buffer, step, grad_scale, found_inf, momentum, lr_tensor);
  const StepValues values = step_values(step, grad_scale, found_inf, lr_tensor);
  if (update_skipped(values)) {  // the momentum buffer is not even read, the master not written
    restore_weights(weights, backup, master);
    return;
  }
  const SGDSettings settings{lr, momentum, dampening, weight_decay, nesterov, maximize};
  FUSED_SAM_DISPATCH(weights.scalar_type(), "fused_sam::restore_sgd", [&] {
    using T = math_t<scalar_t>;
    const auto p = make_sgd_params<T>(settings, values);
    const auto* g = raw_ptr<scalar_t>(grads);
    T* buf = momentum != 0.0 ? momentum_buffer->mutable_data_ptr<T>() : nullptr;
    with_master<scalar_t>(master.has_value(), [&](auto has_master) {
      constexpr bool MASTER = decltype(has_master)::value;
      auto* point = point_ptr<raw_t<scalar_t>, MASTER>(backup, master);
      write_output(raw_ptr<scalar_t>(weights), weights.numel(), [&](raw_t<scalar_t>* out, int64_t i, int64_t len) {
        if (buf != nullptr) {
          sgd_span<true, MASTER, scalar_t>(out, point + i, g + i, buf + i, len, p);
        } else {
          sgd_span<false, MASTER, scalar_t>(out, point + i, g + i, nullptr, len, p);
        }
      });
    });
  });
}

// --- restore + Adam / AdamW ------------------------------------------------------------------------------

template <bool AMSGRAD, bool MASTER, typename scalar_t>
inline void adam_span(raw_t<scalar_t>* __restrict__ out, raw_point_t<scalar_t, MASTER>* __restrict__ point,
                      const raw_t<scalar_t>* __restrict__ g, math_t<scalar_t>* __restrict__ m,
                      math_t<scalar_t>* __restrict__ v, math_t<scalar_t>* __restrict__ vmax, int64_t len,
                      const AdamParams<math_t<scalar_t>> p) {
  using T = math_t<scalar_t>;
  for (int64_t i = 0; i < len; ++i) {
    T* vm = AMSGRAD ? vmax + i : nullptr;
    write_updated<MASTER, scalar_t>(out + i, point + i,
                                    adam_update<AMSGRAD, T>(load_point<scalar_t, MASTER>(point[i]),
                                                            IO<scalar_t>::load(g[i]), m + i, v + i, vm, p));
  }
}

void restore_adam_cpu(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                      const std::optional<at::Tensor>& master, const at::Tensor& grads, const at::Tensor& exp_avg,
                      const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
                      const at::Tensor& step, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, double lr, double beta1, double beta2, double eps,
                      double weight_decay, bool decoupled, bool maximize, const std::optional<at::Tensor>& lr_tensor) {
  check_adam_args(weights, backup, master, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, step, grad_scale,
                  found_inf, lr_tensor);
  const StepValues values = step_values(step, grad_scale, found_inf, lr_tensor);
  if (update_skipped(values)) {  // the moments are not even read, the master not written
    restore_weights(weights, backup, master);
    return;
  }
  const AdamSettings settings{lr, beta1, beta2, eps, weight_decay, decoupled, maximize};
  FUSED_SAM_DISPATCH(weights.scalar_type(), "fused_sam::restore_adam", [&] {
    using T = math_t<scalar_t>;
    const auto p = make_adam_params<T>(settings, values);
    const auto* g = raw_ptr<scalar_t>(grads);
    auto* m = exp_avg.mutable_data_ptr<T>();
    auto* v = exp_avg_sq.mutable_data_ptr<T>();
    T* vmax = max_exp_avg_sq.has_value() ? max_exp_avg_sq->mutable_data_ptr<T>() : nullptr;
    with_master<scalar_t>(master.has_value(), [&](auto has_master) {
      constexpr bool MASTER = decltype(has_master)::value;
      auto* point = point_ptr<raw_t<scalar_t>, MASTER>(backup, master);
      write_output(raw_ptr<scalar_t>(weights), weights.numel(), [&](raw_t<scalar_t>* out, int64_t i, int64_t len) {
        if (vmax != nullptr) {
          adam_span<true, MASTER, scalar_t>(out, point + i, g + i, m + i, v + i, vmax + i, len, p);
        } else {
          adam_span<false, MASTER, scalar_t>(out, point + i, g + i, m + i, v + i, nullptr, len, p);
        }
      });
    });
  });
}

}  // namespace
}  // namespace fused_sam

TORCH_LIBRARY_IMPL(fused_sam, CPU, m) {
  m.impl("sq_norm_partials", &fused_sam::sq_norm_partials_cpu);
  m.impl("perturb", &fused_sam::perturb_cpu);
  m.impl("restore", &fused_sam::restore_cpu);
  m.impl("restore_sgd", &fused_sam::restore_sgd_cpu);
  m.impl("restore_adam", &fused_sam::restore_adam_cpu);
}
