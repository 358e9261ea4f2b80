"""augment_batch: Pad(reflect) → RandomHorizontalFlip → RandomCrop, checked against a brute-force
search over every (flip, dy, dx) built with numpy, for determinism, and statistically."""

import numpy as np
import pytest
import torch

from baffle.data import augment_batch


def candidates(image: np.ndarray, pad: int) -> dict[tuple[bool, int, int], np.ndarray]:
    """Every crop the published transform can produce from one (C, H, W) image, keyed by
    (flipped, dy, dx): numpy reflect padding (no edge repeat, as torchvision's "reflect")."""
    _, height, width = image.shape
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    out = {}
    for flipped in (False, True):
        source = padded[:, :, ::-1] if flipped else padded
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                out[flipped, dy, dx] = source[:, dy:dy + height, dx:dx + width]
    return out


def recover(inputs: torch.Tensor, outputs: torch.Tensor, pad: int) -> list[tuple[bool, int, int]]:
    """For each image, the unique (flipped, dy, dx) whose crop equals the output exactly."""
    found = []
    for image, result in zip(inputs.numpy(), outputs.numpy()):
        matches = [key for key, crop in candidates(image, pad).items() if np.array_equal(crop, result)]
        assert len(matches) == 1, f"output matches {len(matches)} candidate crops"
        found.append(matches[0])
    return found


def test_every_output_is_a_crop_of_the_padded_possibly_flipped_input():
    inputs = torch.randn(40, 3, 12, 10, generator=torch.Generator().manual_seed(0))  # H != W
    outputs = augment_batch(inputs, seed=1, pad=4)
    assert outputs.shape == inputs.shape and outputs.dtype == inputs.dtype
    keys = recover(inputs, outputs, pad=4)
    assert {flipped for flipped, _, _ in keys} == {False, True}  # both kinds occur in 40 images


def test_cifar_sized_batch_and_input_untouched():
    inputs = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    before = inputs.clone()
    outputs = augment_batch(inputs, seed=5)  # default pad = 4, as published
    assert torch.equal(inputs, before) and outputs.data_ptr() != inputs.data_ptr()
    assert outputs.is_contiguous()
    recover(inputs, outputs, pad=4)


def test_pad_zero_only_flips_and_flip_false_only_crops():
    inputs = torch.randn(30, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    keys = recover(inputs, augment_batch(inputs, seed=0, pad=0), pad=0)
    assert all((dy, dx) == (0, 0) for _, dy, dx in keys) and any(f for f, _, _ in keys)
    keys = recover(inputs, augment_batch(inputs, seed=0, pad=2, flip=False), pad=2)
    assert not any(f for f, _, _ in keys)


def test_same_seed_same_output_different_seed_differs():
    inputs = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(augment_batch(inputs, seed=7), augment_batch(inputs.clone(), seed=7))
    assert not torch.equal(augment_batch(inputs, seed=7), augment_batch(inputs, seed=8))


def test_global_rng_untouched():
    inputs = torch.randn(8, 3, 8, 8)
    state = torch.get_rng_state().clone()
    np_state = np.random.get_state()[1].copy()
    augment_batch(inputs, seed=0, pad=2)
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)


def test_flip_frequency_and_crop_offsets_are_uniform():
    """4,000 images, pad 4: P(flip) = 1/2 (binomial sd 0.008; band ±0.03) and each offset
    0..8 has probability 1/9 = 0.111 per axis (sd 0.005; band ±0.025)."""
    n, pad = 4000, 4
    inputs = torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(6))
    outputs = augment_batch(inputs, seed=2024, pad=pad)
    crops = candidates_batch(inputs.numpy(), pad)
    match = np.stack([np.all(c == outputs.numpy(), axis=(1, 2, 3)) for c in crops.values()], axis=1)
    assert np.all(match.sum(axis=1) == 1)  # exactly one (flip, dy, dx) per image
    keys = np.array(list(crops))[match.argmax(axis=1)]  # (n, 3): flipped, dy, dx
    assert abs(keys[:, 0].mean() - 0.5) < 0.03
    for axis in (1, 2):
        freq = np.bincount(keys[:, axis], minlength=2 * pad + 1) / n
        assert np.all(np.abs(freq - 1 / 9) < 0.025), freq


def candidates_batch(images: np.ndarray, pad: int) -> dict[tuple[int, int, int], np.ndarray]:
    """``candidates`` for a whole (N, C, H, W) batch at once."""
    _, _, height, width = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    out = {}
    for flipped in (0, 1):
        source = padded[..., ::-1] if flipped else padded
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                out[flipped, dy, dx] = source[:, :, dy:dy + height, dx:dx + width]
    return out


@pytest.mark.parametrize("kwargs, match", [
    (dict(inputs=torch.zeros(3, 8, 8)), r"\(N, C, H, W\) tensor, got \(3, 8, 8\)"),
    (dict(inputs=np.zeros((1, 1, 8, 8))), "tensor, got ndarray"),
    (dict(pad=8), r"pad must be an integer in \[0, 8\)"),
    (dict(pad=-1), "pad must be"),
    (dict(pad=1.0), "pad must be"),
    (dict(seed=None), "seed must be an integer"),
    (dict(seed=1.5), "seed must be an integer"),
])
def test_bad_arguments(kwargs, match):
    args = dict(inputs=torch.zeros(2, 3, 8, 8), seed=0, pad=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        augment_batch(args.pop("inputs"), **args)
