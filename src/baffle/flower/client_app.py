"""The BAFFLE ``ClientApp``: forward passes only; replies with the K-vector ΔL and the example count.

The run's ``method`` selects what a train message computes, with the functions ``baffle train``
calls (``baffle.rounds``): ``baffle`` the K-vector (``baffle_client_update``), ``bp-fedsgd`` the
exact gradient on the batch (``bp_gradient``), ``baffle-fedavg`` / ``bp-fedavg`` local epochs from
the global weights (``baffle_local_training`` / ``bp_local_training``) with the partition's optimizer
state that the server sends along and gets back (see ``baffle.flower.wire``).

Node config (``flower-supernode --node-config``; the simulation engine sets the first two):
  partition-id    int  which of the run's partitions this node holds (0-based)
  num-partitions  int  must equal the run's ``clients``
  data-dir        str  optional: the node's local dataset folder (overrides the run's ``data_dir``)
  cache-dir       str  optional: where the node caches its partition (default: the temp folder)

The node rebuilds the run's partition from its local copy of the dataset with the run seed, so it
holds exactly the examples client ``partition-id`` has in ``baffle train``. The batch cursor is not
carried between rounds: the server sends the number of batches this partition has taken
(``batches-taken``, the number of earlier rounds that sampled it) and the node seeks the in-process
cursor there (``ClientShards.seek``, O(1)); this survives Flower's fresh ClientApp process per
message, restarted nodes and a resumed server. The node owns its data: it answers the server's
``query`` with the facts the server needs instead of data (``wire.describe_content``), and the
server's ``evaluate`` messages with the test (and validation) metrics of the weights sent, computed
on its own copy of the test set (``baffle.simulation.evaluate``, as ``baffle train`` computes them).
"""
from __future__ import annotations

from baffle.flower import trace

_IMPORT_T0 = trace.process_start_time() if trace.enabled() else 0.0

import hashlib
import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch.nn.functional import cross_entropy

from baffle import rounds as R
from baffle.config import TrainConfig
from baffle.data import load_dataset, partition_indices
from baffle.flower.runconfig import parse_run_config
from baffle.io import save_torch
from baffle.flower.serverstate import DataFacts
from baffle.flower.wire import (ARRAYS, CONFIG, GRADIENT, OPTIMIZER, RAW, ModelUpdate, batches_taken_from_config,
                                describe_content, epochs_taken_from_config, evaluation_content, load_optimizer_state,
                                optimizer_state_arrays, plan_from_config, reply_content, update_content)
from baffle.perturbation import trainable_parameters
from baffle.server import build_optimizer
from baffle.simulation import ClientShards, build_run_model, evaluate, optimizer_spec

app = ClientApp()
if trace.enabled():
    trace.event("clientapp-process-start", t_start=_IMPORT_T0)
    trace.event("clientapp-imported")


@dataclass(frozen=True)
class NodeSettings:
    partition_id: int
    num_partitions: int
    data_dir: str | None
    cache_dir: str | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping, config: TrainConfig) -> NodeSettings:
        try:
            pid, count = int(node_config["partition-id"]), int(node_config["num-partitions"])
        except KeyError as e:
            raise ValueError(f"SuperNode node config lacks {e.args[0]!r}; start it with --node-config "
                             "'partition-id=I num-partitions=N'") from None
        if count != config.clients:
            raise ValueError(f"node config num-partitions={count} but the run has clients={config.clients}; "
                             "they must match")
        if not 0 <= pid < count:
            raise ValueError(f"node config partition-id={pid} outside 0..{count - 1}")
        data_dir = str(node_config.get("data-dir", "")) or config.data_dir
        return cls(pid, count, data_dir, str(node_config.get("cache-dir", "")) or None)


