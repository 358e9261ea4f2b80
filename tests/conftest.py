import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("BAFFLE_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


@pytest.fixture(autouse=True)
def _two_threads():
    """Same thread count everywhere: CPU reductions are reproducible only at a fixed thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(old)


def flat(tensors) -> torch.Tensor:
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return torch.cat([t.detach().flatten() for t in values])
