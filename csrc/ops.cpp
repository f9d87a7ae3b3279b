// ops.cpp: the fused_sam operator schemas, their Meta (fake-tensor) implementations, and the Python module
// fused_sam._C (importing it registers the operators with the dispatcher).
//
// Every operator mutates flat 1-D buffers in place and returns nothing; mutated arguments carry alias
// annotations (Tensor(a!)) so functionalization (torch.compile) and torch.library.opcheck see the
// mutation. The restore point is exactly one of ``backup`` (a copy of the weights in their dtype) and
// ``master`` (a float32 master copy of bfloat16/float16 weights, which the weights are the rounding of).
// The per-step values (step, grad_scale, found_inf) are float32 tensors of one element on the
// weights' device, read by the kernels themselves, so a CUDA step never syncs with the host. So are the
// optional trailing ``lr_tensor`` / ``rho_tensor`` (capturable=True: float64, one element, on the weights'
// device), which replace the ``lr`` / ``rho`` floats (then unused) so a replayed CUDA graph reads the
// values a scheduler wrote in place; the results are bit for bit those of the same value as a float.
// CPU implementations: cpu_kernels.cpp; CUDA: cuda_kernels.cu.
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include "fused_sam_math.h"
#include "op_checks.h"

namespace fused_sam {
namespace {

// Meta kernels check what can be checked without data and write nothing (the ops return nothing).
void sq_norm_partials_meta(const at::Tensor& grads, const at::Tensor& weights,
                           const std::optional<at::Tensor>& master, bool, double, const at::Tensor& out) {
  check_sq_norm_args(grads, weights, master, out, -1);
}

void perturb_meta(const at::Tensor& weights, const at::Tensor& grads, const std::optional<at::Tensor>& backup,
                  const std::optional<at::Tensor>& master, const std::optional<at::Tensor>& partials,
                  const std::optional<at::Tensor>& nonfinite_count, const std::optional<at::Tensor>& grad_scale,
                  double, bool, double, bool, double, const std::optional<at::Tensor>& rho_tensor) {
  check_perturb_args(weights, grads, backup, master, partials, nonfinite_count, grad_scale, rho_tensor);
}

void restore_meta(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                  const std::optional<at::Tensor>& master) {
  check_restore_args(weights, backup, master);
}

void restore_sgd_meta(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                      const std::optional<at::Tensor>& master, const at::Tensor& grads,
                      const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& step,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      double, double momentum, double, double, bool, bool,
                      const std::optional<at::Tensor>& lr_tensor) {
  check_sgd_args(weights, backup, master, grads, momentum_buffer, step, grad_scale, found_inf, momentum, lr_tensor);
}

void restore_adam_meta(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                       const std::optional<at::Tensor>& master, const at::Tensor& grads, const at::Tensor& exp_avg,
                       const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
                       const at::Tensor& step, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, double, double, double, double, double, bool,
                       bool, const std::optional<at::Tensor>& lr_tensor) {
  check_adam_args(weights, backup, master, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, step, grad_scale,
                  found_inf, lr_tensor);
}

}  // namespace
}  // namespace fused_sam

TORCH_LIBRARY(fused_sam, m) {
  m.def(
      "sq_norm_partials(Tensor grads, Tensor weights, Tensor? master, bool adaptive, float eta, Tensor(a!) out) "
      "-> ()");
  m.def(
      "perturb(Tensor(a!) weights, Tensor grads, Tensor(b!)? backup, Tensor? master, Tensor? partials, "
      "Tensor(c!)? nonfinite_count, Tensor? grad_scale, float rho, bool adaptive, float eta, bool normalize, "
      "float eps, Tensor? rho_tensor=None) -> ()");
  m.def("restore(Tensor(a!) weights, Tensor? backup, Tensor? master) -> ()");
  m.def(
      "restore_sgd(Tensor(a!) weights, Tensor? backup, Tensor(b!)? master, Tensor grads, "
      "Tensor(c!)? momentum_buffer, Tensor step, Tensor? grad_scale, Tensor? found_inf, float lr, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool maximize, Tensor? lr_tensor=None) -> ()");
  m.def(
      "restore_adam(Tensor(a!) weights, Tensor? backup, Tensor(b!)? master, Tensor grads, Tensor(c!) exp_avg, "
      "Tensor(d!) exp_avg_sq, Tensor(e!)? max_exp_avg_sq, Tensor step, Tensor? grad_scale, Tensor? found_inf, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool maximize, "
      "Tensor? lr_tensor=None) -> ()");
}

