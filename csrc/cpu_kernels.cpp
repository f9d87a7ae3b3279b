// cpu_kernels.cpp: the CPU kernels, compiled once per instruction set, each build in its own namespace
// fused_sam::cpu::<ISA>: as one of the extension's sources with the baseline flags (DEFAULT), and by
// setup.py with -DCPU_CAPABILITY=AVX2 and that instruction set enabled, which AVX-512 CPUs run too (an
// AVX-512 build measured no faster, the step being memory-bound). cpu_ops.cpp checks the arguments and calls
// the build the CPU runs (cpu_kernels.h).
//
// The AVX2 build loops explicitly over at::vec::Vectorized<T> (the vectors torch's own CPU
// kernels use, in the same per-ISA namespaces), two vectors of the math type per step; the DEFAULT build
// runs the same templates on T, one element per step (see "values" below). Either way the per-element math
// is fused_sam_math.h's. The flags that decide which buffers a loop reads and writes (ASAM, master weights,
// momentum, AMSGrad, LookSAM's reuse) are template parameters; the other per-call settings are uniform
// branches on values in registers. One pass over the flat buffers per operation, split across threads with
// at::parallel_for (OpenMP) into contiguous ranges, the same ones call after call (first-touch friendly).
//
// Determinism: the squared norm is one partial per CPU_NORM_CHUNK elements, each chunk summed by one thread
// in NORM_LANES lanes (vectors holding the same lanes on every ISA), folded in a fixed order and accumulated
// in double, so partials are bitwise identical whatever the thread count and the instruction set; so are the
// telemetry sums of perturb and restore_update, summed the same way. The build uses -ffp-contract=off: no
// multiply-add is contracted into an FMA on one ISA and not another.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#ifndef FUSED_SAM_CHECK_CONTRACTS
#define FUSED_SAM_CHECK_CONTRACTS 0
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "cpu_kernels.h"
#include "fused_sam_math.h"

namespace fused_sam::cpu::CPU_CAPABILITY {
namespace {

#define FUSED_SAM_NAME_OF(x) #x
#define FUSED_SAM_NAME(x) FUSED_SAM_NAME_OF(x)
[[maybe_unused]] constexpr const char* kCapabilityName = FUSED_SAM_NAME(CPU_CAPABILITY);

using at::vec::Vectorized;

// Elements per at::parallel_for task, at least: below ~128k elements (tens of microseconds) a second thread
// costs more than it saves, and on a busy machine waiting for it can cost far more.
constexpr int64_t kGrain = 1 << 17;

template <typename S>
constexpr bool kReduced = std::is_same_v<S, c10::BFloat16> || std::is_same_v<S, c10::Half>;

// The math type of elements of type S: double for double, else float.
template <typename S>
using math_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// --- values, loads and stores ------------------------------------------------------------------------------
// The AVX2 build computes on at::vec::Vectorized<T>, two vectors per loop step (for bfloat16/
// float16 one Vectorized<S>). The DEFAULT build runs the same templates on T, one element per step: ATen's
// DEFAULT Vectorized is generic array code, several times slower than what the compiler makes of these
// plain loops for the baseline ISA (SSE2 on x86-64, which it vectorizes itself).
#if defined(CPU_CAPABILITY_AVX2)
#define FUSED_SAM_SIMD 1
#include <immintrin.h>
#else
#define FUSED_SAM_SIMD 0
#endif
constexpr bool kSimd = FUSED_SAM_SIMD;

template <typename T>
using value_t = std::conditional_t<kSimd, Vectorized<T>, T>;

#if FUSED_SAM_SIMD
// Rounds to bfloat16/float16, to nearest even. NaN becomes c10's quiet NaN (bfloat16 0x7FC0, float16 the
// sign and 0x7E00), as torch's scalar conversions and the DEFAULT build write it; at::vec's AVX2
// conversions write 0xFFFF (bfloat16) or keep the payload (float16, F16C), so their NaN lanes are cleared of
// the bits that differ (a lane mask of NaN lanes, all ones, converts to 0xFFFF).
template <typename S>
ALWAYS_INLINE inline Vectorized<S> round_to(const Vectorized<float>& a, const Vectorized<float>& b) {
  const Vectorized<S> r = at::vec::convert_from_float<S>(a, b);
  constexpr uint16_t differ = std::is_same_v<S, c10::BFloat16> ? 0x803F : 0x01FF;
  const Vectorized<S> nan_lanes = at::vec::convert_from_float<S>(a.isnan(), b.isnan());
  return r ^ (r & nan_lanes & Vectorized<S>(S(differ, S::from_bits())));
}
#else
// bfloat16/float16 <-> float one element at a time, on the raw bits and branch-free (the compiler vectorizes
// these loops; not c10's wrapper structs, nor c10's branchy fallbacks), rounding to nearest even and writing
// NaN exactly as c10's conversions do.
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

template <typename S>
ALWAYS_INLINE inline float to_float(uint16_t x) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    return bits_to_f32(static_cast<uint32_t>(x) << 16);
  } else {  // IEEE half, the FP16 library's algorithm (c10's without F16C)
    const uint32_t w = static_cast<uint32_t>(x) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    // Comparisons on small non-negative int32 values: SSE2 has no unsigned vector compare.
    const bool subnormal = static_cast<int32_t>(two_w >> 27) == 0;  // two_w < 1 << 27
    return bits_to_f32(sign | (subnormal ? f32_to_bits(denormalized) : f32_to_bits(normalized)));
  }
}

template <typename S>
ALWAYS_INLINE inline uint16_t from_float(float f) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    const uint32_t u = f32_to_bits(f);
    const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    return (f != f) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  } else {
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
}
#endif

