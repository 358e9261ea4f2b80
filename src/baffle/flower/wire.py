"""Wire format between the BAFFLE ServerApp and ClientApps (Flower Message API records).

Server → client, message type ``train``, ``RecordDict``:
  "arrays": ArrayRecord  the global model's ``state_dict`` (float32 tensors, key order kept)
  "config": ConfigRecord the round plan: everything a client needs to regenerate δ_k
      server-round        int    BAFFLE's 0-based round t (Flower's round is t + 1)
      seed                int    round seed s = plan_round(base seed, t).seed
      num-perturbations   int    K
      sigma               float  σ
      scheme              str    forward | central | twice-fd
      distribution        str    gaussian | rademacher

Client → server, reply to that message, ``RecordDict``:
  "baffle": MetricRecord
      loss-diffs    list[float]  ΔL, K floats (2K for twice-fd), sent as float64: lossless
      num-examples  int          n_c, examples in the batch the ΔL was measured on
      loss          float        L(W) on that batch (telemetry)
      partition-id  int          the node's partition (orders the server's sum as in-process)

Nothing else leaves the client. Replies are validated on the server (``reply_from_content``,
then ``baffle.server.check_reply``); a bad reply raises ValueError and is dropped.
"""
from __future__ import annotations

import math

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from baffle.rounds import EstimatorSpec, RoundPlan
from baffle.server import ClientReply

ARRAYS, CONFIG, REPLY = "arrays", "config", "baffle"
LOSS_DIFFS, NUM_EXAMPLES, LOSS, PARTITION = "loss-diffs", "num-examples", "loss", "partition-id"


def plan_to_config(plan: RoundPlan) -> ConfigRecord:
    e = plan.estimator
    return ConfigRecord({"server-round": plan.server_round, "seed": plan.seed,
                         "num-perturbations": e.num_perturbations, "sigma": float(e.sigma),
                         "scheme": e.scheme, "distribution": e.distribution,
                         "perturbations": plan.perturbations})


def plan_from_config(config: ConfigRecord) -> RoundPlan:
    try:
        spec = EstimatorSpec(int(config["num-perturbations"]), float(config["sigma"]), str(config["scheme"]),
                             str(config["distribution"]))
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


__all__ = ["ARRAYS", "CONFIG", "REPLY", "plan_from_config", "plan_to_config", "reply_content",
           "reply_from_content"]
