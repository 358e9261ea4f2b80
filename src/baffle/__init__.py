"""baffle: backpropagation-free federated learning (BAFFLE) on PyTorch.

The public functions are loaded on first use, so that ``import baffle.cli`` can configure the
process (OpenMP wait policy) before torch is imported.
"""
__version__ = "0.1.0"
__all__ = ["compute_loss_diffs", "estimate_gradient", "rebuild_gradient", "__version__"]


def __getattr__(name: str):
    if name in ("compute_loss_diffs", "estimate_gradient", "rebuild_gradient"):
        from baffle import api

        return getattr(api, name)
    raise AttributeError(f"module 'baffle' has no attribute {name!r}")
