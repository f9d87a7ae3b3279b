// op_checks.h: host-side argument checks shared by the CPU, CUDA and Meta implementations of the
// fused_sam operators. (The per-element math lives in fused_sam_math.h.)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fused_sam {

// The dtype optimizer state and math use for parameters of ``dtype``.
inline at::ScalarType state_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_param_dtype(const at::Tensor& weights, const char* op) {
  auto dt = weights.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "fused_sam::", op, ": parameters must be float32, float64, bfloat16 or float16, got ", dt);
}

// ``t`` is a contiguous 1-D tensor like ``like`` (device, numel), of ``dtype``.
inline void check_span_tensor(const at::Tensor& t, const at::Tensor& like, at::ScalarType dtype,
                              const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "fused_sam::", op, ": ", name,
              " must be a contiguous 1-D tensor, got shape ", t.sizes(), " strides ", t.strides());
  // sym_numel: the Meta kernels run these checks on fake tensors with symbolic sizes too.
  TORCH_CHECK(t.sym_numel() == like.sym_numel(), "fused_sam::", op, ": ", name, " has ", t.sym_numel(),
              " elements, the weights ", like.sym_numel());
  TORCH_CHECK(t.device() == like.device(), "fused_sam::", op, ": ", name, " is on ", t.device(),
              ", the weights on ", like.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fused_sam::", op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

inline void check_weights(const at::Tensor& weights, const char* op) {
  check_param_dtype(weights, op);
  TORCH_CHECK(weights.dim() == 1 && weights.is_contiguous(), "fused_sam::", op,
              ": weights must be a contiguous 1-D tensor, got shape ", weights.sizes());
}

inline void check_partials(const at::Tensor& partials, const at::Tensor& weights, const char* name,
                           const char* op) {
  TORCH_CHECK(partials.dim() == 1 && partials.is_contiguous(), "fused_sam::", op, ": ", name,
              " must be a contiguous 1-D tensor");
  TORCH_CHECK(partials.scalar_type() == at::kFloat || partials.scalar_type() == at::kDouble, "fused_sam::",
              op, ": ", name, " must be float32 or float64, got ", partials.scalar_type());
  TORCH_CHECK(partials.device() == weights.device(), "fused_sam::", op, ": ", name, " is on ",
              partials.device(), ", the weights on ", weights.device());
}

inline void check_sq_norm_args(const at::Tensor& grads, const at::Tensor& weights, const at::Tensor& out,
                               int64_t expected_len) {
  check_weights(weights, "sq_norm_partials");
  check_span_tensor(grads, weights, weights.scalar_type(), "grads", "sq_norm_partials");
  check_partials(out, weights, "out", "sq_norm_partials");
  TORCH_CHECK(expected_len < 0 || out.numel() == expected_len, "fused_sam::sq_norm_partials: out has ",
              out.sym_numel(), " elements; a span of ", weights.sym_numel(), " elements on ", weights.device(),
              " writes ", expected_len, " partials");
}

inline void check_perturb_args(const at::Tensor& weights, const at::Tensor& grads, const at::Tensor& backup,
                               const std::optional<at::Tensor>& partials,
                               const std::optional<at::Tensor>& nonfinite_count) {
  check_weights(weights, "perturb");
  check_span_tensor(grads, weights, weights.scalar_type(), "grads", "perturb");
  check_span_tensor(backup, weights, weights.scalar_type(), "backup", "perturb");
  if (partials.has_value()) {
    check_partials(*partials, weights, "partials", "perturb");
    TORCH_CHECK(partials->sym_numel() >= 1, "fused_sam::perturb: partials is empty");
  }
  if (nonfinite_count.has_value()) {
    const auto& c = *nonfinite_count;
    TORCH_CHECK(c.sym_numel() == 1 && c.scalar_type() == at::kInt && c.is_contiguous(),
                "fused_sam::perturb: nonfinite_count must be an int32 tensor of one element");
    TORCH_CHECK(c.device() == weights.device(), "fused_sam::perturb: nonfinite_count is on ", c.device(),
                ", the weights on ", weights.device());
  }
}

inline void check_restore_args(const at::Tensor& weights, const at::Tensor& backup) {
  check_weights(weights, "restore");
  check_span_tensor(backup, weights, weights.scalar_type(), "backup", "restore");
}

inline void check_sgd_args(const at::Tensor& weights, const at::Tensor& backup, const at::Tensor& grads,
                           const std::optional<at::Tensor>& momentum_buffer, double momentum) {
  check_weights(weights, "restore_sgd");
  check_span_tensor(backup, weights, weights.scalar_type(), "backup", "restore_sgd");
  check_span_tensor(grads, weights, weights.scalar_type(), "grads", "restore_sgd");
  if (momentum != 0.0) {
    TORCH_CHECK(momentum_buffer.has_value(), "fused_sam::restore_sgd: momentum != 0 needs a momentum_buffer");
  }
  if (momentum_buffer.has_value()) {
    check_span_tensor(*momentum_buffer, weights, state_dtype(weights.scalar_type()), "momentum_buffer",
                      "restore_sgd");
  }
}

inline void check_adam_args(const at::Tensor& weights, const at::Tensor& backup, const at::Tensor& grads,
                            const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                            const std::optional<at::Tensor>& max_exp_avg_sq) {
  check_weights(weights, "restore_adam");
  auto sd = state_dtype(weights.scalar_type());
  check_span_tensor(backup, weights, weights.scalar_type(), "backup", "restore_adam");
  check_span_tensor(grads, weights, weights.scalar_type(), "grads", "restore_adam");
  check_span_tensor(exp_avg, weights, sd, "exp_avg", "restore_adam");
  check_span_tensor(exp_avg_sq, weights, sd, "exp_avg_sq", "restore_adam");
  if (max_exp_avg_sq.has_value()) {
    check_span_tensor(*max_exp_avg_sq, weights, sd, "max_exp_avg_sq", "restore_adam");
  }
}

}  // namespace fused_sam
