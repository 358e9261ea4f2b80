"""End-to-end runs on Flower's engines (marker ``flower``; about 3 minutes in all on 2 cores).

Simulation (Ray) and deployment (SuperLink + SuperNodes, TLS with SuperNode authentication) must
reproduce ``baffle train`` bit for bit; bad replies, a dead SuperNode and a late one must not stop
a run. Every Flower process is started through ``Federation`` and stopped by PID in a finalizer.
"""
import json
import os
import signal
import ssl
import time
import urllib.request

import pytest
import torch

pytest.importorskip("flwr")

from baffle import rounds as R  # noqa: E402
from baffle.config import make_config  # noqa: E402
from baffle.flower.cli import deploy  # noqa: E402
from baffle.flower.launch import Federation, wait_process  # noqa: E402
from baffle.flower.runconfig import app_config, write_app  # noqa: E402
from baffle.training import train  # noqa: E402

pytestmark = pytest.mark.flower

TINY = {"dataset": "digits", "model": "mlp", "hidden": [16], "num_perturbations": 20, "rounds": 3,
        "eval_every": 1, "batch_size": 32, "seed": 1}


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


def in_process(config: dict, out) -> list[torch.Tensor]:
    """``baffle train`` on ``config``; returns the aggregated ΔL of every round."""
    captured, server_update = [], R.baffle_server_update

    def capture(state, replies, plan, **kw):
        diffs = server_update(state, replies, plan, **kw)
        captured.append(diffs.clone())
        return diffs

    R.baffle_server_update = capture
    try:
        train(make_config(config, {"out": str(out)}), progress=False)
    finally:
        R.baffle_server_update = server_update
    return captured


def assert_same_run(flower_out, reference_out, reference_diffs):
    lines = [json.loads(x) for x in (flower_out / "rounds.jsonl").read_text().splitlines()]
    assert len(lines) == len(reference_diffs)
    for line, diffs in zip(lines, reference_diffs):
        assert torch.equal(torch.tensor(line["loss_diffs"], dtype=torch.float64), diffs), line["round"]
    a, b = torch.load(flower_out / "model.pt"), torch.load(reference_out / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    acc = [[m["test_accuracy"] for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
           for d in (flower_out, reference_out)]
    assert acc[0] == acc[1]


def test_flower_simulation_reproduces_baffle_train_bit_for_bit(tmp_path):
    config = {**TINY, "clients": 4}
    table = app_config(config, {"out": str(tmp_path / "flower")}, {"round_timeout": 60})
    summary = deploy(table, 4, engine="simulation", workdir=tmp_path / "work", timeout=300)
    assert summary["rounds"] == 3
    lines = [json.loads(x) for x in (tmp_path / "flower" / "rounds.jsonl").read_text().splitlines()]
    assert [x["replies_used"] for x in lines] == [4, 4, 4]  # every node registered before round 1
    assert_same_run(tmp_path / "flower", tmp_path / "ref", in_process(config, tmp_path / "ref"))


FAULTY_CLIENT = '''
"""A ClientApp that misbehaves on purpose (shipped inside the test's Flower app)."""
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from baffle.flower.client_app import client_update

app = ClientApp()

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


def test_flower_deployment_tls_with_auth_reproduces_baffle_train_and_refuses_unregistered_node(tmp_path, federation):
    config = {**TINY, "clients": 2}
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
    wait_process(run, 240, "flwr run")
    assert (tmp_path / "flower" / "summary.json").exists(), fed.log_text("flwr-run")[-3000:]
    assert_same_run(tmp_path / "flower", tmp_path / "ref", in_process(config, tmp_path / "ref"))


def _rounds_done(out) -> int:
    path = out / "rounds.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_rounds(out, n, run, timeout=120):
    deadline = time.monotonic() + timeout
    while _rounds_done(out) < n:
        assert run.poll() is None and time.monotonic() < deadline, f"run ended or stalled before round {n}"
        time.sleep(0.2)


def test_flower_deployment_survives_a_dead_supernode_and_uses_a_late_one(tmp_path, federation):
    # rounds take well under a second now: enough of them for the late node to register (a few s)
    rounds, kill_after = 30, 28
    config = {**TINY, "clients": 3, "rounds": rounds, "eval_every": 10}
    out = tmp_path / "out"
    table = app_config(config, {"out": str(out)}, {"min_nodes": 2, "round_timeout": 5})
    app = write_app(tmp_path / "app", table)
    fed = federation()
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


def test_flower_deployment_long_running_clientapps_report_bad_replies_and_crashes(tmp_path):
    """The default deployment (one long-running ClientApp runtime per SuperNode) passes a ClientApp's
    exception on as an error reply and keeps serving the node's later messages."""
    config = {**TINY, "clients": 3, "rounds": 5}
    table = app_config(config, {"out": str(tmp_path / "out")}, {"min_replies": 2, "round_timeout": 60})
    summary = deploy(table, 3, workdir=tmp_path / "work", timeout=300, client_app="faulty_client:app",
                     app_files={"faulty_client.py": FAULTY_CLIENT})
    assert summary["rounds"] == 5
    lines = [json.loads(x) for x in (tmp_path / "out" / "rounds.jsonl").read_text().splitlines()]
    assert [x["replies_used"] for x in lines] == [3, 2, 2, 2, 3]
    reasons = [x["dropped"][0]["reason"] for x in lines[1:4]]
    assert "non-finite" in reasons[0] and "no 'baffle' record" in reasons[1] and "simulated ClientApp crash" in reasons[2]
    logs = [(tmp_path / "work" / "federation" / f"supernode{i}.log").read_text() for i in range(3)]
    assert all("baffle ClientApp runtime serving" in x for x in logs)
    assert sum(x.count("Start `flwr-clientapp` process") for x in logs) == 0  # no process per message


def test_flower_deployment_with_flowers_stock_supernode_reproduces_baffle_train(tmp_path):
    """Flower's own SuperNode settings (fresh flwr-clientapp per message, 3 s polls) still work."""
    config = {**TINY, "clients": 2, "rounds": 2}
    table = app_config(config, {"out": str(tmp_path / "flower")}, {"round_timeout": 60})
    deploy(table, 2, workdir=tmp_path / "work", timeout=300, isolation="subprocess", node_poll_interval=0)
    assert_same_run(tmp_path / "flower", tmp_path / "ref", in_process(config, tmp_path / "ref"))
