// cpu_ops.cpp: the CPU implementations of the fused_sam operators: argument checks, the step values and
// the perturbation's scale (read and computed on the host), then one call of a kernel of the instruction set
// in use (cpu_kernels.h; the kernels themselves: cpu_kernels.cpp, one build per instruction set).
//
// The instruction set is chosen once, when the library loads, from the CPU's features (the best one built
// that the CPU runs), unless FUSED_SAM_CPU_CAPABILITY=default|avx2 names another one the CPU runs;
// set_capability switches it at run time (tests; fused_sam.backends.native.set_cpu_capability).
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "fused_sam_math.h"
#include "op_checks.h"

#ifndef FUSED_SAM_CPU_AVX2
#define FUSED_SAM_CPU_AVX2 0
#endif

namespace fused_sam::cpu {
namespace {

// --- the instruction set ----------------------------------------------------------------------------------

enum Capability : int { kDefault = 0, kAvx2 = 1, kCount = 2 };
constexpr const char* kNames[kCount] = {"default", "avx2"};
// What each build needs (the flags setup.py compiles it with), for the messages.
constexpr const char* kNeeds[kCount] = {"", "AVX2, FMA and F16C"};

bool built(int c) { return c == kDefault || (c == kAvx2 && FUSED_SAM_CPU_AVX2); }

bool cpu_runs(int c) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (c == kAvx2) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
#endif
  return c == kDefault;
}

bool usable(int c) { return built(c) && cpu_runs(c); }

Kernels table_of(int c) {
#if FUSED_SAM_CPU_AVX2
  if (c == kAvx2) return AVX2::kernels();
#endif
  return DEFAULT::kernels();
}

std::string usable_list() {
  std::string out;
  for (int c = 0; c < kCount; ++c) {
    if (usable(c)) out += std::string(out.empty() ? "" : ", ") + kNames[c];
  }
  return out;
}

// -1 for an unknown name.
int parse(std::string name) {
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) { return std::tolower(ch); });
  for (int c = 0; c < kCount; ++c) {
    if (name == kNames[c]) return c;
  }
  return -1;
}

// Empty if ``c`` can be used here, else why not.
std::string unusable_reason(int c, const std::string& name) {
  std::string lower = name;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char ch) { return std::tolower(ch); });
  if (c < 0 && lower == "avx512") {
    return "there is no AVX-512 build: AVX-512 CPUs run the avx2 kernels (an AVX-512 build measured no faster)";
  }
  if (c < 0) return "'" + name + "' is not one of default, avx2";
  if (!built(c)) return "this build of fused_sam._C has no " + name + " kernels";
  if (!cpu_runs(c)) return "this CPU lacks " + std::string(kNames[c]) + " (" + kNeeds[c] + ")";
  return "";
}

struct Selection {
  int capability;
  std::string warning;
};

