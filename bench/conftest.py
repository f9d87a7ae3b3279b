"""pytest-benchmark suites over the same cases as ``fused-sam bench`` (not part of the default test run): the
same parameter sets (``--sam-sets``: default, all, a list; ``--sam-quick``: tiny), the same methods (every
method ``fused-sam bench`` lists for the device and dtype), the same end-to-end models and methods.

    pytest bench/ --benchmark-only                       # default sets for the device
    pytest bench/ --benchmark-only --sam-sets all --sam-device cuda
    pytest bench/ --benchmark-only --sam-quick           # tiny sets, a few rounds: checks the suites run
    pytest bench/ --benchmark-only --benchmark-autosave  # save .benchmarks/<machine>/NNNN_*.json
    pytest-benchmark compare 0001 0002 --group-by group  # compare two saved runs

Every timed method is first checked against classic SAM over the same number of steps (a test fails
rather than time a broken path). The saved JSON's machine_info records torch, its threads and the load
average, so a comparison shows when one run shared the machine with other work.
"""
import pytest
import torch

from fused_sam.bench import cases
from fused_sam.bench.e2e import methods_for
from fused_sam.bench.methods import method_names
from fused_sam.bench.report import load_average, machine_cores
from fused_sam.bench.runner import DTYPES


def pytest_addoption(parser):
    group = parser.getgroup("fused_sam bench")
    group.addoption("--sam-device", default="auto", choices=["auto", "cpu", "cuda"])
    group.addoption("--sam-sets", default="default", help="'default', 'all' or a comma list of parameter sets")
    group.addoption("--sam-dtypes", default="default", help="comma list of fp32, bf16; default fp32 (+ bf16 on CUDA)")
    group.addoption("--sam-quick", action="store_true", help="tiny parameter sets and models")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), cores=machine_cores(),
                        load_average=load_average())


def _device(config):
    name = config.getoption("--sam-device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _dtypes(config, device):
    spec = config.getoption("--sam-dtypes")
    if spec == "default":
        return ["fp32", "bf16"] if device.type == "cuda" and torch.cuda.is_bf16_supported() else ["fp32"]
    return [d.strip() for d in spec.split(",") if d.strip() in DTYPES]


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device = _device(config)
    if device.type == "cuda" and not torch.cuda.is_available():
        return  # the device fixture skips
    dtypes = _dtypes(config, device)
    if "sam_set" in metafunc.fixturenames:
        sets = cases.resolve_sets(config.getoption("--sam-sets"), device.type, config.getoption("--sam-quick"))
        metafunc.parametrize("sam_set", sets)
    if "sam_dtype" in metafunc.fixturenames:
        metafunc.parametrize("sam_dtype", dtypes)
    if "sam_method" in metafunc.fixturenames:  # every method of any dtype; a test skips those its dtype lacks
        names = [m for d in dtypes for m in method_names(device, DTYPES[d])]
        metafunc.parametrize("sam_method", list(dict.fromkeys(names)))
    if "e2e_method" in metafunc.fixturenames:
        metafunc.parametrize("e2e_method", methods_for(device))


@pytest.fixture(scope="session")
def device(request):
    device = _device(request.config)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--sam-device cuda but no CUDA device")
    return device


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--sam-quick")
