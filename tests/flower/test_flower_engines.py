"""End-to-end runs on Flower's engines (marker ``flower``; several minutes in all on 2 cores).

Simulation (Ray) and deployment (SuperLink + SuperNodes, TLS with SuperNode authentication), on
Flower's stock path and with the accelerator (``fast_nodes``), must reproduce ``baffle train`` bit for
bit, client sampling included; so must a run whose server has no data directory, and a run resumed
after its server and launcher were killed with SIGKILL. Bad replies, a dead SuperNode and a late
one must not stop a run. Every Flower process is started through ``Federation`` and stopped by PID
(in a finalizer, or by the watchdog when the launcher was killed).
"""
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from baffle.flower.cli import deploy  # noqa: E402
from baffle.flower.fastpath import problems as fast_path_problems  # noqa: E402
from baffle.flower.launch import Federation, wait_process  # noqa: E402
from baffle.flower.runconfig import app_config, write_app  # noqa: E402
from baffle.flower.watchdog import group_alive, read_groups  # noqa: E402
from baffle.simulation import sample_clients  # noqa: E402
from baffle.config import make_config  # noqa: E402
from baffle.training import train  # noqa: E402
from test_flower_adapter import in_process  # noqa: E402  (the same in-process reference run)
from test_flower_adapter import OTHER_METHODS, assert_same_model_and_metrics  # noqa: E402

pytestmark = pytest.mark.flower
# accelerator tests need the flwr internals it was written against (elsewhere it falls back: tested)
fast_only = pytest.mark.skipif(bool(fast_path_problems()), reason="this flwr lacks the accelerator's internals: "
                               + "; ".join(fast_path_problems()[:3]))

TINY = {"dataset": "digits", "model": "mlp", "hidden": [16], "num_perturbations": 20, "rounds": 3,
        "eval_every": 1, "batch_size": 32, "seed": 1}
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def flower_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


@pytest.fixture
def federation(tmp_path):
    """Yields a factory; every Federation it made is stopped (all its processes, by PID) afterwards."""
    made = []

    def make(**kw):
        made.append(Federation(tmp_path / f"federation{len(made)}", **kw))
        return made[-1]

    yield make
    for fed in made:
        fed.stop()


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def assert_same_run(flower_out, reference_out, reference_diffs, keys=("test_accuracy",)):
    rounds = lines(flower_out / "rounds.jsonl")
    assert len(rounds) == len(reference_diffs)
    for line, diffs in zip(rounds, reference_diffs):
        assert torch.equal(torch.tensor(line["loss_diffs"], dtype=torch.float64), diffs), line["round"]
    a, b = torch.load(flower_out / "model.pt"), torch.load(reference_out / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ours, ref = lines(flower_out / "metrics.jsonl"), lines(reference_out / "metrics.jsonl")
    assert [[m.get(k) for k in keys] for m in ours] == [[m.get(k) for k in keys] for m in ref]


def test_flower_simulation_samples_clients_and_reproduces_baffle_train_bit_for_bit(tmp_path):
    config = {**TINY, "clients": 4, "fraction": 0.5}
    table = app_config(config, {"out": str(tmp_path / "flower")}, {"round_timeout": 60})
    summary = deploy(table, 4, engine="simulation", workdir=tmp_path / "work", timeout=300)
    assert summary["rounds"] == 3 and not summary["fast_nodes"]
    rounds = lines(tmp_path / "flower" / "rounds.jsonl")
    assert [x["partitions"] for x in rounds] == [sample_clients(4, 0.5, 1, t) for t in range(3)]
    assert_same_run(tmp_path / "flower", tmp_path / "ref", in_process(config, tmp_path / "ref"))


@pytest.mark.parametrize("method", list(OTHER_METHODS))
def test_flower_simulation_runs_the_backprop_and_epoch_level_methods_as_baffle_train_bit_for_bit(tmp_path, method):
    """bp-fedsgd (exact gradients up), bp-fedavg and baffle-fedavg (weights and the partition's optimizer
    state up and down) on Ray's virtual nodes: the model and metrics of ``baffle train``, bit for bit."""
    config = {**OTHER_METHODS[method], "clients": 2, "fraction": 1.0, "rounds": 2}
    table = app_config(config, {"out": str(tmp_path / "flower")}, {"round_timeout": 60})
    summary = deploy(table, 2, engine="simulation", workdir=tmp_path / "work", timeout=300)
    assert summary["rounds"] == 2
    assert [x["replies_used"] for x in lines(tmp_path / "flower" / "rounds.jsonl")] == [2, 2]
    train(make_config(config, {"out": str(tmp_path / "ref")}), progress=False)
    assert_same_model_and_metrics(tmp_path / "flower", tmp_path / "ref")


FAULTY_CLIENT = '''
"""A ClientApp that misbehaves on purpose (shipped inside the test's Flower app)."""
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from baffle.flower.client_app import client_update, evaluate_handler, query

app = ClientApp()
app.query()(query)  # describing the data and evaluating are baffle's own
app.evaluate()(evaluate_handler)

@app.train()
def train(msg, context):
    partition, t = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
    content = client_update(msg, context)
    if (partition, t) == (1, 1):
        record = content["baffle"]
        record["loss-diffs"] = [float("nan")] * len(record["loss-diffs"])
    if (partition, t) == (2, 2):
        content = RecordDict({"something": MetricRecord({"else": 1})})
    if (partition, t) == (0, 3):
        raise RuntimeError("simulated ClientApp crash")
    return Message(content, reply_to=msg)
'''


def test_flower_simulation_drops_nan_malformed_and_crashed_replies(tmp_path):
    config = {**TINY, "clients": 3, "rounds": 5}
    table = app_config(config, {"out": str(tmp_path / "out")}, {"min_replies": 2, "round_timeout": 60})
    summary = deploy(table, 3, engine="simulation", workdir=tmp_path / "work", timeout=300,
                     client_app="faulty_client:app", app_files={"faulty_client.py": FAULTY_CLIENT})
    assert summary["rounds"] == 5
    lines = [json.loads(x) for x in (tmp_path / "out" / "rounds.jsonl").read_text().splitlines()]
    assert [x["replies_used"] for x in lines] == [3, 2, 2, 2, 3]
    assert all(x["stepped"] for x in lines)
    reasons = [x["dropped"][0]["reason"] for x in lines[1:4]]
    assert "non-finite" in reasons[0] and "no 'baffle' record" in reasons[1] and "simulated ClientApp crash" in reasons[2]
    assert all(str(x["dropped"][0]["node"]) in x["dropped"][0]["reason"] for x in lines[1:4])  # named by node id
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("replies_used") for m in metrics[1:]] == [3, 2, 2, 2, 3]


