"""--workers: a round's clients over worker processes, bit-identical to one process with one thread.

The oracle is the single-process run (``workers=1``, ``threads=1``), which the simulation tests pin
against reference loops; the worker runs must reproduce its bytes exactly."""
import json
import multiprocessing
import os

import pytest
import torch

import baffle.simulation as simulation
import baffle.training as training
import baffle.workers as workers
from baffle.cli import main
from baffle.config import make_config
from baffle.io import load_checked
from baffle.rounds import RoundFailed
from baffle.training import RunOptions, train

MLP = {"clients": 4, "hidden": (16,), "num_perturbations": 10, "batch_size": 64, "eval_every": 2, "seed": 5}
LENET = {**MLP, "model": "lenet", "image_size": 16, "memory_format": "channels_last", "clients": 3}
CASES = {
    "mlp-shared": {**MLP, "perturbations": "shared", "ema_decay": 0.9},
    "mlp-per-client": {**MLP, "perturbations": "per-client", "clip": 0.3, "clip_scope": "client",
                       "clip_norm_type": "inf"},
    "lenet-per-client": {**LENET, "perturbations": "per-client"},
    "lenet-shared-central": {**LENET, "scheme": "central", "fraction": 0.67},
}
BASE = ["--clients", "4", "--batch-size", "64", "--hidden", "16", "--no-progress"]


def _run(tmp_path, name, settings, rounds=4, **options):
    config = make_config(settings, {"rounds": rounds, "out": str(tmp_path / name)})
    train(config, progress=False, options=RunOptions(threads=1, **options))
    return tmp_path / name


def _lines(folder, name="metrics.jsonl", drop=("wall_s", "round_s")):
    return [{k: v for k, v in json.loads(s).items() if k not in drop}
            for s in (folder / name).read_text().splitlines()]


def _same_run(a, b):
    assert (a / "model.pt").read_bytes() == (b / "model.pt").read_bytes()
    assert _lines(a) == _lines(b) and _lines(a, "rounds.jsonl") == _lines(b, "rounds.jsonl")
    sa, sb = load_checked(a / "checkpoint.pt")[0]["state"], load_checked(b / "checkpoint.pt")[0]["state"]
    assert torch.save(sa["server"], a / "s.pt") is None and torch.save(sb["server"], b / "s.pt") is None
    assert (a / "s.pt").read_bytes() == (b / "s.pt").read_bytes()  # optimizer moments and EMA too


def test_split_evenly_keeps_order_and_balances():
    items = list(range(7))
    for parts in (1, 2, 3, 7, 9):
        cut = workers.split_evenly(items, parts)
        assert sum(cut, []) == items and len(cut) == min(parts, 7)
        assert max(map(len, cut)) - min(map(len, cut)) <= 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_workers_reproduce_one_process_bit_for_bit(tmp_path, case):
    one = _run(tmp_path, "one", CASES[case], workers=1)
    two = _run(tmp_path, "two", CASES[case], workers=2)
    assert load_checked(two / "checkpoint.pt")[0]["runtime"]["workers"] == 2
    _same_run(one, two)
    three = _run(tmp_path, "three", CASES[case], rounds=2, workers=3)  # more workers than some rounds' clients
    assert _lines(three)[-1] == _lines(one)[1]


def test_spawned_workers_compute_the_same_numbers(tmp_path):
    one = _run(tmp_path, "one", CASES["mlp-shared"], rounds=2, workers=1)
    spawned = _run(tmp_path, "spawned", CASES["mlp-shared"], rounds=2, workers=2, start_method="spawn")
    _same_run(one, spawned)


def test_resume_with_workers_is_bit_identical(tmp_path):
    full = _run(tmp_path, "full", CASES["mlp-per-client"], rounds=6, workers=1)
    part = _run(tmp_path, "part", CASES["mlp-per-client"], rounds=3, workers=2)  # checkpoint between evaluations
    config = make_config(CASES["mlp-per-client"], {"rounds": 5, "out": str(part)})
    train(config, resume=True, progress=False, options=RunOptions(workers=2))  # threads: the recorded 1
    config = make_config(CASES["mlp-per-client"], {"rounds": 6, "out": str(part)})
    train(config, resume=True, progress=False, options=RunOptions(workers=1))
    assert (full / "model.pt").read_bytes() == (part / "model.pt").read_bytes()
    assert _lines(full, "rounds.jsonl") == _lines(part, "rounds.jsonl")
    assert [m for m in _lines(part) if m["round"] % 2 == 0] == _lines(full)  # plus the ends at rounds 3 and 5


def test_auto_is_the_cpus_or_the_round_clients_else_one_process(monkeypatch):
    monkeypatch.setattr(workers, "available_cpus", lambda: 3)
    config = make_config(MLP)
    assert training.resolve_workers("auto", config, None) == 3
    assert training.resolve_workers("auto", make_config(MLP, {"fraction": 0.5}), 1) == 2  # 2 clients a round
    assert training.resolve_workers("auto", config, 2) == 1  # --threads 2: one process, as before
    assert training.resolve_workers("auto", make_config(MLP, {"method": "bp-fedsgd", "num_perturbations": None}),
                                    None) == 1
    assert training.resolve_workers("auto", config, None, "cuda") == 1
    monkeypatch.setattr(workers, "available_cpus", lambda: 1)
    assert training.resolve_workers("auto", config, None) == 1


