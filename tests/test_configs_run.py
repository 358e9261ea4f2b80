"""Every shipped config (configs/ and configs/paper/) runs one round on small stand-in data."""
import json

import pytest
import torch

import baffle.simulation as simulation
from baffle.config import load_toml, make_config
from baffle.data import ArrayDataset
from baffle.training import train
from conftest import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.toml"))
PER_CLASS = 520  # 500 validation examples per class (the paper configs) + 2 per client per class


def _stand_in(name, data_dir=None, *, image_size=None, normalize="mean-std"):
    """A random dataset shaped like ``name`` (channels, 32×32, 10 classes), class-balanced."""
    if name == "digits":
        return _real_load(name, data_dir, image_size=image_size, normalize=normalize)
    channels = 3 if name == "cifar10" else 1
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat_interleave(PER_CLASS)
    return ArrayDataset(name, torch.rand(len(y), channels, 32, 32, generator=g), y,
                        torch.rand(200, channels, 32, 32, generator=g), torch.arange(10).repeat(20), num_classes=10)


_real_load = simulation.load_dataset


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_config_runs_one_round(path, tmp_path, monkeypatch):
    monkeypatch.setattr(simulation, "load_dataset", _stand_in)
    raw = load_toml(path)
    small = {"rounds": 1, "eval_batch_size": 256, "out": str(tmp_path / "run")}
    if raw.get("method", "baffle") in ("baffle", "baffle-fedavg"):
        small["num_perturbations"] = 2  # the round's code path, not its cost
    summary = train(make_config(raw, small), progress=False)
    assert summary["rounds"] == 1 and 0 <= summary["final_test_accuracy"] <= 1
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1]
    assert ("val_accuracy" in metrics[-1]) == (raw.get("val_per_class", 0) > 0)


@pytest.mark.parametrize("name,groups,params", [
    ("mnist-wrn-fedsgd.toml", [2, 2, 2, 4, 4, 8, 8], 302_506), ("mnist-lenet-fedsgd.toml", [], 26_730),
])
def test_paper_configs_build_the_published_models(name, groups, params):
    from types import SimpleNamespace

    config = make_config(load_toml(REPO / "configs" / "paper" / name))
    model = simulation.build_run_model(config, SimpleNamespace(image_size=32, in_channels=1, num_classes=10))
    assert [m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)] == groups
    assert sum(p.numel() for p in model.parameters()) == params
