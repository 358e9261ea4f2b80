"""The Flower adapter without a Flower engine: run config, wire format, the server over an in-memory grid
(the real ClientApp handlers), the accelerator's internals check and its fallback, the deploy CLI's refusals."""
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict  # noqa: E402
from flwr.common.config import flatten_dict  # noqa: E402
try:  # flwr >= 1.4x: a Message needs the task identity Flower's runtime sets
    from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
except ImportError:  # older releases of the supported range have none
    TaskIdentity = None

from baffle import rounds as R  # noqa: E402
from baffle.config import make_config  # noqa: E402
from baffle.flower import wire  # noqa: E402
from baffle.flower.cli import flatten  # noqa: E402
from baffle.flower.runconfig import FlowerOptions, app_config, app_pyproject, parse_run_config  # noqa: E402
from baffle.flower.serverstate import DataFacts, ServerRun, rounds_per_epoch  # noqa: E402
from baffle.flower.server_app import run_server  # noqa: E402
from baffle.flower.strategy import BaffleStrategy, NodeBook  # noqa: E402
from baffle.simulation import ClientShards, Simulation, rounds_sampled_before, sample_clients  # noqa: E402
from baffle.training import load_checkpoint, train  # noqa: E402
from baffle.flower.fastpath import problems as fast_path_problems  # noqa: E402
from memgrid import MemoryGrid  # noqa: E402

# The accelerator's tests need the flwr internals it was written against; on another flwr release
# `--fast-nodes` falls back to the stock path (tested below with a simulated missing internal).
fast_only = pytest.mark.skipif(bool(fast_path_problems()), reason="this flwr lacks the accelerator's internals: "
                               + "; ".join(fast_path_problems()[:3]))

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
    philox = R.plan_round(3, 9, R.EstimatorSpec(num_perturbations=5, sigma=1e-4, stream="philox"))
    assert wire.plan_from_config(wire.plan_to_config(philox)).estimator.stream == "philox"
    old = wire.plan_to_config(plan)
    del old["direction-stream"]  # a server from before the key: the mt19937 stream it used
    assert wire.plan_from_config(old) == plan
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


# ---- the server over an in-memory grid (the real ClientApp handlers, no Flower process) ----------

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


@pytest.fixture
def task_identity():
    """Message() for instructions needs a run id (set by Flower's runtime in a real ServerApp)."""
    if TaskIdentity is None:
        yield
        return
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


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


def flower_in_memory(config: dict, out, options=None, nodes=None, fail=None, node_config=None):
    table = app_config(config, {"out": str(out)}, options or {})
    grid = MemoryGrid(table, nodes or {100 + i: i for i in range(config["clients"])}, node_config, fail)
    cfg, opts = parse_run_config(flatten(table))
    return run_server(grid, cfg, opts), grid


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def assert_same_run(flower_out, reference_out, reference_diffs, metric_keys=("test_loss", "test_accuracy")):
    rounds = lines(flower_out / "rounds.jsonl")
    assert len(rounds) == len(reference_diffs)
    for line, diffs in zip(rounds, reference_diffs):
        assert torch.equal(torch.tensor(line["loss_diffs"], dtype=torch.float64), diffs), line["round"]
    a, b = torch.load(flower_out / "model.pt"), torch.load(reference_out / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ours, ref = lines(flower_out / "metrics.jsonl"), lines(reference_out / "metrics.jsonl")
    keys = [k for k in ref[0] if k in metric_keys or k in ("round", "epoch", "lr", "forward_passes", "bytes_up")]
    assert [{k: m.get(k) for k in keys} for m in ours] == [{k: m[k] for k in keys} for m in ref]


SAMPLED = {**TINY, "clients": 6, "fraction": 0.5, "rounds": 6, "eval_every": 2, "val_per_class": 2,
           "ema_decay": 0.9}
PUBLISHED = {**TINY, "rounds": 2, "perturbations": "per-client", "clip": 0.05, "clip_scope": "client",
             "client_weights": "equal"}
EVAL_KEYS = ("test_loss", "test_accuracy", "raw_test_loss", "raw_test_accuracy", "val_loss", "val_accuracy")


@pytest.mark.parametrize("config", [SAMPLED, PUBLISHED], ids=["sampling-ema-validation", "published-options"])
def test_server_equals_baffle_train_bit_for_bit(tmp_path, task_identity, config):
    """Same sampled clients, batches, ΔL sums, model and evaluation (EMA and validation computed on a node)."""
    summary, grid = flower_in_memory(config, tmp_path / "flower")
    assert_same_run(tmp_path / "flower", tmp_path / "ref", in_process(config, tmp_path / "ref"), EVAL_KEYS)
    used = [x["partitions"] for x in lines(tmp_path / "flower" / "rounds.jsonl")]
    assert used == [sample_clients(config["clients"], config.get("fraction", 1.0), config["seed"], t)
                    for t in range(config["rounds"])]
    assert summary == {**json.loads((tmp_path / "flower" / "summary.json").read_text())}
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trains) == sum(map(len, used))  # only the sampled partitions' nodes are sent the model


