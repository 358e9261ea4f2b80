"""The Flower adapter without a Flower engine: run config, wire format, strategy with mock replies."""
import json
import tomllib

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict  # noqa: E402
from flwr.common.config import flatten_dict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from baffle import rounds as R  # noqa: E402
from baffle.config import make_config  # noqa: E402
from baffle.flower import wire  # noqa: E402
from baffle.flower.client_app import client_update  # noqa: E402
from baffle.flower.runconfig import FlowerOptions, app_config, app_pyproject, parse_run_config  # noqa: E402
from baffle.flower.strategy import BaffleStrategy  # noqa: E402
from baffle.simulation import ClientShards, Simulation, rounds_sampled_before, sample_clients  # noqa: E402

TINY = {"dataset": "digits", "model": "mlp", "hidden": [8], "clients": 3, "num_perturbations": 12, "rounds": 4,
        "batch_size": 16, "seed": 5, "eval_every": 1}


def test_run_config_round_trips_through_a_flower_app_table_nested_or_flat():
    tree = {"dataset": "digits", "model": {"hidden": [32, 16]}, "optimizer": {"lr": 0.02}}
    table = app_config(tree, {"rounds": 7, "lr": 0.03}, {"min_replies": 2})
    text = app_pyproject(table)
    flower_view = flatten_dict(tomllib.loads(text)["tool"]["flwr"]["app"]["config"])  # what Flower hands over
    assert flower_view["model.hidden"] == "32,16" and flower_view["optimizer.lr"] == 0.03
    config, options = parse_run_config(flower_view)
    assert config == make_config({"dataset": "digits", "hidden": [32, 16], "lr": 0.03, "rounds": 7})
    assert options == FlowerOptions(min_replies=2)
    assert 'dependencies = []' in text


def test_run_config_refuses_unknown_keys_naming_them():
    with pytest.raises(ValueError, match="flower.min-replys"):
        parse_run_config({"flower.min-replys": 1})
    with pytest.raises(ValueError, match="learning_rate"):
        parse_run_config({"train.learning_rate": 0.1})
    with pytest.raises(ValueError, match="min-replies"):
        FlowerOptions(min_replies=0)


def test_round_plan_and_reply_survive_the_wire_losslessly():
    plan = R.plan_round(3, 9, R.EstimatorSpec(num_perturbations=5, sigma=1e-4, scheme="central"))
    assert wire.plan_from_config(wire.plan_to_config(plan)) == plan
    diffs = torch.randn(5, dtype=torch.float64) * 1e-7
    content = wire.reply_content(_reply(diffs, 33), partition_id=2)
    partition, reply = wire.reply_from_content(content, node_id=17)
    assert partition == 2 and reply.num_examples == 33 and torch.equal(reply.loss_diffs, diffs)


def _reply(diffs, n, loss=1.5):
    from baffle.server import ClientReply
    return ClientReply(0, diffs, n, loss)


@pytest.mark.parametrize("content, match", [
    (RecordDict(), "no 'baffle' record"),
    (RecordDict({"baffle": MetricRecord({"num-examples": 3, "partition-id": 0})}), "lacks loss-diffs"),
    (RecordDict({"baffle": MetricRecord({"loss-diffs": 1.0, "num-examples": 3, "partition-id": 0})}), "list"),
    (RecordDict({"baffle": MetricRecord({"loss-diffs": [1.0], "num-examples": 3, "partition-id": -1})}),
     "partition-id"),
])
def test_malformed_reply_content_is_a_value_error_naming_the_node(content, match):
    with pytest.raises(ValueError, match=match) as e:
        wire.reply_from_content(content, node_id=42)
    assert "node 42" in str(e.value)


def test_cursor_seek_matches_the_stateful_cursor_of_baffle_train():
    x, y = torch.arange(50.0).unsqueeze(1), torch.arange(50)
    live = ClientShards(x, y, [np.arange(0, 23), np.arange(23, 50)], seed=1)
    for taken in range(13):
        fresh = ClientShards(x, y, [np.arange(0, 23), np.arange(23, 50)], seed=1)
        fresh.seek(0, taken, 5)
        assert torch.equal(fresh.next_batch(0, 5)[1], live.next_batch(0, 5)[1])
    hits = [t for t in range(20) if 4 in sample_clients(10, 0.3, 7, t)]
    assert rounds_sampled_before(10, 0.3, 7, 4, 20) == len(hits)
    assert rounds_sampled_before(10, 1.0, 7, 4, 20) == 20


# ---- strategy with mock replies ---------------------------------------------------------------------

