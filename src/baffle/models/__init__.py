"""The paper's models (LeNet, WRN-10-2), fully connected baselines, and their registry.

Build by name with ``build_model("lenet", in_channels=1, num_classes=10)``; see
``model_names()`` for what is registered and ``register_model`` to add a builder.
"""

from .layers import activation_names, make_activation, make_norm
from .lenet import build_lenet
from .mlp import build_linear, build_mlp
from .registry import build_model, model_names, register_model
from .wrn import PreActBlock, build_wrn, build_wrn_10_2

__all__ = [
    "PreActBlock",
    "activation_names",
    "build_lenet",
    "build_linear",
    "build_mlp",
    "build_model",
    "build_wrn",
    "build_wrn_10_2",
    "make_activation",
    "make_norm",
    "model_names",
    "register_model",
]
