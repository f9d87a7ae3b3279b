// cuda_kernels.cu: CUDA implementations of the fused_sam operators.
//
// The same operations as cpu_kernels.cpp, with the per-element math from fused_sam_math.h:
// - grid-stride loops with 64-bit indices; 16-byte vector loads/stores when every pointer is aligned
//   (a scalar kernel otherwise); launches on the current stream, each checked.
// - Squared norm, two-stage and deterministic: the grid size depends on numel only
//   (cuda_partials_len), each block reduces its share in double in a fixed tree order and writes one
//   partial. perturb re-reduces the whole partials buffer in every block (fixed order, no host sync),
//   so the non-finite check and the scale never leave the device.
// - The step values (step, grad_scale, found_inf), lr / rho when given as float64 tensors
//   (capturable=True), and LookSAM's reuse_scale are read through pointers inside the kernels: no host
//   sync, and CUDA-graph capture records the tensors, not their values. A skipped update (found_inf)
//   restores the weights in the same launch and leaves the optimizer state untouched.
// - Telemetry sums (perturb's and restore_update's sums): the SUMS instances of the perturb and update
//   kernels, on a grid of at most cuda_partials_len(n) blocks, one row per block, deterministic like the norm.
// - Master weights: each kernel has a MASTER variant (bfloat16/float16 only) that reads w from the float32
//   master (see point_t); the updates write it back, and the weights receive its rounding (round to
//   nearest even, c10's conversions as torch's .to()).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "fused_sam_math.h"
#include "op_checks.h"

namespace fused_sam {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

#define FUSED_SAM_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// --- vector loads ----------------------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = *p;
  } else {
    const AlignedVec<T, N> x = *reinterpret_cast<const AlignedVec<T, N>*>(p);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = x.v[j];
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const T (&in)[N]) {
  if constexpr (N == 1) {
    *p = in[0];
  } else {
    AlignedVec<T, N> x;
#pragma unroll
    for (int j = 0; j < N; ++j) x.v[j] = in[j];
    *reinterpret_cast<AlignedVec<T, N>*>(p) = x;
  }
}

// Elements per 16-byte vector of the parameter dtype.
template <typename scalar_t>
constexpr int vec_elems() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

inline bool aligned(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// The vector path (N elements per load, 16 bytes of the parameter dtype) needs every pointer aligned to
// N elements of its own type; null pointers (absent buffers) do not count.
template <int N, typename... Elems>
bool vectors_aligned(const Elems*... ptrs) {
  return (aligned(ptrs, N * static_cast<int64_t>(sizeof(Elems))) && ...);
}

// The restore point's element type (see point_t): the parameter dtype, or float for a master.
template <typename scalar_t, bool MASTER>
using point_elem_t = std::remove_const_t<point_t<scalar_t, MASTER>>;

// The grid-stride loop of every elementwise kernel: ``body(width, i)`` handles elements [i, i + width),
// N-element vectors first, then the tail one by one. ``width`` is a std::integral_constant, so each body is
// written once and compiled for both.
template <int N, typename Body>
__device__ __forceinline__ void for_each_vec(int64_t n, const Body& body) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / N;
  for (int64_t v = tid; v < nvec; v += stride) body(std::integral_constant<int, N>{}, v * N);
  for (int64_t i = nvec * N + tid; i < n; i += stride) body(std::integral_constant<int, 1>{}, i);
}

// --- launch geometry -------------------------------------------------------------------------------------

int sm_count(int device) {
  static std::atomic<int> cache[64] = {};
  if (device >= 0 && device < 64) {
    int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

// Blocks of kThreads threads of ``kernel`` resident per SM of ``device`` (its registers decide: the Adam
// kernels fit 4-5 where the copy kernels fit 8), from the occupancy API, cached per (device, kernel). A host
// query that enqueues nothing and does not synchronize, so it is harmless inside a CUDA-graph capture too.
int blocks_per_sm(const void* kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find({device, kernel});
  if (found != cache.end()) return found->second;
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
  cache.emplace(std::make_pair(device, kernel), std::max(1, blocks));
  return std::max(1, blocks);
}

// Blocks for a grid-stride elementwise kernel doing ``work`` vector steps: one full wave at most.
template <typename Kernel>
unsigned int elementwise_blocks(Kernel kernel, int64_t work, int device) {
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  const int64_t wave =
      static_cast<int64_t>(sm_count(device)) * blocks_per_sm(reinterpret_cast<const void*>(kernel), device);
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wanted, wave)));
}

