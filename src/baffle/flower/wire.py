"""Wire format between the BAFFLE ServerApp and ClientApps (Flower Message API records).

Server → node, message type ``train``, ``RecordDict``:
  "arrays": ArrayRecord  the global model's ``state_dict`` (float32 tensors, key order kept)
  "config": ConfigRecord the round plan: everything a client needs to regenerate δ_k
      server-round        int    BAFFLE's 0-based round t (Flower's round is t + 1)
      seed                int    round seed s = plan_round(base seed, t).seed
      num-perturbations   int    K
      sigma               float  σ
      scheme              str    forward | central | twice-fd
      distribution        str    gaussian | rademacher
      direction-stream    str    mt19937 | philox (absent: mt19937, as sent before it existed)
      perturbations       str    shared | per-client
      batches-taken       int    batches this partition has taken before round t (the number of
                                 earlier rounds that sampled it): the node derives its batch from
                                 (seed, partition id, batches-taken) in O(1)

Node → server, reply to that message, ``RecordDict``:
  "baffle": MetricRecord
      loss-diffs    list[float]  ΔL, K floats (2K for twice-fd), sent as float64: lossless
      num-examples  int          n_c, examples in the batch the ΔL was measured on
      loss          float        L(W) on that batch (telemetry)
      partition-id  int          the node's partition (orders the server's sum as in-process)

The other methods (``method`` in the run config, which every node has) use the same message type:

  bp-fedsgd      config: server-round, batches-taken (no estimator keys)
                 reply: "gradient" ArrayRecord (the exact gradient ∂L/∂W on the batch, one float32
                 tensor per trainable parameter), "baffle" MetricRecord (num-examples, loss, partition-id)
  baffle-fedavg  config: the round plan above and epochs-taken (local epochs this partition has done
  bp-fedavg      before round t; bp-fedavg: server-round and epochs-taken only), "optimizer" ArrayRecord
                 (the partition's local optimizer state, see below; empty in its first round)
                 reply: "arrays" ArrayRecord (the locally trained ``state_dict``), "optimizer"
                 ArrayRecord (the updated optimizer state), "baffle" MetricRecord (num-examples: the
                 examples seen over all local steps, loss: their mean batch loss, local-steps,
                 partition-id)

The local optimizer's state (Adam: step, exp_avg, exp_avg_sq per parameter; SGD with momentum: the
momentum buffers; plain SGD: nothing) is keyed "<parameter index>.<name>"; the server keeps it per
partition as opaque bookkeeping (and in its checkpoint) and sends it back with the partition's next
task, so a node keeps no state between rounds and ``baffle train``'s per-client optimizers are
reproduced exactly.

Server → node, message type ``query`` (empty content): "describe your data". Reply "baffle":
MetricRecord with partition-id, num-examples (this partition's size), train-examples (Σ of all
partitions' sizes), image-size, in-channels, num-classes: what the server needs to build the
model and count the rounds of an epoch without the data.

Server → node, message type ``evaluate``: "arrays" (the weights to evaluate: the EMA weights if
EMA is on), optionally "raw" (the raw weights, with EMA), "config" (server-round). Reply "baffle":
MetricRecord with test-loss, test-accuracy, and raw-test-* / val-* when they apply.

Nothing else leaves a node. Replies are validated on the server (``reply_from_content``,
then ``baffle.server.check_reply``); a bad reply raises ValueError and is dropped.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from baffle.flower.serverstate import DataFacts
from baffle.rounds import EstimatorSpec, RoundPlan
from baffle.server import ClientReply

ARRAYS, RAW, CONFIG, REPLY = "arrays", "raw", "config", "baffle"
GRADIENT, OPTIMIZER = "gradient", "optimizer"
LOSS_DIFFS, NUM_EXAMPLES, LOSS, PARTITION = "loss-diffs", "num-examples", "loss", "partition-id"
BATCHES_TAKEN, EPOCHS_TAKEN, LOCAL_STEPS = "batches-taken", "epochs-taken", "local-steps"
TRAIN_EXAMPLES = "train-examples"
FACT_KEYS = {"image_size": "image-size", "in_channels": "in-channels", "num_classes": "num-classes",
             "train_examples": TRAIN_EXAMPLES}
EVAL_KEYS = ("test_loss", "test_accuracy", "raw_test_loss", "raw_test_accuracy", "val_loss", "val_accuracy")


def plan_to_config(plan: RoundPlan, batches_taken: int = 0) -> ConfigRecord:
    e = plan.estimator
    return ConfigRecord({"server-round": plan.server_round, "seed": plan.seed,
                         "num-perturbations": e.num_perturbations, "sigma": float(e.sigma),
                         "scheme": e.scheme, "distribution": e.distribution, "direction-stream": e.stream,
                         "perturbations": plan.perturbations, BATCHES_TAKEN: int(batches_taken)})


def train_config(server_round: int, plan: RoundPlan | None = None, *, batches_taken: int | None = None,
                 epochs_taken: int | None = None) -> ConfigRecord:
    """A train message's config: the round plan (BAFFLE methods) or just the round, and the cursor."""
    record = plan_to_config(plan) if plan is not None else ConfigRecord({"server-round": int(server_round)})
    for key, value in ((BATCHES_TAKEN, batches_taken), (EPOCHS_TAKEN, epochs_taken)):
        if value is None:
            record.pop(key, None)
        else:
            record[key] = int(value)
    return record


