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


@pytest.fixture
def interrupt_round(monkeypatch):
    """``interrupt_round(n)``: from now on a run raises KeyboardInterrupt (Ctrl-C) as round n starts;
    ``interrupt_round(None)`` gives the runs their real rounds back."""
    from baffle import simulation

    real = simulation.Simulation.run_round

    def arm(at: int | None) -> None:
        def run_round(self, server_round):
            if server_round == at:
                raise KeyboardInterrupt
            return real(self, server_round)

        monkeypatch.setattr(simulation.Simulation, "run_round", real if at is None else run_round)

    return arm


def flat(tensors) -> torch.Tensor:
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return torch.cat([t.detach().flatten() for t in values])
