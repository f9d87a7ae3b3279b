// op_checks.h: host-side argument checks shared by the CPU, CUDA and Meta implementations of the
// fused_sam operators, the unpacking of the step tensors for the kernels, and the choice of the restore
// point (backup or float32 master). (The per-element math lives in fused_sam_math.h.)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <optional>
#include <type_traits>

#include "fused_sam_math.h"

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

// Master weights: a float32 copy of bfloat16/float16 weights, contiguous, 1-D, like the weights.
inline void check_master(const at::Tensor& master, const at::Tensor& weights, const char* op) {
  const auto dt = weights.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf, "fused_sam::", op,
              ": master weights are for bfloat16 or float16 weights, got ", dt, " weights");
  check_span_tensor(master, weights, at::kFloat, "master", op);
}

// The restore point: exactly one of ``backup`` (in the weights' dtype) and ``master`` (float32).
inline void check_restore_point(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                                const std::optional<at::Tensor>& master, const char* op) {
  TORCH_CHECK(backup.has_value() != master.has_value(), "fused_sam::", op,
              ": pass exactly one of backup and master, got ", backup.has_value() ? "both" : "neither");
  if (backup.has_value()) {
    check_span_tensor(*backup, weights, weights.scalar_type(), "backup", op);
  } else {
    check_master(*master, weights, op);
  }
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

// A per-step value the kernels read (the step count, GradScaler's scale or found_inf): a float32 tensor of
// exactly one element on the weights' device.
inline void check_step_scalar(const at::Tensor& t, const at::Tensor& weights, const char* name, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fused_sam::", op, ": ", name, " must be a float32 tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.sym_numel() == 1, "fused_sam::", op, ": ", name, " must have exactly one element, got ",
              t.sym_numel());
  TORCH_CHECK(t.device() == weights.device(), "fused_sam::", op, ": ", name, " is on ", t.device(),
              ", the weights on ", weights.device());
}

inline void check_optional_step_scalar(const std::optional<at::Tensor>& t, const at::Tensor& weights,
                                       const char* name, const char* op) {
  if (t.has_value()) check_step_scalar(*t, weights, name, op);
}

// A hyperparameter on the device (lr or rho with capturable=True; the op's float argument is then unused),
// or LookSAM's reuse_scale: absent, or a float64 tensor of exactly one element on the weights' device.
inline void check_optional_hyperparameter(const std::optional<at::Tensor>& t, const at::Tensor& weights,
                                          const char* name, const char* op) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == at::kDouble, "fused_sam::", op, ": ", name, " must be a float64 tensor, got ",
              t->scalar_type());
  TORCH_CHECK(t->sym_numel() == 1, "fused_sam::", op, ": ", name, " must have exactly one element, got ",
              t->sym_numel());
  TORCH_CHECK(t->device() == weights.device(), "fused_sam::", op, ": ", name, " is on ", t->device(),
              ", the weights on ", weights.device());
}

inline void check_step_values(const at::Tensor& step, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& lr_tensor,
                              const at::Tensor& weights, const char* op) {
  check_step_scalar(step, weights, "step", op);
  check_optional_step_scalar(grad_scale, weights, "grad_scale", op);
  check_optional_step_scalar(found_inf, weights, "found_inf", op);
  check_optional_hyperparameter(lr_tensor, weights, "lr_tensor", op);
}

// LookSAM's reuse step: both or neither of ``reused`` (g_v, in the math dtype, like the weights) and
// ``reuse_scale`` (c).
inline void check_reuse(const std::optional<at::Tensor>& reused, const std::optional<at::Tensor>& reuse_scale,
                        const at::Tensor& weights, const char* op) {
  TORCH_CHECK(reused.has_value() == reuse_scale.has_value(), "fused_sam::", op,
              ": pass both reused and reuse_scale or neither, got only ",
              reused.has_value() ? "reused" : "reuse_scale");
  if (reused.has_value()) check_span_tensor(*reused, weights, state_dtype(weights.scalar_type()), "reused", op);
  check_optional_hyperparameter(reuse_scale, weights, "reuse_scale", op);
}

// The data pointer of an optional float32 tensor (host or device memory), null when absent.
inline const float* optional_float_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

// The data pointer of an optional float64 tensor (host or device memory), null when absent.
inline const double* optional_double_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<double>() : nullptr;
}

