"""baffle.secure never touches global RNG state (its imports are checked in tests/test_project.py)."""
from pathlib import Path

import baffle.secure

SECURE = Path(baffle.secure.__file__).parent


def test_no_global_rng_calls():
    banned = ("manual_seed(", "np.random.seed", "random.seed", "np.random.normal", "np.random.rand",
              "torch.randn(", "torch.rand(", "secrets.")
    for path in SECURE.glob("*.py"):
        for line in path.read_text().splitlines():
            for b in banned:
                if b in line and "generator=" not in line:
                    raise AssertionError(f"{path.name}: {line.strip()}")