class Worker:
    """A node's partition, batch cursor and model instance (cached per process and run config).

    With the accelerator (``baffle deploy --fast-nodes``: one long-running ClientApp runtime per
    SuperNode) this in-process cache serves every round after the first. With Flower's stock
    ``--isolation subprocess`` (a fresh ClientApp process per message) the node's own partition
    (inputs, targets, and the data facts) is also cached on disk under ``cache_dir``: later rounds
    load a few MB instead of decoding and partitioning the whole dataset again.
    """

    def __init__(self, config: TrainConfig, data_dir: str | None, partition_id: int, cache_dir: str | None):
        self.config, self.partition_id = config, partition_id
        key = hashlib.sha256(json.dumps(["v2", config.dataset, str(data_dir), config.image_size, config.clients,
                                         config.partition, config.seed, config.val_per_class, config.normalize,
                                         partition_id])
                             .encode()).hexdigest()[:24]
        path = Path(cache_dir or tempfile.gettempdir()) / f"baffle-partition-{key}.pt"
        part = _load(path)
        if part is None:
            part = _own_partition(config, data_dir, partition_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_torch(part, path)
        lists = [np.zeros(0, dtype=np.int64)] * config.clients
        lists[partition_id] = np.arange(len(part["targets"]), dtype=np.int64)  # same order as the global indices
        self.shards = ClientShards(part["inputs"], part["targets"], lists, config.seed, config.augment)
        self.facts = DataFacts(**part["facts"])
        self.model = build_model_like(config, self.facts.shape())

    @property
    def num_examples(self) -> int:
        return self.shards.size(self.partition_id)

    def batch(self, batches_taken: int) -> R.Batch:
        """The batch ``baffle train`` gives this partition after it has taken ``batches_taken``."""
        self.shards.seek(self.partition_id, batches_taken, self.config.batch_size)
        return self.shards.next_batch(self.partition_id, self.config.batch_size)

    def epoch_batches(self, epochs_taken: int) -> list[R.Batch]:
        """The batches of an epoch-level round in ``baffle train`` after ``epochs_taken`` local epochs
        (its rounds take whole epochs, so the cursor is then at the start of epoch ``epochs_taken``)."""
        size = self.config.batch_size
        self.shards.seek(self.partition_id, epochs_taken * math.ceil(self.num_examples / size), size)
        return self.shards.epoch_batches(self.partition_id, size, self.config.local_epochs)


_DATASET: dict[tuple, tuple] = {}  # the last (dataset, partition) this process built


def _dataset_and_partition(config: TrainConfig, data_dir: str | None) -> tuple:
    """The decoded dataset and the run's partition, built once per process and run: a simulation
    actor or a long-running ClientApp runtime serves many messages (and virtual nodes)."""
    key = (config.dataset, str(data_dir), config.image_size, config.clients, config.partition, config.seed,
           config.val_per_class, config.normalize)
    if key not in _DATASET:
        _DATASET.clear()  # keep one dataset in memory
        data = load_dataset(config.dataset, data_dir, image_size=config.image_size, normalize=config.normalize)
        part = partition_indices(data.train_targets, config.clients, config.partition, seed=config.seed,
                                 val_per_class=config.val_per_class, num_classes=data.num_classes)
        _DATASET[key] = (data, part)
    return _DATASET[key]


def _own_partition(config: TrainConfig, data_dir: str | None, partition_id: int) -> dict:
    data, part = _dataset_and_partition(config, data_dir)
    idx = torch.from_numpy(np.asarray(part.clients[partition_id], dtype=np.int64))
    facts = {"image_size": data.image_size, "in_channels": data.in_channels, "num_classes": data.num_classes,
             "train_examples": int(sum(len(c) for c in part.clients))}
    return {"inputs": data.train_inputs[idx].clone(), "targets": data.train_targets[idx].clone(), "facts": facts}


def _load(path: Path) -> dict | None:
    try:
        part = torch.load(path, weights_only=True)
    except Exception:  # absent or from an interrupted writer: rebuild it
        return None
    return part if isinstance(part, dict) and {"inputs", "targets", "facts"} <= set(part) else None


def build_model_like(config: TrainConfig, shape: dict) -> torch.nn.Module:
    """``build_run_model`` from the dataset's shape facts alone (same init seed, same weights)."""
    return build_run_model(config, SimpleNamespace(**shape))


_CACHE: dict[tuple, Worker] = {}


def worker_for(config: TrainConfig, node: NodeSettings) -> Worker:
    """One Worker per (run config, node) in this process (Ray actors serve many virtual nodes)."""
    key = (tuple(sorted((k, str(v)) for k, v in config.to_dict().items() if k != "out")), node)
    if key not in _CACHE:
        if len(_CACHE) >= 64:
            _CACHE.clear()
        _CACHE[key] = Worker(config, node.data_dir, node.partition_id, node.cache_dir)
    return _CACHE[key]


def _node(context: Context) -> tuple[TrainConfig, NodeSettings]:
    config, options = parse_run_config(context.run_config)
    if options.client_threads:
        torch.set_num_threads(options.client_threads)
    return config, NodeSettings.from_node_config(context.node_config, config)


def client_update(msg: Message, context: Context) -> RecordDict:
    """The reply content for a train message (kept apart from the handler so tests can wrap it)."""
    trace.event("task-start", node=int(context.node_id))
    config, node = _node(context)
    worker = worker_for(config, node)
    trace.event("data-ready", node=int(context.node_id))
    task = msg.content[CONFIG]
    worker.model.load_state_dict(msg.content[ARRAYS].to_torch_state_dict())
    if config.method == "baffle":
        batch = worker.batch(batches_taken_from_config(task))
        reply = R.baffle_client_update(worker.model, [batch], plan_from_config(task), cross_entropy,
                                       node.partition_id)
        content = reply_content(reply, node.partition_id)
    elif config.method == "bp-fedsgd":
        batch = worker.batch(batches_taken_from_config(task))
        grads, loss = R.bp_gradient(worker.model, batch, cross_entropy)
        content = update_content(GRADIENT, ModelUpdate(grads, len(batch[1]), loss), node.partition_id)
    else:
        content = update_content(ARRAYS, local_training(worker, msg), node.partition_id)
    trace.event("compute-done", node=int(context.node_id), round=int(task["server-round"]))
    return content


def local_training(worker: Worker, msg: Message) -> ModelUpdate:
    """An epoch-level round on the node (``worker.model`` holds the global weights): ``baffle train``'s
    ``Simulation._fedavg`` for one client, its optimizer state loaded from and returned to the server."""
    config, task = worker.config, msg.content[CONFIG]
    if OPTIMIZER not in msg.content:
        raise ValueError(f"train message lacks the {OPTIMIZER!r} record (the partition's optimizer state) that "
                         f"--method {config.method} needs; sent by a different baffle version?")
    batches = worker.epoch_batches(epochs_taken_from_config(task))
    spec = optimizer_spec(config)
    optimizer = build_optimizer([p for _, p in trainable_parameters(worker.model)], spec)
    saved = msg.content[OPTIMIZER]
    load_optimizer_state(optimizer, saved.to_torch_state_dict() if len(saved) else {})
    if config.method == "baffle-fedavg":
        seen, loss = R.baffle_local_training(worker.model, batches, plan_from_config(task), cross_entropy, optimizer,
                                             client_id=worker.partition_id, clip=spec.clip,
                                             clip_norm_type=spec.clip_norm_type)
    else:
        seen, loss = R.bp_local_training(worker.model, batches, cross_entropy, optimizer)
    weights = {k: v.detach().clone() for k, v in worker.model.state_dict().items()}
    return ModelUpdate(weights, seen, loss, len(batches), optimizer_state_arrays(optimizer))


def node_evaluation(msg: Message, context: Context) -> dict:
    """``Simulation.evaluate``'s metrics of the weights in ``msg``, on this node's copy of the data."""
    config, node = _node(context)
    worker = worker_for(config, node)
    data, part = _dataset_and_partition(config, node.data_dir)
    model, size = worker.model, config.eval_batch_size
    model.load_state_dict(msg.content[ARRAYS].to_torch_state_dict())
    out = dict(zip(("test_loss", "test_accuracy"), evaluate(model, data.test_inputs, data.test_targets, size)))
    validation = torch.from_numpy(np.asarray(part.validation, dtype=np.int64))
    if len(validation):
        x, y = data.train_inputs[validation], data.train_targets[validation]
        out["val_loss"], out["val_accuracy"] = evaluate(model, x, y, size)
    if RAW in msg.content:  # EMA on: the metrics above are the EMA weights'; these the raw weights'
        model.load_state_dict(msg.content[RAW].to_torch_state_dict())
        out["raw_test_loss"], out["raw_test_accuracy"] = evaluate(model, data.test_inputs, data.test_targets, size)
    return out


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(client_update(msg, context), reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Test/validation metrics of the server's weights (the server holds no data)."""
    return Message(evaluation_content(node_evaluation(msg, context)), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Describe the node's data: partition id and size, and the facts the server needs (no data)."""
    config, node = _node(context)
    worker = worker_for(config, node)
    return Message(describe_content(node.partition_id, worker.num_examples, worker.facts), reply_to=msg)


__all__ = ["NodeSettings", "Worker", "app", "client_update", "local_training", "node_evaluation", "worker_for"]