// Pointers to checked step tensors (and the learning rate on the device and LookSAM's reuse_scale, if any),
// for kernels that read the values themselves.
inline StepValues step_values(const at::Tensor& step, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& lr_tensor,
                              const std::optional<at::Tensor>& reuse_scale) {
  return StepValues{step.const_data_ptr<float>(), optional_float_ptr(grad_scale), optional_float_ptr(found_inf),
                    optional_double_ptr(lr_tensor), optional_double_ptr(reuse_scale)};
}

inline void check_sq_norm_args(const at::Tensor& grads, const at::Tensor& weights,
                               const std::optional<at::Tensor>& master, const at::Tensor& out,
                               int64_t expected_len) {
  check_weights(weights, "sq_norm_partials");
  check_span_tensor(grads, weights, weights.scalar_type(), "grads", "sq_norm_partials");
  if (master.has_value()) check_master(*master, weights, "sq_norm_partials");
  check_partials(out, weights, "out", "sq_norm_partials");
  TORCH_CHECK(expected_len < 0 || out.numel() == expected_len, "fused_sam::sq_norm_partials: out has ",
              out.sym_numel(), " elements; a span of ", weights.sym_numel(), " elements on ", weights.device(),
              " writes ", expected_len, " partials");
}

// Telemetry sums (perturb's, restore_update's): float32 or float64 (float64 for float64 weights), on the
// weights' device.
inline void check_sums_device_and_dtype(const at::Tensor& sums, const at::Tensor& weights, const char* op) {
  TORCH_CHECK(sums.device() == weights.device(), "fused_sam::", op, ": sums is on ", sums.device(),
              ", the weights on ", weights.device());
  TORCH_CHECK(sums.scalar_type() == at::kFloat || sums.scalar_type() == at::kDouble, "fused_sam::", op,
              ": sums must be float32 or float64, got ", sums.scalar_type());
  TORCH_CHECK(weights.scalar_type() != at::kDouble || sums.scalar_type() == at::kDouble, "fused_sam::", op,
              ": sums of float64 weights must be float64, got ", sums.scalar_type());
}

// perturb's arguments; ``sums`` (telemetry), if given, a contiguous 1-D float32 or float64 tensor (float64 for
// float64 weights) on the weights' device of ``sums_len`` elements, the span's partials count (not checked
// when negative: the Meta kernel does not know the device the span will run on).
inline void check_perturb_args(const at::Tensor& weights, const at::Tensor& grads,
                               const std::optional<at::Tensor>& backup, const std::optional<at::Tensor>& master,
                               const std::optional<at::Tensor>& partials,
                               const std::optional<at::Tensor>& nonfinite_count,
                               const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& rho_tensor, const std::optional<at::Tensor>& sums,
                               int64_t sums_len) {
  check_weights(weights, "perturb");
  check_optional_step_scalar(grad_scale, weights, "grad_scale", "perturb");
  check_optional_hyperparameter(rho_tensor, weights, "rho_tensor", "perturb");
  check_span_tensor(grads, weights, weights.scalar_type(), "grads", "perturb");
  check_restore_point(weights, backup, master, "perturb");
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
  if (sums.has_value()) {
    const at::Tensor& t = *sums;
    check_sums_device_and_dtype(t, weights, "perturb");
    TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "fused_sam::perturb: sums must be a contiguous 1-D tensor, got "
                "shape ", t.sym_sizes(), " strides ", t.sym_strides());
    TORCH_CHECK(sums_len < 0 || t.sym_numel() == sums_len, "fused_sam::perturb: sums has ", t.sym_numel(),
                " elements; a span of ", weights.sym_numel(), " elements on ", weights.device(), " writes ",
                sums_len);
  }
}

inline void check_restore_args(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                               const std::optional<at::Tensor>& master) {
  check_weights(weights, "restore");
  check_restore_point(weights, backup, master, "restore");
}

// restore_update's telemetry sums: a contiguous (rows, 3) tensor as check_sums_device_and_dtype says, ``rows``
// the span's partials count (not checked when negative: the Meta kernel does not know the device the span
// will run on).
inline void check_telemetry_sums(const at::Tensor& sums, const at::Tensor& weights, int64_t rows, const char* op) {
  check_sums_device_and_dtype(sums, weights, op);
  TORCH_CHECK(sums.dim() == 2 && sums.sym_size(1) == 3 && sums.is_contiguous(), "fused_sam::", op,
              ": sums must be a contiguous tensor of shape (rows, 3), got shape ", sums.sym_sizes(), " strides ",
              sums.sym_strides());
  TORCH_CHECK(rows < 0 || sums.sym_size(0) == rows, "fused_sam::", op, ": sums has ", sums.sym_size(0),
              " rows; a span of ", weights.sym_numel(), " elements on ", weights.device(), " writes ", rows);
}

