"""Test-wide setup. Triton kernels run through its interpreter when no GPU is present; the variable must be
set before triton is first imported, so it is set here, ahead of every test module."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