TORCH_LIBRARY_IMPL(fused_sam, Meta, m) {
  m.impl("sq_norm_partials", &fused_sam::sq_norm_partials_meta);
  m.impl("perturb", &fused_sam::perturb_meta);
  m.impl("restore", &fused_sam::restore_meta);
  m.impl("restore_sgd", &fused_sam::restore_sgd_meta);
  m.impl("restore_adam", &fused_sam::restore_adam_meta);
}

// --- the Python module ------------------------------------------------------------------------------------

#ifndef FUSED_SAM_WITH_CUDA
#define FUSED_SAM_WITH_CUDA 0
#endif
#ifndef FUSED_SAM_CUDA_REQUIRED
#define FUSED_SAM_CUDA_REQUIRED 0
#endif

// views_intact(params, data_ptrs, grad_views) -> bool: does every parameter still store its data at the
// expected address and hold the expected tensor as its .grad? The optimizer asks this twice per SAM step for
// every parameter; in Python that costs ~0.15 us per parameter, here a few ns. Anything unexpected answers
// False, and the optimizer's Python path then works out what changed and reports it.
static PyObject* views_intact(PyObject*, PyObject* args) {
  PyObject *params, *data_ptrs, *grad_views;
  if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &params, &PyList_Type, &data_ptrs, &PyList_Type,
                        &grad_views)) {
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (PyList_GET_SIZE(data_ptrs) != n || PyList_GET_SIZE(grad_views) != n) {
    PyErr_SetString(PyExc_ValueError, "views_intact: params, data_ptrs and grad_views differ in length");
    return nullptr;
  }
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* param = PyList_GET_ITEM(params, i);
      PyObject* view = PyList_GET_ITEM(grad_views, i);
      if (!THPVariable_Check(param) || !THPVariable_Check(view)) Py_RETURN_FALSE;
      const at::Tensor& p = THPVariable_Unpack(param);
      void* expected = PyLong_AsVoidPtr(PyList_GET_ITEM(data_ptrs, i));
      if (expected == nullptr && PyErr_Occurred()) return nullptr;
      if (p.layout() != at::kStrided || p.data_ptr() != expected) Py_RETURN_FALSE;
      const at::Tensor& g = p.grad();
      if (!g.defined() || g.unsafeGetTensorImpl() != THPVariable_Unpack(view).unsafeGetTensorImpl()) {
        Py_RETURN_FALSE;
      }
    }
  } catch (...) {  // e.g. a tensor without storage: not our view
    Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

static PyMethodDef fused_sam_methods[] = {
    {"views_intact", views_intact, METH_VARARGS,
     "views_intact(params, data_ptrs, grad_views) -> bool: parameters and gradients are still the flat views"},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef fused_sam_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "fused_sam's compiled operators (torch.ops.fused_sam.*), registered on import.",
    -1,
    fused_sam_methods,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&fused_sam_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "CPU_NORM_CHUNK", fused_sam::CPU_NORM_CHUNK) < 0 ||
      PyModule_AddIntConstant(m, "CPU_STREAM_MIN_ELEMS", fused_sam::CPU_STREAM_MIN_ELEMS) < 0 ||
      PyModule_AddIntConstant(m, "CUDA_NORM_BLOCK_ELEMS", fused_sam::CUDA_NORM_BLOCK_ELEMS) < 0 ||
      PyModule_AddIntConstant(m, "CUDA_NORM_MAX_BLOCKS", fused_sam::CUDA_NORM_MAX_BLOCKS) < 0 ||
      PyModule_AddIntConstant(m, "WITH_CUDA", FUSED_SAM_WITH_CUDA) < 0 ||
      PyModule_AddIntConstant(m, "CUDA_REQUIRED_AT_BUILD", FUSED_SAM_CUDA_REQUIRED) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