def test_flower_deployment_stock_tls_with_auth_reproduces_baffle_train_and_refuses_unregistered_node(
        tmp_path, federation):
    """Flower's stock path (public API; a fresh flwr-clientapp per message, Flower's own polls)."""
    config = {**TINY, "clients": 2, "eval_every": 3}
    table = app_config(config, {"out": str(tmp_path / "flower")}, {"round_timeout": 60})
    app = write_app(tmp_path / "app", table)
    fed = federation(tls=True)
    fed.start_superlink(num_nodes_for_credentials=3)
    with pytest.raises(OSError):  # the port speaks TLS only
        urllib.request.urlopen(f"http://{fed.address}/health", timeout=5)
    context = ssl.create_default_context(cafile=str(fed.credentials.ca_cert))
    with urllib.request.urlopen(f"https://{fed.address}/health", timeout=5, context=context) as r:
        assert r.status == 200
    for i in range(2):
        fed.register(i)
        fed.start_supernode(f"supernode{i}", {"partition-id": i, "num-partitions": 2}, identity=i)
    intruder = fed.start_supernode("intruder", {"partition-id": 0, "num-partitions": 2}, identity=2)
    run = fed.run_app(app)
    assert wait_process(intruder, 60, "unregistered SuperNode") != 0
    assert "Failed to activate SuperNode" in fed.log_text("intruder") or "denied" in fed.log_text("intruder").lower()
    wait_process(run, 400, "flwr run")
    assert (tmp_path / "flower" / "summary.json").exists(), fed.log_text("flwr-run")[-3000:]
    assert_same_run(tmp_path / "flower", tmp_path / "ref", in_process(config, tmp_path / "ref"),
                    ("test_loss", "test_accuracy"))
    assert "Start `flwr-clientapp` process" in fed.log_text("supernode0")  # Flower's own SuperNode


@fast_only
def test_flower_deployment_fast_nodes_fall_back_to_the_stock_path_on_a_missing_internal(tmp_path, capfd,
                                                                                    monkeypatch):
    from flwr.supercore.runtime import RuntimeHttpClient

    monkeypatch.delattr(RuntimeHttpClient, "AcquireTask")  # as if a newer flwr had dropped it
    config = {**TINY, "clients": 2, "rounds": 1}
    table = app_config(config, {"out": str(tmp_path / "flower")}, {"round_timeout": 60})
    summary = deploy(table, 2, workdir=tmp_path / "work", timeout=400, fast_nodes=True)
    err = capfd.readouterr().err
    assert not summary["fast_nodes"] and err.count("baffle: warning:") == 1 and "stock path" in err
    logs = [(tmp_path / "work" / "federation" / f"supernode{i}.log").read_text() for i in range(2)]
    assert all("Start `flwr-clientapp` process" in x and "ClientApp runtime serving" not in x for x in logs)
    assert_same_run(tmp_path / "flower", tmp_path / "ref", in_process(config, tmp_path / "ref"))


