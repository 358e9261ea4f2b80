"""Where a run computes: ``--device cpu | cuda | auto``, and moving run state between devices.

``resolve_device`` turns the setting into a ``torch.device`` once, at the edge of a run: ``cpu``;
``cuda`` (refused with one line when ``torch.cuda.is_available()`` is False); ``auto``: cuda when
available, else cpu. The device is a runtime setting, like the thread count: it changes results
only by floating-point rounding (other kernels), never the algorithm or the directions.

Directions on a device: the counter-based ``philox`` stream is computed there (integer tensor ops);
the ``mt19937`` stream is a CPU generator, so its numbers are drawn on the CPU and copied (the same
numbers as on the CPU, at the CPU generator's speed).

Checkpoints and ``model.pt`` are written with every tensor on the CPU (``to_cpu``) and read with
``map_location="cpu"``, so a file written on a GPU loads on a machine without one.
"""
from __future__ import annotations

import copy

import torch

DEVICES = ("cpu", "cuda", "auto")


def resolve_device(name: str, *, flag: str = "--device") -> torch.device:
    """``torch.device`` of a ``--device`` value; ValueError (one line) for cuda without CUDA."""
    if name not in DEVICES:
        raise ValueError(f"{flag} {name!r}: unknown device; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} cuda: torch.cuda.is_available() is False on this machine; "
                         f"use {flag} cpu or auto")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The card's name for a CUDA device ("NVIDIA H200"), else the device type ("cpu")."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def to_cpu(obj):
    """``obj`` with every tensor moved to the CPU: nested dicts (also ``state_dict`` OrderedDicts, with
    their ``_metadata``), lists and tuples are copied, the rest is returned as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping type and its attributes
        for key, value in obj.items():
            out[key] = to_cpu(value)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


__all__ = ["DEVICES", "device_name", "resolve_device", "to_cpu"]