Selection initial_selection() {
  int best = kDefault;
  for (int c = 0; c < kCount; ++c) {
    if (usable(c)) best = c;
  }
  const char* env = std::getenv("FUSED_SAM_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return {best, ""};
  const int asked = parse(env);
  const std::string reason = unusable_reason(asked, env);
  if (!reason.empty()) {
    return {best, std::string("FUSED_SAM_CPU_CAPABILITY=") + env + " is ignored: " + reason + "; using " +
                      kNames[best] + " (usable here: " + usable_list() + ")"};
  }
  return {asked, ""};
}

const Selection& selection() {
  static const Selection s = initial_selection();
  return s;
}

std::atomic<int>& active() {
  static std::atomic<int> a{selection().capability};
  return a;
}

// The kernels of the instruction set in use.
const Kernels& kernels() {
  static const Kernels tables[kCount] = {table_of(kDefault), table_of(kAvx2)};
  return tables[active().load(std::memory_order_relaxed)];
}

// --- the operators ------------------------------------------------------------------------------------------

void sq_norm_partials_cpu(const at::Tensor& grads, const at::Tensor& weights,
                          const std::optional<at::Tensor>& master, bool adaptive, double eta, const at::Tensor& out) {
  const int64_t n = weights.numel();
  check_sq_norm_args(grads, weights, master, out, cpu_partials_len(n));
  kernels().sq_norm_partials(NormCall{weights.scalar_type(), n, grads.const_data_ptr(), weights.const_data_ptr(),
                                      optional_float_ptr(master), adaptive, eta, out.mutable_data_ptr(),
                                      out.scalar_type() == at::kDouble});
}

// The perturbation's scale from the partials, summed serially in index order (in the partials' dtype P, as
// the reference sums them).
template <typename T, typename P>
ScaleResult<T> scale_from_partials(const P* partials, int64_t len, double rho, double eps, bool normalize,
                                   const float* grad_scale) {
  double total = 0.0;
  for (int64_t i = 0; i < len; ++i) total += static_cast<double>(partials[i]);
  return perturb_scale<T>(static_cast<P>(total), rho, eps, normalize, grad_scale);
}

template <typename T>
ScaleResult<T> perturbation_scale(const std::optional<at::Tensor>& partials, double rho, double eps, bool normalize,
                                  const float* grad_scale) {
  if (!partials.has_value()) return {scale_without_norm<T>(rho, normalize, grad_scale), true};
  if (partials->scalar_type() == at::kDouble) {
    return scale_from_partials<T>(partials->const_data_ptr<double>(), partials->numel(), rho, eps, normalize,
                                  grad_scale);
  }
  return scale_from_partials<T>(partials->const_data_ptr<float>(), partials->numel(), rho, eps, normalize,
                                grad_scale);
}

void perturb_cpu(const at::Tensor& weights, const at::Tensor& grads, const std::optional<at::Tensor>& backup,
                 const std::optional<at::Tensor>& master, const std::optional<at::Tensor>& partials,
                 const std::optional<at::Tensor>& nonfinite_count, const std::optional<at::Tensor>& grad_scale,
                 bool adaptive, double eta, bool normalize, double eps, double rho_arg,
                 const std::optional<at::Tensor>& rho_tensor, const std::optional<at::Tensor>& sums) {
  check_perturb_args(weights, grads, backup, master, partials, nonfinite_count, grad_scale, rho_tensor, sums,
                     cpu_partials_len(weights.numel()));
  const float* scale_of_grads = optional_float_ptr(grad_scale);
  const double rho = hyperparameter(optional_double_ptr(rho_tensor), rho_arg);
  PerturbCall call{weights.scalar_type(), weights.numel(), weights.mutable_data_ptr(), grads.const_data_ptr(),
                   backup.has_value() ? backup->mutable_data_ptr() : nullptr, optional_float_ptr(master),
                   0.0, true, adaptive, eta, nullptr, false};
  // In the math type (float64 for float64 weights, else float32); widening it to double is exact.
  if (weights.scalar_type() == at::kDouble) {
    const auto r = perturbation_scale<double>(partials, rho, eps, normalize, scale_of_grads);
    call.scale = r.scale;
    call.finite = r.finite;
  } else {
    const auto r = perturbation_scale<float>(partials, rho, eps, normalize, scale_of_grads);
    call.scale = r.scale;
    call.finite = r.finite;
  }
  if (partials.has_value() && !call.finite && nonfinite_count.has_value()) {
    nonfinite_count->mutable_data_ptr<int32_t>()[0] += 1;
  }
  if (sums.has_value()) {
    if (call.finite) {
      call.sums = sums->mutable_data_ptr();
      call.sums_double = sums->scalar_type() == at::kDouble;
    } else {  // no perturbation: the sums are 0 (not a master's rounding error, nor 0 * a non-finite g)
      sums->zero_();
    }
  }
  kernels().perturb(call);
}

// w <- the restore point: the backup bit for bit, or the rounding of the master. Also what a skipped
// update does.
void restore_weights(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                     const std::optional<at::Tensor>& master) {
  kernels().restore(RestoreCall{weights.scalar_type(), weights.numel(), weights.mutable_data_ptr(),
                                backup.has_value() ? backup->const_data_ptr() : nullptr, optional_float_ptr(master)});
}

void restore_cpu(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                 const std::optional<at::Tensor>& master) {
  check_restore_args(weights, backup, master);
  restore_weights(weights, backup, master);
}

const void* optional_data(const std::optional<at::Tensor>& t) { return t.has_value() ? t->const_data_ptr() : nullptr; }

void restore_update_cpu(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                        const std::optional<at::Tensor>& master, const at::Tensor& grads, at::TensorList state,
                        const at::Tensor& step, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& reused,
                        const std::optional<at::Tensor>& reuse_scale, int64_t kind, int64_t flags,
                        at::ArrayRef<double> hyperparameters, double lr, const std::optional<at::Tensor>& lr_tensor,
                        const std::optional<at::Tensor>& sums) {
  check_update_args(weights, backup, master, grads, state, step, grad_scale, found_inf, reused, reuse_scale, kind,
                    flags, hyperparameters, lr_tensor, sums, cpu_partials_len(weights.numel()));
  const StepValues values = step_values(step, grad_scale, found_inf, lr_tensor, reuse_scale);
  if (update_skipped(values) && !sums.has_value()) {  // the state is not even read, the master not written
    restore_weights(weights, backup, master);
    return;
  }
  UpdateCall call{weights.scalar_type(), weights.numel(), weights.mutable_data_ptr(), optional_data(backup),
                  master.has_value() ? master->mutable_data_ptr<float>() : nullptr, grads.const_data_ptr(),
                  optional_data(reused), kind, static_cast<int>(state.size()), {},
                  update_settings(lr, flags, hyperparameters), values,
                  sums.has_value() ? sums->mutable_data_ptr() : nullptr,
                  sums.has_value() && sums->scalar_type() == at::kDouble};
  for (size_t k = 0; k < state.size(); ++k) call.state[k] = state[k].mutable_data_ptr();
  kernels().restore_update(call);
}

}  // namespace

std::vector<std::string> built_capabilities() {
  std::vector<std::string> out;
  for (int c = 0; c < kCount; ++c) {
    if (built(c)) out.emplace_back(kNames[c]);
  }
  return out;
}

std::vector<std::string> supported_capabilities() {
  std::vector<std::string> out;
  for (int c = 0; c < kCount; ++c) {
    if (usable(c)) out.emplace_back(kNames[c]);
  }
  return out;
}

std::string capability() { return kNames[active().load()]; }

void set_capability(const std::string& name) {
  const int c = parse(name);
  const std::string reason = unusable_reason(c, name);
  if (!reason.empty()) {
    throw std::invalid_argument("cannot use the '" + name + "' CPU kernels: " + reason + " (usable here: " +
                                usable_list() + ")");
  }
  active().store(c);
}

std::string capability_warning() { return selection().warning; }

}  // namespace fused_sam::cpu

TORCH_LIBRARY_IMPL(fused_sam, CPU, m) {
  m.impl("sq_norm_partials", &fused_sam::cpu::sq_norm_partials_cpu);
  m.impl("perturb", &fused_sam::cpu::perturb_cpu);
  m.impl("restore", &fused_sam::cpu::restore_cpu);
  m.impl("restore_update", &fused_sam::cpu::restore_update_cpu);
}