# the other methods, each with the state it must carry: sampling (cursors of unsampled partitions),
# EMA, SGD momentum / Adam moments of every partition's local optimizer, per-client directions, clipping
BP = {k: v for k, v in TINY.items() if k != "num_perturbations"}
OTHER_METHODS = {
    "bp-fedsgd": {**BP, "method": "bp-fedsgd", "lr": 0.05, "fraction": 0.67, "ema_decay": 0.9, "clip": 0.02},
    "bp-fedavg": {**BP, "method": "bp-fedavg", "optimizer": "sgd", "momentum": 0.9, "lr": 0.02, "local_epochs": 2,
                  "fraction": 0.67, "val_per_class": 2},
    "baffle-fedavg": {**TINY, "method": "baffle-fedavg", "fraction": 0.67, "perturbations": "per-client",
                      "clip": 0.05},
}
METHOD_KEYS = ("round", "epoch", "lr", "forward_passes", "backward_passes", "bytes_up", "bytes_down", "train_loss",
               *EVAL_KEYS)


def assert_same_model_and_metrics(flower_out, reference_out):
    """model.pt bit for bit, and every metric both runs write (wall time and Flower's reply counts aside)."""
    a, b = torch.load(flower_out / "model.pt"), torch.load(reference_out / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ours, ref = lines(flower_out / "metrics.jsonl"), lines(reference_out / "metrics.jsonl")
    assert [{k: m.get(k) for k in METHOD_KEYS} for m in ours] == [{k: m.get(k) for k in METHOD_KEYS} for m in ref]


@pytest.mark.parametrize("method", list(OTHER_METHODS))
def test_server_runs_the_backprop_and_epoch_level_methods_as_baffle_train_bit_for_bit(tmp_path, task_identity,
                                                                                     method):
    config = OTHER_METHODS[method]
    flower_in_memory(config, tmp_path / "flower")
    train(make_config(config, {"out": str(tmp_path / "ref")}), progress=False)
    assert_same_model_and_metrics(tmp_path / "flower", tmp_path / "ref")
    used = [x["partitions"] for x in lines(tmp_path / "flower" / "rounds.jsonl")]
    assert used == [sample_clients(3, 0.67, 5, t) for t in range(4)] and len(set(map(tuple, used))) > 1


def test_epoch_level_resume_carries_every_partitions_optimizer_state(tmp_path, task_identity):
    """The server keeps each partition's local optimizer state (in its checkpoint too) and sends it with
    the partition's task: a resumed run ends with the uninterrupted model; a node that dropped the
    state it was sent would not (the Adam moments of earlier rounds change the steps)."""
    config = {**OTHER_METHODS["baffle-fedavg"], "rounds": 5, "eval_every": 2}
    out = tmp_path / "flower"

    def crash_in_round_4(node, msg):
        if msg.metadata.message_type == "train" and int(msg.content["config"]["server-round"]) == 3:
            raise Crash()

    with pytest.raises(Crash):
        flower_in_memory(config, out, fail=crash_in_round_4)
    ckpt = load_checkpoint(out)
    assert ckpt["round"] == 2 and all(s is not None for s in ckpt["state"]["local_optimizers"])
    flower_in_memory(config, out, options={"resume": True})
    train(make_config(config, {"out": str(tmp_path / "ref")}), progress=False)
    assert_same_model_and_metrics(out, tmp_path / "ref")


def test_epoch_level_node_without_its_optimizer_state_differs(tmp_path, task_identity, monkeypatch):
    """The oracle above can fail: a node that ignores the state it is sent ends elsewhere."""
    from baffle.flower import client_app

    monkeypatch.setattr(client_app, "load_optimizer_state", lambda optimizer, flat: None)
    config = {**OTHER_METHODS["bp-fedavg"], "rounds": 3}
    flower_in_memory(config, tmp_path / "flower")
    train(make_config(config, {"out": str(tmp_path / "ref")}), progress=False)
    a, b = torch.load(tmp_path / "flower" / "model.pt"), torch.load(tmp_path / "ref" / "model.pt")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_optimizer_state_survives_the_wire_and_continues_the_same_steps():
    """Adam moved by a few steps, sent as flat arrays into a fresh Adam, then stepped once more, equals
    the original stepped once more (float32 bit for bit)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        model.weight.grad, model.bias.grad = torch.randn(2, 3), torch.randn(2)
        opt.step()
    flat = wire.optimizer_state_arrays(opt)
    assert sorted(flat) == ["0.exp_avg", "0.exp_avg_sq", "0.step", "1.exp_avg", "1.exp_avg_sq", "1.step"]
    record = ArrayRecord(flat).to_torch_state_dict()  # through Flower's own array record
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    opt2 = torch.optim.Adam(twin.parameters(), lr=0.1)
    wire.load_optimizer_state(opt2, record)
    g = torch.randn(2, 3), torch.randn(2)
    for m, o in ((model, opt), (twin, opt2)):
        m.weight.grad, m.bias.grad = g[0].clone(), g[1].clone()
        o.step()
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)


GOOD_WEIGHTS, GOOD_STATE = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}, {"0.step": torch.tensor(1.0)}


def _update_reply(tensors, optimizer, **metrics):
    content = {"baffle": MetricRecord({"num-examples": 16, "partition-id": 1, "local-steps": 2, **metrics}),
               "arrays": ArrayRecord(tensors)}
    if optimizer is not None:
        content["optimizer"] = ArrayRecord(optimizer)
    return RecordDict(content)


@pytest.mark.parametrize("tensors, state, metrics, match", [
    ({"w": torch.zeros(2, 3)}, GOOD_STATE, {}, "must hold 2 tensors"),
    ({"w": torch.zeros(3, 2), "b": torch.zeros(2)}, GOOD_STATE, {}, "w is torch.float32 (3, 2), expected"),
    ({"w": torch.full((2, 3), float("inf")), "b": torch.zeros(2)}, GOOD_STATE, {}, "w has non-finite"),
    (GOOD_WEIGHTS, None, {}, "'optimizer': missing"),
    (GOOD_WEIGHTS, {"7.exp_avg": torch.zeros(2)}, {}, "not '<parameter index < 2>.<name>'"),
    (GOOD_WEIGHTS, {"0.exp_avg": torch.full((2, 3), float("nan"))}, {}, "0.exp_avg has non-finite"),
    (GOOD_WEIGHTS, GOOD_STATE, {"local-steps": 0}, "local-steps=0"),
])
def test_malformed_weight_reply_is_a_value_error_naming_the_node(tensors, state, metrics, match):
    import re

    with pytest.raises(ValueError, match=re.escape(match)) as e:
        wire.update_from_content(_update_reply(tensors, state, **metrics), node_id=42, key="arrays",
                                 expected=GOOD_WEIGHTS, num_params=2)
    assert "node 42" in str(e.value) and "\n" not in str(e.value)


def test_weight_reply_round_trips():
    update = wire.ModelUpdate({k: torch.randn(v.shape) for k, v in GOOD_WEIGHTS.items()}, 48, 0.5, 3,
                              {"0.exp_avg": torch.randn(2, 3), "0.step": torch.tensor(3.0)})
    partition, back = wire.update_from_content(wire.update_content("arrays", update, 4), node_id=1, key="arrays",
                                               expected=GOOD_WEIGHTS, num_params=2)
    assert partition == 4 and (back.num_examples, back.loss, back.local_steps) == (48, 0.5, 3)
    assert all(torch.equal(back.tensors[k], update.tensors[k]) for k in GOOD_WEIGHTS)
    assert all(torch.equal(back.optimizer_state[k], update.optimizer_state[k]) for k in update.optimizer_state)


class Crash(BaseException):
    """The server process dying mid-round (nothing in the server may catch it)."""


def test_server_resumes_after_a_crash_and_ends_with_the_uninterrupted_model(tmp_path, task_identity):
    config = {**SAMPLED, "rounds": 7}
    out = tmp_path / "flower"

    def crash_in_round_6(node, msg):
        if msg.metadata.message_type == "train" and int(msg.content["config"]["server-round"]) == 5:
            raise Crash()

    with pytest.raises(Crash):
        flower_in_memory(config, out, fail=crash_in_round_6)
    assert load_checkpoint(out)["round"] == 4  # the last evaluation
    assert len(lines(out / "rounds.jsonl")) == 5  # round 5 done but not checkpointed: redone on resume
    flower_in_memory(config, out, options={"resume": True})
    assert_same_run(out, tmp_path / "ref", in_process(config, tmp_path / "ref"), EVAL_KEYS)
    with pytest.raises(ValueError, match="already holds a run"):
        flower_in_memory(config, out)


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason=f"MNIST not found in {SHARED}")
def test_server_without_a_data_directory_equals_baffle_train(tmp_path, task_identity):
    """The server's data_dir does not exist; each node reads its own copy (node config data-dir)."""
    config = {"dataset": "mnist", "model": "mlp", "hidden": [8], "clients": 3, "fraction": 0.67,
              "num_perturbations": 8, "rounds": 3, "eval_every": 1, "batch_size": 16, "seed": 2,
              "val_per_class": 1}
    flower_in_memory({**config, "data_dir": str(tmp_path / "server-has-no-data")}, tmp_path / "flower",
                     node_config={"data-dir": str(SHARED)})
    assert not (tmp_path / "server-has-no-data").exists()
    assert_same_run(tmp_path / "flower", tmp_path / "ref",
                    in_process({**config, "data_dir": str(SHARED)}, tmp_path / "ref"), EVAL_KEYS)


@pytest.mark.parametrize("config", [TINY, {**TINY, "fraction": 0.34, "partition": "dirichlet:0.5"},
                                    {**TINY, "clients": 7, "batch_size": 5, "fraction": 0.5},
                                    {**TINY, "epochs": 2.5, "rounds": None, "eval_every": None}])
def test_server_state_from_the_nodes_facts_matches_the_in_process_simulation(tmp_path, config):
    cfg = make_config(config, {"out": str(tmp_path)})
    sim = Simulation(cfg)
    sizes = [sim.shards.size(c) for c in range(cfg.clients)]
    facts = DataFacts(sim.data.image_size, sim.data.in_channels, sim.data.num_classes, sum(sizes))
    run = ServerRun(cfg, facts)
    assert rounds_per_epoch(cfg, sum(sizes)) == sim.rounds_per_epoch
    assert (run.rounds, run.eval_every, run.num_parameters, run.model_bytes) == (
        sim.rounds, sim.eval_every, sim.num_parameters, sim.model_bytes)
    assert all(torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), sim.model.state_dict().values()))