// --- deterministic block reduction -------------------------------------------------------------------------

// Sum of ``v`` over the block, in a fixed order; the result is valid in every thread.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  __shared__ double result;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

// --- squared-norm partials --------------------------------------------------------------------------------

// ASAM's T reads w from the weights, or from the master (MASTER).
template <typename scalar_t, bool ADAPTIVE, bool MASTER, int N, typename out_t>
__global__ void __launch_bounds__(kThreads)
    sq_norm_kernel(const scalar_t* __restrict__ g, const point_t<scalar_t, MASTER>* __restrict__ w, int64_t n,
                   math_t<scalar_t> eta, out_t* __restrict__ out) {
  using T = math_t<scalar_t>;
  double acc = 0.0;
  for_each_vec<N>(n, [&](auto width, int64_t i) {
    constexpr int M = decltype(width)::value;
    scalar_t gv[M];
    point_elem_t<scalar_t, MASTER> wv[M];
    load_vec<M>(g + i, gv);
    if (ADAPTIVE) load_vec<M>(w + i, wv);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      acc += static_cast<double>(
          sq_norm_term<T>(static_cast<T>(gv[j]), ADAPTIVE ? static_cast<T>(wv[j]) : T(0), ADAPTIVE, eta));
    }
  });
  const double total = block_sum(acc);
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<out_t>(total);
}

