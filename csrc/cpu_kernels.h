// cpu_kernels.h: the interface between the CPU operators (cpu_ops.cpp: argument checks, step values, the
// choice of instruction set) and the CPU kernels (cpu_kernels.cpp, compiled once per instruction set into
// its own namespace fused_sam::cpu::<ISA>). The kernels see raw pointers to checked buffers: elements of
// the weights' dtype (bfloat16/float16 as c10::BFloat16/c10::Half), the float32 master, and state and
// LookSAM's reused direction in the math dtype (float64 for float64 weights, else float32).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

#include "fused_sam_math.h"

namespace fused_sam::cpu {

struct NormCall {
  at::ScalarType dtype;
  int64_t n;
  const void* grads;
  const void* weights;  // ASAM's w, unless master is given
  const float* master;  // null: no master weights
  bool adaptive;
  double eta;
  void* out;            // cpu_partials_len(n) partials
  bool out_double;      // float64 partials, else float32
};

// The perturbation's scale is computed by the operator (in the math type, then widened to double: exact).
// With ``sums`` (only when ``finite``: the operator zeroes them otherwise) it also writes the telemetry sums.
struct PerturbCall {
  at::ScalarType dtype;
  int64_t n;
  void* weights;
  const void* grads;
  void* backup;         // null with master weights
  const float* master;  // null: backup <- w, w <- w + e; else w <- rounding(master + e)
  double scale;
  bool finite;
  bool adaptive;
  double eta;
  void* sums;        // telemetry: cpu_partials_len(n) sums of e * g (e as written), or null
  bool sums_double;  // float64 sums, else float32
};

// w <- the backup bit for bit, or the rounding of the master (exactly one of them given).
struct RestoreCall {
  at::ScalarType dtype;
  int64_t n;
  void* weights;
  const void* backup;
  const float* master;
};

// One base update (of the base ``kind``, fused_sam_math.h's FUSED_SAM_BASE_KINDS): it computes its
// coefficients from the settings and the step values (host pointers on CPU). With ``sums`` it also writes the
// telemetry sums, skipped update or not (then it only restores w).
struct UpdateCall {
  at::ScalarType dtype;
  int64_t n;
  void* weights;
  const void* backup;  // null with master weights (may be the weights themselves: a plain step)
  float* master;
  const void* grads;
  const void* reused;  // LookSAM's g_v, or null
  int64_t kind;
  int nstate;                        // the state buffers this update reads and writes, in the base's order
  void* state[kMaxStateBuffers];     // in the math dtype
  UpdateSettings settings;
  StepValues values;
  void* sums;        // telemetry: cpu_partials_len(n) rows of (e^2, e * g2, g2^2), or null
  bool sums_double;  // float64 sums, else float32
};

struct Kernels {
  void (*sq_norm_partials)(const NormCall&);
  void (*perturb)(const PerturbCall&);
  void (*restore)(const RestoreCall&);
  void (*restore_update)(const UpdateCall&);
};

// One table per build of cpu_kernels.cpp. DEFAULT always exists; setup.py builds AVX2 on x86-64 and then
// defines FUSED_SAM_CPU_AVX2 for the operators.
namespace DEFAULT {
Kernels kernels();
}
namespace AVX2 {
Kernels kernels();
}

// The instruction set the CPU operators run (cpu_ops.cpp). Names: "default", "avx2".
std::vector<std::string> built_capabilities();      // compiled into this build, in increasing order
std::vector<std::string> supported_capabilities();  // of those, the ones this CPU runs
std::string capability();                           // the one in use
// Switches to ``name``; throws std::invalid_argument for an unknown name, or one this CPU (or build) lacks.
void set_capability(const std::string& name);
// Why the FUSED_SAM_CPU_CAPABILITY environment variable was not followed (empty if it was, or is unset).
std::string capability_warning();

}  // namespace fused_sam::cpu