#if FUSED_SAM_SIMD
// ATen's partial loads and stores, Vectorized<T>::loadu(p, count) and v.store(p, count), require
// 0 <= count <= size(): the AVX-512 headers build the lane mask as (1 << count) - 1, undefined from 64 on,
// and older AVX2 headers copy ``count`` elements into a buffer of size() elements. Every partial access here
// goes through these two. Every caller passes a count within the vector; the release build clamps it there
// as a defence, and the contract-checking build (setup.py: FUSED_SAM_CHECK_CONTRACTS=1) raises instead, so a
// caller that relies on the clamp, or passes a negative count, is found on whatever ISA the tests run.
template <typename T>
ALWAYS_INLINE inline int64_t lanes_to_access(int64_t count) {
  constexpr int64_t kSize = Vectorized<T>::size();
#if FUSED_SAM_CHECK_CONTRACTS
  TORCH_CHECK(count >= 0 && count <= kSize, "fused_sam contract check: a partial access of ", count,
              " elements of a vector of ", kSize, " (", kCapabilityName, " build)");
#endif
  return std::clamp<int64_t>(count, 0, kSize);
}

template <typename T>
ALWAYS_INLINE inline Vectorized<T> load_partial(const T* p, int64_t count) {
  return Vectorized<T>::loadu(p, lanes_to_access<T>(count));
}

template <typename T>
ALWAYS_INLINE inline void store_partial(T* p, const Vectorized<T>& v, int64_t count) {
  v.store(p, lanes_to_access<T>(count));
}

// Stores vector v at p, 32-byte aligned, with non-temporal stores (32 bytes each, on either ISA).
template <typename T>
ALWAYS_INLINE inline void stream_store(void* p, const Vectorized<T>& v) {
  static_assert(sizeof(v) % 32 == 0, "whole 32-byte stores");
  alignas(64) char bytes[sizeof(v)];
  v.store(bytes);
  for (size_t o = 0; o < sizeof(v); o += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(static_cast<char*>(p) + o),
                        _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes + o)));
  }
}
#endif

// Loads and stores of a buffer of S elements as values of its math type T: kVals values per loop step.
// FULL: a whole step; else its first ``count`` elements (loads fill the rest with zeros).
template <typename S>
struct Mem {
  using T = math_t<S>;
  using V = value_t<T>;
  static constexpr int kVals = kSimd ? 2 : 1;
  static constexpr int64_t kLanes = kSimd ? Vectorized<T>::size() : 1;  // elements per value
  static constexpr int64_t kStep = kVals * kLanes;

  template <bool FULL>
  ALWAYS_INLINE static void load(const S* p, int64_t count, V (&v)[kVals]) {
#if FUSED_SAM_SIMD
    if constexpr (kReduced<S>) {
      const Vectorized<S> raw = FULL ? Vectorized<S>::loadu(p) : load_partial(p, count);
      std::tie(v[0], v[1]) = at::vec::convert_to_float<S>(raw);
    } else if constexpr (FULL) {
      v[0] = V::loadu(p);
      v[1] = V::loadu(p + kLanes);
    } else {
      v[0] = load_partial(p, std::min(count, kLanes));
      v[1] = count > kLanes ? load_partial(p + kLanes, count - kLanes) : V(T(0));
    }
#else
    v[0] = load1<FULL>(p, count);
#endif
  }

  template <bool FULL>
  ALWAYS_INLINE static void store(S* p, int64_t count, const V (&v)[kVals]) {
#if FUSED_SAM_SIMD
    if constexpr (kReduced<S>) {
      if constexpr (FULL) {
        round_to<S>(v[0], v[1]).store(p);
      } else {
        store_partial(p, round_to<S>(v[0], v[1]), count);
      }
    } else if constexpr (FULL) {
      v[0].store(p);
      v[1].store(p + kLanes);
    } else {
      store_partial(p, v[0], std::min(count, kLanes));
      if (count > kLanes) store_partial(p + kLanes, v[1], count - kLanes);
    }
#else
    if constexpr (kReduced<S>) {
      *reinterpret_cast<uint16_t*>(p) = from_float<S>(v[0]);
    } else {
      *p = v[0];
    }
#endif
  }

  // store_out, and v <- the values written (rounded to S when S is bfloat16/float16) in the math type: the
  // rounding done once, its result kept in registers.
  template <bool FULL>
  ALWAYS_INLINE static void store_out_rounded(S* p, int64_t count, V (&v)[kVals], bool stream) {
    if constexpr (kReduced<S>) {
#if FUSED_SAM_SIMD
      const Vectorized<S> r = round_to<S>(v[0], v[1]);
      if constexpr (FULL) {
        if (stream) {
          stream_store(p, r);
        } else {
          r.store(p);
        }
      } else {
        store_partial(p, r, count);
      }
      std::tie(v[0], v[1]) = at::vec::convert_to_float<S>(r);
#else
      const uint16_t bits = from_float<S>(v[0]);
      *reinterpret_cast<uint16_t*>(p) = bits;
      v[0] = to_float<S>(bits);
#endif
    } else {
      store_out<FULL>(p, count, v, stream);
    }
  }

  // store, for a buffer the loop only writes: a whole step with non-temporal stores when ``stream`` (then p
  // is 32-byte aligned; see for_each_range).
  template <bool FULL>
  ALWAYS_INLINE static void store_out(S* p, int64_t count, const V (&v)[kVals], bool stream) {
#if FUSED_SAM_SIMD
    if (FULL && stream) {
      if constexpr (kReduced<S>) {
        stream_store(p, round_to<S>(v[0], v[1]));
      } else {
        stream_store(p, v[0]);
        stream_store(p + kLanes, v[1]);
      }
      return;
    }
#endif
    store<FULL>(p, count, v);
  }