def _strategy_round(tmp_path, partitions, replies_for, min_replies):
    """One configure/aggregate round of a BaffleStrategy whose nodes are ``partitions`` (node → partition)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    table = app_config(TINY, {"out": str(tmp_path / "unused")}, {})
    grid = MemoryGrid(table, partitions)
    cfg = make_config(TINY, {"out": str(tmp_path / "unused")})
    book = NodeBook(cfg.clients)
    book.refresh(grid, 10)
    run = ServerRun(cfg, book.facts)
    strategy = BaffleStrategy(run, FlowerOptions(min_replies=min_replies), tmp_path / "rounds.jsonl", book)
    messages = list(strategy.configure_train(1, ArrayRecord(run.model.state_dict()), ConfigRecord(), grid))
    good = {m.metadata.src_node_id: m for m in grid.pull_messages(grid.push_messages(messages))}
    new_arrays, metrics = strategy.aggregate_train(1, replies_for(good))
    return run, strategy, messages, new_arrays, metrics


def _reply_message(node, content=None, error=None):
    meta = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"m{node}",
                    group_id="", created_at=0.0, ttl=60.0, message_type="train")
    return Message(content, metadata=meta) if error is None else Message(error, metadata=meta)


def test_strategy_drops_bad_replies_and_steps_with_the_good_ones(tmp_path, task_identity):
    partitions = {100: 0, 101: 1, 102: 2, 103: 0}  # node 103 claims a partition node 100 serves: not used
    good_only = _strategy_round(tmp_path / "a", partitions, lambda good: list(good.values()), 3)
    nan = wire.reply_content(_reply(torch.full((12,), float("nan"), dtype=torch.float64), 16), partition_id=1)

    def bad_and_good(good):
        return [good[102], _reply_message(103, error=Error(code=0, reason="ClientApp crashed")), good[100],
                _reply_message(101, nan), good[101],
                _reply_message(104, RecordDict({"baffle": MetricRecord({"loss-diffs": [0.0] * 12, "num-examples": 16,
                                                                        "partition-id": 1})})),
                _reply_message(100, RecordDict({"baffle": MetricRecord({"loss-diffs": [0.0] * 3, "num-examples": 16,
                                                                        "partition-id": 0})}))]

    run, strategy, messages, new_arrays, metrics = _strategy_round(tmp_path / "b", partitions, bad_and_good, 3)
    assert sorted(m.metadata.dst_node_id for m in messages) == [100, 101, 102]
    for k, v in good_only[0].model.state_dict().items():
        assert torch.equal(new_arrays.to_torch_state_dict()[k], v), k
    assert metrics["replies-used"] == 3 and metrics["replies-dropped"] == 4
    line = json.loads((tmp_path / "b" / "rounds.jsonl").read_text().splitlines()[0])
    reasons = [(d["node"], d["reason"]) for d in line["dropped"]]
    assert [n for n, _ in reasons] == [103, 101, 104, 100]
    assert "not asked" in reasons[0][1] or "crashed" in reasons[0][1]
    assert "non-finite" in reasons[1][1] and "not asked" in reasons[2][1] and "length 12" in reasons[3][1]
    assert line["replies_used"] == 3 and line["stepped"] and len(line["loss_diffs"]) == 12
    assert line["partitions"] == [0, 1, 2]


def test_round_below_min_replies_keeps_the_model_and_logs(tmp_path, task_identity):
    run, strategy, messages, arrays, metrics = _strategy_round(
        tmp_path, {7: 0, 8: 1, 9: 2}, lambda good: [good[7]], 2)  # nodes 8 and 9 never answer
    assert arrays is None and metrics["replies-used"] == 1 and metrics["replies-missing"] == 2
    before = ServerRun(run.config, run.facts).model.state_dict()
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    line = json.loads((tmp_path / "rounds.jsonl").read_text())
    assert line["missing_nodes"] == [8, 9] and not line["stepped"]


def test_node_book_learns_partitions_forgets_gone_nodes_and_refuses_mismatched_data(tmp_path, task_identity):
    table = app_config(TINY, {"out": str(tmp_path)}, {})
    grid = MemoryGrid(table, {5: 2, 6: 0})
    book = NodeBook(3)
    book.refresh(grid, 10)
    assert book.partition_of == {5: 2, 6: 0} and book.by_partition() == [6, 5]
    del grid.partitions[5]
    grid.partitions[9] = 1
    book.refresh(grid, 10)
    assert book.partition_of == {6: 0, 9: 1}
    book.facts = DataFacts(8, 1, 10, 999)  # another dataset on the next node
    grid.partitions[11] = 2
    book.refresh(grid, 10)
    assert 11 not in book.partition_of and "differs" in book.failures[11][1]


def test_core_modules_do_not_import_flwr():
    """`baffle` without the extra: only baffle.flower's Flower-facing modules may import flwr."""
    import ast

    import baffle

    root = Path(baffle.__file__).parent
    allowed = {"wire", "strategy", "server_app", "client_app", "node"}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "flwr" for n in names):
                assert path.parent.name == "flower" and path.stem in allowed, path


