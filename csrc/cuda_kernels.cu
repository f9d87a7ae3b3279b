// cuda_kernels.cu: CUDA implementations of the fused_sam operators.
//
// The same operations as cpu_kernels.cpp, with the per-element math from fused_sam_math.h:
// - grid-stride loops with 64-bit indices; 16-byte vector loads/stores when every pointer is aligned
//   (a scalar kernel otherwise); launches on the current stream, each checked.
// - Squared norm, two-stage and deterministic: the grid size depends on numel only
//   (cuda_partials_len), each block reduces its share in double in a fixed tree order and writes one
//   partial. perturb re-reduces the whole partials buffer in every block (fixed order, no host sync),
//   so the non-finite check and the scale never leave the device.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <atomic>
#include <type_traits>

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

// Blocks for a grid-stride elementwise kernel doing ``work`` vector steps: one full wave at most.
unsigned int elementwise_blocks(int64_t work, int device) {
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * (2048 / kThreads);
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wanted, cap)));
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

template <typename scalar_t, bool ADAPTIVE, int N, typename out_t>
__global__ void __launch_bounds__(kThreads)
    sq_norm_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ w, int64_t n,
                   math_t<scalar_t> eta, out_t* __restrict__ out) {
  using T = math_t<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / N;
  double acc = 0.0;
  for (int64_t v = tid; v < nvec; v += stride) {
    scalar_t gv[N], wv[N];
    load_vec<N>(g + v * N, gv);
    if (ADAPTIVE) load_vec<N>(w + v * N, wv);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      acc += static_cast<double>(
          sq_norm_term<T>(static_cast<T>(gv[j]), ADAPTIVE ? static_cast<T>(wv[j]) : T(0), ADAPTIVE, eta));
    }
  }
  for (int64_t i = nvec * N + tid; i < n; i += stride) {
    acc += static_cast<double>(
        sq_norm_term<T>(static_cast<T>(g[i]), ADAPTIVE ? static_cast<T>(w[i]) : T(0), ADAPTIVE, eta));
  }
  const double total = block_sum(acc);
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<out_t>(total);
}