def batches_taken_from_config(config: ConfigRecord) -> int:
    return _cursor(config, BATCHES_TAKEN)


def epochs_taken_from_config(config: ConfigRecord) -> int:
    return _cursor(config, EPOCHS_TAKEN)


def _cursor(config: ConfigRecord, key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"train message config: {key} must be an integer >= 0, got {value!r} "
                         "(sent by a different baffle version?)")
    return value


def plan_from_config(config: ConfigRecord) -> RoundPlan:
    try:
        spec = EstimatorSpec(int(config["num-perturbations"]), float(config["sigma"]), str(config["scheme"]),
                             str(config["distribution"]), str(config.get("direction-stream", "mt19937")))
        return RoundPlan(int(config["server-round"]), int(config["seed"]), spec,
                         str(config.get("perturbations", "shared")))
    except KeyError as e:
        raise ValueError(f"train message config lacks {e.args[0]!r}; sent by a different baffle version?") from None


def reply_content(reply: ClientReply, partition_id: int) -> RecordDict:
    record = MetricRecord({LOSS_DIFFS: [float(v) for v in reply.loss_diffs.tolist()],
                           NUM_EXAMPLES: int(reply.num_examples),
                           LOSS: float("nan") if reply.loss is None else float(reply.loss),
                           PARTITION: int(partition_id)})
    return RecordDict({REPLY: record})


def reply_from_content(content: RecordDict, node_id: int) -> tuple[int, ClientReply]:
    """(partition id, ClientReply) from a reply's content; ValueError naming the node if malformed."""
    where = f"node {node_id}"
    try:
        record = content[REPLY]
    except KeyError:
        raise ValueError(f"{where}: reply has no {REPLY!r} record (found {sorted(content.keys())})") from None
    if not isinstance(record, MetricRecord):
        raise ValueError(f"{where}: {REPLY!r} must be a MetricRecord, got {type(record).__name__}")
    missing = [k for k in (LOSS_DIFFS, NUM_EXAMPLES, PARTITION) if k not in record]
    if missing:
        raise ValueError(f"{where}: reply lacks {', '.join(missing)}")
    diffs, partition = record[LOSS_DIFFS], record[PARTITION]
    if not isinstance(diffs, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in diffs):
        raise ValueError(f"{where}: {LOSS_DIFFS} must be a list of numbers, got {type(diffs).__name__}")
    if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
        raise ValueError(f"{where}: {PARTITION} must be an integer >= 0, got {partition!r}")
    loss = record.get(LOSS)
    loss = float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None
    reply = ClientReply(f"node {node_id} (partition {partition})", torch.tensor(diffs, dtype=torch.float64),
                        record[NUM_EXAMPLES], loss)
    return partition, reply


@dataclass(frozen=True)
class ModelUpdate:
    """A backprop or epoch-level reply: a gradient or trained weights, with its bookkeeping."""

    tensors: dict[str, torch.Tensor]
    num_examples: int
    loss: float | None
    local_steps: int | None = None
    optimizer_state: dict[str, torch.Tensor] | None = None


def update_content(key: str, update: ModelUpdate, partition_id: int) -> RecordDict:
    """A node's reply carrying ``update.tensors`` under ``key`` (GRADIENT or ARRAYS)."""
    metrics = {NUM_EXAMPLES: int(update.num_examples), PARTITION: int(partition_id),
               LOSS: float("nan") if update.loss is None else float(update.loss)}
    if update.local_steps is not None:
        metrics[LOCAL_STEPS] = int(update.local_steps)
    content = {REPLY: MetricRecord(metrics), key: ArrayRecord({k: v.detach() for k, v in update.tensors.items()})}
    if update.optimizer_state is not None:
        content[OPTIMIZER] = ArrayRecord(dict(update.optimizer_state))
    return RecordDict(content)


def update_from_content(content: RecordDict, node_id: int, key: str, expected: Mapping[str, torch.Tensor],
                        num_params: int | None = None) -> tuple[int, ModelUpdate]:
    """(partition id, ModelUpdate) from a reply; ValueError naming the node if malformed: ``key``'s tensors
    must have ``expected``'s names, shapes and dtypes and be finite; with ``num_params`` (epoch-level
    methods) the reply must carry local-steps and an optimizer state for that many parameters."""
    where = f"node {node_id}"
    record, arrays = content.get(REPLY), content.get(key)
    if not isinstance(record, MetricRecord) or not isinstance(arrays, ArrayRecord):
        raise ValueError(f"{where}: reply needs a {REPLY!r} MetricRecord and a {key!r} ArrayRecord "
                         f"(found {sorted(content.keys())})")
    needed = (NUM_EXAMPLES, PARTITION) + ((LOCAL_STEPS,) if num_params is not None else ())
    bad = [k for k in needed if isinstance(record.get(k), bool) or not isinstance(record.get(k), int)
           or record[k] < (0 if k == PARTITION else 1)]
    if bad:
        got = ", ".join(f"{k}={record.get(k)!r}" for k in bad)
        raise ValueError(f"{where}: reply has {got} (num-examples and local-steps must be integers >= 1, "
                         "partition-id an integer >= 0)")
    tensors = _checked_tensors(arrays, expected, f"{where}: {key!r}")
    state = None
    if num_params is not None:
        state = _checked_optimizer_state(content.get(OPTIMIZER), num_params, f"{where}: {OPTIMIZER!r}")
    loss = record.get(LOSS)
    loss = float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None
    return record[PARTITION], ModelUpdate(tensors, record[NUM_EXAMPLES], loss, record.get(LOCAL_STEPS), state)