  // dst <- src bit for bit (not through T: a NaN's payload is kept), for one step's elements, streamed as
  // store_out does.
  template <bool FULL>
  ALWAYS_INLINE static void copy_step(S* dst, const S* src, int64_t count, bool stream) {
#if FUSED_SAM_SIMD
    if constexpr (FULL) {
      static_assert(kStep % Vectorized<S>::size() == 0, "whole vectors of S per step");
      for (int64_t o = 0; o < kStep; o += Vectorized<S>::size()) {
        const Vectorized<S> raw = Vectorized<S>::loadu(src + o);
        if (stream) {
          stream_store(dst + o, raw);
        } else {
          raw.store(dst + o);
        }
      }
      return;
    }
#endif
    std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(S));
  }

  // One value: kLanes elements (the norm's lanes).
  template <bool FULL>
  ALWAYS_INLINE static V load1(const S* p, int64_t count) {
#if FUSED_SAM_SIMD
    if constexpr (!kReduced<S>) {
      return FULL ? V::loadu(p) : load_partial(p, count);
    } else if constexpr (FULL) {
      V out;
      at::vec::load_to_float<S>(p, out);
      return out;
    } else {
      return std::get<0>(at::vec::convert_to_float<S>(load_partial(p, count)));
    }
#else
    if constexpr (kReduced<S>) {
      return to_float<S>(*reinterpret_cast<const uint16_t*>(p));
    } else {
      return *p;
    }
#endif
  }
};

// The loops over a span (or a norm chunk) are functions of their own, called from the at::parallel_for
// bodies: one copy each, not one in the serial and one in the OpenMP path of every at::parallel_for.
#define SPAN_FN __attribute__((noinline))

// Runs body(std::bool_constant<FULL>, k, count) over [0, len) in steps of kStep elements: the whole steps,
// then the rest (one step with count < kStep).
template <int64_t kStep, typename Body>
ALWAYS_INLINE inline void for_each_step(int64_t len, const Body& body) {
  int64_t k = 0;
  for (; k + kStep <= len; k += kStep) body(std::true_type{}, k, kStep);
  if (k < len) body(std::false_type{}, k, len - k);
}

// --- streaming stores -----------------------------------------------------------------------------------
// A buffer an operation only writes (the backup in perturb, the weights after an update, the weights in
// every operation with master weights) is written with non-temporal stores when the span is far larger
// than the caches: that skips reading each line before overwriting it. The AVX2 loops stream
// their whole steps straight from registers (Mem::store_out): staging a tile on the stack and streaming it
// out after made the SGD update 8-15% slower on the 2-core CI VM. The DEFAULT build stores plainly.

inline bool use_streaming(int64_t n) { return kSimd && n >= CPU_STREAM_MIN_ELEMS; }

// Orders this thread's streaming stores before whatever follows (the end of a parallel task).
inline void stream_fence() {
#if FUSED_SAM_SIMD
  _mm_sfence();
#endif
}

// Splits each thread's range [b, e) of a loop that writes out[0, n) for ``body(i, len, stream)``: with
// streaming stores, the elements before out's first 64-byte boundary in the range are written plainly, so
// every streamed step (32 bytes or a multiple) is aligned.
template <typename R, typename Body>
void for_each_range(const R* out, int64_t n, const Body& body) {
  const bool stream = use_streaming(n);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    int64_t start = b;
    if (stream) {
      const auto misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out + b) & 63);
      start = std::min(e, b + (misaligned ? (64 - misaligned) / static_cast<int64_t>(sizeof(R)) : 0));
      if (start > b) body(b, start - b, false);
    }
    if (start < e) body(start, e - start, stream);
    if (stream) stream_fence();
  });
}

// --- dispatch -------------------------------------------------------------------------------------------

template <typename S>
struct Type {
  using type = S;
};

// f(Type<S>{}) for the weights' dtype (checked by the operator).
template <typename F>
void dispatch(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kDouble: return f(Type<double>{});
    case at::kBFloat16: return f(Type<c10::BFloat16>{});
    case at::kHalf: return f(Type<c10::Half>{});
    default: return f(Type<float>{});
  }
}

// f(std::bool_constant<flag>...): one template instance per combination of the flags.
template <typename F>
void with_flags(const F& f) {
  f();
}
template <typename F, typename... Flags>
void with_flags(const F& f, bool flag, Flags... flags) {
  if (flag) {
    with_flags([&](auto... rest) { f(std::true_type{}, rest...); }, flags...);
  } else {
    with_flags([&](auto... rest) { f(std::false_type{}, rest...); }, flags...);
  }
}

// The restore point: the backup in the weights' dtype (read only), or the float32 master (MASTER).
template <typename S, bool MASTER>
using point_t = std::conditional_t<MASTER, float, const S>;

// An update call's restore point: its master (MASTER) or its backup.
template <typename S, bool MASTER, typename Call>
point_t<S, MASTER>* restore_point(const Call& c) {
  if constexpr (MASTER) {
    return c.master;
  } else {
    return static_cast<const S*>(c.backup);
  }
}

// --- squared-norm partials ------------------------------------------------------------------------------