# ---- the accelerator (--fast-nodes): its flwr internals, checked; the fallback ------------------------

def test_fast_path_lists_every_flwr_name_the_accelerator_imports():
    """Every ``from flwr... import X`` in node.py (and the ServerApp's accelerate_grid) is in NEEDS."""
    import ast

    from baffle.flower import fastpath, node

    targets = {n.target for n in fastpath.NEEDS} | {n.same_as for n in fastpath.NEEDS if n.same_as}
    public = {"flwr.app:Message", "flwr.app:Error"}
    for tree in (ast.parse(Path(node.__file__).read_text()),):
        for imp in ast.walk(tree):
            if isinstance(imp, ast.ImportFrom) and (imp.module or "").startswith("flwr"):
                for alias in imp.names:
                    name = f"{imp.module}:{alias.name}"
                    module = f"{imp.module}.{alias.name}"  # `from flwr.x import module`
                    covered = name in targets or any(t.startswith(name + ".") for t in targets) or \
                        any(t.split(":")[0] == module for t in targets)
                    assert covered or name in public, name


@fast_only
def test_fast_path_internals_are_all_there_in_the_flwr_it_was_written_for():
    from baffle.flower import fastpath

    assert fastpath.problems() == [] and fastpath.fast_path_problem() is None


@fast_only
def test_fast_path_check_names_a_missing_or_changed_internal(monkeypatch):
    from flwr.supercore import inflatable
    from flwr.supercore.runtime import RuntimeHttpClient

    from baffle.flower import fastpath

    monkeypatch.delattr(RuntimeHttpClient, "AcquireTask")
    problem = fastpath.fast_path_problem()
    assert "flwr.supercore.runtime:RuntimeHttpClient: changed (no AcquireTask)" in problem
    assert "stock path" in problem and "\n" not in problem
    monkeypatch.setattr(inflatable.inflatable_utils, "pull_and_inflate_object_from_tree", lambda tree, a, b: None)
    found = fastpath.problems()
    assert len(found) == 2 and "no parameter return_type, initial_backoff, backoff_cap" in found[1]
    monkeypatch.delattr(inflatable.inflatable_utils, "pull_objects")
    assert any("pull_objects: missing" in p for p in fastpath.problems())


