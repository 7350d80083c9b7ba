"""Test-wide settings."""

import os

import pytest
import torch

# The command line compiles a quantized bfloat16 Llama's decoder layer by default (`canvaslm.load(compile="auto")`):
# ~20-50 s for each new layer shape, and the tests load many. They run the eager layers unless they ask;
# tests/models/test_aot_layers.py runs the default itself (its environment without this variable).
os.environ["CANVASLM_COMPILE_LAYERS"] = "0"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: one thread is fastest, and a busy 2-core machine stalls torch's thread pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
