"""Configuration: one schema for TOML and flags, clear errors, every shipped config builds."""
from pathlib import Path

import pytest

from baffle.config import FIELDS, TrainConfig, load_toml, make_config
from baffle.models import build_model
from conftest import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.toml"))


def test_defaults_are_valid_and_default_model_follows_dataset():
    c = TrainConfig()
    assert (c.dataset, c.model_name, c.method, c.clients) == ("digits", "mlp", "baffle", 10)
    assert TrainConfig(dataset="mnist").model_name == "lenet"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_shipped_config_parses_and_builds(path):
    config = make_config(load_toml(path))
    channels = 3 if config.dataset == "cifar10" else 1
    options = {"hidden": config.hidden} if config.model_name == "mlp" else {}
    model = build_model(config.model_name, in_channels=channels, num_classes=10, activation=config.activation,
                        norm=config.norm, image_size=config.image_size or 8, seed=0, **options)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_default_config_file_equals_builtin_defaults_except_out():
    from_file = make_config(load_toml(REPO / "configs" / "digits.toml")).to_dict()
    builtin = TrainConfig().to_dict()
    assert {k for k in FIELDS if from_file[k] != builtin[k]} == {"out", "model"}  # model: None -> "mlp"
    assert make_config(load_toml(REPO / "configs" / "digits.toml")).model_name == TrainConfig().model_name


def test_toml_accepts_dashes_tables_and_flower_style_dotted_keys(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('num-perturbations = 7\n[optim]\nlr = 0.5\n"estimator.sigma" = 0.01\nlr_milestones = [3, 9]\n')
    c = make_config(load_toml(p))
    assert (c.num_perturbations, c.lr, c.sigma, c.lr_milestones) == (7, 0.5, 0.01, (3, 9))


@pytest.mark.parametrize("text,match", [
    ("num_perturbation = 3", "did you mean 'num_perturbations'"),
    ("lr = 0.1\n[x]\nlr = 0.2", "given twice"),
    ("lr = [", "not valid TOML"),
])
def test_bad_toml_files(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_toml(p)
    with pytest.raises(ValueError, match="not found"):
        load_toml(tmp_path / "missing.toml")


def test_unreadable_toml_files_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        load_toml(tmp_path)
    (tmp_path / "bin.toml").write_bytes(b"lr = '\xff\xfe'\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_toml(tmp_path / "bin.toml")


def test_clip_may_be_infinite_but_not_the_learning_rate():
    assert make_config({"clip": "inf"}).clip == float("inf")
    with pytest.raises(ValueError, match="finite"):
        make_config({"lr": "inf"})


@pytest.mark.parametrize("overrides,match", [
    ({"num_perturbations": "0"}, r"--num-perturbations.*>= 1"),
    ({"num_perturbations": 2.5}, r"--num-perturbations.*expected int"),
    ({"sigma": "0"}, r"--sigma.*> 0"), ({"sigma": "abc"}, r"--sigma.*expected float"),
    ({"clients": True}, r"--clients.*expected int"), ({"fraction": 1.5}, "--fraction"),
    ({"dataset": "imagenet"}, r"--dataset.*digits"), ({"model": "resnet"}, r"--model.*lenet"),
    ({"partition": "dirichlet:-1"}, "--partition"), ({"partition": "banana"}, "--partition"),
    ({"method": "sgd"}, r"--method.*bp-fedavg"), ({"scheme": "backward"}, "--scheme"),
    ({"ema_decay": 1.0}, "--ema-decay"), ({"hidden": "a,b"}, "--hidden"),
    ({"seed": -1}, r"--seed.*\[0, 2\*\*63 - 1\]"), ({"seed": 2**63}, "--seed"), ({"hidden": "16,0"}, "--hidden"),
    ({"epochs": "inf"}, r"--epochs.*finite"), ({"lr": float("inf")}, r"--lr.*finite"), ({"sigma": "1e400"}, "--sigma"),
    ({"momentum": "nan", "optimizer": "sgd"}, "--momentum"), ({"weight_decay": "inf"}, "--weight-decay"),
    ({"lr": 10**400}, r"--lr.*expected float"), ({"image_size": 5000}, r"--image-size.*<= 1024"),
    ({"out": ""}, r"--out.*empty"), ({"data_dir": "a\0b"}, r"--data-dir.*NUL"),
])
def test_bad_values_name_the_flag(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(overrides)


def test_cli_strings_are_coerced_like_toml_values():
    c = make_config({"num_perturbations": "12", "sigma": "1e-3", "clip": "0.3", "ema_decay": "0.9",
                     "lr_milestones": "5,10", "hidden": "32,16", "clip_norm_type": "inf", "adam_betas": "0.9,0.99"})
    assert (c.num_perturbations, c.sigma, c.clip, c.ema_decay, c.adam_betas) == (12, 1e-3, 0.3, 0.9, (0.9, 0.99))
    assert make_config({"clip": "none"}).clip is None
    assert c.lr_milestones == (5, 10) and c.hidden == (32, 16) and c.clip_norm_type == float("inf")
    assert Path(make_config({"out": "x/y"}).out) == Path("x/y")


def test_to_dict_is_strict_json_and_round_trips():
    import json

    c = make_config({"clip": 0.3, "lr_milestones": [4, 8]})
    text = json.dumps(c.to_dict(), allow_nan=False)  # clip_norm_type = inf must not become Infinity
    assert make_config(json.loads(text)) == c
