"""The published CIFAR train-time augmentation, as one pure, seeded, batched function."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F


def augment_batch(inputs: torch.Tensor, *, seed: int, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Pad(pad, reflect) → RandomHorizontalFlip(p=0.5) → RandomCrop(H, W), independently per image.

    This is the published code's CIFAR train transform (torchvision ``Pad(4, padding_mode="reflect")``,
    ``RandomHorizontalFlip()``, ``RandomCrop(32)``). ``flip=False`` drops the flip (its SVHN variant).
    For every image n: ``flipped_n ~ Bernoulli(0.5)`` and crop offsets ``dy_n, dx_n`` uniform on
    ``{0, ..., 2*pad}``; the output is rows ``dy_n..dy_n+H-1`` and columns ``dx_n..dx_n+W-1`` of the
    reflect-padded image, mirrored left-right first when flipped.

    The published code transforms uint8 images before ``ToTensor``/``Normalize``; here the inputs are
    already normalized (N, C, H, W) tensors. That gives the same images: reflect padding, flipping
    and cropping only copy pixels, so they commute with any per-channel affine map (x - m) / s.

    The random draws come from a local CPU ``torch.Generator`` seeded with ``seed`` (global RNG state
    is untouched), so the result depends only on ``seed`` and the batch, on any device. Returns a new
    tensor with the dtype and device of ``inputs``; ``inputs`` is not modified.
    """
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"augment_batch: inputs must be an (N, C, H, W) tensor, got {shape}")
    if not _is_int(seed):
        raise ValueError(f"augment_batch: seed must be an integer, got {seed!r}")
    n, _, height, width = inputs.shape
    if not _is_int(pad) or pad < 0 or pad >= min(height, width):
        raise ValueError(f"augment_batch: pad must be an integer in [0, {min(height, width)}) "
                         f"(reflect padding needs pad < image height and width), got {pad!r}")
    gen = torch.Generator().manual_seed(int(seed))
    flips = torch.rand(n, generator=gen) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    padded = F.pad(inputs, (pad, pad, pad, pad), mode="reflect") if pad else inputs
    rows = dy[:, None] + torch.arange(height)  # (N, H) rows of the padded image
    cols = dx[:, None] + torch.arange(width)  # (N, W) columns of the (possibly flipped) padded image
    cols = torch.where(flips[:, None], width + 2 * pad - 1 - cols, cols)  # flip: column j ← W'-1-j
    device = inputs.device
    batch = torch.arange(n, device=device)[:, None, None]
    picked = padded.permute(0, 2, 3, 1)[batch, rows.to(device)[:, :, None], cols.to(device)[:, None, :]]
    return picked.permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) → (N, C, H, W)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
