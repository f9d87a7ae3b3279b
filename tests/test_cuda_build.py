"""The CUDA build, checked without a GPU: which architectures setup.py builds for by default, which GPUs the
native backend then accepts (a pure function of the built images and the device's compute capability), and
that nvcc, given setup.py's flags, contracts no multiply-add into an FMA in the CUDA kernels (their
elementwise ops then do the CPU kernels' arithmetic, built with -ffp-contract=off)."""
from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import types

import pytest
import torch
from torch.utils import cpp_extension

from fused_sam.backends import BackendUnavailable, backend_report, resolve_backend
from fused_sam.backends import native as native_module
from fused_sam.backends.native import NativeBackend, missing_cuda_image_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_setup():
    spec = importlib.util.spec_from_file_location("fused_sam_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, builds nothing
    return module


SETUP = _load_setup()

# nvcc 13.0's architectures, and torch 2.14.1+cu130's own build
NVCC_13 = {75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121}
TORCH_CU130 = "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120"


# --- the default architecture list ------------------------------------------------------------------------

def test_default_arch_list_covers_torch_and_the_common_gpus():
    assert SETUP.default_cuda_arch_list(TORCH_CU130, NVCC_13) == "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    # torch's list unknown: the fixed minimum, PTX for its newest
    assert SETUP.default_cuda_arch_list(None, NVCC_13) == "7.5;8.0;8.6;8.9;9.0+PTX"
    # an older torch built for older GPUs too: those are built for as well
    assert (SETUP.default_cuda_arch_list("sm_50 sm_60 sm_70 sm_75 sm_80 sm_86 sm_90", None)
            == "5.0;6.0;7.0;7.5;8.0;8.6;8.9;9.0+PTX")
    # architecture-specific torch builds (sm_90a) count as their architecture
    assert SETUP.default_cuda_arch_list("sm_80 sm_90a compute_90", NVCC_13) == "7.5;8.0;8.6;8.9;9.0+PTX"


def test_default_arch_list_keeps_to_what_nvcc_compiles():
    """An nvcc older than torch's CUDA (no Blackwell) builds what it can; PTX moves to its newest."""
    nvcc_12_6 = {50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90}
    assert SETUP.default_cuda_arch_list(TORCH_CU130, nvcc_12_6) == "7.5;8.0;8.6;8.9;9.0+PTX"
    assert SETUP.default_cuda_arch_list(TORCH_CU130, {70}) is None


def test_default_arch_list_of_this_torch(monkeypatch):
    """The default for the installed torch holds every architecture it was built for, and torch's own
    translation (what setup.py passes to nvcc and records as the extension's CUDA_ARCHS) yields cubins for
    them and the common GPUs plus PTX for the newest."""
    torch_flags = torch._C._cuda_getArchFlags() if torch.version.cuda else None
    default = SETUP.default_cuda_arch_list(torch_flags, None)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", default)
    images = SETUP.built_cuda_archs(cpp_extension._get_cuda_arch_flags()).split(",")
    assert [a for a in images if a.startswith("compute_")] == [images[-1]]
    cubins = {a for a in images if a.startswith("sm_")}
    assert {"sm_75", "sm_80", "sm_86", "sm_89", "sm_90"} <= cubins
    assert set(torch.cuda.get_arch_list() if torch.version.cuda else []) <= cubins
    assert images[-1] == "compute_" + max((a[3:] for a in cubins), key=int)


def test_built_archs_from_gencode_flags():
    flags = ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_100,code=compute_100",
             "-gencode=arch=compute_75,code=sm_75", "-gencode=arch=compute_100,code=sm_100",
             "-gencode arch=compute_80,code=[sm_80,compute_80]"]
    assert SETUP.built_cuda_archs(flags) == "sm_75,sm_80,compute_80,sm_90,sm_100,compute_100"


def test_nvcc_flags():
    """No contraction (--fmad=false), no fast math (which would also flush denormals and approximate
    division and sqrt): the CUDA kernels round as IEEE says, like the C++ built with -ffp-contract=off."""
    assert "--fmad=false" in SETUP.NVCC_FLAGS
    assert not any("fast_math" in f or "fast-math" in f or "ftz=true" in f or "prec" in f for f in SETUP.NVCC_FLAGS)
    assert not any("arch" in f for f in SETUP.NVCC_FLAGS)  # so torch's TORCH_CUDA_ARCH_LIST handling decides