@fast_only
def test_fast_nodes_fall_back_to_the_stock_path_with_one_warning(monkeypatch, capsys, tmp_path):
    """A missing internal: the launcher keeps Flower's stock SuperNodes; the node wrapper, run anyway,
    replaces itself with Flower's stock SuperNode."""
    from flwr.supercore.runtime import RuntimeHttpClient

    from baffle.flower import cli as flower_cli
    from baffle.flower import node

    assert flower_cli._fast_path_usable() and capsys.readouterr().err == ""
    monkeypatch.delattr(RuntimeHttpClient, "AcquireTask")
    assert not flower_cli._fast_path_usable()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("baffle: warning: --fast-nodes needs flwr internals")
    execs = []
    monkeypatch.setattr(node.os, "execv", lambda path, argv: execs.append(argv))
    node.run_supernode(["--poll-interval", "0.1", "--clientapp-runtime", "127.0.0.1:1", "--",
                        "--superlink", "127.0.0.1:2", "--isolation", "process", "--insecure"])
    (argv,), err = execs, capsys.readouterr().err
    assert argv[0].endswith("flower-supernode") and argv[argv.index("--isolation") + 1] == "subprocess"
    assert err.count("\n") == 1 and "stock path" in err


@fast_only
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

    (name, argv, env), = _supernode_launches(monkeypatch, tmp_path)  # default: Flower's stock SuperNode
    assert argv[0].endswith("flower-supernode") and argv[argv.index("--isolation") + 1] == "subprocess" and env == {}
    (name, argv, env), = _supernode_launches(monkeypatch, tmp_path, fast_nodes=True)  # runtime, 0.1 s
    assert argv[1:4] == ["-m", "baffle.flower.node", "supernode"] and argv[argv.index("--poll-interval") + 1] == "0.1"
    runtime = argv[argv.index("--clientapp-runtime") + 1]
    assert argv[argv.index("--isolation") + 1] == "process" and runtime == f"127.0.0.1:{argv[argv.index('--port') + 1]}"
    (name, argv, env), = _supernode_launches(monkeypatch, tmp_path, fast_nodes=True, isolation="subprocess",
                                             node_poll_interval=0.2)
    assert "--clientapp-runtime" not in argv and argv[argv.index("--isolation") + 1] == "subprocess"
    assert env == {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}
    with pytest.raises(ValueError, match="isolation"):
        Federation(tmp_path, isolation="thread")


