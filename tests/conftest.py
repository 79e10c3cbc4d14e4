import os

import pyro
import pytest
import torch

# Tests are small: compiling the fused kernels (seconds per process) would cost more than
# it saves. test_fusion.py switches it back on to check the compiled kernels.
os.environ["BAYESSPARSE_COMPILE"] = "0"


@pytest.fixture(autouse=True)
def _pyro_defaults():
    """Every test starts from an empty param store, a fixed seed and Pyro's checks on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


def pytest_configure(config):
    # Tests are small; two threads match the target machine and keep timings stable.
    torch.set_num_threads(min(2, torch.get_num_threads()))
