"""Attacks for the robustness harness: F malicious clients alter what they send (``--attack KIND:F``,
optionally ``KIND:F:STRENGTH``).

  sign-flip   v ↦ −s·v                   (s = strength, default 1)
  scaling     v ↦ s·v                    (default s = 10)
  gaussian    v ↦ N(0, (s·rms(v))² I)    (replaces the vector by noise of s times its RMS, default s = 1)
  label-flip  a data attack: the client trains on y ↦ num_classes − 1 − y (``flip_labels``)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ATTACKS = {"sign-flip": 1.0, "scaling": 10.0, "gaussian": 1.0, "label-flip": None}  # kind → default strength


@dataclass(frozen=True)
class AttackSpec:
    kind: str
    num_malicious: int
    strength: float | None = None

    @property
    def is_data_attack(self) -> bool:
        """True for attacks on the training data (label flip) rather than on the uploaded vector."""
        return self.kind == "label-flip"


def parse_attack(text: str) -> AttackSpec:
    """'KIND:F' or 'KIND:F:STRENGTH' → AttackSpec (strength defaulted per kind)."""
    parts = str(text).strip().split(":")
    usage = "use KIND:F or KIND:F:STRENGTH with KIND one of " + ", ".join(ATTACKS)
    if parts[0] not in ATTACKS or len(parts) not in (2, 3):
        raise ValueError(f"bad attack {text!r}; {usage}")
    try:
        count = int(parts[1])
        strength = float(parts[2]) if len(parts) == 3 else ATTACKS[parts[0]]
    except ValueError:
        raise ValueError(f"bad attack {text!r}: F must be an integer and STRENGTH a number; {usage}") from None
    if count < 0:
        raise ValueError(f"bad attack {text!r}: the number of malicious clients F must be >= 0")
    if parts[0] == "label-flip" and len(parts) == 3:
        raise ValueError(f"bad attack {text!r}: label-flip takes no strength")
    return AttackSpec(parts[0], count, strength)


def sign_flip(values: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    return -strength * torch.as_tensor(values, dtype=torch.float64)


def scale(values: torch.Tensor, factor: float = 10.0) -> torch.Tensor:
    return factor * torch.as_tensor(values, dtype=torch.float64)


def gaussian(values: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, (s · rms(v))² I) shaped like v, drawn from ``generator``."""
    v = torch.as_tensor(values, dtype=torch.float64)
    rms = float(v.square().mean().sqrt())
    return torch.randn(v.shape, generator=generator, dtype=torch.float64) * (strength * rms)


def attack_vector(spec: AttackSpec, values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """What a malicious client sends instead of ``values`` (model attacks only)."""
    if spec.kind == "sign-flip":
        return sign_flip(values, spec.strength)
    if spec.kind == "scaling":
        return scale(values, spec.strength)
    if spec.kind == "gaussian":
        if generator is None:
            raise ValueError("the gaussian attack needs a torch.Generator")
        return gaussian(values, spec.strength, generator)
    raise ValueError(f"{spec.kind!r} is a data attack: flip the malicious clients' labels with flip_labels "
                     "instead of altering their vectors")


def flip_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """y ↦ num_classes − 1 − y (a new tensor); ValueError for labels outside [0, num_classes)."""
    y = torch.as_tensor(labels)
    if y.dtype.is_floating_point or (y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes)):
        raise ValueError(f"labels must be integers in [0, {num_classes}) to flip")
    return num_classes - 1 - y


def choose_malicious(client_ids: Sequence, num_malicious: int, generator: torch.Generator) -> tuple:
    """F of the client ids, drawn without replacement from ``generator`` (returned in id order)."""
    ids = list(client_ids)
    if not 0 <= num_malicious <= len(ids):
        raise ValueError(f"cannot make {num_malicious} of {len(ids)} clients malicious")
    picks = torch.randperm(len(ids), generator=generator)[:num_malicious].tolist()
    return tuple(ids[i] for i in sorted(picks))


def apply_attack(spec: AttackSpec, vectors: dict, malicious: Sequence,
                 generator: torch.Generator | None = None) -> dict:
    """{client: vector} with the malicious clients' vectors replaced (a new dict; inputs untouched)."""
    bad = set(malicious)
    return {c: attack_vector(spec, v, generator) if c in bad else v for c, v in vectors.items()}
