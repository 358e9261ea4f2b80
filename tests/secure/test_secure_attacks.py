"""Attack functions of the robustness harness: parser, vector attacks, label flip, malicious choice."""
import pytest
import torch

from baffle.secure import attacks
from baffle.secure.attacks import AttackSpec, parse_attack


def test_parser_forms_defaults_and_errors():
    assert parse_attack("sign-flip:2") == AttackSpec("sign-flip", 2, 1.0)
    assert parse_attack("scaling:3") == AttackSpec("scaling", 3, 10.0)
    assert parse_attack("scaling:3:-4") == AttackSpec("scaling", 3, -4.0)
    assert parse_attack("gaussian:1:0.5") == AttackSpec("gaussian", 1, 0.5)
    assert parse_attack("label-flip:2") == AttackSpec("label-flip", 2, None)
    assert parse_attack("label-flip:2").is_data_attack and not parse_attack("sign-flip:1").is_data_attack
    for bad in ("sign-flip", "flip:2", "sign-flip:x", "sign-flip:-1", "scaling:1:big", "label-flip:1:2", "a:1:2:3"):
        with pytest.raises(ValueError, match="attack"):
            parse_attack(bad)


def test_vector_attacks():
    v = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    assert torch.equal(attacks.attack_vector(parse_attack("sign-flip:1"), v), -v)
    assert torch.equal(attacks.attack_vector(parse_attack("sign-flip:1:3"), v), -3 * v)
    assert torch.equal(attacks.attack_vector(parse_attack("scaling:1"), v), 10 * v)
    with pytest.raises(ValueError, match="data attack"):
        attacks.attack_vector(parse_attack("label-flip:1"), v)
    with pytest.raises(ValueError, match="Generator"):
        attacks.attack_vector(parse_attack("gaussian:1"), v)


def test_gaussian_attack_std_is_strength_times_rms():
    v = torch.full((100_000,), 0.02, dtype=torch.float64)  # rms 0.02
    out = attacks.gaussian(v, 3.0, torch.Generator().manual_seed(0))
    assert abs(float(out.std()) / 0.06 - 1) < 0.01  # sample std's own std: 0.22 %
    assert abs(float(out.mean())) < 4 * 0.06 / 100_000 ** 0.5


def test_flip_labels():
    y = torch.tensor([0, 1, 9, 4])
    assert torch.equal(attacks.flip_labels(y, 10), torch.tensor([9, 8, 0, 5]))
    assert torch.equal(attacks.flip_labels(attacks.flip_labels(y, 10), 10), y)
    assert torch.equal(y, torch.tensor([0, 1, 9, 4]))  # not in place
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        attacks.flip_labels(y, 5)


def test_choose_malicious_and_apply():
    ids = list(range(10, 20))
    a = attacks.choose_malicious(ids, 3, torch.Generator().manual_seed(4))
    assert a == attacks.choose_malicious(ids, 3, torch.Generator().manual_seed(4))
    assert len(set(a)) == 3 and set(a) <= set(ids) and list(a) == sorted(a)
    vectors = {c: torch.full((2,), float(c), dtype=torch.float64) for c in ids}
    out = attacks.apply_attack(parse_attack("sign-flip:3"), vectors, a)
    for c in ids:
        assert torch.equal(out[c], -vectors[c] if c in a else vectors[c])
    with pytest.raises(ValueError, match="cannot make 11"):
        attacks.choose_malicious(ids, 11, torch.Generator())
