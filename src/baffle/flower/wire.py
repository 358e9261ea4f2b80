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

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from baffle.flower.serverstate import DataFacts
from baffle.rounds import EstimatorSpec, RoundPlan
from baffle.server import ClientReply

ARRAYS, RAW, CONFIG, REPLY = "arrays", "raw", "config", "baffle"
LOSS_DIFFS, NUM_EXAMPLES, LOSS, PARTITION = "loss-diffs", "num-examples", "loss", "partition-id"
BATCHES_TAKEN, TRAIN_EXAMPLES = "batches-taken", "train-examples"
FACT_KEYS = {"image_size": "image-size", "in_channels": "in-channels", "num_classes": "num-classes",
             "train_examples": TRAIN_EXAMPLES}
EVAL_KEYS = ("test_loss", "test_accuracy", "raw_test_loss", "raw_test_accuracy", "val_loss", "val_accuracy")


def plan_to_config(plan: RoundPlan, batches_taken: int = 0) -> ConfigRecord:
    e = plan.estimator
    return ConfigRecord({"server-round": plan.server_round, "seed": plan.seed,
                         "num-perturbations": e.num_perturbations, "sigma": float(e.sigma),
                         "scheme": e.scheme, "distribution": e.distribution, "direction-stream": e.stream,
                         "perturbations": plan.perturbations, BATCHES_TAKEN: int(batches_taken)})


def batches_taken_from_config(config: ConfigRecord) -> int:
    value = config.get(BATCHES_TAKEN)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"train message config: {BATCHES_TAKEN} must be an integer >= 0, got {value!r} "
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


__all__ = ["ARRAYS", "CONFIG", "RAW", "REPLY", "batches_taken_from_config", "describe_content",
           "describe_from_content", "evaluation_content", "evaluation_from_content", "plan_from_config",
           "plan_to_config", "reply_content", "reply_from_content"]
