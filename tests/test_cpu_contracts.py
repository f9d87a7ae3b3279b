"""The contract-checking build of the CPU kernels: every partial SIMD load and store checks that its count is
within the vector (ATen's contract for ``Vectorized::loadu(p, count)`` / ``store(p, count)``) and raises
otherwise. The AVX-512 build broke that contract and dropped elements from the norm on AVX-512 CPUs only; a
count past the vector is undefined on every ISA, so this build finds such a caller on whatever CPU runs the
tests, under every instruction set it has.

The build is made here, once per session, into a temporary folder (FUSED_SAM_CHECK_CONTRACTS=1, CPU only:
about a minute on 2 cores), and exercised in a fresh interpreter (a process holds one fused_sam._C): every
operation of the native backend against the reference (perturb and restore_and_update with telemetry sums
too), every dtype with and without master weights, awkward sizes, misaligned starts and two threads.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checking_extension(tmp_path_factory):
    if not os.path.exists(os.path.join(REPO, "setup.py")) or not os.path.isdir(os.path.join(REPO, "csrc")):
        pytest.skip("needs the source tree (setup.py, csrc/) to build the contract-checking extension")
    out = tmp_path_factory.mktemp("contracts")
    env = dict(os.environ, FUSED_SAM_CHECK_CONTRACTS="1", FUSED_SAM_NATIVE="1", FUSED_SAM_CUDA="0",
               MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(out / "lib"), "--build-temp", str(out / "tmp")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    found = [os.path.join(root, name) for root, _, names in os.walk(out / "lib") for name in names
             if name.startswith("_C") and name.endswith((".so", ".pyd"))]
    assert len(found) == 1, found
    return found[0]


# Loads the contract-checking build as fused_sam._C before anything imports the installed one, then holds the
# native backend to the reference under every instruction set this CPU runs.
_EXERCISE = textwrap.dedent("""
    import importlib.util, sys
    import torch

    spec = importlib.util.spec_from_file_location("fused_sam._C", sys.argv[1])
    checked = importlib.util.module_from_spec(spec)
    sys.modules["fused_sam._C"] = checked  # before the package, whose import loads fused_sam._C
    spec.loader.exec_module(checked)
    assert checked.CONTRACT_CHECKS == 1

    from fused_sam.backends import native
    from fused_sam.selfcheck import SELF_CHECK_SIZES, check_all_ops, dtype_configs, misaligned_span, make_span
    from fused_sam.selfcheck import check_restore_and_update, check_sq_norm, PERTURBATIONS, UPDATES, step_scalars
    from fused_sam.selfcheck import check_perturb_sums, clone_span, norm_partials_for
    from fused_sam.backends.reference import telemetry_sums
    assert native._C is checked

    def check_telemetry(backend, span, update, scalars):  # restore_and_update's sums pass, tails and all
        span = clone_span(span)
        if span.backup is not None:
            span.backup.copy_(span.weights)
        span.weights.add_(span.grads / 8)
        expected = torch.empty(1, 3, dtype=torch.float64)
        telemetry_sums(span, scalars.grad_scale, expected)
        sums = torch.full((backend.partials_len(span), 3), float("nan"), dtype=torch.float64)
        backend.restore_and_update(span, update, scalars, sums)
        torch.testing.assert_close(sums.sum(0), expected[0], rtol=1e-4, atol=1e-6)

    backend = native.NativeBackend()
    chunk = checked.CPU_NORM_CHUNK
    for isa in native.cpu_capabilities():
        native.set_cpu_capability(isa)
        torch.set_num_threads(1)
        for dtype, master in dtype_configs():
            for numel in SELF_CHECK_SIZES:
                check_all_ops(backend, numel, dtype, "cpu", seed=numel, master=master)
                for update in (UPDATES[1], UPDATES[6], UPDATES[9]):
                    span = make_span(numel, dtype, "cpu", update, seed=numel, master=master)
                    for found_inf in (0.0, 1.0):
                        check_telemetry(backend, span, update, step_scalars("cpu", 3, 1024.0, found_inf))
        torch.set_num_threads(2)
        for dtype, master in dtype_configs():  # several chunks, two threads, every thread's range unaligned
            span = misaligned_span(make_span(4 * chunk + 77, dtype, "cpu", UPDATES[6], master=master), 3)
            for perturbation in PERTURBATIONS:
                check_sq_norm(backend, span, perturbation)
                partials = norm_partials_for(span, perturbation) if perturbation.normalize else None
                check_perturb_sums(backend, span, perturbation, partials, 1024.0)
            check_restore_and_update(backend, span, UPDATES[6], step_scalars("cpu", 3))
            check_telemetry(backend, span, UPDATES[6], step_scalars("cpu", 3, 1024.0, 0.0))
        print("checked", isa)
""")


def test_every_partial_access_keeps_the_vector_contract(checking_extension):
    run = subprocess.run([sys.executable, "-c", _EXERCISE, checking_extension], capture_output=True, text=True,
                         timeout=900, env=dict(os.environ, FUSED_SAM_SKIP_SELF_CHECK="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    import fused_sam.backends.native as native

    if native.extension_unavailable_reason() is None:
        assert run.stdout.split() == [word for isa in native.cpu_capabilities() for word in ("checked", isa)]