@pytest.fixture
def task_identity():
    """Message() for instructions needs a run id (set by Flower's runtime in a real ServerApp)."""
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _reply_message(node, content=None, error=None):
    meta = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"m{node}",
                    group_id="", created_at=0.0, ttl=60.0, message_type="train")
    return Message(content, metadata=meta) if error is None else Message(error, metadata=meta)


def _client_contents(sim_config, server_round, state_dict, plan):
    """What the real ClientApp handler replies for each partition (run through ``client_update``)."""
    table = app_config(sim_config, {}, {})
    from baffle.flower.cli import flatten

    out = {}
    for pid in range(sim_config["clients"]):
        ctx = Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid, "num-partitions": 3},
                      state=RecordDict(), run_config=flatten(table))
        msg = Message(RecordDict({"arrays": ArrayRecord(state_dict), "config": wire.plan_to_config(plan)}),
                      metadata=Metadata(run_id=1, message_id=f"m{pid}", src_node_id=0, dst_node_id=100 + pid,
                                        reply_to_message_id="", group_id="", created_at=0.0, ttl=60.0,
                                        message_type="train"))
        out[pid] = client_update(msg, ctx)
    return out


def test_strategy_round_equals_in_process_round_and_drops_bad_replies(tmp_path, task_identity):
    cfg = make_config(TINY, {"out": str(tmp_path / "unused")})
    ref, sim = Simulation(cfg), Simulation(cfg)
    strategy = BaffleStrategy(sim, FlowerOptions(min_replies=2), tmp_path / "rounds.jsonl")
    arrays = ArrayRecord(sim.model.state_dict())
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([102, 100, 101, 103, 104, 105])))
    assert [m.metadata.dst_node_id for m in messages] == [100, 101, 102, 103, 104, 105]
    plan = wire.plan_from_config(messages[0].content["config"])
    assert plan == R.plan_round(cfg.seed, 0, sim.estimator)
    good = _client_contents(TINY, 0, sim.model.state_dict(), plan)
    nan = wire.reply_content(_reply(torch.full((12,), float("nan"), dtype=torch.float64), 16), partition_id=0)
    replies = [_reply_message(102, good[2]), _reply_message(103, error=Error(code=0, reason="ClientApp crashed")),
               _reply_message(100, good[0]), _reply_message(104, nan),
               _reply_message(105, RecordDict({"baffle": MetricRecord({"loss-diffs": [0.0] * 3, "num-examples": 16,
                                                                       "partition-id": 1})})),
               _reply_message(101, good[1])]
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    ref.run_round(0)  # the in-process round over the same three clients
    for k, v in ref.model.state_dict().items():
        assert torch.equal(new_arrays.to_torch_state_dict()[k], v), k
    assert metrics["replies-used"] == 3 and metrics["replies-dropped"] == 3
    line = json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[0])
    reasons = {d["node"]: d["reason"] for d in line["dropped"]}
    assert set(reasons) == {103, 104, 105}
    assert "ClientApp crashed" in reasons[103] and "non-finite" in reasons[104] and "length 12" in reasons[105]
    assert line["replies_used"] == 3 and line["stepped"] and len(line["loss_diffs"]) == 12
    assert (sim.counters.forward_passes, sim.counters.bytes_up) == (ref.counters.forward_passes, ref.counters.bytes_up)
    assert sim.counters.bytes_down == 2 * ref.counters.bytes_down  # 6 nodes were sent the model, not 3
    assert sim.shards.state_dict() == ref.shards.state_dict()


def test_strategy_round_with_the_published_options_equals_the_in_process_round(tmp_path, task_identity):
    """Per-client directions, client-side ∞-norm clipping and equal weights, through the real ClientApp."""
    published = {**TINY, "perturbations": "per-client", "clip": 0.05, "clip_scope": "client",
                 "client_weights": "equal"}
    cfg = make_config(published, {"out": str(tmp_path / "unused")})
    ref, sim = Simulation(cfg), Simulation(cfg)
    strategy = BaffleStrategy(sim, FlowerOptions(min_replies=3), tmp_path / "rounds.jsonl")
    messages = list(strategy.configure_train(1, ArrayRecord(sim.model.state_dict()), ConfigRecord(),
                                             FakeGrid([100, 101, 102])))
    plan = wire.plan_from_config(messages[0].content["config"])
    assert plan.perturbations == "per-client" and plan.client_seed(0) != plan.client_seed(1)
    good = _client_contents(published, 0, sim.model.state_dict(), plan)
    new_arrays, _ = strategy.aggregate_train(1, [_reply_message(100 + pid, good[pid]) for pid in (2, 0, 1)])
    ref.run_round(0)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(new_arrays.to_torch_state_dict()[k], v), k