@fast_only
def test_flower_deployment_fast_nodes_tls_sampling_and_a_server_without_data(tmp_path):
    """The accelerator with TLS, 3 nodes, fraction 2/3; with MNIST available the server's data_dir
    does not exist and each node reads its own copy (--node-data-dir)."""
    config = {**TINY, "clients": 3, "fraction": 0.67, "rounds": 4, "eval_every": 2, "val_per_class": 1}
    node_data, server_data = None, None
    if (SHARED / "mnist").is_dir():
        config.update(dataset="mnist", batch_size=16, num_perturbations=8, hidden=[8])
        node_data, server_data = str(SHARED), str(tmp_path / "server-has-no-data")
    table = app_config({**config, "data_dir": server_data}, {"out": str(tmp_path / "flower")}, {"round_timeout": 60})
    summary = deploy(table, 3, workdir=tmp_path / "work", timeout=400, tls=True, fast_nodes=True,
                     node_data_dir=node_data)
    assert summary["fast_nodes"] and not (tmp_path / "server-has-no-data").exists()
    rounds = lines(tmp_path / "flower" / "rounds.jsonl")
    assert [x["partitions"] for x in rounds] == [sample_clients(3, 0.67, 1, t) for t in range(4)]
    reference = in_process({**config, "data_dir": node_data}, tmp_path / "ref")
    assert_same_run(tmp_path / "flower", tmp_path / "ref", reference,
                    ("test_loss", "test_accuracy", "val_loss", "val_accuracy"))
    logs = [(tmp_path / "work" / "federation" / f"supernode{i}.log").read_text() for i in range(3)]
    assert all("baffle ClientApp runtime serving" in x for x in logs)


@fast_only
def test_flower_deployment_runs_epoch_level_baffle_as_baffle_train_bit_for_bit(tmp_path):
    """SuperLink + 2 SuperNodes (the accelerator's long-running ClientApps): each round's task carries
    the partition's Adam state there and back; the model and metrics equal ``baffle train``'s."""
    config = {**OTHER_METHODS["baffle-fedavg"], "clients": 2, "fraction": 1.0, "rounds": 3}
    table = app_config(config, {"out": str(tmp_path / "flower")}, {"round_timeout": 60})
    summary = deploy(table, 2, workdir=tmp_path / "work", timeout=400, fast_nodes=True)
    assert summary["rounds"] == 3 and summary["fast_nodes"]
    train(make_config(config, {"out": str(tmp_path / "ref")}), progress=False)
    assert_same_model_and_metrics(tmp_path / "flower", tmp_path / "ref")


def _rounds_done(out) -> int:
    path = out / "rounds.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_rounds(out, n, run, timeout=300):  # generous: start-up on a busy 2-core machine
    deadline = time.monotonic() + timeout
    while _rounds_done(out) < n:
        assert run.poll() is None and time.monotonic() < deadline, f"run ended or stalled before round {n}"
        time.sleep(0.2)


@fast_only
def test_flower_deployment_survives_a_dead_supernode_and_uses_a_late_one(tmp_path, federation):
    # rounds take well under a second now: enough of them for the late node to register (a few s)
    rounds, kill_after = 30, 28
    config = {**TINY, "clients": 3, "rounds": rounds, "eval_every": 10}
    out = tmp_path / "out"
    table = app_config(config, {"out": str(out)}, {"min_nodes": 2, "round_timeout": 5})
    app = write_app(tmp_path / "app", table)
    fed = federation(fast_nodes=True)
    fed.start_superlink()
    nodes = {i: fed.start_supernode(f"supernode{i}", {"partition-id": i, "num-partitions": 3}) for i in (0, 1)}
    run = fed.run_app(app)
    _wait_rounds(out, 1, run)
    fed.start_supernode("late", {"partition-id": 2, "num-partitions": 3})
    _wait_rounds(out, kill_after, run)
    os.killpg(nodes[1].pid, signal.SIGKILL)  # node 1 dies mid-run (with its ClientApp runtime)
    wait_process(run, 240, "flwr run")
    assert (out / "summary.json").exists(), fed.log_text("flwr-run")[-3000:]
    lines = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    used = [x["replies_used"] for x in lines]
    assert used[0] == 2 and 3 in used[1:kill_after], used  # the late node is used from a later round on
    assert used[-1] == 2 and all(x["stepped"] for x in lines), used
    lost = [x for x in lines[kill_after:] if x["missing_nodes"] or x["dropped"]]
    assert lost, lines  # the dead node's missing reply is logged with its node id
    log = fed.log_text("flwr-run")
    assert "no reply from node" in log or "dropped reply of node" in log