// One block's NORM_LANES lanes (acc[j / size] lane j % size) folded in a fixed order, widened to double.
template <typename T, int64_t kLanes, typename V, int kVecs>
ALWAYS_INLINE inline double fold_lanes(const V (&acc)[kVecs]) {
  T lanes[NORM_LANES];
  for (int q = 0; q < kVecs; ++q) {
#if FUSED_SAM_SIMD
    acc[q].store(lanes + q * kLanes);
#else
    lanes[q] = acc[q];
#endif
  }
  for (int width = NORM_LANES / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return static_cast<double>(lanes[0]);
}

// One vector's norm terms: elements [i, i + kLanes) of g (and, for ASAM, of w: the weights or the master),
// the first ``count`` of them unless FULL.
template <bool ADAPTIVE, bool MASTER, bool FULL, typename S>
ALWAYS_INLINE inline value_t<math_t<S>> norm_terms_at(const S* g, const point_t<S, MASTER>* w, int64_t i,
                                                      int64_t count, math_t<S> eta) {
  using V = value_t<math_t<S>>;
  using WMem = Mem<std::remove_const_t<point_t<S, MASTER>>>;
  const int64_t lanes = std::min(count, Mem<S>::kLanes);  // count: the elements left in the block
  const V gv = Mem<S>::template load1<FULL>(g + i, lanes);
  const V wv = ADAPTIVE ? WMem::template load1<FULL>(w + i, lanes) : V(math_t<S>(0));
  return sq_norm_term(gv, wv, ADAPTIVE, eta);
}

// The sum of block [b, b + len), len <= CPU_NORM_BLOCK, in NORM_LANES lanes (lane j, acc[j / size] lane
// j % size, sums its elements j, j + NORM_LANES, ... in order), folded in a fixed order. ASAM's T reads w
// from the weights, or from the master (MASTER). Arguments by value: the loop keeps them in registers
// (intrinsic stores may alias anything reached through memory).
template <bool ADAPTIVE, bool MASTER, bool FULL, typename S>
ALWAYS_INLINE inline double block_sum(const S* g, const point_t<S, MASTER>* w, int64_t b, int64_t len,
                                      math_t<S> eta) {
  using T = math_t<S>;
  using V = value_t<T>;
  constexpr int64_t kLanes = Mem<S>::kLanes;
  constexpr int kVecs = NORM_LANES / kLanes;
  static_assert(NORM_LANES % kLanes == 0 && CPU_NORM_BLOCK % NORM_LANES == 0 && CPU_NORM_CHUNK % CPU_NORM_BLOCK == 0,
                "norm blocking");
  V acc[kVecs];
  for (V& a : acc) a = V(T(0));
  for (int64_t k = 0; k < len; k += NORM_LANES) {
    for (int q = 0; q < kVecs; ++q) {
      const int64_t i = b + k + q * kLanes;
      const int64_t count = b + len - i;  // a missing value adds nothing (acc + 0 is acc: acc >= +0)
      if (!FULL && count <= 0) break;
      acc[q] = acc[q] + norm_terms_at<ADAPTIVE, MASTER, FULL>(g, w, i, count, eta);
    }
  }
  return fold_lanes<T, kLanes>(acc);
}

// The partial of elements [start, stop): its blocks' sums added to a double total, block after block.
template <bool ADAPTIVE, bool MASTER, typename S>
SPAN_FN double chunk_partial(const S* g, const point_t<S, MASTER>* w, int64_t start, int64_t stop, math_t<S> eta) {
  double total = 0.0;
  int64_t b = start;
  for (; b + CPU_NORM_BLOCK <= stop; b += CPU_NORM_BLOCK) {
    total += block_sum<ADAPTIVE, MASTER, true, S>(g, w, b, CPU_NORM_BLOCK, eta);
  }
  if (b < stop) total += block_sum<ADAPTIVE, MASTER, false, S>(g, w, b, stop - b, eta);
  return total;
}

// The partials of kStreams whole chunks from ``start`` on, read together: block k of every chunk at once, one
// vector of each chunk in turn, each chunk in its own accumulators. Each partial is the same sum as
// chunk_partial's, in the same order (bitwise), but a thread reading several streams at once, finely
// interleaved, gets more memory bandwidth than one reading a single stream or one block of each in turn
// (16M float32, two threads on the CI VM: 3.3-3.9 -> 2.6-2.9 ms).
constexpr int kStreams = 4;
template <bool ADAPTIVE, bool MASTER, typename S>
SPAN_FN void chunk_partials_interleaved(const S* g, const point_t<S, MASTER>* w, int64_t start, math_t<S> eta,
                                        double (&totals)[kStreams]) {
  using T = math_t<S>;
  using V = value_t<T>;
  constexpr int64_t kLanes = Mem<S>::kLanes;
  constexpr int kVecs = NORM_LANES / kLanes;
  for (double& t : totals) t = 0.0;
  for (int64_t b = start; b < start + CPU_NORM_CHUNK; b += CPU_NORM_BLOCK) {
    V acc[kStreams][kVecs];
    for (auto& chunk : acc) {
      for (V& a : chunk) a = V(T(0));
    }
    for (int64_t k = 0; k < CPU_NORM_BLOCK; k += NORM_LANES) {
      for (int s = 0; s < kStreams; ++s) {
        for (int q = 0; q < kVecs; ++q) {
          const int64_t i = b + s * CPU_NORM_CHUNK + k + q * kLanes;
          acc[s][q] = acc[s][q] + norm_terms_at<ADAPTIVE, MASTER, true>(g, w, i, kLanes, eta);
        }
      }
    }
    for (int s = 0; s < kStreams; ++s) totals[s] += fold_lanes<T, kLanes>(acc[s]);
  }
}

void sq_norm_partials(const NormCall& c) {
  dispatch(c.dtype, [&](auto type) {
    using S = typename decltype(type)::type;
    const auto* g = static_cast<const S*>(c.grads);
    const auto eta = static_cast<math_t<S>>(c.eta);
    with_flags(
        [&](auto adaptive, auto master, auto out_double) {
          constexpr bool ADAPTIVE = decltype(adaptive)::value, MASTER = decltype(master)::value;
          using O = std::conditional_t<decltype(out_double)::value, double, float>;
          if constexpr (!MASTER || (ADAPTIVE && kReduced<S>)) {
            const point_t<S, MASTER>* w;
            if constexpr (MASTER) {
              w = c.master;
            } else {
              w = static_cast<const S*>(c.weights);
            }
            auto* out = static_cast<O*>(c.out);
            const int64_t n = c.n;
            at::parallel_for(0, cpu_partials_len(n), std::max<int64_t>(1, kGrain / CPU_NORM_CHUNK),
                             [&](int64_t cb, int64_t ce) {
                               int64_t k = cb;
                               for (; k + kStreams <= ce && (k + kStreams) * CPU_NORM_CHUNK <= n; k += kStreams) {
                                 double totals[kStreams];
                                 chunk_partials_interleaved<ADAPTIVE, MASTER, S>(g, w, k * CPU_NORM_CHUNK, eta, totals);
                                 for (int s = 0; s < kStreams; ++s) out[k + s] = static_cast<O>(totals[s]);
                               }
                               for (; k < ce; ++k) {
                                 const int64_t start = k * CPU_NORM_CHUNK;
                                 out[k] = static_cast<O>(chunk_partial<ADAPTIVE, MASTER, S>(
                                     g, w, start, std::min(n, start + CPU_NORM_CHUNK), eta));
                               }
                             });
          }
        },
        c.adaptive, c.adaptive && c.master != nullptr, c.out_double);
  });
}

// --- telemetry sums (perturb and restore_update with sums) ------------------------------------------------
// One row of sums per CPU_NORM_CHUNK elements, like the norm's partials, each chunk summed by one thread as
// the norm sums a chunk: blocks of CPU_NORM_BLOCK elements in NORM_LANES lanes in the math type (lane j adds
// the block's elements j, j + NORM_LANES, ... in order), folded in a fixed order and added in double. The
// lanes are the same on every instruction set, so the sums are bitwise the same on each and for any thread
// count.

// The lanes of one block's K sums: lane j of sum k is lanes[k][j / kLanes], lane j % kLanes.
template <typename S, int K>
struct SumLanes {
  using T = math_t<S>;
  using V = value_t<T>;
  static constexpr int64_t kLanes = Mem<S>::kLanes;
  static constexpr int kVecs = NORM_LANES / kLanes;
  static constexpr int kVals = Mem<S>::kVals;
  V lanes[K][kVecs];

  SumLanes() {
    for (int k = 0; k < K; ++k) {
      for (int q = 0; q < kVecs; ++q) lanes[k][q] = V(T(0));
    }
  }

  void fold_into(double (&totals)[K]) const {
    for (int k = 0; k < K; ++k) totals[k] += fold_lanes<T, kLanes>(lanes[k]);
  }
};

// restore_update's three sums (e^2, e * g2, g2^2).
template <typename S>
struct TelemetryLanes : SumLanes<S, 3> {
  using V = typename SumLanes<S, 3>::V;
  static constexpr int kVals = SumLanes<S, 3>::kVals;

  // One loop step's terms, its first value in lane vector q (missing elements were loaded as zeros: their
  // terms are +0, which leaves a lane as it is).
  ALWAYS_INLINE void add(int q, const V (&now)[kVals], const V (&point)[kVals], const V (&g)[kVals],
                         math_t<S> unscale) {
    auto& [ee, eg, gg] = this->lanes;
    for (int j = 0; j < kVals; ++j) {
      const TelemetryTerms<V> t = telemetry_terms(now[j], point[j], g[j], unscale);
      ee[q + j] = ee[q + j] + t.ee;
      eg[q + j] = eg[q + j] + t.eg;
      gg[q + j] = gg[q + j] + t.gg;
    }
  }
};

// perturb's sum of e * g.
template <typename S>
struct PerturbLanes : SumLanes<S, 1> {
  using V = typename SumLanes<S, 1>::V;
  static constexpr int kVals = SumLanes<S, 1>::kVals;

  // As TelemetryLanes::add: ``written`` the weights as stored, ``point`` the restore point, g as given.
  ALWAYS_INLINE void add(int q, const V (&written)[kVals], const V (&point)[kVals], const V (&g)[kVals]) {
    auto& eg = this->lanes[0];
    for (int j = 0; j < kVals; ++j) eg[q + j] = eg[q + j] + perturbation_term(written[j], point[j], g[j]);
  }
};

// Runs step(std::bool_constant<FULL>, k, count, lanes, q) over the elements [0, len) of one chunk, one loop step
// (kStep elements, the last one maybe fewer) at a time, block by block: ``lanes`` the block's Lanes
// (TelemetryLanes or PerturbLanes), ``q`` the lane vector element k falls in. totals <- the chunk's sums.
template <typename S, typename Lanes, typename Step, size_t K>
ALWAYS_INLINE inline void telemetry_blocks(int64_t len, const Step& step, double (&totals)[K]) {
  constexpr int64_t kStep = Mem<S>::kStep;
  constexpr int kVals = Mem<S>::kVals;
  static_assert(NORM_LANES % kStep == 0 && CPU_NORM_BLOCK % NORM_LANES == 0, "whole loop steps per lane group");
  for (double& t : totals) t = 0.0;
  for (int64_t b = 0; b < len; b += CPU_NORM_BLOCK) {
    Lanes lanes;
    const int64_t stop = std::min(len, b + CPU_NORM_BLOCK);
    int64_t k = b;
    for (; k + NORM_LANES <= stop; k += NORM_LANES) {
      for (int t = 0; t < NORM_LANES / kStep; ++t) step(std::true_type{}, k + t * kStep, kStep, lanes, t * kVals);
    }
    for (int t = 0; k < stop; k += kStep, ++t) {  // the block's last lane group, not whole
      if (k + kStep <= stop) {
        step(std::true_type{}, k, kStep, lanes, t * kVals);
      } else {
        step(std::false_type{}, k, stop - k, lanes, t * kVals);
      }
    }
    lanes.fold_into(totals);
  }
}

// Runs chunk(start, len, totals) over every chunk of a span of n elements (threads take whole chunks) and
// writes each chunk's K sums as row k of ``sums`` (float64 when sums_double, else float32).
template <size_t K, typename Chunk>
void for_each_chunk_with_sums(int64_t n, void* sums, bool sums_double, const Chunk& chunk) {
  at::parallel_for(0, cpu_partials_len(n), std::max<int64_t>(1, kGrain / CPU_NORM_CHUNK), [&](int64_t cb, int64_t ce) {
    for (int64_t k = cb; k < ce; ++k) {
      const int64_t start = k * CPU_NORM_CHUNK;
      double totals[K];
      chunk(start, std::min(n, start + CPU_NORM_CHUNK) - start, totals);
      for (size_t i = 0; i < K; ++i) {
        if (sums_double) {
          static_cast<double*>(sums)[K * k + i] = totals[i];
        } else {
          static_cast<float*>(sums)[K * k + i] = static_cast<float>(totals[i]);
        }
      }
    }
  });
}

// --- perturb ---------------------------------------------------------------------------------------------
// The span functions below take everything by value: their loops keep pointers, coefficients and flags in
// registers (intrinsic stores may alias anything the loop would otherwise reach through memory).

// backup <- w, w <- w + e for len elements.
template <bool ADAPTIVE, typename S>
SPAN_FN void perturb_span(S* w, S* backup, const S* g, int64_t len, math_t<S> scale, math_t<S> eta, bool finite,
                          bool stream) {
  using M = Mem<S>;
  for_each_step<M::kStep>(len, [=](auto full, int64_t k, int64_t count) {
    constexpr bool FULL = decltype(full)::value;
    typename M::V wv[M::kVals], gr[M::kVals];
    M::template copy_step<FULL>(backup + k, w + k, count, stream);
    M::template load<FULL>(w + k, count, wv);
    M::template load<FULL>(g + k, count, gr);
    for (int j = 0; j < M::kVals; ++j) wv[j] = perturb_value(wv[j], gr[j], scale, ADAPTIVE, eta, finite);
    M::template store<FULL>(w + k, count, wv);
  });
}

// out <- the rounding of master + e for len elements; the master is left as it is.
template <bool ADAPTIVE, typename S>
SPAN_FN void perturb_master_span(S* out, const float* master, const S* g, int64_t len, float scale, float eta,
                                 bool finite, bool stream) {
  using M = Mem<S>;
  for_each_step<M::kStep>(len, [=](auto full, int64_t k, int64_t count) {
    constexpr bool FULL = decltype(full)::value;
    typename M::V wv[M::kVals], gr[M::kVals];
    Mem<float>::load<FULL>(master + k, count, wv);
    M::template load<FULL>(g + k, count, gr);
    for (int j = 0; j < M::kVals; ++j) wv[j] = perturb_value(wv[j], gr[j], scale, ADAPTIVE, eta, finite);
    M::template store_out<FULL>(out + k, count, wv, stream);
  });
}

// perturb_span (MASTER: perturb_master_span) over one chunk of len elements, with its telemetry sum of
// e * g: e = the weights as written (rounded to S once, stored, kept in registers) minus the restore point
// (the master, or the weights on entry), g as given. Only for a finite total (the operator zeroes the sums
// otherwise). The buffer the pass only writes (the backup; with MASTER, the weights) is streamed when
// ``stream``, as for_each_range does.
template <bool ADAPTIVE, bool MASTER, typename S>
SPAN_FN void perturb_chunk_with_sums(S* w, S* backup, const float* master, const S* g, int64_t len,
                                     math_t<S> scale, math_t<S> eta, bool stream, double (&totals)[1]) {
  using M = Mem<S>;
  using V = typename M::V;
  telemetry_blocks<S, PerturbLanes<S>>(
      len,
      [=](auto full, int64_t k, int64_t count, PerturbLanes<S>& lanes, int q) {  // by value, as the span functions
        constexpr bool FULL = decltype(full)::value;
        V point[M::kVals], gr[M::kVals], wv[M::kVals];
        if constexpr (MASTER) {
          Mem<float>::load<FULL>(master + k, count, point);
        } else {
          M::template copy_step<FULL>(backup + k, w + k, count, stream);
          M::template load<FULL>(w + k, count, point);
        }
        M::template load<FULL>(g + k, count, gr);
        for (int j = 0; j < M::kVals; ++j) wv[j] = perturb_value(point[j], gr[j], scale, ADAPTIVE, eta, true);
        M::template store_out_rounded<FULL>(w + k, count, wv, MASTER && stream);  // only written: MASTER
        lanes.add(q, wv, point, gr);
      },
      totals);
}

// Without a master: backup <- w, w <- w + e, the backup output only. With one (MASTER): w <- the rounding of
// master + e, and the weights are output only. SUMS: with the telemetry sums (a separate instance: the loops
// without them are unchanged), chunk by chunk.
template <bool ADAPTIVE, bool MASTER, bool SUMS, typename S>
void perturb_loop(const PerturbCall& c) {
  using T = math_t<S>;
  const T scale = static_cast<T>(c.scale), eta = static_cast<T>(c.eta);
  const bool finite = c.finite;
  auto* w = static_cast<S*>(c.weights);
  const auto* g = static_cast<const S*>(c.grads);
  if constexpr (SUMS) {
    auto* backup = static_cast<S*>(c.backup);
    const S* written_only = MASTER ? w : backup;
    const bool stream = use_streaming(c.n);
    for_each_chunk_with_sums<1>(c.n, c.sums, c.sums_double, [&](int64_t i, int64_t len, double (&totals)[1]) {
      // a chunk starting on a 32-byte boundary has every whole step on one, as streaming needs
      const bool stream_chunk = stream && (reinterpret_cast<uintptr_t>(written_only + i) & 31) == 0;
      perturb_chunk_with_sums<ADAPTIVE, MASTER, S>(w + i, MASTER ? nullptr : backup + i,
                                                   MASTER ? c.master + i : nullptr, g + i, len, scale, eta,
                                                   stream_chunk, totals);
      if (stream_chunk) stream_fence();
    });
  } else if constexpr (MASTER) {
    for_each_range(w, c.n, [&](int64_t i, int64_t len, bool stream) {
      perturb_master_span<ADAPTIVE, S>(w + i, c.master + i, g + i, len, scale, eta, finite, stream);
    });
  } else {
    auto* backup = static_cast<S*>(c.backup);
    for_each_range(backup, c.n, [&](int64_t i, int64_t len, bool stream) {
      perturb_span<ADAPTIVE, S>(w + i, backup + i, g + i, len, scale, eta, finite, stream);
    });
  }
}

void perturb(const PerturbCall& c) {
  dispatch(c.dtype, [&](auto type) {
    using S = typename decltype(type)::type;
    with_flags(
        [&](auto adaptive, auto master, auto sums) {
          if constexpr (!decltype(master)::value || kReduced<S>) {
            perturb_loop<decltype(adaptive)::value, decltype(master)::value, decltype(sums)::value, S>(c);
          }
        },
        c.adaptive, c.master != nullptr, c.sums != nullptr);
  });
}

// --- restore ---------------------------------------------------------------------------------------------

// out <- the rounding of master for len elements.
template <typename S>
SPAN_FN void round_master_span(S* out, const float* master, int64_t len, bool stream) {
  for_each_step<Mem<S>::kStep>(len, [=](auto full, int64_t k, int64_t count) {
    constexpr bool FULL = decltype(full)::value;
    value_t<float> wv[Mem<S>::kVals];
    Mem<float>::load<FULL>(master + k, count, wv);
    Mem<S>::template store_out<FULL>(out + k, count, wv, stream);
  });
}

// out <- src bit for bit for len elements.
template <typename S>
SPAN_FN void copy_span(S* out, const S* src, int64_t len, bool stream) {
  for_each_step<Mem<S>::kStep>(len, [=](auto full, int64_t k, int64_t count) {
    Mem<S>::template copy_step<decltype(full)::value>(out + k, src + k, count, stream);
  });
}

// w <- the backup bit for bit, or the rounding of the master. Also what a skipped update does.
void restore(const RestoreCall& c) {
  dispatch(c.dtype, [&](auto type) {
    using S = typename decltype(type)::type;
    auto* w = static_cast<S*>(c.weights);
    if (c.backup != nullptr) {
      const auto* backup = static_cast<const S*>(c.backup);
      for_each_range(w, c.n, [&](int64_t i, int64_t len, bool stream) { copy_span<S>(w + i, backup + i, len, stream); });
    } else if constexpr (kReduced<S>) {
      for_each_range(w, c.n, [&](int64_t i, int64_t len, bool stream) {
        round_master_span<S>(w + i, c.master + i, len, stream);
      });
    }
  });
}

// --- restore + a base update ------------------------------------------------------------------------------

// out <- the updated w (also written to the master: MASTER) for len elements, by the base Kind's per-element
// update; its NSTATE state buffers are read and written, g_v read when REUSE.
template <typename Kind, int NSTATE, bool MASTER, bool REUSE, typename S>
SPAN_FN void update_span(S* out, point_t<S, MASTER>* point, const S* g, const math_t<S>* gv,
                         math_t<S>* const* state, int64_t len, const typename Kind::template Params<math_t<S>> p,
                         bool stream) {
  using T = math_t<S>;
  using M = Mem<S>;
  using PMem = Mem<std::remove_const_t<point_t<S, MASTER>>>;
  using V = typename M::V;
  T* s[kMaxStateBuffers] = {};
  for (int k = 0; k < NSTATE; ++k) s[k] = state[k];  // in registers: the loop below never reloads them
  for_each_step<M::kStep>(len, [=](auto full, int64_t k, int64_t count) {
    constexpr bool FULL = decltype(full)::value;
    V wv[M::kVals], gr[M::kVals], rv[M::kVals] = {}, sv[kMaxStateBuffers][M::kVals];
    PMem::template load<FULL>(point + k, count, wv);
    M::template load<FULL>(g + k, count, gr);
    if constexpr (REUSE) Mem<T>::template load<FULL>(gv + k, count, rv);
    for (int b = 0; b < NSTATE; ++b) Mem<T>::template load<FULL>(s[b] + k, count, sv[b]);
    for (int j = 0; j < M::kVals; ++j) {
      V lane_state[kMaxStateBuffers];
      for (int b = 0; b < NSTATE; ++b) lane_state[b] = sv[b][j];
      wv[j] = Kind::template update<NSTATE, REUSE>(wv[j], gr[j], rv[j], lane_state, p);
      for (int b = 0; b < NSTATE; ++b) sv[b][j] = lane_state[b];
    }
    for (int b = 0; b < NSTATE; ++b) Mem<T>::template store<FULL>(s[b] + k, count, sv[b]);
    if constexpr (MASTER) PMem::template store<FULL>(point + k, count, wv);
    M::template store_out<FULL>(out + k, count, wv, stream);
  });
}

// --- restore + a base update with telemetry sums --------------------------------------------------------

// update_span over one chunk (len elements), with its telemetry sums: e = the weights on entry minus the
// restore point, g2 = the unscaled gradient. The loop step is update_span's plus the sums (update_span keeps
// its own copy: sharing one inline step function changed how GCC compiles the loop without the sums). The
// pass reads the weights before it writes them and stores them plainly (their lines are in the cache
// already: streaming would save nothing).
template <typename Kind, int NSTATE, bool MASTER, bool REUSE, typename S>
SPAN_FN void update_chunk_with_sums(S* out, point_t<S, MASTER>* point, const S* g, const math_t<S>* gv,
                                    math_t<S>* const* state, int64_t len,
                                    const typename Kind::template Params<math_t<S>> p, double (&totals)[3]) {
  using T = math_t<S>;
  using M = Mem<S>;
  using PMem = Mem<std::remove_const_t<point_t<S, MASTER>>>;
  using V = typename M::V;
  T* s[kMaxStateBuffers] = {};
  for (int k = 0; k < NSTATE; ++k) s[k] = state[k];
  telemetry_blocks<S, TelemetryLanes<S>>(
      len,
      [&](auto full, int64_t k, int64_t count, TelemetryLanes<S>& lanes, int q) {
        constexpr bool FULL = decltype(full)::value;
        V wv[M::kVals], gr[M::kVals], rv[M::kVals] = {}, sv[kMaxStateBuffers][M::kVals], now[M::kVals];
        PMem::template load<FULL>(point + k, count, wv);
        M::template load<FULL>(g + k, count, gr);
        M::template load<FULL>(out + k, count, now);  // w + e, before the update overwrites it
        if constexpr (REUSE) Mem<T>::template load<FULL>(gv + k, count, rv);
        for (int b = 0; b < NSTATE; ++b) Mem<T>::template load<FULL>(s[b] + k, count, sv[b]);
        lanes.add(q, now, wv, gr, p.unscale);
        for (int j = 0; j < M::kVals; ++j) {
          V lane_state[kMaxStateBuffers];
          for (int b = 0; b < NSTATE; ++b) lane_state[b] = sv[b][j];
          wv[j] = Kind::template update<NSTATE, REUSE>(wv[j], gr[j], rv[j], lane_state, p);
          for (int b = 0; b < NSTATE; ++b) sv[b][j] = lane_state[b];
        }
        for (int b = 0; b < NSTATE; ++b) Mem<T>::template store<FULL>(s[b] + k, count, sv[b]);
        if constexpr (MASTER) PMem::template store<FULL>(point + k, count, wv);
        M::template store<FULL>(out + k, count, wv);
      },
      totals);
}

// A skipped update's pass with telemetry over one chunk: its sums, and out <- the restore point as restore
// writes it (the backup bit for bit, or the master's rounding).
template <bool MASTER, typename S>
SPAN_FN void restore_chunk_with_sums(S* out, point_t<S, MASTER>* point, const S* g, int64_t len, math_t<S> unscale,
                                     double (&totals)[3]) {
  using M = Mem<S>;
  using PMem = Mem<std::remove_const_t<point_t<S, MASTER>>>;
  using V = typename M::V;
  telemetry_blocks<S, TelemetryLanes<S>>(
      len,
      [&](auto full, int64_t k, int64_t count, TelemetryLanes<S>& lanes, int q) {
        constexpr bool FULL = decltype(full)::value;
        V now[M::kVals], pv[M::kVals], gr[M::kVals];
        M::template load<FULL>(out + k, count, now);
        PMem::template load<FULL>(point + k, count, pv);
        M::template load<FULL>(g + k, count, gr);
        lanes.add(q, now, pv, gr, unscale);
        if constexpr (MASTER) {
          M::template store<FULL>(out + k, count, pv);
        } else {
          M::template copy_step<FULL>(out + k, point + k, count, false);
        }
      },
      totals);
}

// --- restore + a base update: the loops -------------------------------------------------------------------

// SUMS: with the telemetry sums (a separate instance: the loop without them is unchanged).
template <typename Kind, int NSTATE, bool MASTER, bool REUSE, bool SUMS, typename S>
void update_loop(const UpdateCall& c) {
  using T = math_t<S>;
  const auto p = Kind::template params<T>(c.settings, c.values);
  point_t<S, MASTER>* point = restore_point<S, MASTER>(c);
  const auto* g = static_cast<const S*>(c.grads);
  const auto* gv = static_cast<const T*>(c.reused);
  auto* w = static_cast<S*>(c.weights);
  auto state_at = [&](int64_t i, T* (&state)[kMaxStateBuffers]) {
    for (int b = 0; b < NSTATE; ++b) state[b] = static_cast<T*>(c.state[b]) + i;
  };
  if constexpr (SUMS) {
    for_each_chunk_with_sums<3>(c.n, c.sums, c.sums_double, [&](int64_t i, int64_t len, double (&totals)[3]) {
      T* state[kMaxStateBuffers] = {};
      state_at(i, state);
      update_chunk_with_sums<Kind, NSTATE, MASTER, REUSE, S>(w + i, point + i, g + i, REUSE ? gv + i : nullptr, state,
                                                             len, p, totals);
    });
  } else {
    for_each_range(w, c.n, [&](int64_t i, int64_t len, bool stream) {
      T* state[kMaxStateBuffers] = {};
      state_at(i, state);
      update_span<Kind, NSTATE, MASTER, REUSE, S>(w + i, point + i, g + i, REUSE ? gv + i : nullptr, state, len, p,
                                                  stream);
    });
  }
}

// A skipped update with telemetry: the sums, and w <- the restore point; the state neither read nor written.
template <bool MASTER, typename S>
void restore_loop_with_sums(const UpdateCall& c) {
  const auto unscale = static_cast<math_t<S>>(grad_unscale(c.values));
  point_t<S, MASTER>* point = restore_point<S, MASTER>(c);
  const auto* g = static_cast<const S*>(c.grads);
  auto* w = static_cast<S*>(c.weights);
  for_each_chunk_with_sums<3>(c.n, c.sums, c.sums_double, [&](int64_t i, int64_t len, double (&totals)[3]) {
    restore_chunk_with_sums<MASTER, S>(w + i, point + i, g + i, len, unscale, totals);
  });
}

void restore_update(const UpdateCall& c) {
  dispatch(c.dtype, [&](auto type) {
    using S = typename decltype(type)::type;
    if (c.sums != nullptr && update_skipped(c.values)) {
      with_flags(
          [&](auto master) {
            if constexpr (!decltype(master)::value || kReduced<S>) restore_loop_with_sums<decltype(master)::value, S>(c);
          },
          c.master != nullptr);
      return;
    }
    with_base_kind(c.kind, [&](auto kind) {
      using Kind = decltype(kind);
      with_state_count<Kind>(c.nstate, [&](auto nstate) {
        constexpr int NSTATE = decltype(nstate)::value;
        with_flags(
            [&](auto master, auto reuse, auto sums) {
              if constexpr (!decltype(master)::value || kReduced<S>) {
                update_loop<Kind, NSTATE, decltype(master)::value, decltype(reuse)::value, decltype(sums)::value, S>(c);
              }
            },
            c.master != nullptr, c.reused != nullptr, c.sums != nullptr);
      });
    });
  });
}

}  // namespace

Kernels kernels() {
  return {&sq_norm_partials, &perturb, &restore, &restore_update};
}

}  // namespace fused_sam::cpu::CPU_CAPABILITY
