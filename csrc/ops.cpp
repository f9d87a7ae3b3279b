// ops.cpp: the fused_sam operator schemas, their Meta (fake-tensor) implementations, and the Python module
// fused_sam._C (importing it registers the operators with the dispatcher).
//
// Every operator mutates flat 1-D buffers in place and returns nothing; mutated arguments carry alias
// annotations (Tensor(a!)) so functionalization (torch.compile) and torch.library.opcheck see the
// mutation. The restore point is exactly one of ``backup`` (a copy of the weights in their dtype) and
// ``master`` (a float32 master copy of bfloat16/float16 weights, which the weights are the rounding of).
// The per-step values (step, grad_scale, found_inf) are float32 tensors of one element on the
// weights' device, read by the kernels themselves, so a CUDA step never syncs with the host.
// lr and rho come last in their operator, one way in both: ``float lr, Tensor? lr_tensor`` (``float rho, Tensor?
// rho_tensor``): the tensor, when given (capturable=True: float64, one element, on the weights' device),
// replaces the float (then unused), so a replayed CUDA graph reads the value a scheduler wrote in place; the
// results are bit for bit those of the same value as a float.
// restore_update runs one fused base update: ``kind`` its code (FUSED_SAM_BASE_KINDS in fused_sam_math.h, the
// ``code`` of fused_sam/updates.py), ``state`` the buffers it keeps (its ``needed_state()``, in order),
// ``hyperparameters`` its float settings in the order updates.py declares them, ``flags`` its bool settings as
// bits. Its ``reused`` / ``reuse_scale`` (both or neither) are LookSAM's reuse step: the update's gradient is
// grads + c * reused (reused in the math dtype, c float64 with one element on the weights' device, rounded once
// to the math dtype), formed in registers: grads is not written. Its optional ``sums`` (telemetry, last) receives
// per partial row the sums of e^2, e * g2 and g2^2 (e the weights on entry minus the restore point, g2 the
// unscaled gradient), whatever found_inf says; without it the kernels are the ones without telemetry.
// perturb's optional ``sums`` (telemetry, last) receives per partial the sum of e * g (e the weights as it
// writes them minus the restore point, g the gradient as given), zeros when the norm is not finite.
// CPU implementations: cpu_ops.cpp (kernels: cpu_kernels.cpp, one build per instruction set); CUDA:
// cuda_kernels.cu.
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu_kernels.h"
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
                  bool, double, bool, double, double, const std::optional<at::Tensor>& rho_tensor,
                  const std::optional<at::Tensor>& sums) {
  check_perturb_args(weights, grads, backup, master, partials, nonfinite_count, grad_scale, rho_tensor, sums, -1);
}

void restore_meta(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                  const std::optional<at::Tensor>& master) {
  check_restore_args(weights, backup, master);
}

void restore_update_meta(const at::Tensor& weights, const std::optional<at::Tensor>& backup,
                         const std::optional<at::Tensor>& master, const at::Tensor& grads, at::TensorList state,
                         const at::Tensor& step, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& reused,
                         const std::optional<at::Tensor>& reuse_scale, int64_t kind, int64_t flags,
                         at::ArrayRef<double> hyperparameters, double, const std::optional<at::Tensor>& lr_tensor,
                         const std::optional<at::Tensor>& sums) {
  check_update_args(weights, backup, master, grads, state, step, grad_scale, found_inf, reused, reuse_scale, kind,
                    flags, hyperparameters, lr_tensor, sums, -1);
}

}  // namespace
}  // namespace fused_sam

TORCH_LIBRARY(fused_sam, m) {
  m.def(
      "sq_norm_partials(Tensor grads, Tensor weights, Tensor? master, bool adaptive, float eta, Tensor(a!) out) "
      "-> ()");
  m.def(
      "perturb(Tensor(a!) weights, Tensor grads, Tensor(b!)? backup, Tensor? master, Tensor? partials, "
      "Tensor(c!)? nonfinite_count, Tensor? grad_scale, bool adaptive, float eta, bool normalize, float eps, "
      "float rho, Tensor? rho_tensor, Tensor(d!)? sums=None) -> ()");
  m.def("restore(Tensor(a!) weights, Tensor? backup, Tensor? master) -> ()");
  m.def(
      "restore_update(Tensor(a!) weights, Tensor? backup, Tensor(b!)? master, Tensor grads, Tensor(c!)[] state, "
      "Tensor step, Tensor? grad_scale, Tensor? found_inf, Tensor? reused, Tensor? reuse_scale, int kind, int flags, "
      "float[] hyperparameters, float lr, Tensor? lr_tensor, Tensor(d!)? sums=None) -> ()");
}