def _checked_tensors(arrays: ArrayRecord, expected: Mapping[str, torch.Tensor], where: str) -> dict:
    if list(arrays.keys()) != list(expected):
        raise ValueError(f"{where} must hold {len(expected)} tensors {list(expected)[:4]}..., "
                         f"got {list(arrays.keys())[:4]}... ({len(arrays)})")
    out = arrays.to_torch_state_dict()
    for name, ref in expected.items():
        t = out[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise ValueError(f"{where}: {name} is {t.dtype} {tuple(t.shape)}, expected {ref.dtype} {tuple(ref.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {name} has non-finite values")
    return dict(out)


def _checked_optimizer_state(arrays, num_params: int, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(arrays, ArrayRecord):
        raise ValueError(f"{where}: missing (an ArrayRecord of the local optimizer's state is needed)")
    state = arrays.to_torch_state_dict() if len(arrays) else {}
    for name, t in state.items():
        index, _, _ = name.partition(".")
        if not index.isdigit() or int(index) >= num_params:
            raise ValueError(f"{where}: entry {name!r} is not '<parameter index < {num_params}>.<name>'")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {name} has non-finite values")
    return dict(state)


def optimizer_state_arrays(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state, flat: {"<parameter index>.<name>": tensor} (None entries left out)."""
    out = {}
    for index, entries in optimizer.state_dict()["state"].items():
        for name, value in entries.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {index}.{name} is a {type(value).__name__}, not a tensor")
            out[f"{index}.{name}"] = value.detach().clone()
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, flat: Mapping[str, torch.Tensor]) -> None:
    """Inverse of ``optimizer_state_arrays`` on an optimizer built with the same parameters and settings."""
    state: dict[int, dict] = {}
    for key, value in flat.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def describe_content(partition_id: int, num_examples: int, facts: DataFacts) -> RecordDict:
    record = {PARTITION: int(partition_id), NUM_EXAMPLES: int(num_examples)}
    record.update({key: int(getattr(facts, name)) for name, key in FACT_KEYS.items()})
    return RecordDict({REPLY: MetricRecord(record)})


def describe_from_content(content: RecordDict, node_id: int) -> tuple[int, int, DataFacts]:
    """(partition id, partition size, DataFacts) from a describe reply; ValueError naming the node."""
    record = content[REPLY] if REPLY in content else None
    keys = (PARTITION, NUM_EXAMPLES, *FACT_KEYS.values())
    if not isinstance(record, MetricRecord) or any(k not in record for k in keys):
        raise ValueError(f"node {node_id}: describe reply lacks {', '.join(keys)} (a different baffle version?)")
    values = {k: record[k] for k in keys}
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values.values()) or values[PARTITION] < 0:
        raise ValueError(f"node {node_id}: describe reply must hold integers >= 0, got {values}")
    try:
        facts = DataFacts(**{name: values[key] for name, key in FACT_KEYS.items()})
    except ValueError as e:
        raise ValueError(f"node {node_id}: {e}") from None
    return values[PARTITION], values[NUM_EXAMPLES], facts


def evaluation_content(metrics: dict) -> RecordDict:
    return RecordDict({REPLY: MetricRecord({k.replace("_", "-"): float(metrics[k]) for k in EVAL_KEYS
                                            if k in metrics})})


def evaluation_from_content(content: RecordDict, node_id: int) -> dict:
    """{test_loss, test_accuracy, ...} (the keys of ``Simulation.evaluate``) from an evaluate reply."""
    record = content[REPLY] if REPLY in content else None
    if not isinstance(record, MetricRecord) or "test-loss" not in record or "test-accuracy" not in record:
        raise ValueError(f"node {node_id}: evaluate reply lacks test-loss / test-accuracy")
    return {k: float(record[k.replace("_", "-")]) for k in EVAL_KEYS if k.replace("_", "-") in record}


__all__ = ["ARRAYS", "CONFIG", "GRADIENT", "OPTIMIZER", "RAW", "REPLY", "ModelUpdate", "batches_taken_from_config",
           "describe_content", "describe_from_content", "epochs_taken_from_config", "evaluation_content",
           "evaluation_from_content", "load_optimizer_state", "optimizer_state_arrays", "plan_from_config",
           "plan_to_config", "reply_content", "reply_from_content", "train_config", "update_content",
           "update_from_content"]