def test_round_below_min_replies_keeps_the_model_and_logs(tmp_path, task_identity):
    sim = Simulation(make_config(TINY, {"out": str(tmp_path / "unused")}))
    before = {k: v.clone() for k, v in sim.model.state_dict().items()}
    strategy = BaffleStrategy(sim, FlowerOptions(min_replies=2), tmp_path / "rounds.jsonl")
    messages = list(strategy.configure_train(1, ArrayRecord(sim.model.state_dict()), ConfigRecord(),
                                             FakeGrid([7, 8])))
    plan = wire.plan_from_config(messages[0].content["config"])
    good = _client_contents(TINY, 0, sim.model.state_dict(), plan)
    arrays, metrics = strategy.aggregate_train(1, [_reply_message(7, good[0])])  # node 8 never answers
    assert arrays is None and metrics["replies-used"] == 1 and metrics["replies-missing"] == 1
    assert all(torch.equal(before[k], v) for k, v in sim.model.state_dict().items())
    line = json.loads((tmp_path / "rounds.jsonl").read_text())
    assert line["missing_nodes"] == [8] and not line["stepped"]


def test_strategy_refuses_methods_it_cannot_run(tmp_path):
    tiny = {k: v for k, v in TINY.items() if k != "num_perturbations"}
    sim = Simulation(make_config(tiny, {"method": "bp-fedavg", "out": str(tmp_path)}))
    with pytest.raises(ValueError, match="not available on Flower"):
        BaffleStrategy(sim, FlowerOptions())


def test_core_modules_do_not_import_flwr():
    """`baffle` without the extra: only baffle.flower's Flower-facing modules may import flwr."""
    import ast
    from pathlib import Path

    import baffle

    root = Path(baffle.__file__).parent
    allowed = {"wire", "strategy", "server_app", "client_app", "node"}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "flwr" for n in names):
                assert path.parent.name == "flower" and path.stem in allowed, path


def test_supernode_sleeps_are_capped_and_other_time_functions_untouched(monkeypatch):
    import time

    from flwr.supernode import start_client_internal as loop

    from baffle.flower.node import patch_supernode_sleeps

    slept = []
    monkeypatch.setattr(loop, "time", time)  # both restored afterwards
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    monkeypatch.setattr(time, "sleep", slept.append)
    patch_supernode_sleeps(0.1)
    loop.time.sleep(3)
    loop.time.sleep(0.5)
    loop.time.sleep(0.02)
    assert slept == [0.1, 0.1, 0.02]
    assert loop.time.monotonic is time.monotonic
    assert loop.pull_objects.keywords == {"initial_backoff": 0.02, "backoff_cap": 0.1}  # Flower: 1 s, 10 s


def _supernode_launches(monkeypatch, tmp_path, **kw):
    from baffle.flower.launch import Federation

    started = []
    monkeypatch.setattr(Federation, "start", lambda self, name, argv, home=None, extra_env=None:
                        started.append((name, argv, extra_env or {})))
    fed = Federation(tmp_path, **kw)
    fed.port = 9999
    fed.start_supernode("supernode0", {"partition-id": 0, "num-partitions": 2})
    return started


def test_supernode_launch_settings(monkeypatch, tmp_path):
    from baffle.flower.launch import Federation

    (name, argv, env), = _supernode_launches(monkeypatch, tmp_path)  # default: long-running runtime, 0.1 s
    assert argv[1:4] == ["-m", "baffle.flower.node", "supernode"] and argv[argv.index("--poll-interval") + 1] == "0.1"
    runtime = argv[argv.index("--clientapp-runtime") + 1]
    assert argv[argv.index("--isolation") + 1] == "process" and runtime == f"127.0.0.1:{argv[argv.index('--port') + 1]}"
    (name, argv, env), = _supernode_launches(monkeypatch, tmp_path, isolation="subprocess", node_poll_interval=0.2)
    assert "--clientapp-runtime" not in argv and argv[argv.index("--isolation") + 1] == "subprocess"
    assert env == {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}
    (name, argv, env), = _supernode_launches(monkeypatch, tmp_path, isolation="subprocess", node_poll_interval=0)
    assert argv[0].endswith("flower-supernode") and env == {}  # Flower's stock SuperNode
    with pytest.raises(ValueError, match="isolation"):
        Federation(tmp_path, isolation="thread")


def test_deploy_cli_isolation_and_poll_flags():
    import argparse

    from baffle.flower.cli import add_deploy_parser

    parser = argparse.ArgumentParser()
    add_deploy_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["deploy"])
    assert (args.isolation, args.node_poll_interval) == ("process", 0.1)
    args = parser.parse_args(["deploy", "--isolation", "subprocess", "--node-poll-interval", "0"])
    assert (args.isolation, args.node_poll_interval) == ("subprocess", 0.0)
