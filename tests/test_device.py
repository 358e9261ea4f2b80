"""--device cpu | cuda | auto: resolution, the one-line refusal, the resume rule across devices, CPU
checkpoints. CUDA runs are skipped (with the reason) where no CUDA device exists."""
import collections
import json

import pytest
import torch

from baffle.cli import main
from baffle.config import make_config
from baffle.devices import resolve_device, to_cpu
from baffle.io import load_checked, save_checked

NO_CUDA = "--device cuda: torch.cuda.is_available() is False on this machine; use --device cpu or auto"
BASE = ["train", "--clients", "4", "--hidden", "16", "--num-perturbations", "5", "--no-progress"]


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resolve_device(monkeypatch):
    _no_cuda(monkeypatch)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError) as e:
        resolve_device("cuda")
    assert str(e.value) == NO_CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_config_key_default_and_choices():
    assert make_config({}).device == "cpu"  # results never depend on what the machine happens to have
    assert make_config({"device": "auto"}).device == "auto"
    with pytest.raises(ValueError, match=r"device \(--device\): unknown value 'gpu'"):
        make_config({"device": "gpu"})


def test_cuda_without_cuda_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    _no_cuda(monkeypatch)
    out = tmp_path / "run"
    assert main([*BASE, "--rounds", "1", "--device", "cuda", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"baffle: error: {NO_CUDA}\n"
    assert not out.exists() or not any(out.iterdir())


def _fake_device(out, device):
    """Rewrite the checkpoint as a run on ``device`` writes it (runtime.device)."""
    ckpt, _ = load_checked(out / "checkpoint.pt")
    ckpt["runtime"]["device"] = device
    save_checked(ckpt, out / "checkpoint.pt")


def test_resume_on_another_device_needs_it_named(tmp_path, monkeypatch, capsys):
    _no_cuda(monkeypatch)
    out = tmp_path / "run"
    assert main([*BASE, "--rounds", "2", "--eval-every", "2", "--device", "auto", "--out", str(out)]) == 0
    ckpt, _ = load_checked(out / "checkpoint.pt")
    assert ckpt["runtime"]["device"] == "cpu" and ckpt["runtime"]["device_name"] == "cpu"
    _fake_device(out, "cuda")  # as if rounds 1-2 had run on a GPU
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--rounds", "3", "--no-progress"]) == 2  # auto: refused
    err = capsys.readouterr().err
    assert err.startswith("baffle: error: --device auto: the run in") and "computed on cuda" in err
    assert "--device cpu" in err and err.count("\n") == 1
    assert main(["train", "--out", str(out), "--resume", "--rounds", "3", "--no-progress"]) == 2  # nothing changed
    assert main(["train", "--out", str(out), "--resume", "--rounds", "3", "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "continuing on cpu a run computed on cuda: from round 2 on" in printed
    runtime = json.loads((out / "summary.json").read_text())["runtime"]
    assert runtime["device"] == "cpu" and runtime["device_switches"] == [{"round": 2, "from": "cuda", "to": "cpu"}]
    assert main(["train", "--out", str(out), "--resume", "--rounds", "4", "--no-progress"]) == 0  # same device now
    assert load_checked(out / "checkpoint.pt")[0]["runtime"]["device_switches"] == runtime["device_switches"]


def test_checkpoints_without_a_device_record_are_cpu_runs(tmp_path, monkeypatch):
    _no_cuda(monkeypatch)
    out = tmp_path / "run"
    assert main([*BASE, "--rounds", "2", "--eval-every", "2", "--out", str(out)]) == 0
    ckpt, _ = load_checked(out / "checkpoint.pt")
    for key in ("device", "device_name"):
        del ckpt["runtime"][key]
    save_checked(ckpt, out / "checkpoint.pt")
    assert main(["train", "--out", str(out), "--resume", "--rounds", "3", "--device", "auto", "--no-progress"]) == 0
    assert "device_switches" not in load_checked(out / "checkpoint.pt")[0]["runtime"]


def test_to_cpu_keeps_state_dict_metadata_and_cpu_tensors():
    model = torch.nn.Linear(3, 2)
    state = model.state_dict()
    moved = to_cpu({"model": state, "list": [torch.ones(2)], "pair": (1, torch.zeros(1)), "n": 3})
    assert isinstance(moved["model"], collections.OrderedDict) and moved["model"]._metadata == state._metadata
    assert moved["model"]["weight"] is state["weight"] and moved["pair"][0] == 1 and moved["n"] == 3


def test_flower_refuses_a_gpu_device():
    from baffle.flower.serverstate import check_flower_config

    check_flower_config(make_config({}))
    with pytest.raises(ValueError, match="--device cuda: not available on Flower"):
        check_flower_config(make_config({"device": "cuda"}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("stream", ["philox", "mt19937"])
def test_cuda_run_checkpoints_on_the_cpu_and_resumes_there(tmp_path, stream):
    out = tmp_path / "run"
    assert main([*BASE, "--rounds", "3", "--eval-every", "2", "--device", "cuda", "--direction-stream", stream,
                 "--out", str(out)]) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # no map_location: CPU tensors only
    assert ckpt["runtime"]["device"] == "cuda"
    assert all(t.device.type == "cpu" for t in ckpt["state"]["server"]["model"].values())
    assert all(t.device.type == "cpu" for t in torch.load(out / "model.pt", weights_only=True).values())
    assert 0 <= json.loads((out / "summary.json").read_text())["final_test_accuracy"] <= 1
    assert main(["train", "--out", str(out), "--resume", "--rounds", "4", "--device", "cpu", "--no-progress"]) == 0
    runtime = json.loads((out / "summary.json").read_text())["runtime"]
    assert runtime["device_switches"] == [{"round": 3, "from": "cuda", "to": "cpu"}]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_rebuild_against_the_dense_formula():
    from baffle import philox
    from baffle.estimator import stein_coefficients
    from baffle.rebuild import rebuild_gradient
    from oracles import dense_stein_gradient

    n, diffs = 70_001, torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kw = dict(seed=4, num_perturbations=30, sigma=1e-3, scheme="forward")
    eps = torch.stack([philox.normal(4, k, 0, n) for k in range(30)]).double()
    dense = dense_stein_gradient(eps, diffs, 1e-3, "forward")
    terms = (stein_coefficients(diffs, 1e-3, "forward")[:, None] * eps).abs().sum(0)
    model = torch.nn.Linear(n, 1, bias=False)
    gpu = torch.nn.Linear(n, 1, bias=False).cuda()
    got = rebuild_gradient(gpu, diffs, stream="philox", **kw)["weight"].flatten()
    assert got.device.type == "cuda" and ((got.cpu().double() - dense).abs() <= 32 * torch.finfo(torch.float32).eps
                                           * terms).all()
    host = rebuild_gradient(model, diffs, **kw)["weight"]
    assert torch.equal(rebuild_gradient(gpu, diffs, **kw)["weight"].cpu(), host)  # mt19937: formed on the CPU, copied
