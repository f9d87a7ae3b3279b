"""fused_sam.backend_report() and available_backends(): which backends run here, in the order auto tries
them, and why the others do not; printed, the report reads as one."""
import pytest
import torch

import fused_sam
from fused_sam.backends import _AUTO_ORDER, _REGISTRY, resolve_backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_report_lists_every_backend_in_autos_order_with_a_reason_for_each_unavailable_one(dtype):
    report = fused_sam.backend_report("cpu", dtype)
    assert sorted(report) == sorted(_REGISTRY)
    assert list(report)[:len(_AUTO_ORDER["cpu"])] == list(_AUTO_ORDER["cpu"])
    for name, reason in report.items():  # the dict reading: None where it runs, else a sentence
        assert reason is None or (isinstance(reason, str) and len(reason) > 20), (name, reason)
    assert report.available == [name for name, reason in report.items() if reason is None]
    assert report.auto == resolve_backend("auto", torch.device("cpu"), dtype).name
    assert fused_sam.available_backends("cpu", dtype) == report.available
    assert report.available[0] == report.auto  # auto takes the first that runs


def test_printed_report_says_available_or_why_not_and_autos_choice():
    report = fused_sam.backend_report("cpu", torch.float32)
    text = str(report)
    assert repr(report) == text
    lines = text.splitlines()
    assert lines[0].startswith("fused_sam backends for torch.float32 parameters on cpu; backend='auto' tries "
                               f"{', '.join(_AUTO_ORDER['cpu'])} and takes {report.auto}:")
    for name, reason in report.items():
        (line,) = [line for line in lines[1:] if line.split()[0] == name]
        assert ("unavailable: " + reason in line) if reason else " available" in line
    assert "(auto's choice)" in next(line for line in lines if line.split()[0] == report.auto)


def test_a_float64_report_gives_tritons_reason():
    report = fused_sam.backend_report("cpu", torch.float64)
    assert report["triton"] and "triton" not in report.available


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_nothing_runs_on_a_cuda_device_this_machine_does_not_have():
    assert fused_sam.available_backends("cuda", torch.float32) == []
    report = fused_sam.backend_report("cuda:0", torch.float32)
    assert report.auto is None and list(report)[:3] == list(_AUTO_ORDER["cuda"])
    assert all("no CUDA device" in reason for reason in report.values())
    assert "takes none of them" in str(report)