# --- which GPUs the native backend accepts ----------------------------------------------------------------

DEFAULT_IMAGES = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120", "compute_120")
OLD_DEFAULT = ("sm_80", "sm_90", "compute_90")  # setup.py's default before: "8.0;9.0+PTX"


@pytest.mark.parametrize("capability,archs,runs", [
    ((7, 5), DEFAULT_IMAGES, True),            # T4 with sm_75
    ((7, 5), OLD_DEFAULT, False),              # T4 without: PTX 9.0 is newer than the GPU
    ((7, 5), ("compute_75",), True),           # PTX of its own architecture, JIT-compiled
    ((8, 0), DEFAULT_IMAGES, True),            # A100
    ((8, 0), OLD_DEFAULT, True),
    ((8, 0), ("sm_86", "compute_90"), False),  # a cubin of a later minor does not run on 8.0
    ((8, 6), ("sm_80",), True),                # same major, later minor: the sm_80 cubin runs
    ((8, 9), ("sm_80", "sm_86"), True),
    ((9, 0), DEFAULT_IMAGES, True),            # H100
    ((9, 0), ("sm_75", "sm_80", "sm_86"), False),  # another major
    ((9, 0), ("sm_90a",), True),               # architecture-specific: this one GPU only
    ((10, 0), OLD_DEFAULT, True),              # a future GPU: the PTX
    ((10, 0), ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90"), False),  # without PTX
    ((12, 0), ("sm_100",), False),
    ((12, 1), DEFAULT_IMAGES, True),
])
def test_missing_cuda_image_reason(capability, archs, runs):
    reason = missing_cuda_image_reason(archs, capability)
    if runs:
        assert reason is None
    else:
        assert reason is not None
        major, minor = capability
        assert f"compute capability {major}.{minor}" in reason
        assert f'TORCH_CUDA_ARCH_LIST="{major}.{minor}"' in reason
        assert all(a in reason for a in archs)


def test_missing_cuda_image_reason_rejects_unknown_names():
    assert "no CUDA architecture" in missing_cuda_image_reason((), (9, 0))
    with pytest.raises(ValueError, match="sm90"):
        missing_cuda_image_reason(("sm90",), (9, 0))


def test_auto_skips_native_on_a_gpu_without_its_image(monkeypatch):
    """A bfloat16 model on a T4 with an extension built for 8.0 and 9.0+PTX: Triton refuses bfloat16 below
    8.0 and native holds no image for 7.5, so auto takes the reference backend, and backend_report says why."""
    fake = types.SimpleNamespace(WITH_CUDA=1, CUDA_ARCHS=",".join(OLD_DEFAULT))
    monkeypatch.setattr(native_module, "_C", fake)
    monkeypatch.setattr(native_module, "_IMPORT_ERROR", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    cuda = torch.device("cuda")
    assert native_module.cuda_archs() == OLD_DEFAULT
    report = backend_report(cuda, torch.bfloat16)
    assert "no CUDA kernel image for this GPU (compute capability 7.5)" in report["native"]
    assert resolve_backend("auto", cuda, torch.bfloat16).name == "reference"
    with pytest.raises(BackendUnavailable, match="compute capability 7.5"):
        resolve_backend("native", cuda, torch.bfloat16)
    fake.CUDA_ARCHS = ",".join(DEFAULT_IMAGES)
    assert NativeBackend.unavailable_reason(cuda, torch.bfloat16) is None


# --- no contracted multiply-adds in the CUDA kernels ------------------------------------------------------

# PTX floating-point multiply-adds: fma.rn.f32, fma.rn.ftz.f32, fma.rn.f64, fma.rn.bf16x2, mad.rn.f32, ...
FMA = re.compile(r"\b(?:fma|mad)(?:\.\w+)*\.(?:f16|f16x2|bf16|bf16x2|f32|f64)\b")
FUNCTION = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.(?:entry|func)\s+(?:\([^)]*\)\s*)?([\w$.]+)")


def _nvcc():
    home = SETUP._find_cuda_home()
    if home is None:
        pytest.skip("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is not a CUDA build: no CUDA headers to compile the kernels with")
    return os.path.join(home, "bin", "nvcc")


def _to_ptx(source, out, extra_flags, timeout=300):
    """nvcc ``source`` -> PTX for compute_90 (CI's architecture) with ``extra_flags``; the PTX text."""
    run = subprocess.run([_nvcc(), "-ptx", "-arch=compute_90", *extra_flags, source, "-o", str(out)],
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"nvcc failed:\n{run.stderr[-4000:]}"
    return out.read_text()


def _fmas_by_function(ptx):
    """{function name: number of floating-point multiply-adds in it}."""
    found, current = {}, None
    for line in ptx.splitlines():
        header = FUNCTION.match(line)
        if header:
            current = header.group(1)
        elif FMA.search(line):
            found[current] = found.get(current, 0) + 1
    return found


def test_fma_detector_and_flag(tmp_path):
    """On a two-line kernel: nvcc's default contracts a * b + c into an FMA, which the check below finds;
    setup.py's flags do not."""
    source = tmp_path / "axpy.cu"
    source.write_text("__global__ void axpy(float* y, const float* x, float a, double* z) {\n"
                      "  y[threadIdx.x] = a * x[threadIdx.x] + y[threadIdx.x];\n"
                      "  z[threadIdx.x] = z[threadIdx.x] * z[1] + z[2];\n}\n")
    contracted = _fmas_by_function(_to_ptx(str(source), tmp_path / "default.ptx", ["-O3"]))
    assert len(contracted) == 1 and "axpy" in next(iter(contracted)), contracted
    assert sum(contracted.values()) == 2  # one f32, one f64
    assert _fmas_by_function(_to_ptx(str(source), tmp_path / "setup.ptx", SETUP.NVCC_FLAGS)) == {}


def _kernel_compile_flags():
    """The flags setup.py's build gives nvcc for csrc/cuda_kernels.cu, less the -gencode ones."""
    includes = [os.path.join(ROOT, "csrc")] + cpp_extension.include_paths(device_type="cuda")
    includes += SETUP._pip_nvidia_include_dirs()
    for header in ("cuda_runtime.h", "cusparse.h", "cublas_v2.h"):  # torch's CUDA headers include them
        dirs = includes + [os.path.join(os.path.dirname(os.path.dirname(_nvcc())), "include")]
        if not any(os.path.exists(os.path.join(d, header)) for d in dirs):
            pytest.skip(f"{header} is missing (neither the CUDA toolkit nor a pip nvidia-* package has it)")
    # torch's extensions build with the C++ standard its cpp_extension passes nvcc
    std = "-std=c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "-std=c++17"
    return (SETUP.NVCC_FLAGS + cpp_extension.COMMON_NVCC_FLAGS + [std] + [f"-I{d}" for d in includes]
            + ["-DFUSED_SAM_WITH_CUDA=1", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"])


def test_cuda_kernels_contract_no_multiply_add(tmp_path):
    """csrc/cuda_kernels.cu built as setup.py builds it: no kernel holds an FMA. The only ones left are inside
    the CUDA math library's pow (Adam's bias corrections, 1 - beta^t, in double: its own explicit FMAs, as
    any accurate pow has; the CPU's pow is glibc's)."""
    ptx = _to_ptx(os.path.join(ROOT, "csrc", "cuda_kernels.cu"), tmp_path / "cuda_kernels.ptx",
                  _kernel_compile_flags())
    entries = re.findall(r"\.entry\s+(\w+)", ptx)
    for kernel in ("sq_norm_kernel", "perturb_kernel", "round_master_kernel", "update_kernel"):
        assert any(kernel in name for name in entries), f"no {kernel} in the PTX"
    for base in ("SGD", "Adam", "Adagrad"):  # the update kernel of every fused base (FUSED_SAM_BASE_KINDS)
        for sums in (0, 1):  # without and with the telemetry sums: the last template flag, SUMS
            assert any("update_kernel" in name and f"{len(base)}{base}E" in name and f"Lb{sums}EEEv" in name
                       for name in entries), f"no {base} update with SUMS = {sums}"
    for sums in (0, 1):  # perturb's too (SUMS its last template flag, after the partials' type)
        for partials in "fd":
            assert any("perturb_kernel" in name and f"E{partials}Lb{sums}EEEv" in name for name in entries), (
                f"no perturb with {partials} partials and SUMS = {sums}")
    fmas = _fmas_by_function(ptx)
    assert all("pow" in name for name in fmas), f"multiply-adds contracted outside pow: {fmas}"