@fast_only
def test_flower_deployment_long_running_clientapps_report_bad_replies_and_crashes(tmp_path):
    """The default deployment (one long-running ClientApp runtime per SuperNode) passes a ClientApp's
    exception on as an error reply and keeps serving the node's later messages."""
    config = {**TINY, "clients": 3, "rounds": 5}
    table = app_config(config, {"out": str(tmp_path / "out")}, {"min_replies": 2, "round_timeout": 60})
    summary = deploy(table, 3, workdir=tmp_path / "work", timeout=300, client_app="faulty_client:app",
                     app_files={"faulty_client.py": FAULTY_CLIENT}, fast_nodes=True)
    assert summary["rounds"] == 5 and summary["fast_nodes"]
    lines = [json.loads(x) for x in (tmp_path / "out" / "rounds.jsonl").read_text().splitlines()]
    assert [x["replies_used"] for x in lines] == [3, 2, 2, 2, 3]
    reasons = [x["dropped"][0]["reason"] for x in lines[1:4]]
    assert "non-finite" in reasons[0] and "no 'baffle' record" in reasons[1] and "simulated ClientApp crash" in reasons[2]
    logs = [(tmp_path / "work" / "federation" / f"supernode{i}.log").read_text() for i in range(3)]
    assert all("baffle ClientApp runtime serving" in x for x in logs)
    assert sum(x.count("Start `flwr-clientapp` process") for x in logs) == 0  # no process per message


def _federation_processes(out) -> list[str]:
    """Running processes whose FLWR_HOME lies in this run's federation folder (every process a
    Federation starts, and every child Flower starts from one, has one there)."""
    needle, found = f"FLWR_HOME={out / 'flower' / 'federation'}".encode(), []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if not any(v.startswith(needle) for v in f.read().split(b"\0")):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    found.append(entry)
        except OSError:
            continue
    return found


def test_flower_deployment_resumes_after_sigkill_of_server_and_launcher_with_the_uninterrupted_model(tmp_path):
    """``baffle deploy`` is killed with SIGKILL, and so are its SuperLink, SuperExec and ServerApp (the
    server): the watchdog ends the SuperNodes, nothing is left behind, and ``baffle deploy --resume``
    continues from the checkpoint to the model and metrics of an uninterrupted run."""
    config = {**TINY, "clients": 2, "rounds": 8}
    out = tmp_path / "flower"
    flags = [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, list) else v}"
             for k, v in config.items()]
    argv = [sys.executable, "-m", "baffle.flower.cli", *flags, "--nodes", "2", "--fast-nodes", "--out", str(out),
            "--round-timeout", "60"]
    launcher = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    groups_file = out / "flower" / "federation" / "processes"
    groups = []
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").exists() and len(lines(out / "metrics.jsonl")) >= 4):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run ended or stalled"
            time.sleep(0.1)
        groups = read_groups(str(groups_file))
        names = dict(line.split() for line in groups_file.read_text().splitlines())
        superlink = int(next(pid for pid, name in names.items() if name == "superlink"))
        os.kill(launcher.pid, signal.SIGKILL)
        os.killpg(superlink, signal.SIGKILL)  # SuperLink, SuperExec and the ServerApp process
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(group_alive(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(group_alive(g) for g in groups), "Flower processes left behind"
        while _federation_processes(out) and time.monotonic() < deadline:  # Flower's own detached children
            time.sleep(0.2)
        assert not _federation_processes(out), "Flower processes left behind"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for g in groups:  # only if the watchdog failed: nothing may outlive the test
            try:
                os.killpg(g, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    done = lines(out / "metrics.jsonl")[-1]["round"]
    assert 3 <= done < 8
    from baffle.flower.cli import main as deploy_cli

    assert deploy_cli(["--resume", "--out", str(out), "--nodes", "2", "--fast-nodes", "--round-timeout", "60"]) == 0
    assert_same_run(out, tmp_path / "ref", in_process(config, tmp_path / "ref"), ("test_loss", "test_accuracy"))
    assert (out / "flower" / "federation-previous" / "superlink.log").exists()
    assert not _federation_processes(out)  # the resumed run stopped everything it started, too