TORCH_LIBRARY_IMPL(fused_sam, Meta, m) {
  m.impl("sq_norm_partials", &fused_sam::sq_norm_partials_meta);
  m.impl("perturb", &fused_sam::perturb_meta);
  m.impl("restore", &fused_sam::restore_meta);
  m.impl("restore_update", &fused_sam::restore_update_meta);
}

// --- the Python module ------------------------------------------------------------------------------------

#ifndef FUSED_SAM_CHECK_CONTRACTS
#define FUSED_SAM_CHECK_CONTRACTS 0
#endif
#ifndef FUSED_SAM_WITH_CUDA
#define FUSED_SAM_WITH_CUDA 0
#endif
#ifndef FUSED_SAM_CUDA_REQUIRED
#define FUSED_SAM_CUDA_REQUIRED 0
#endif
// The CUDA images built (setup.py, from nvcc's -gencode flags): comma-separated cubins sm_XY and PTX compute_XY.
#ifndef FUSED_SAM_CUDA_ARCHS
#define FUSED_SAM_CUDA_ARCHS
#endif
#define FUSED_SAM_STRINGIFY(...) #__VA_ARGS__
#define FUSED_SAM_EXPAND_STRINGIFY(...) FUSED_SAM_STRINGIFY(__VA_ARGS__)

// views_intact(params, data_ptrs, grad_views) -> bool: does every parameter still store its data at the
// expected address (``data_ptrs``: the addresses packed as native void*, bytes) and hold the expected tensor as
// its .grad? The optimizer asks this twice per SAM step for every parameter: ~10 ns per parameter with warm
// caches (Python: ~150 ns). Anything unexpected answers False, and the optimizer's Python path then works out
// what changed and reports it.
// Between steps, the step's own buffers (and the training step's activations) evict these objects from the
// caches, and each parameter is a chain of dependent misses (object -> TensorImpl -> storage, autograd meta
// -> .grad). So one pass walks the parameters with each link prefetched a few parameters ahead of the one
// that needs it (objects 3D ahead, TensorImpls 2D, storage and autograd meta D): the misses of many
// parameters overlap. 1000 parameters on a shared 2-core EPYC VM, medians, against the three separate passes
// over a list of Python ints this replaces: right after a SAM step 8-11 us (15-19), after a 128 MiB copy
// 25-46 us (37-68).
static PyObject* views_intact(PyObject*, PyObject* args) {
  constexpr Py_ssize_t D = 8;
  PyObject *params, *data_ptrs, *grad_views;
  if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &params, &PyBytes_Type, &data_ptrs, &PyList_Type,
                        &grad_views)) {
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (PyBytes_GET_SIZE(data_ptrs) != n * static_cast<Py_ssize_t>(sizeof(void*)) ||
      PyList_GET_SIZE(grad_views) != n) {
    PyErr_SetString(PyExc_ValueError, "views_intact: params, data_ptrs and grad_views differ in length");
    return nullptr;
  }
  const char* expected = PyBytes_AS_STRING(data_ptrs);
  PyObject* const* param_objects = reinterpret_cast<PyListObject*>(params)->ob_item;
  PyObject* const* view_objects = reinterpret_cast<PyListObject*>(grad_views)->ob_item;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (i + 3 * D < n) {
        for (PyObject* object : {param_objects[i + 3 * D], view_objects[i + 3 * D]}) {
          __builtin_prefetch(object);
          __builtin_prefetch(reinterpret_cast<const char*>(object) + 64);
        }
      }
      // Only an exact Tensor or Parameter is unpacked ahead: anything else is refused below.
      if (i + 2 * D < n && THPVariable_CheckExact(param_objects[i + 2 * D])) {
        const auto* impl = reinterpret_cast<const char*>(
            THPVariable_Unpack(param_objects[i + 2 * D]).unsafeGetTensorImpl());
        for (size_t line = 0; line < sizeof(c10::TensorImpl); line += 64) __builtin_prefetch(impl + line);
      }
      if (i + D < n && THPVariable_CheckExact(param_objects[i + D])) {
        const c10::TensorImpl* impl = THPVariable_Unpack(param_objects[i + D]).unsafeGetTensorImpl();
        __builtin_prefetch(impl->unsafe_storage().unsafeGetStorageImpl());
        __builtin_prefetch(impl->autograd_meta());
      }
      if (!THPVariable_Check(param_objects[i]) || !THPVariable_Check(view_objects[i])) Py_RETURN_FALSE;
      const c10::TensorImpl* impl = THPVariable_Unpack(param_objects[i]).unsafeGetTensorImpl();
      void* address;
      std::memcpy(&address, expected + i * sizeof(void*), sizeof(void*));
      if (impl->layout() != at::kStrided || impl->data() != address) Py_RETURN_FALSE;
      const at::Tensor& g = impl->grad();  // not Tensor::grad(), which also asks autograd is_leaf()
      if (!g.defined() || g.unsafeGetTensorImpl() != THPVariable_Unpack(view_objects[i]).unsafeGetTensorImpl()) {
        Py_RETURN_FALSE;
      }
    }
  } catch (...) {  // e.g. a tensor without storage, or an isinstance that raised: not our view
    PyErr_Clear();
    Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

static PyObject* string_tuple(const std::vector<std::string>& names) {
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(names.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) {
    PyObject* name = PyUnicode_FromString(names[i].c_str());
    if (name == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), name);
  }
  return out;
}

static PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(fused_sam::cpu::capability().c_str());
}

static PyObject* cpu_capabilities(PyObject*, PyObject*) {
  return string_tuple(fused_sam::cpu::supported_capabilities());
}

static PyObject* set_cpu_capability(PyObject*, PyObject* args) {
  const char* name;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  try {
    fused_sam::cpu::set_capability(name);
  } catch (const std::invalid_argument& exc) {
    PyErr_SetString(PyExc_ValueError, exc.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

static PyMethodDef fused_sam_methods[] = {
    {"views_intact", views_intact, METH_VARARGS,
     "views_intact(params, data_ptrs: bytes, grad_views) -> bool: parameters and gradients are still the flat views"},
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "cpu_capability() -> str: the instruction set of the CPU kernels in use (default or avx2)"},
    {"cpu_capabilities", cpu_capabilities, METH_NOARGS,
     "cpu_capabilities() -> tuple[str, ...]: the instruction sets built that this CPU runs"},
    {"set_cpu_capability", set_cpu_capability, METH_VARARGS,
     "set_cpu_capability(name): use the CPU kernels of that instruction set (ValueError if unknown, not built, "
     "or this CPU lacks it)"},
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
      PyModule_AddIntConstant(m, "CUDA_REQUIRED_AT_BUILD", FUSED_SAM_CUDA_REQUIRED) < 0 ||
      PyModule_AddIntConstant(m, "CONTRACT_CHECKS", FUSED_SAM_CHECK_CONTRACTS) < 0 ||
      PyModule_AddStringConstant(m, "CUDA_ARCHS", FUSED_SAM_EXPAND_STRINGIFY(FUSED_SAM_CUDA_ARCHS)) < 0 ||
      PyModule_AddObject(m, "CPU_CAPABILITIES_BUILT", string_tuple(fused_sam::cpu::built_capabilities())) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  // The instruction set is chosen now; a FUSED_SAM_CPU_CAPABILITY this CPU (or build) cannot follow is a
  // warning, not an error: the best usable kernels run instead.
  const std::string warning = fused_sam::cpu::capability_warning();
  if (!warning.empty() && PyErr_WarnEx(PyExc_RuntimeWarning, warning.c_str(), 1) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