def test_deploy_cli_flags():
    import argparse

    from baffle.flower.cli import add_deploy_parser

    parser = argparse.ArgumentParser()
    add_deploy_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["deploy"])
    assert (args.fast_nodes, args.isolation, args.node_poll_interval, args.resume) == (False, None, None, False)
    args = parser.parse_args(["deploy", "--fast-nodes", "--isolation", "subprocess", "--node-poll-interval", "0",
                              "--resume", "--checkpoint-every", "10,1m"])
    assert (args.fast_nodes, args.isolation, args.node_poll_interval, args.resume) == (True, "subprocess", 0.0, True)


@pytest.mark.parametrize("argv, match", [
    (["--method", "bp-fedavg", "--num-perturbations", "8"], "method 'bp-fedavg' does not use it"),
    (["--method", "bp-fedsgd", "--aggregator", "median"], "method 'bp-fedsgd' does not use it"),
    (["--nodes", "2", "--min-replies", "5"], "--min-replies 5"),
    (["--nodes", "4", "--fraction", "0.5", "--min-replies", "3"], "samples only 2 of the 4"),
    (["--isolation", "process"], "add --fast-nodes"),
    (["--engine", "simulation", "--fast-nodes"], "deployment engine only"),
    (["--resume"], "--resume needs --out"),
    (["--checkpoint-every", "often"], "--checkpoint-every"),
    (["--dataset", "mnist"], "pass --data-dir"),
])
def test_deploy_refuses_impossible_runs_in_one_line_before_starting_anything(argv, match, capsys, monkeypatch,
                                                                            tmp_path):
    from baffle.flower import cli as flower_cli
    from baffle.flower import launch

    monkeypatch.setattr(launch.Federation, "start", lambda *a, **k: pytest.fail("a process was started"))
    assert flower_cli.main([*argv, "--out", str(tmp_path / "out")] if argv != ["--resume"] else argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and "\x1b[" not in err, err


def test_deploy_resume_refuses_a_missing_checkpoint_and_an_in_process_one(tmp_path, capsys, monkeypatch):
    from baffle.flower import cli as flower_cli
    from baffle.flower import launch

    monkeypatch.setattr(launch.Federation, "start", lambda *a, **k: pytest.fail("a process was started"))
    assert flower_cli.main(["--resume", "--out", str(tmp_path / "none")]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    train(make_config({**TINY, "rounds": 1}, {"out": str(tmp_path / "inproc")}), progress=False)
    assert flower_cli.main(["--resume", "--out", str(tmp_path / "inproc")]) == 2
    assert "written by `baffle train`" in capsys.readouterr().err


# ---- the watchdog: nothing outlives a killed launcher ---------------------------------------------

_LAUNCHER = """
import os, subprocess, sys, time
from baffle.flower.launch import Federation
fed = Federation(sys.argv[1], stop_grace=2.0)
leader = fed.start("leader", [sys.executable, "-c", "import time; time.sleep(120)"])
# a child in a session of its own, as flwr's SuperLink starts its SuperExec: outside every group
detached = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                            env=fed.process_env("home-detached"))
print(leader.pid, detached.pid, flush=True)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_watchdog_ends_groups_and_detached_children_when_the_launcher_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(tmp_path / "fed")], stdout=subprocess.PIPE,
                                text=True)
    pids = []
    try:
        pids = [int(x) for x in launcher.stdout.readline().split()]
        assert len(pids) == 2 and all(_running(p) for p in pids)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_running(p) for p in pids)
    finally:
        for pid in pids:  # only if the watchdog failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if launcher.poll() is None:
            launcher.kill()
