"""Build script: package metadata lives in pyproject.toml; this file adds the optional C++/CUDA extension
``fused_sam._C`` (the "native" backend's operators).

Environment variables:
  FUSED_SAM_NATIVE=0   build no extension at all (pure-Python install; backends reference/triton only).
  FUSED_SAM_NATIVE=1   the extension is required: a failed build fails the install.
  FUSED_SAM_CUDA=0     build the CPU operators only.
  FUSED_SAM_CUDA=1     the CUDA operators are required: no CUDA build of torch, no nvcc, or a failed
                       build fails the install.
  (unset)              CPU operators always; CUDA operators too when torch is a CUDA build and nvcc is
                       found. A failed build then only warns (first retrying without CUDA), and the package
                       works without the extension.
  TORCH_CUDA_ARCH_LIST the CUDA architectures to build for; default: every one the installed torch was built
                       for, at least 7.5, 8.0, 8.6, 8.9 and 9.0 (those the nvcc found supports), PTX for the
                       newest (default_cuda_arch_list).
  CUDA_HOME / CUDA_PATH  the CUDA toolkit; otherwise found from nvcc on PATH (wrappers are resolved).
  FUSED_SAM_CPU_ARCH   e.g. "native" to add -march=native to the CPU kernels (not portable; default off).
  FUSED_SAM_CHECK_CONTRACTS=1  the contract-checking build: every partial SIMD load or store checks that its
                       count is within the vector (ATen's contract) and raises otherwise (the tests build
                       one; slower tails, never for users).
  MAX_JOBS             parallel compile jobs (ninja).

The CPU kernels (csrc/cpu_kernels.cpp) are compiled once per instruction set: as an extension source with
the baseline flags (DEFAULT) and, on x86-64, again with AVX2 enabled (CPU_ISAS); the extension picks one at
load time from the CPU's features, and fused_sam checks it against DEFAULT before using it (csrc/README.md).
"""
import copy
import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import time

from setuptools import setup

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _flag(name):
    """'0', '1' or None (unset/empty) for a FUSED_SAM_* switch."""
    value = os.environ.get(name, "").strip()
    if value in ("", "auto"):
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value


NATIVE = _flag("FUSED_SAM_NATIVE")
CUDA = _flag("FUSED_SAM_CUDA")


def _log(msg):
    print(f"fused_sam setup: {msg}", file=sys.stderr, flush=True)


