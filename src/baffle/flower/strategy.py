"""``BaffleStrategy``: BAFFLE's server on Flower's Message-API strategy interface.

``configure_train`` broadcasts the global model and the round plan (seed, K, σ, scheme); ``aggregate_train``
validates each reply on its own (a failed, malformed or non-finite reply is logged with its node id and
dropped), orders the valid K-vectors by partition id, and performs exactly the in-process server step
``baffle.rounds.baffle_server_update`` (sample-weighted ΔL sum → ĝ → optimizer step → EMA) on the
``Simulation`` object the ServerApp holds. A round with fewer than ``min_replies`` valid replies keeps
the model. One JSON line per round goes to ``rounds.jsonl`` (replies used, dropped with reasons,
missing nodes, the aggregated ΔL).
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from baffle import rounds as R
from baffle.estimator import forward_passes
from baffle.flower.runconfig import FlowerOptions
from baffle.flower.wire import ARRAYS, CONFIG, PARTITION, REPLY, plan_to_config, reply_from_content
from baffle.server import check_reply
from baffle.simulation import Simulation, rounds_sampled_before, sample_clients


class BaffleStrategy(FedAvg):
    """FedSGD-style BAFFLE rounds over Flower; the server state lives in ``sim`` (a ``Simulation``)."""

    def __init__(self, sim: Simulation, options: FlowerOptions, rounds_log: str | Path | None = None):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=options.min_replies,
                         min_available_nodes=options.nodes_needed(sim.config))
        if sim.config.method != "baffle":
            raise ValueError(f"method {sim.config.method!r} is not available on Flower; use method = 'baffle' "
                             "(or run it in-process with `baffle train`)")
        if sim.config.memory_format == "channels_last":
            raise ValueError("memory_format 'channels_last' is not available on Flower (its clients compute in "
                             "NCHW); use 'nchw'")
        self.sim, self.options = sim, options
        self.rounds_log = None if rounds_log is None else Path(rounds_log)
        self.partition_of: dict[int, int] = {}  # node id → partition id, learned from replies
        self.plan: R.RoundPlan | None = None
        self.sent: list[int] = []
        self.last_info: dict = {}
        self._t0 = 0.0

    def summary(self) -> None:
        c = self.sim.config
        log(INFO, "\t├──> BAFFLE: K=%d sigma=%g scheme=%s, %d partitions, fraction %.2f",
            c.num_perturbations, c.sigma, c.scheme, c.clients, c.fraction)
        log(INFO, "\t└──> min replies per round: %d", self.options.min_replies)

    # ---- server → clients -------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower round r is BAFFLE round t = r − 1: the same seed and clients as ``baffle train``."""
        self._t0 = time.perf_counter()
        c, t = self.sim.config, server_round - 1
        self.plan = R.plan_round(c.seed, t, self.sim.estimator, c.perturbations)
        nodes = sorted(grid.get_node_ids())
        if c.fraction < 1.0:
            self._discover(grid, [n for n in nodes if n not in self.partition_of])
            wanted = set(sample_clients(c.clients, c.fraction, c.seed, t))
            nodes = [n for n in nodes if self.partition_of.get(n) in wanted]
        self.sent = nodes
        content = RecordDict({ARRAYS: arrays, CONFIG: plan_to_config(self.plan)})
        log(INFO, "configure_train: round %d (seed %d) to %d node(s)", server_round, self.plan.seed, len(nodes))
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]

    def _discover(self, grid: Grid, nodes: list[int]) -> None:
        """Ask nodes whose partition is unknown for it (a ``query`` message); needed when fraction < 1."""
        if not nodes:
            return
        queries = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        for msg in grid.send_and_receive(queries, timeout=self.options.round_timeout):
            node = msg.metadata.src_node_id
            if msg.has_error() or REPLY not in msg.content or PARTITION not in msg.content[REPLY]:
                log(WARNING, "node %d did not report its partition; not used this round", node)
                continue
            self.partition_of[node] = int(msg.content[REPLY][PARTITION])

    # ---- clients → server -------------------------------------------------------------------------

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid, dropped = self._validate(server_round, replies)
        answered = {m.metadata.src_node_id for m in replies}
        missing = [n for n in self.sent if n not in answered]
        for node in missing:
            log(WARNING, "round %d: no reply from node %d within %.0f s; continuing without it",
                server_round, node, self.options.round_timeout)
        ordered = [valid[p] for p in sorted(valid)]
        diffs = None
        if len(ordered) >= self.options.min_replies:
            # per-client directions are derived from the partition id, as in-process
            by_partition = [dataclasses.replace(valid[p], client_id=p) for p in sorted(valid)]
            diffs = R.baffle_server_update(self.sim.server, by_partition, self.plan,
                                           weighting=self.sim.config.client_weights,
                                           update_ema=self.sim.ema_due(server_round - 1))
        else:
            log(WARNING, "round %d: %d valid repl%s < min-replies %d; model kept unchanged", server_round,
                len(ordered), "y" if len(ordered) == 1 else "ies", self.options.min_replies)
        self._account(server_round - 1, ordered)
        info = self._round_info(ordered, dropped, missing)
        self._log_round(server_round, info, dropped, missing, diffs)
        self.last_info = info
        metrics = MetricRecord({"replies-used": info["replies_used"], "replies-dropped": len(dropped),
                                "replies-missing": len(missing)})
        return (None if diffs is None else ArrayRecord(self.sim.model.state_dict())), metrics

    def _validate(self, server_round: int, replies: list[Message]) -> tuple[dict, list[dict]]:
        """{partition id: ClientReply} of the usable replies, and [{node, reason}] of the dropped ones."""
        valid, dropped, expected = {}, [], self.sim.estimator.num_directions
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                if msg.has_error():
                    raise ValueError(f"node {node}: error reply (code {msg.error.code}): {msg.error.reason}")
                partition, reply = reply_from_content(msg.content, node)
                if partition >= self.sim.config.clients:
                    raise ValueError(f"node {node}: partition-id {partition} >= clients {self.sim.config.clients}")
                check_reply(reply, expected)
                if partition in valid:
                    raise ValueError(f"node {node}: partition {partition} already answered by another node")
            except ValueError as e:
                reason = str(e) if len(str(e)) <= 600 else f"{str(e)[:200]} [...] {str(e)[-400:]}"  # keep the cause
                log(WARNING, "round %d: dropped reply of node %d: %s", server_round, node, reason)
                dropped.append({"node": node, "reason": reason})
                continue
            self.partition_of[node] = partition
            valid[partition] = reply
        return valid, dropped

    def _account(self, t: int, used: list) -> None:
        """Counters as ``baffle train`` keeps them; advance the server's copy of the batch cursors."""
        c, sim = self.sim.config, self.sim
        sim.counters.forward_passes += len(used) * forward_passes(c.num_perturbations, c.scheme)
        sim.counters.bytes_up += len(used) * 8 * (sim.estimator.num_directions + 2)
        sim.counters.bytes_down += len(self.sent) * (sim.model_bytes + 32)
        for cid in sample_clients(c.clients, c.fraction, c.seed, t):
            sim.shards.seek(cid, rounds_sampled_before(c.clients, c.fraction, c.seed, cid, t + 1), c.batch_size)

    def _round_info(self, used: list, dropped: list, missing: list) -> dict:
        total = sum(r.num_examples for r in used)
        losses = [(r.loss, r.num_examples) for r in used if r.loss is not None]
        loss = sum(v * n for v, n in losses) / sum(n for _, n in losses) if losses and total else None
        return {"clients": len(used), "train_loss": loss, "replies_used": len(used),
                "replies_dropped": len(dropped), "replies_missing": len(missing), "replies_sent": len(self.sent)}

    def _log_round(self, server_round: int, info: dict, dropped: list, missing: list, diffs) -> None:
        if self.rounds_log is None:
            return
        line = {"round": server_round, "seed": self.plan.seed, **info, "dropped": dropped, "missing_nodes": missing,
                "round_s": time.perf_counter() - self._t0, "stepped": diffs is not None,
                "loss_diffs": None if diffs is None else diffs.tolist()}
        with self.rounds_log.open("a") as f:
            f.write(json.dumps(line) + "\n")


__all__ = ["BaffleStrategy"]