template <bool ADAPTIVE, bool MASTER, typename scalar_t, typename out_t>
void launch_sq_norm(const scalar_t* g, const point_t<scalar_t, MASTER>* w, int64_t n, double eta, out_t* out,
                    int64_t blocks, cudaStream_t stream) {
  using T = math_t<scalar_t>;
  constexpr int N = vec_elems<scalar_t>();
  const dim3 grid(static_cast<unsigned int>(blocks));
  if (vectors_aligned<N>(g, w)) {
    sq_norm_kernel<scalar_t, ADAPTIVE, MASTER, N, out_t><<<grid, kThreads, 0, stream>>>(g, w, n, T(eta), out);
  } else {
    sq_norm_kernel<scalar_t, ADAPTIVE, MASTER, 1, out_t><<<grid, kThreads, 0, stream>>>(g, w, n, T(eta), out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void sq_norm_partials_cuda(const at::Tensor& grads, const at::Tensor& weights,
                           const std::optional<at::Tensor>& master, bool adaptive, double eta,
                           const at::Tensor& out) {
  const int64_t n = weights.numel();
  const int64_t blocks = cuda_partials_len(n);
  check_sq_norm_args(grads, weights, master, out, blocks);
  const c10::cuda::CUDAGuard guard(weights.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FUSED_SAM_DISPATCH(weights.scalar_type(), "fused_sam::sq_norm_partials", [&] {
    const auto* g = grads.const_data_ptr<scalar_t>();
    auto run = [&](auto* o) {
      if (!adaptive) {  // w is not read
        launch_sq_norm<false, false>(g, static_cast<const scalar_t*>(nullptr), n, eta, o, blocks, stream);
        return;
      }
      with_master<scalar_t>(master.has_value(), [&](auto has_master) {
        constexpr bool MASTER = decltype(has_master)::value;
        launch_sq_norm<true, MASTER>(g, point_ptr<scalar_t, MASTER>(weights, master), n, eta, o, blocks, stream);
      });
    };
    if (out.scalar_type() == at::kDouble) {
      run(out.mutable_data_ptr<double>());
    } else {
      run(out.mutable_data_ptr<float>());
    }
  });
}

// --- telemetry sums: where they go -------------------------------------------------------------------------
// One row of sums per block of the pass's grid, which then has at most cuda_partials_len(n) blocks (rows past
// the grid are written as zeros): each thread sums its elements' terms (fused_sam_math.h, in the math type)
// in double, each block reduces them in a fixed order, as the norm does.

// Where the sums go: ``rows`` rows (of three for restore_update, of one for perturb), float64 or float32.
struct SumsOut {
  void* data;
  bool is_double;
  int64_t rows;
};

// perturb's: the block's sum of e * g (``eg``, this thread's part), and block 0 zeroes the rows past the grid
// (every thread of the block calls this).
__device__ __forceinline__ void write_perturb_sum(double eg, const SumsOut& out) {
  const double total = block_sum(eg);
  auto store = [&](int64_t row, double v) {
    if (out.is_double) {
      static_cast<double*>(out.data)[row] = v;
    } else {
      static_cast<float*>(out.data)[row] = static_cast<float>(v);
    }
  };
  if (threadIdx.x == 0) store(blockIdx.x, total);
  if (blockIdx.x == 0) {
    for (int64_t row = gridDim.x + threadIdx.x; row < out.rows; row += blockDim.x) store(row, 0.0);
  }
}

// --- perturb ---------------------------------------------------------------------------------------------

// Without a master: backup <- w, w <- w + e. With one (MASTER): w <- the rounding of master + e; no backup.
// SUMS: also the telemetry sums of e * g (perturbation_term: e the weights as written, rounded to scalar_t,
// minus the restore point), zeros when the norm is not finite; the grid has at most sums.rows blocks.
template <typename scalar_t, bool ADAPTIVE, bool MASTER, int N, typename P, bool SUMS>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(scalar_t* __restrict__ w, const scalar_t* __restrict__ g, scalar_t* __restrict__ backup,
                   const float* __restrict__ master, int64_t n, const P* __restrict__ partials, int64_t npartials,
                   int* __restrict__ counter, const float* __restrict__ grad_scale,
                   const double* __restrict__ rho_on_device, double rho_arg, double eps, bool normalize,
                   math_t<scalar_t> eta, const SumsOut sums) {
  using T = math_t<scalar_t>;
  const double rho = hyperparameter(rho_on_device, rho_arg);  // one load per thread, before the loop
  ScaleResult<T> r;
  if (partials != nullptr) {
    double acc = 0.0;
    for (int64_t k = threadIdx.x; k < npartials; k += blockDim.x) acc += static_cast<double>(partials[k]);
    const double total = block_sum(acc);
    r = perturb_scale<T>(static_cast<P>(total), rho, eps, normalize, grad_scale);
    if (!r.finite && counter != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *counter += 1;
  } else {
    r = ScaleResult<T>{scale_without_norm<T>(rho, normalize, grad_scale), true};
  }
  const T scale = r.scale;
  const bool finite = r.finite;
  double eg = 0.0;  // SUMS: this thread's sum of e * g
  for_each_vec<N>(n, [&](auto width, int64_t i) {
    constexpr int M = decltype(width)::value;
    scalar_t gv[M], out[M];
    T wv[M];
    load_vec<M>(g + i, gv);
    if constexpr (MASTER) {
      load_vec<M>(master + i, wv);
    } else {
      scalar_t raw[M];
      load_vec<M>(w + i, raw);
      store_vec<M>(backup + i, raw);
#pragma unroll
      for (int j = 0; j < M; ++j) wv[j] = static_cast<T>(raw[j]);
    }
#pragma unroll
    for (int j = 0; j < M; ++j) {
      out[j] = static_cast<scalar_t>(perturb_value<T>(wv[j], static_cast<T>(gv[j]), scale, ADAPTIVE, eta, finite));
      if constexpr (SUMS) {
        eg += static_cast<double>(perturbation_term(static_cast<T>(out[j]), wv[j], static_cast<T>(gv[j])));
      }
    }
    store_vec<M>(w + i, out);
  });
  if constexpr (SUMS) write_perturb_sum(finite ? eg : 0.0, sums);  // no perturbation: 0, not 0 * a non-finite g
}

// SUMS: the grid has at most sums.rows blocks, one row each.
template <bool MASTER, bool SUMS, typename scalar_t, typename P>
void launch_perturb(scalar_t* w, const scalar_t* g, scalar_t* bk, const float* master, int64_t n, const P* partials,
                    int64_t np, int* counter, const float* grad_scale, const double* rho_on_device, double rho,
                    bool adaptive, double eta, bool normalize, double eps, const SumsOut& sums, int device,
                    cudaStream_t stream) {
  using T = math_t<scalar_t>;
  constexpr int N = vec_elems<scalar_t>();
  const bool vec = vectors_aligned<N>(w, g, bk, master);
  const int64_t work = vec ? (n + N - 1) / N : n;
  const T e = static_cast<T>(eta);
  auto launch = [&](auto kernel) {
    unsigned int blocks = elementwise_blocks(kernel, work, device);
    if (SUMS) blocks = static_cast<unsigned int>(std::min<int64_t>(blocks, sums.rows));
    kernel<<<blocks, kThreads, 0, stream>>>(w, g, bk, master, n, partials, np, counter, grad_scale, rho_on_device,
                                            rho, eps, normalize, e, sums);
  };
  if (adaptive) {
    if (vec) launch(perturb_kernel<scalar_t, true, MASTER, N, P, SUMS>);
    else launch(perturb_kernel<scalar_t, true, MASTER, 1, P, SUMS>);
  } else {
    if (vec) launch(perturb_kernel<scalar_t, false, MASTER, N, P, SUMS>);
    else launch(perturb_kernel<scalar_t, false, MASTER, 1, P, SUMS>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void perturb_cuda(const at::Tensor& weights, const at::Tensor& grads, const std::optional<at::Tensor>& backup,
                  const std::optional<at::Tensor>& master, const std::optional<at::Tensor>& partials,
                  const std::optional<at::Tensor>& nonfinite_count, const std::optional<at::Tensor>& grad_scale,
                  bool adaptive, double eta, bool normalize, double eps, double rho,
                  const std::optional<at::Tensor>& rho_tensor, const std::optional<at::Tensor>& sums) {
  const int64_t n = weights.numel();
  check_perturb_args(weights, grads, backup, master, partials, nonfinite_count, grad_scale, rho_tensor, sums,
                     cuda_partials_len(n));
  const c10::cuda::CUDAGuard guard(weights.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // An empty span still counts a non-finite norm, as the CPU op does: one block sums the partials.
  if (n == 0 && !(partials.has_value() && nonfinite_count.has_value())) {
    if (sums.has_value()) sums->zero_();
    return;
  }
  const SumsOut sums_out{sums.has_value() ? sums->mutable_data_ptr() : nullptr,
                         sums.has_value() && sums->scalar_type() == at::kDouble, cuda_partials_len(n)};
  int* counter = nonfinite_count.has_value() ? nonfinite_count->mutable_data_ptr<int32_t>() : nullptr;
  const float* scale_of_grads = optional_float_ptr(grad_scale);
  const double* rho_on_device = optional_double_ptr(rho_tensor);
  const float* m = optional_float_ptr(master);
  const int device = weights.get_device();
  FUSED_SAM_DISPATCH(weights.scalar_type(), "fused_sam::perturb", [&] {
    auto* w = weights.mutable_data_ptr<scalar_t>();
    const auto* g = grads.const_data_ptr<scalar_t>();
    auto* bk = backup.has_value() ? backup->mutable_data_ptr<scalar_t>() : nullptr;
    with_master<scalar_t>(master.has_value(), [&](auto has_master) {
      constexpr bool MASTER = decltype(has_master)::value;
      auto run = [&](auto with_sums) {
        constexpr bool SUMS = decltype(with_sums)::value;
        if (!partials.has_value()) {
          launch_perturb<MASTER, SUMS>(w, g, bk, m, n, static_cast<const float*>(nullptr), 0, nullptr, scale_of_grads,
                                       rho_on_device, rho, adaptive, eta, normalize, eps, sums_out, device, stream);
        } else if (partials->scalar_type() == at::kDouble) {
          launch_perturb<MASTER, SUMS>(w, g, bk, m, n, partials->const_data_ptr<double>(), partials->numel(), counter,
                                       scale_of_grads, rho_on_device, rho, adaptive, eta, normalize, eps, sums_out,
                                       device, stream);
        } else {
          launch_perturb<MASTER, SUMS>(w, g, bk, m, n, partials->const_data_ptr<float>(), partials->numel(), counter,
                                       scale_of_grads, rho_on_device, rho, adaptive, eta, normalize, eps, sums_out,
                                       device, stream);
        }
      };
      if (sums.has_value()) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
  });
}

// --- restore ---------------------------------------------------------------------------------------------

// w <- the restore point: the backup bit for bit, or the rounding of the master. Also what a skipped update
// (found_inf) does, in the update kernels' grid-stride pattern, leaving the optimizer state unread and
// unwritten.
template <int N, bool MASTER, typename scalar_t>
__device__ __forceinline__ void restore_from(scalar_t* __restrict__ w,
                                             const point_t<scalar_t, MASTER>* __restrict__ point, int64_t n) {
  for_each_vec<N>(n, [&](auto width, int64_t i) {
    constexpr int M = decltype(width)::value;
    point_elem_t<scalar_t, MASTER> pv[M];
    scalar_t out[M];
    load_vec<M>(point + i, pv);
#pragma unroll
    for (int j = 0; j < M; ++j) out[j] = static_cast<scalar_t>(pv[j]);
    store_vec<M>(w + i, out);
  });
}

// --- telemetry sums (restore_update with sums) -------------------------------------------------------------
// One row of (e^2, e * g2, g2^2) per block of the update's grid, as perturb's (above).

// One thread's sums.
struct TelemetryAcc {
  double ee = 0.0, eg = 0.0, gg = 0.0;

  template <typename T>
  __device__ __forceinline__ void add(T w_now, T point, T g, T unscale) {
    const TelemetryTerms<T> t = telemetry_terms(w_now, point, g, unscale);
    ee += static_cast<double>(t.ee);
    eg += static_cast<double>(t.eg);
    gg += static_cast<double>(t.gg);
  }
};

__device__ __forceinline__ void store_sums_row(const SumsOut& out, int64_t row, double ee, double eg, double gg) {
  if (out.is_double) {
    double* r = static_cast<double*>(out.data) + 3 * row;
    r[0] = ee, r[1] = eg, r[2] = gg;
  } else {
    float* r = static_cast<float*>(out.data) + 3 * row;
    r[0] = static_cast<float>(ee), r[1] = static_cast<float>(eg), r[2] = static_cast<float>(gg);
  }
}

// The block's row (every thread of the block calls this), and block 0 zeroes the rows past the grid.
__device__ __forceinline__ void write_sums(const TelemetryAcc& acc, const SumsOut& out) {
  const double ee = block_sum(acc.ee), eg = block_sum(acc.eg), gg = block_sum(acc.gg);
  if (threadIdx.x == 0) store_sums_row(out, blockIdx.x, ee, eg, gg);
  if (blockIdx.x == 0) {
    for (int64_t row = gridDim.x + threadIdx.x; row < out.rows; row += blockDim.x) store_sums_row(out, row, 0.0, 0.0, 0.0);
  }
}

// restore_from for a skipped update with telemetry: also the sums of the elements this thread restores.
template <int N, bool MASTER, typename scalar_t>
__device__ __forceinline__ void restore_with_sums(scalar_t* __restrict__ w,
                                                  const point_t<scalar_t, MASTER>* __restrict__ point,
                                                  const scalar_t* __restrict__ g, int64_t n,
                                                  math_t<scalar_t> unscale, TelemetryAcc& acc) {
  using T = math_t<scalar_t>;
  for_each_vec<N>(n, [&](auto width, int64_t i) {
    constexpr int M = decltype(width)::value;
    point_elem_t<scalar_t, MASTER> pv[M];
    scalar_t now[M], gv[M], out[M];
    load_vec<M>(point + i, pv);
    load_vec<M>(w + i, now);
    load_vec<M>(g + i, gv);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      acc.add(static_cast<T>(now[j]), static_cast<T>(pv[j]), static_cast<T>(gv[j]), unscale);
      out[j] = static_cast<scalar_t>(pv[j]);
    }
    store_vec<M>(w + i, out);
  });
}

template <typename scalar_t, int N>
__global__ void __launch_bounds__(kThreads)
    round_master_kernel(scalar_t* __restrict__ w, const float* __restrict__ master, int64_t n) {
  restore_from<N, true>(w, master, n);
}

void restore_cuda(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                  const std::optional<at::Tensor>& master) {
  check_restore_args(weights, backup, master);
  const c10::cuda::CUDAGuard guard(weights.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = weights.numel();
  if (n == 0) return;
  if (backup.has_value()) {
    C10_CUDA_CHECK(cudaMemcpyAsync(weights.mutable_data_ptr(), backup->const_data_ptr(),
                                   static_cast<size_t>(n) * weights.element_size(), cudaMemcpyDeviceToDevice,
                                   stream));
    return;
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(weights.scalar_type(), "fused_sam::restore", [&] {
    constexpr int N = vec_elems<scalar_t>();
    auto* w = weights.mutable_data_ptr<scalar_t>();
    const float* m = master->const_data_ptr<float>();
    const bool vec = vectors_aligned<N>(w, m);
    const int64_t work = vec ? (n + N - 1) / N : n;
    auto launch = [&](auto kernel) {
      kernel<<<elementwise_blocks(kernel, work, weights.get_device()), kThreads, 0, stream>>>(w, m, n);
    };
    if (vec) launch(round_master_kernel<scalar_t, N>);
    else launch(round_master_kernel<scalar_t, 1>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// --- restore + update: shared pieces ----------------------------------------------------------------------

// The update's coefficients from the step values (and the learning rate, when on the device), built by one
// thread per block and shared (Adam's take two double-precision pow, slow on GPUs with few FP64 units).
template <typename Params, typename Build>
__device__ __forceinline__ Params block_params(const Build& build) {
  __shared__ Params shared;
  if (threadIdx.x == 0) shared = build();
  __syncthreads();
  return shared;
}

// --- restore + a base update ------------------------------------------------------------------------------

// The state pointers of one update (NSTATE of them used), passed by value.
template <typename T>
struct StatePointers {
  T* p[kMaxStateBuffers];
};

// The base Kind's update: its NSTATE state buffers read and written; gv: LookSAM's reused direction, read only
// when REUSE. SUMS: also the telemetry sums into ``sums`` (unused otherwise), the weights read before they are
// written, the update skipped or not.
template <typename Kind, typename scalar_t, int NSTATE, bool MASTER, bool REUSE, int N, bool SUMS>
__global__ void __launch_bounds__(kThreads)
    update_kernel(scalar_t* __restrict__ w, point_t<scalar_t, MASTER>* __restrict__ point,
                  const scalar_t* __restrict__ g, const math_t<scalar_t>* __restrict__ gv,
                  const StatePointers<math_t<scalar_t>> state, int64_t n, const UpdateSettings settings,
                  const StepValues values, const SumsOut sums) {
  using T = math_t<scalar_t>;
  using Params = typename Kind::template Params<T>;
  TelemetryAcc acc;
  if (update_skipped(values)) {  // the same value in every thread: the whole grid returns here
    if constexpr (SUMS) {
      restore_with_sums<N, MASTER>(w, point, g, n, static_cast<T>(grad_unscale(values)), acc);
      write_sums(acc, sums);
    } else {
      restore_from<N, MASTER>(w, point, n);
    }
    return;
  }
  const Params p = block_params<Params>([&] { return Kind::template params<T>(settings, values); });
  for_each_vec<N>(n, [&](auto width, int64_t i) {
    constexpr int M = decltype(width)::value;
    point_elem_t<scalar_t, MASTER> pv[M];
    scalar_t gr[M], out[M];
    T rv[M], sv[kMaxStateBuffers][M];
    load_vec<M>(point + i, pv);
    load_vec<M>(g + i, gr);
    if (REUSE) load_vec<M>(gv + i, rv);
#pragma unroll
    for (int b = 0; b < NSTATE; ++b) load_vec<M>(state.p[b] + i, sv[b]);
    if constexpr (SUMS) {
      scalar_t now[M];
      load_vec<M>(w + i, now);
#pragma unroll
      for (int j = 0; j < M; ++j) {
        acc.add(static_cast<T>(now[j]), static_cast<T>(pv[j]), static_cast<T>(gr[j]), p.unscale);
      }
    }
#pragma unroll
    for (int j = 0; j < M; ++j) {
      T lane_state[kMaxStateBuffers];
#pragma unroll
      for (int b = 0; b < NSTATE; ++b) lane_state[b] = sv[b][j];
      const T updated = Kind::template update<NSTATE, REUSE, T>(static_cast<T>(pv[j]), static_cast<T>(gr[j]),
                                                                REUSE ? rv[j] : T(0), lane_state, p);
#pragma unroll
      for (int b = 0; b < NSTATE; ++b) sv[b][j] = lane_state[b];
      if constexpr (MASTER) pv[j] = updated;
      out[j] = static_cast<scalar_t>(updated);
    }
#pragma unroll
    for (int b = 0; b < NSTATE; ++b) store_vec<M>(state.p[b] + i, sv[b]);
    if constexpr (MASTER) store_vec<M>(point + i, pv);
    store_vec<M>(w + i, out);
  });
  if constexpr (SUMS) write_sums(acc, sums);
}

// SUMS: the grid has at most sums.rows blocks, one row each.
template <typename Kind, int NSTATE, bool MASTER, bool REUSE, bool SUMS, typename scalar_t>
void launch_update(scalar_t* w, point_t<scalar_t, MASTER>* point, const scalar_t* g, const math_t<scalar_t>* gv,
                   const StatePointers<math_t<scalar_t>>& state, int64_t n, const UpdateSettings& settings,
                   const StepValues& values, const SumsOut& sums, int device, cudaStream_t stream) {
  constexpr int N = vec_elems<scalar_t>();
  bool vec = vectors_aligned<N>(w, point, g, gv);
  for (int b = 0; b < NSTATE; ++b) vec = vec && vectors_aligned<N>(state.p[b]);
  const int64_t work = vec ? (n + N - 1) / N : n;
  auto launch = [&](auto kernel) {
    unsigned int blocks = elementwise_blocks(kernel, work, device);
    if (SUMS) blocks = static_cast<unsigned int>(std::min<int64_t>(blocks, sums.rows));
    kernel<<<blocks, kThreads, 0, stream>>>(w, point, g, gv, state, n, settings, values, sums);
  };
  if (vec) launch(update_kernel<Kind, scalar_t, NSTATE, MASTER, REUSE, N, SUMS>);
  else launch(update_kernel<Kind, scalar_t, NSTATE, MASTER, REUSE, 1, SUMS>);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void restore_update_cuda(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                         const std::optional<at::Tensor>& master, const at::Tensor& grads, at::TensorList state,
                         const at::Tensor& step, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& reused,
                         const std::optional<at::Tensor>& reuse_scale, int64_t kind, int64_t flags,
                         at::ArrayRef<double> hyperparameters, double lr, const std::optional<at::Tensor>& lr_tensor,
                         const std::optional<at::Tensor>& sums) {
  const int64_t n = weights.numel();
  check_update_args(weights, backup, master, grads, state, step, grad_scale, found_inf, reused, reuse_scale, kind,
                    flags, hyperparameters, lr_tensor, sums, cuda_partials_len(n));
  const c10::cuda::CUDAGuard guard(weights.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (n == 0) {
    if (sums.has_value()) sums->zero_();
    return;
  }
  const SumsOut sums_out{sums.has_value() ? sums->mutable_data_ptr() : nullptr,
                         sums.has_value() && sums->scalar_type() == at::kDouble, cuda_partials_len(n)};
  const UpdateSettings settings = update_settings(lr, flags, hyperparameters);
  const StepValues values = step_values(step, grad_scale, found_inf, lr_tensor, reuse_scale);
  FUSED_SAM_DISPATCH(weights.scalar_type(), "fused_sam::restore_update", [&] {
    using T = math_t<scalar_t>;
    const T* gv = reused.has_value() ? reused->const_data_ptr<T>() : nullptr;
    StatePointers<T> buffers{};
    for (size_t b = 0; b < state.size(); ++b) buffers.p[b] = state[b].mutable_data_ptr<T>();
    with_base_kind(kind, [&](auto base) {
      using Kind = decltype(base);
      with_state_count<Kind>(static_cast<int>(state.size()), [&](auto nstate) {
        constexpr int NSTATE = decltype(nstate)::value;
        with_master<scalar_t>(master.has_value(), [&](auto has_master) {
          constexpr bool MASTER = decltype(has_master)::value;
          with_reuse(gv != nullptr, [&](auto reuse) {
            auto run = [&](auto with_sums) {
              launch_update<Kind, NSTATE, MASTER, decltype(reuse)::value, decltype(with_sums)::value>(
                  weights.mutable_data_ptr<scalar_t>(), point_ptr<scalar_t, MASTER>(backup, master),
                  grads.const_data_ptr<scalar_t>(), gv, buffers, n, settings, values, sums_out, weights.get_device(),
                  stream);
            };
            if (sums.has_value()) {
              run(std::true_type{});
            } else {
              run(std::false_type{});
            }
          });
        });
      });
    });
  });
}

}  // namespace
}  // namespace fused_sam

TORCH_LIBRARY_IMPL(fused_sam, CUDA, m) {
  m.impl("sq_norm_partials", &fused_sam::sq_norm_partials_cuda);
  m.impl("perturb", &fused_sam::perturb_cuda);
  m.impl("restore", &fused_sam::restore_cuda);
  m.impl("restore_update", &fused_sam::restore_update_cuda);
}
