"""Test-wide setup. Triton kernels run through its interpreter when no GPU is present; the variable must be
set before triton is first imported, so it is set here, ahead of every test module."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Hypothesis profiles for the property-based tests (tests/test_properties.py). "ci", the default: a fixed
# set of examples (derandomized, so every run and every machine tests the same cases) sized to run the
# file in one to two minutes on a 2-core CPU. "thorough": 20x the examples, freshly random each run; select it
# with `python -m pytest tests/test_properties.py --hypothesis-profile=thorough` (hypothesis' pytest plugin
# loads it after this file). The thorough profile keeps failing examples in .hypothesis/ (which hypothesis
# git-ignores itself), so a rerun tries them first; the ci profile keeps none (its runs repeat anyway).
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test dependency; without it test_properties.py skips itself
    pass
else:
    _SLOW_DATA = [HealthCheck.too_slow, HealthCheck.data_too_large]  # spans of 1e5 elements, triton's interpreter
    CI_EXAMPLES = 50
    settings.register_profile("ci", derandomize=True, database=None, max_examples=CI_EXAMPLES, deadline=None,
                              print_blob=True, suppress_health_check=_SLOW_DATA)
    settings.register_profile("thorough", max_examples=20 * CI_EXAMPLES, deadline=None, print_blob=True,
                              suppress_health_check=_SLOW_DATA)
    settings.load_profile("ci")