def _find_cuda_home():
    """The CUDA toolkit root: $CUDA_HOME/$CUDA_PATH, else the toolkit of the nvcc on PATH.

    torch.utils.cpp_extension takes dirname(dirname(which nvcc)), which is wrong when nvcc is a wrapper
    script or a symlink (e.g. /usr/local/bin/nvcc); so resolve it here, before cpp_extension is imported.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # nvcc itself knows where it lives: "#$ _HERE_=/usr/local/cuda-13.0/bin"
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            found = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
            if found:
                candidates.append(os.path.dirname(os.path.realpath(found.group(1))))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.append("/usr/local/cuda")
    for home in dict.fromkeys(candidates):
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def _pip_nvidia_include_dirs():
    """Include folders of the pip ``nvidia-*`` packages torch depends on (cublas, cusparse, ... headers that
    a slim toolkit lacks but torch's CUDA headers include), found through the installed ``nvidia``
    namespace package."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    dirs = []
    for root in list(getattr(nvidia, "__path__", [])):
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.isdir(inc) and inc not in dirs:
                dirs.append(inc)
    return dirs


# The extra builds of csrc/cpu_kernels.cpp: (CPU_CAPABILITY, compiler flags), an instruction set ATen builds
# its own kernels for. Each build defines its kernels in namespace fused_sam::cpu::<ISA>; the extension is told
# which exist by FUSED_SAM_CPU_<ISA>=1. They are linked after the DEFAULT build: the linker keeps the first copy
# of an inline function that several builds emit, so no caller gets a copy compiled for a newer ISA than its
# own. No AVX-512 build: it measured no faster than AVX2 (the step is memory-bound), AVX-512 CPUs run the
# AVX2 build, and one build fewer is a third less C++ compile time.
CPU_ISAS = [
    ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
]
CPU_KERNELS = os.path.join(CSRC, "cpu_kernels.cpp")


# nvcc's flags for csrc/cuda_kernels.cu. --fmad=false: no multiply-add contracted into an FMA, as
# -ffp-contract=off for the C++, so the CUDA kernels' elementwise ops give the CPU kernels' bits.
# --threads=0: the architectures' images are compiled in parallel, one per core (the default list has eight).
NVCC_FLAGS = ["-O3", "-lineinfo", "--fmad=false", "--threads=0"]
# The extension's record of the CUDA images it holds (fused_sam._C.CUDA_ARCHS; built_cuda_archs).
CUDA_ARCHS_MACRO = "FUSED_SAM_CUDA_ARCHS"
# Built for even when torch's own list lacks them: T4 (7.5), A100 (8.0), A10/RTX 30xx (8.6), L4/RTX 40xx
# (8.9), H100 (9.0).
MIN_CUDA_ARCHS = ("7.5", "8.0", "8.6", "8.9", "9.0")


def _arch_key(arch):
    major, minor = arch.split(".")
    return int(major), int(minor)


def default_cuda_arch_list(torch_arch_flags, nvcc_archs):
    """TORCH_CUDA_ARCH_LIST's default, e.g. "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX": the architectures of
    ``torch_arch_flags`` (torch's own build, "sm_75 sm_80 ... compute_90"; None when unknown) and
    MIN_CUDA_ARCHS, less those missing from ``nvcc_archs`` (the compute capabilities, as ints like 75, that
    the nvcc found compiles for; None when unknown), with PTX for the newest, which newer GPUs JIT-compile."""
    archs = set(MIN_CUDA_ARCHS)
    for token in (torch_arch_flags or "").split():
        # sm_90a / sm_100f: architecture-specific builds of torch; the plain architecture covers that GPU
        found = re.fullmatch(r"(?:sm|compute)_(\d+)(\d)[af]?", token)
        if found:
            archs.add(f"{int(found.group(1))}.{found.group(2)}")
    if nvcc_archs is not None:
        archs = {a for a in archs if int(a.replace(".", "")) in nvcc_archs}
    if not archs:
        return None
    ordered = sorted(archs, key=_arch_key)
    return ";".join(ordered[:-1] + [ordered[-1] + "+PTX"])


def _nvcc_archs(nvcc):
    """The compute capabilities ``nvcc --list-gpu-arch`` names (e.g. {75, 80, ...}); None if it cannot say."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = {int(n) for n in re.findall(r"compute_(\d+)", out.stdout)}
    return found if out.returncode == 0 and found else None


def built_cuda_archs(gencode_flags):
    """The images that ``-gencode=arch=compute_XY,code=...`` flags build, comma-separated: "sm_75,...,compute_90"
    (cubins sm_XY, PTX compute_XY); the extension's CUDA_ARCHS."""
    codes = set()
    for flag in gencode_flags:
        for code in re.findall(r"\bcode=\[?([\w,]+)\]?", flag):
            codes.update(code.split(","))
    return ",".join(sorted(codes, key=lambda c: (int(re.sub(r"\D", "", c)), c.startswith("compute"))))


def _cuda_gencode_flags(torch, cpp_extension):
    """(nvcc's -gencode flags, None), or ([], why not): TORCH_CUDA_ARCH_LIST, else default_cuda_arch_list,
    as torch translates it."""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        default = default_cuda_arch_list(
            torch._C._cuda_getArchFlags(), _nvcc_archs(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")))
        if default:
            os.environ["TORCH_CUDA_ARCH_LIST"] = default
    _log(f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}")
    try:
        flags = cpp_extension._get_cuda_arch_flags()
    except (ValueError, IndexError) as exc:  # an architecture torch does not know; "native" without a GPU
        return [], f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')!r} is not usable ({exc})"
    return flags, None if flags else "no CUDA architecture to build for"


def _extensions():
    if NATIVE == "0":
        if CUDA == "1":
            raise SystemExit("FUSED_SAM_NATIVE=0 and FUSED_SAM_CUDA=1 contradict each other")
        _log("FUSED_SAM_NATIVE=0: building no C++ extension")
        return [], {}
    want_cuda = CUDA != "0"
    home = _find_cuda_home() if want_cuda else None
    if home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home  # read when torch.utils.cpp_extension is imported
    try:
        import torch
        from torch.utils import cpp_extension
        if home and cpp_extension.CUDA_HOME != home:  # imported earlier, with its own guess
            cpp_extension.CUDA_HOME = home
    except ImportError as exc:
        if NATIVE == "1" or CUDA == "1":
            raise SystemExit(f"building fused_sam._C needs torch installed first ({exc}); "
                             "install with --no-build-isolation")
        _log(f"WARNING: torch is not importable ({exc}), so the compiled operators fused_sam._C (backend "
             "'native') are NOT built; pip's build isolation hides an installed torch: to build them, install "
             "torch first, then `pip install --no-build-isolation .` (without them, the pure-torch fallback runs)")
        return [], {}

    cuda_reason = None
    if CUDA == "0":
        cuda_reason = "FUSED_SAM_CUDA=0"
    elif torch.version.cuda is None:
        cuda_reason = f"torch {torch.__version__} is not a CUDA build"
    elif cpp_extension.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        cuda_reason = "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    else:
        # torch's own translation of the architecture list: passed to nvcc explicitly (so torch adds none) and
        # recorded in the extension, whose CUDA_ARCHS then names exactly the images it holds.
        gencode, cuda_reason = _cuda_gencode_flags(torch, cpp_extension)
    with_cuda = cuda_reason is None
    if not with_cuda:
        if CUDA == "1":
            raise SystemExit(f"FUSED_SAM_CUDA=1 but the CUDA operators cannot be built: {cuda_reason}")
        _log(f"building the CPU operators only: {cuda_reason}")
    else:
        _log(f"building the CPU and CUDA operators (CUDA_HOME={cpp_extension.CUDA_HOME})")

    # -ffp-contract=off: no multiply-add contracted into an FMA where the ISA has one (the CPU kernels give
    # the same bits on every ISA; the norm partials must). -Wno-unknown-pragmas: ATen's vector headers carry
    # `#pragma unroll`, which GCC does not know.
    cxx = ["-O3", "-fno-wrapv", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-Wno-unknown-pragmas"]
    link = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for runs its threads through OpenMP only when the caller is compiled with it (else
        # serially); the libgomp torch already loaded is the one used (same soname), so torch.set_num_threads
        # applies.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if os.environ.get("FUSED_SAM_CPU_ARCH"):
        cxx.append(f"-march={os.environ['FUSED_SAM_CPU_ARCH']}")
    macros = [("FUSED_SAM_CUDA_REQUIRED", "1" if CUDA == "1" else "0")]
    if _flag("FUSED_SAM_CHECK_CONTRACTS") == "1":
        _log("FUSED_SAM_CHECK_CONTRACTS=1: the contract-checking build (for tests, not for use)")
        macros.append(("FUSED_SAM_CHECK_CONTRACTS", "1"))
    sources = [os.path.join(CSRC, "ops.cpp"), os.path.join(CSRC, "cpu_ops.cpp"), CPU_KERNELS]
    include_dirs = [os.path.join(PACKAGE_DIR, CSRC)]
    depends = sorted(glob.glob(os.path.join(CSRC, "*.h")))  # rebuild when only a header changed
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "fused_sam._C",
            sources + [os.path.join(CSRC, "cuda_kernels.cu")],
            include_dirs=include_dirs + _pip_nvidia_include_dirs(),
            define_macros=macros + [("FUSED_SAM_WITH_CUDA", "1")],
            # for ops.cpp only: nvcc would split the value at its commas into several macros
            extra_compile_args={"cxx": cxx + [f"-D{CUDA_ARCHS_MACRO}={built_cuda_archs(gencode)}"],
                                "nvcc": NVCC_FLAGS + gencode},
            extra_link_args=link, depends=depends,
        )
    else:
        ext = cpp_extension.CppExtension(
            "fused_sam._C", sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=link, depends=depends,
        )
    ext._fused_sam_cuda = with_cuda

    required = NATIVE == "1" or CUDA == "1"

    def cpu_only(extension):
        """A copy of the extension without its CUDA sources, macro and libraries."""
        cpu = copy.copy(extension)
        cpu.sources = [s for s in extension.sources if not s.endswith(".cu")]
        cpu.define_macros = [m for m in extension.define_macros if m[0] != "FUSED_SAM_WITH_CUDA"]
        cpu.libraries = [lib for lib in extension.libraries if "cuda" not in lib]
        cpu.extra_compile_args = copy.deepcopy(extension.extra_compile_args)
        cpu.extra_compile_args["cxx"] = [f for f in cpu.extra_compile_args["cxx"]
                                         if not f.startswith(f"-D{CUDA_ARCHS_MACRO}=")]
        cpu._fused_sam_cuda = False
        return cpu

    class BuildExt(cpp_extension.BuildExtension):
        """Builds fused_sam._C; when the extension is optional, a failed build warns instead of failing
        (after retrying without the CUDA operators)."""

        def build_extensions(self):
            originals = [copy.copy(e) for e in self.extensions]
            try:
                return super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - torch's pre-build checks (e.g. nvcc/torch CUDA mismatch)
                if required:
                    raise
                _log(f"WARNING: cannot build the CUDA operators ({type(exc).__name__}: {exc}); "
                     "building the CPU operators only")
                self.extensions = [cpu_only(e) for e in originals]
                try:
                    return super().build_extensions()
                except Exception as exc2:  # noqa: BLE001
                    _log(f"WARNING: installing without fused_sam._C ({type(exc2).__name__}: {exc2})")

        def with_isa_kernels(self, extension):
            """A copy of the extension that also links CPU_KERNELS built for each of CPU_ISAS (x86-64, GCC or
            Clang): compiled here, by torch's compile step, with the extension's flags plus the ISA's."""
            if platform.machine().lower() not in ("x86_64", "amd64") or self.compiler.compiler_type != "unix":
                return extension
            ext = copy.copy(extension)
            ext.define_macros = list(extension.define_macros)
            ext.extra_objects = list(extension.extra_objects)
            for isa, flags in CPU_ISAS:
                _log(f"compiling the CPU kernels ({CPU_KERNELS}) for {isa}...")
                started = time.perf_counter()
                ext.extra_objects += self.compiler.compile(
                    [CPU_KERNELS], output_dir=os.path.join(self.build_temp, f"cpu_{isa.lower()}"),
                    macros=extension.define_macros + [("CPU_CAPABILITY", isa), (f"CPU_CAPABILITY_{isa}", None)],
                    include_dirs=extension.include_dirs, debug=self.debug, depends=extension.depends,
                    extra_postargs={"cxx": extension.extra_compile_args["cxx"] + flags},
                )
                ext.define_macros.append((f"FUSED_SAM_CPU_{isa}", "1"))
                _log(f"  {isa} CPU kernels compiled in {time.perf_counter() - started:.0f} s")
            return ext

        def timed_build(self, extension):
            """Builds the extension with its per-ISA CPU kernels, saying what it compiles and how long it took."""
            started = time.perf_counter()
            extension = self.with_isa_kernels(extension)
            cuda = getattr(extension, "_fused_sam_cuda", False)
            _log("compiling the C++ operators and the default-ISA CPU kernels"
                 + (f", and the CUDA operators for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}"
                    if cuda else "") + f", then linking {extension.name}...")
            built = time.perf_counter()
            result = super().build_extension(extension)
            _log(f"  {extension.name} built in {time.perf_counter() - built:.0f} s "
                 f"({time.perf_counter() - started:.0f} s in all)")
            return result

        def build_extension(self, extension):
            try:
                return self.timed_build(extension)
            except Exception as exc:  # noqa: BLE001 - any compiler/linker failure
                if required:
                    raise
                _log(f"WARNING: building {extension.name} failed ({type(exc).__name__}: {exc})")
                if getattr(extension, "_fused_sam_cuda", False):
                    _log("retrying with the CPU operators only")
                    try:
                        return self.timed_build(cpu_only(extension))
                    except Exception as exc2:  # noqa: BLE001
                        _log(f"WARNING: the CPU-only build failed too ({type(exc2).__name__}: {exc2})")
                _log("WARNING: installing without fused_sam._C; backend='native' will say why it is unavailable")

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


if __name__ == "__main__":  # so tests can import the helpers above (pip's build backend runs it as __main__)
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
