"""baffle: backpropagation-free federated learning (BAFFLE) on PyTorch."""
from baffle.api import compute_loss_diffs, estimate_gradient, rebuild_gradient

__version__ = "0.1.0"
__all__ = ["compute_loss_diffs", "estimate_gradient", "rebuild_gradient", "__version__"]