template <typename scalar_t, typename out_t>
void launch_sq_norm(const scalar_t* g, const scalar_t* w, int64_t n, bool adaptive, double eta, out_t* out,
                    int64_t blocks, cudaStream_t stream) {
  using T = math_t<scalar_t>;
  constexpr int N = vec_elems<scalar_t>();
  const bool vec = aligned(g, 16) && aligned(w, 16);
  const T e = static_cast<T>(eta);
  const dim3 grid(static_cast<unsigned int>(blocks));
  if (adaptive) {
    if (vec) sq_norm_kernel<scalar_t, true, N, out_t><<<grid, kThreads, 0, stream>>>(g, w, n, e, out);
    else sq_norm_kernel<scalar_t, true, 1, out_t><<<grid, kThreads, 0, stream>>>(g, w, n, e, out);
  } else {
    if (vec) sq_norm_kernel<scalar_t, false, N, out_t><<<grid, kThreads, 0, stream>>>(g, w, n, e, out);
    else sq_norm_kernel<scalar_t, false, 1, out_t><<<grid, kThreads, 0, stream>>>(g, w, n, e, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void sq_norm_partials_cuda(const at::Tensor& grads, const at::Tensor& weights, bool adaptive, double eta,
                           const at::Tensor& out) {
  const int64_t n = weights.numel();
  const int64_t blocks = cuda_partials_len(n);
  check_sq_norm_args(grads, weights, out, blocks);
  const c10::cuda::CUDAGuard guard(weights.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FUSED_SAM_DISPATCH(weights.scalar_type(), "fused_sam::sq_norm_partials", [&] {
    const auto* g = grads.const_data_ptr<scalar_t>();
    const auto* w = weights.const_data_ptr<scalar_t>();
    if (out.scalar_type() == at::kDouble) {
      launch_sq_norm(g, w, n, adaptive, eta, out.mutable_data_ptr<double>(), blocks, stream);
    } else {
      launch_sq_norm(g, w, n, adaptive, eta, out.mutable_data_ptr<float>(), blocks, stream);
    }
  });
}

// --- perturb ---------------------------------------------------------------------------------------------

template <typename scalar_t, bool ADAPTIVE, int N, typename P>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(scalar_t* __restrict__ w, const scalar_t* __restrict__ g, scalar_t* __restrict__ backup,
                   int64_t n, const P* __restrict__ partials, int64_t npartials, int* __restrict__ counter,
                   double rho, double eps, bool normalize, math_t<scalar_t> eta) {
  using T = math_t<scalar_t>;
  T scale = static_cast<T>(rho);
  bool finite = true;
  if (partials != nullptr) {
    double acc = 0.0;
    for (int64_t k = threadIdx.x; k < npartials; k += blockDim.x) acc += static_cast<double>(partials[k]);
    const double total = block_sum(acc);
    const ScaleResult<P> r = perturb_scale<P>(static_cast<P>(total), rho, eps, normalize, /*check=*/true);
    scale = static_cast<T>(r.scale);
    finite = r.finite;
    if (!finite && counter != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *counter += 1;
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / N;
  for (int64_t v = tid; v < nvec; v += stride) {
    scalar_t wv[N], gv[N], out[N];
    load_vec<N>(w + v * N, wv);
    load_vec<N>(g + v * N, gv);
    store_vec<N>(backup + v * N, wv);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      out[j] = static_cast<scalar_t>(
          perturb_value<T>(static_cast<T>(wv[j]), static_cast<T>(gv[j]), scale, ADAPTIVE, eta, finite));
    }
    store_vec<N>(w + v * N, out);
  }
  for (int64_t i = nvec * N + tid; i < n; i += stride) {
    const scalar_t wi = w[i];
    backup[i] = wi;
    w[i] = static_cast<scalar_t>(
        perturb_value<T>(static_cast<T>(wi), static_cast<T>(g[i]), scale, ADAPTIVE, eta, finite));
  }
}

template <typename scalar_t, typename P>
void launch_perturb(scalar_t* w, const scalar_t* g, scalar_t* bk, int64_t n, const P* partials, int64_t np,
                    int* counter, double rho, bool adaptive, double eta, bool normalize, double eps, int device,
                    cudaStream_t stream) {
  using T = math_t<scalar_t>;
  constexpr int N = vec_elems<scalar_t>();
  const bool vec = aligned(w, 16) && aligned(g, 16) && aligned(bk, 16);
  const unsigned int blocks = elementwise_blocks(vec ? (n + N - 1) / N : n, device);
  const T e = static_cast<T>(eta);
  if (adaptive) {
    if (vec) perturb_kernel<scalar_t, true, N, P><<<blocks, kThreads, 0, stream>>>(w, g, bk, n, partials, np, counter, rho, eps, normalize, e);
    else perturb_kernel<scalar_t, true, 1, P><<<blocks, kThreads, 0, stream>>>(w, g, bk, n, partials, np, counter, rho, eps, normalize, e);
  } else {
    if (vec) perturb_kernel<scalar_t, false, N, P><<<blocks, kThreads, 0, stream>>>(w, g, bk, n, partials, np, counter, rho, eps, normalize, e);
    else perturb_kernel<scalar_t, false, 1, P><<<blocks, kThreads, 0, stream>>>(w, g, bk, n, partials, np, counter, rho, eps, normalize, e);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void perturb_cuda(const at::Tensor& weights, const at::Tensor& grads, const at::Tensor& backup,
                  const std::optional<at::Tensor>& partials, const std::optional<at::Tensor>& nonfinite_count,
                  double rho, bool adaptive, double eta, bool normalize, double eps) {
  check_perturb_args(weights, grads, backup, partials, nonfinite_count);
  const c10::cuda::CUDAGuard guard(weights.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = weights.numel();
  if (n == 0) return;
  int* counter = nonfinite_count.has_value() ? nonfinite_count->mutable_data_ptr<int32_t>() : nullptr;
  const int device = weights.get_device();
  FUSED_SAM_DISPATCH(weights.scalar_type(), "fused_sam::perturb", [&] {
    auto* w = weights.mutable_data_ptr<scalar_t>();
    const auto* g = grads.const_data_ptr<scalar_t>();
    auto* bk = backup.mutable_data_ptr<scalar_t>();
    if (!partials.has_value()) {
      launch_perturb(w, g, bk, n, static_cast<const float*>(nullptr), 0, nullptr, rho, adaptive, eta, normalize,
                     eps, device, stream);
    } else if (partials->scalar_type() == at::kDouble) {
      launch_perturb(w, g, bk, n, partials->const_data_ptr<double>(), partials->numel(), counter, rho, adaptive,
                     eta, normalize, eps, device, stream);
    } else {
      launch_perturb(w, g, bk, n, partials->const_data_ptr<float>(), partials->numel(), counter, rho, adaptive,
                     eta, normalize, eps, device, stream);
    }
  });
}

// --- restore ---------------------------------------------------------------------------------------------

void restore_cuda(const at::Tensor& weights, const at::Tensor& backup) {
  check_restore_args(weights, backup);
  const c10::cuda::CUDAGuard guard(weights.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t bytes = static_cast<size_t>(weights.numel()) * weights.element_size();
  if (bytes == 0) return;
  C10_CUDA_CHECK(cudaMemcpyAsync(weights.mutable_data_ptr(), backup.const_data_ptr(), bytes,
                                 cudaMemcpyDeviceToDevice, stream));
}

// --- restore + SGD ---------------------------------------------------------------------------------------

template <typename scalar_t, bool MOMENTUM, int N>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(scalar_t* __restrict__ w, const scalar_t* __restrict__ backup, const scalar_t* __restrict__ g,
               math_t<scalar_t>* __restrict__ buf, int64_t n, const SGDParams<math_t<scalar_t>> p) {
  using T = math_t<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / N;
  for (int64_t v = tid; v < nvec; v += stride) {
    scalar_t bv[N], gv[N], out[N];
    T mb[N];
    load_vec<N>(backup + v * N, bv);
    load_vec<N>(g + v * N, gv);
    if (MOMENTUM) load_vec<N>(buf + v * N, mb);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      out[j] = static_cast<scalar_t>(
          sgd_update<MOMENTUM, T>(static_cast<T>(bv[j]), static_cast<T>(gv[j]), mb + j, p));
    }
    if (MOMENTUM) store_vec<N>(buf + v * N, mb);
    store_vec<N>(w + v * N, out);
  }
  for (int64_t i = nvec * N + tid; i < n; i += stride) {
    T* bi = MOMENTUM ? buf + i : nullptr;
    w[i] = static_cast<scalar_t>(sgd_update<MOMENTUM, T>(static_cast<T>(backup[i]), static_cast<T>(g[i]), bi, p));
  }
}

template <typename scalar_t>
void launch_sgd(scalar_t* w, const scalar_t* bk, const scalar_t* g, math_t<scalar_t>* buf, int64_t n,
                const SGDParams<math_t<scalar_t>>& p, int device, cudaStream_t stream) {
  using T = math_t<scalar_t>;
  constexpr int N = vec_elems<scalar_t>();
  const bool vec = aligned(w, 16) && aligned(bk, 16) && aligned(g, 16) && aligned(buf, N * sizeof(T));
  const unsigned int blocks = elementwise_blocks(vec ? (n + N - 1) / N : n, device);
  if (buf != nullptr) {
    if (vec) sgd_kernel<scalar_t, true, N><<<blocks, kThreads, 0, stream>>>(w, bk, g, buf, n, p);
    else sgd_kernel<scalar_t, true, 1><<<blocks, kThreads, 0, stream>>>(w, bk, g, buf, n, p);
  } else {
    if (vec) sgd_kernel<scalar_t, false, N><<<blocks, kThreads, 0, stream>>>(w, bk, g, buf, n, p);
    else sgd_kernel<scalar_t, false, 1><<<blocks, kThreads, 0, stream>>>(w, bk, g, buf, n, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void restore_sgd_cuda(const at::Tensor& weights, const at::Tensor& backup, const at::Tensor& grads,
                      const std::optional<at::Tensor>& momentum_buffer, double lr, double momentum,
                      double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step) {
  check_sgd_args(weights, backup, grads, momentum_buffer, momentum);
  const c10::cuda::CUDAGuard guard(weights.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = weights.numel();
  if (n == 0) return;
  FUSED_SAM_DISPATCH(weights.scalar_type(), "fused_sam::restore_sgd", [&] {
    using T = math_t<scalar_t>;
    const auto p = make_sgd_params<T>(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step);
    T* buf = momentum != 0.0 ? momentum_buffer->mutable_data_ptr<T>() : nullptr;
    launch_sgd(weights.mutable_data_ptr<scalar_t>(), backup.const_data_ptr<scalar_t>(),
               grads.const_data_ptr<scalar_t>(), buf, n, p, weights.get_device(), stream);
  });
}

// --- restore + Adam / AdamW ------------------------------------------------------------------------------

template <typename scalar_t, bool AMSGRAD, int N>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(scalar_t* __restrict__ w, const scalar_t* __restrict__ backup, const scalar_t* __restrict__ g,
                math_t<scalar_t>* __restrict__ m, math_t<scalar_t>* __restrict__ v,
                math_t<scalar_t>* __restrict__ vmax, int64_t n, const AdamParams<math_t<scalar_t>> p) {
  using T = math_t<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / N;
  for (int64_t k = tid; k < nvec; k += stride) {
    const int64_t i = k * N;
    scalar_t bv[N], gv[N], out[N];
    T mv[N], vv[N], xv[N];
    load_vec<N>(backup + i, bv);
    load_vec<N>(g + i, gv);
    load_vec<N>(m + i, mv);
    load_vec<N>(v + i, vv);
    if (AMSGRAD) load_vec<N>(vmax + i, xv);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      out[j] = static_cast<scalar_t>(
          adam_update<AMSGRAD, T>(static_cast<T>(bv[j]), static_cast<T>(gv[j]), mv + j, vv + j, xv + j, p));
    }
    store_vec<N>(m + i, mv);
    store_vec<N>(v + i, vv);
    if (AMSGRAD) store_vec<N>(vmax + i, xv);
    store_vec<N>(w + i, out);
  }
  for (int64_t i = nvec * N + tid; i < n; i += stride) {
    T* vm = AMSGRAD ? vmax + i : nullptr;
    w[i] = static_cast<scalar_t>(
        adam_update<AMSGRAD, T>(static_cast<T>(backup[i]), static_cast<T>(g[i]), m + i, v + i, vm, p));
  }
}

template <typename scalar_t>
void launch_adam(scalar_t* w, const scalar_t* bk, const scalar_t* g, math_t<scalar_t>* m, math_t<scalar_t>* v,
                 math_t<scalar_t>* vmax, int64_t n, const AdamParams<math_t<scalar_t>>& p, int device,
                 cudaStream_t stream) {
  using T = math_t<scalar_t>;
  constexpr int N = vec_elems<scalar_t>();
  const int64_t sb = N * sizeof(T);
  const bool vec = aligned(w, 16) && aligned(bk, 16) && aligned(g, 16) && aligned(m, sb) && aligned(v, sb) &&
                   aligned(vmax, sb);
  const unsigned int blocks = elementwise_blocks(vec ? (n + N - 1) / N : n, device);
  if (vmax != nullptr) {
    if (vec) adam_kernel<scalar_t, true, N><<<blocks, kThreads, 0, stream>>>(w, bk, g, m, v, vmax, n, p);
    else adam_kernel<scalar_t, true, 1><<<blocks, kThreads, 0, stream>>>(w, bk, g, m, v, vmax, n, p);
  } else {
    if (vec) adam_kernel<scalar_t, false, N><<<blocks, kThreads, 0, stream>>>(w, bk, g, m, v, vmax, n, p);
    else adam_kernel<scalar_t, false, 1><<<blocks, kThreads, 0, stream>>>(w, bk, g, m, v, vmax, n, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void restore_adam_cuda(const at::Tensor& weights, const at::Tensor& backup, const at::Tensor& grads,
                       const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                       const std::optional<at::Tensor>& max_exp_avg_sq, double lr, double beta1, double beta2,
                       double eps, double weight_decay, bool decoupled, bool maximize, double step_size,
                       double bias_correction2_sqrt) {
  check_adam_args(weights, backup, grads, exp_avg, exp_avg_sq, max_exp_avg_sq);
  const c10::cuda::CUDAGuard guard(weights.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = weights.numel();
  if (n == 0) return;
  FUSED_SAM_DISPATCH(weights.scalar_type(), "fused_sam::restore_adam", [&] {
    using T = math_t<scalar_t>;
    const auto p = make_adam_params<T>(lr, beta1, beta2, eps, weight_decay, decoupled, maximize, step_size,
                                       bias_correction2_sqrt);
    T* vmax = max_exp_avg_sq.has_value() ? max_exp_avg_sq->mutable_data_ptr<T>() : nullptr;
    launch_adam(weights.mutable_data_ptr<scalar_t>(), backup.const_data_ptr<scalar_t>(),
                grads.const_data_ptr<scalar_t>(), exp_avg.mutable_data_ptr<T>(), exp_avg_sq.mutable_data_ptr<T>(),
                vmax, n, p, weights.get_device(), stream);
  });
}

}  // namespace
}  // namespace fused_sam

TORCH_LIBRARY_IMPL(fused_sam, CUDA, m) {
  m.impl("sq_norm_partials", &fused_sam::sq_norm_partials_cuda);
  m.impl("perturb", &fused_sam::perturb_cuda);
  m.impl("restore", &fused_sam::restore_cuda);
  m.impl("restore_sgd", &fused_sam::restore_sgd_cuda);
  m.impl("restore_adam", &fused_sam::restore_adam_cuda);
}