def test_auto_workers_run_the_parent_on_one_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "available_cpus", lambda: 2)
    seen = []
    real = simulation.Simulation.run_round
    monkeypatch.setattr(simulation.Simulation, "run_round",
                        lambda self, r: seen.append((torch.get_num_threads(), self.workers)) or real(self, r))
    torch.set_num_threads(2)
    config = make_config(MLP, {"rounds": 2, "out": str(tmp_path / "auto")})
    summary = train(config, progress=False)
    assert seen == [(1, 2), (1, 2)] and summary["runtime"]["threads"] == 1 and summary["runtime"]["workers"] == 2


@pytest.mark.parametrize("argv, culprit", [
    (["--workers", "2", "--method", "bp-fedsgd"], "--workers 2: parallel workers cover method baffle"),
    (["--workers", "2", "--method", "baffle-fedavg"], "--workers 2: parallel workers cover method baffle"),
    (["--workers", "2", "--threads", "2"], "--workers 2 with --threads 2: each worker runs one torch thread"),
    (["--workers", "0"], "--workers must be 'auto' or an integer between 1 and"),
    (["--workers", "two"], "--workers must be 'auto' or an integer between 1 and"),
])
def test_settings_where_workers_do_not_apply_are_refused(tmp_path, capsys, argv, culprit):
    out = tmp_path / "run"
    assert main(["train", *BASE, "--rounds", "2", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"baffle: error: {culprit}") and err.count("\n") == 1
    assert not out.exists()


def test_resuming_a_multithreaded_run_with_workers_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *BASE, "--num-perturbations", "10", "--rounds", "2", "--eval-every", "2", "--threads", "2",
                 "--out", str(out)]) == 0
    assert load_checked(out / "checkpoint.pt")[0]["runtime"]["workers"] == 1  # auto with --threads 2
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--rounds", "4", "--workers", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("baffle: error: --workers 2: the run in") and "--threads 2" in err
    assert err.count("\n") == 1 and (out / "checkpoint.pt").read_bytes() == before
    assert main(["train", "--out", str(out), "--resume", "--rounds", "3", "--no-progress"]) == 0  # auto: 1
    runtime = json.loads((out / "summary.json").read_text())["runtime"]
    assert (runtime["threads"], runtime["workers"]) == (2, 1)


def _failing_in_workers(monkeypatch):
    """Models whose forward raises in any process but this one (the workers inherit it by fork)."""
    parent, real = os.getpid(), simulation.build_run_model

    def hook(module, inputs):
        if os.getpid() != parent:
            raise RuntimeError("injected worker failure")

    def build(config, data):
        model = real(config, data)
        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(simulation, "build_run_model", build)


def test_a_failing_worker_stops_the_run_with_its_error_and_keeps_what_was_written(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(["train", *BASE, "--num-perturbations", "10", "--rounds", "2", "--eval-every", "2", "--threads", "1",
                 "--workers", "2", "--out", str(out)]) == 0
    kept = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    _failing_in_workers(monkeypatch)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--rounds", "4", "--workers", "2", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("baffle: error: round 3: a client worker failed (RuntimeError: injected worker failure)")
    assert "intact at round 2" in err and err.count("\n") == 1
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert multiprocessing.active_children() == []  # the pool was shut down
    monkeypatch.undo()
    assert main(["train", "--out", str(out), "--resume", "--rounds", "4", "--workers", "2", "--no-progress"]) == 0


def test_the_pool_is_shut_down_on_keyboard_interrupt(tmp_path, interrupt_round):
    interrupt_round(1)
    config = make_config(MLP, {"rounds": 3, "out": str(tmp_path / "run")})
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False, options=RunOptions(threads=1, workers=2))
    assert multiprocessing.active_children() == []


def test_worker_failure_is_a_round_failure_raised_before_the_server_step(tmp_path, monkeypatch):
    _failing_in_workers(monkeypatch)
    with simulation.Simulation(make_config(MLP, {"out": str(tmp_path / "x")}), workers=2) as sim:
        before = {k: v.clone() for k, v in sim.model.state_dict().items()}
        with pytest.raises(RoundFailed, match="round 1: a client worker failed"):
            sim.run_round(0)
        assert all(torch.equal(before[k], v) for k, v in sim.model.state_dict().items())
    assert multiprocessing.active_children() == []


_ORPHAN_SCRIPT = """
import sys, time, torch
from baffle.fast import FastOptions
from baffle.rounds import EstimatorSpec, plan_round
from baffle.workers import ClientPool
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
pool = ClientPool(model, 2)
plan = plan_round(1, 0, EstimatorSpec(num_perturbations=2, sigma=1e-3))
items = [(c, (torch.ones(3, 4), torch.zeros(3, dtype=torch.long))) for c in range(2)]
pool.baffle_replies(model, items, plan, torch.nn.functional.cross_entropy, FastOptions())
print(" ".join(str(p) for p in pool._executor._processes), flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not os.sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_workers_exit_when_the_runner_is_killed_with_sigkill():
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "worker processes outlived a SIGKILLed runner"
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