// One base update (restore_update): ``kind`` a code of FUSED_SAM_BASE_KINDS, ``state`` as many buffers as that
// base runs with (in the math dtype, like the weights), ``hyperparameters`` and ``flags`` as many as it takes;
// ``sums`` (telemetry), if given, ``sums_rows`` rows (see check_telemetry_sums).
inline void check_update_args(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                              const std::optional<at::Tensor>& master, const at::Tensor& grads, at::TensorList state,
                              const at::Tensor& step, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& reused,
                              const std::optional<at::Tensor>& reuse_scale, int64_t kind, int64_t flags,
                              at::ArrayRef<double> hyperparameters, const std::optional<at::Tensor>& lr_tensor,
                              const std::optional<at::Tensor>& sums, int64_t sums_rows) {
  const char* op = "restore_update";
  check_weights(weights, op);
  check_step_values(step, grad_scale, found_inf, lr_tensor, weights, op);
  check_restore_point(weights, backup, master, op);
  check_span_tensor(grads, weights, weights.scalar_type(), "grads", op);
  check_reuse(reused, reuse_scale, weights, op);
  TORCH_CHECK(kind >= 0 && kind < kBaseKindCount, "fused_sam::restore_update: unknown base update kind ", kind,
              " (this build knows ", static_cast<int64_t>(kBaseKindCount), ")");
  with_base_kind(kind, [&](auto base) {
    using Kind = decltype(base);
    TORCH_CHECK(Kind::valid_state_count(static_cast<int>(state.size())), "fused_sam::restore_update: base kind ",
                kind, " does not run with ", state.size(), " state buffers");
    TORCH_CHECK(static_cast<int64_t>(hyperparameters.size()) == Kind::kHyperparameters,
                "fused_sam::restore_update: base kind ", kind, " takes ", Kind::kHyperparameters,
                " hyperparameters, got ", hyperparameters.size());
    TORCH_CHECK(flags >= 0 && (flags >> Kind::kFlags) == 0, "fused_sam::restore_update: base kind ", kind,
                " takes ", Kind::kFlags, " flags, got the bits ", flags);
  });
  for (const at::Tensor& buffer : state) {
    check_span_tensor(buffer, weights, state_dtype(weights.scalar_type()), "a state buffer", op);
  }
  if (sums.has_value()) check_telemetry_sums(*sums, weights, sums_rows, op);
}

// The settings an update's kernels read (checked by check_update_args).
inline UpdateSettings update_settings(double lr, int64_t flags, at::ArrayRef<double> hyperparameters) {
  UpdateSettings s{};
  s.lr = lr;
  s.flags = flags;
  for (size_t i = 0; i < hyperparameters.size(); ++i) s.hyper[i] = hyperparameters[i];
  return s;
}

// --- the restore point ----------------------------------------------------------------------------------
// Where the kernels read w: the backup in the parameter dtype (``elem_t``: the type the kernels load it
// as), read only; or with master weights (MASTER) the float32 master, which the updates also write back.
template <typename elem_t, bool MASTER>
using point_t = std::conditional_t<MASTER, float, const elem_t>;

template <typename elem_t, bool MASTER>
inline point_t<elem_t, MASTER>* point_ptr(const std::optional<at::Tensor>& backup,
                                         const std::optional<at::Tensor>& master) {
  if constexpr (MASTER) {
    return master->mutable_data_ptr<float>();
  } else {
    return static_cast<const elem_t*>(backup->const_data_ptr());
  }
}

// Runs ``body(std::bool_constant<MASTER>{})``, MASTER telling whether the span has master weights, so that
// a kernel chooses its restore point at compile time and the loops without a master stay as they are.
// The master variant is compiled for bfloat16/float16 only: the checks refuse a master with other weights.
template <typename scalar_t, typename Body>
inline void with_master(bool has_master, const Body& body) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    if (has_master) {
      body(std::true_type{});
      return;
    }
  }
  body(std::false_type{});
}

// Runs ``body(std::bool_constant<REUSE>{})``, REUSE telling whether the update adds LookSAM's reused
// direction, so that the update loops without one stay as they are.
template <typename Body>
inline void with_reuse(bool reuse, const Body& body) {
  if (reuse) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

}  // namespace fused_sam
