"""``BaffleStrategy``: BAFFLE's server on Flower's Message-API strategy interface (public API only).

``NodeBook`` is the server's client bookkeeping: which node serves which partition (learned by a
``query`` message to every node it has not seen yet: nodes describe their data instead of sending
it), the nodes' ``DataFacts``, and nothing else. ``configure_train`` draws the round's partitions
exactly as ``baffle train`` does (``sample_clients`` with the run seed, ``fraction`` < 1 included)
and sends each sampled partition's node the global model, the round plan (seed, K, σ, scheme) and
that partition's batch cursor (``batches-taken``, O(1) from ``ServerRun.cursors``).
``aggregate_train`` validates each reply on its own (a failed, malformed, non-finite or unexpected
reply is logged with its node id and dropped), orders the valid replies by partition id, and
performs exactly the in-process server step of the run's method on the ``ServerRun``:
``baffle.rounds.baffle_server_update`` (sample-weighted ΔL sum → ĝ → optimizer step → EMA),
``bp_fedsgd_server_update`` (exact gradients) or ``fedavg_server_update`` (epoch-level methods: the
nodes' trained weights; each partition's returned optimizer state is kept for its next round). A
round with fewer than ``min_replies`` valid replies keeps the model (and the optimizer states). One
JSON line per round goes to ``rounds.jsonl`` (replies used, dropped with reasons, missing nodes and
partitions, the aggregated ΔL of the ``baffle`` method).
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
from baffle.flower.serverstate import DataFacts, ServerRun, check_flower_config
from baffle.flower.wire import (ARRAYS, CONFIG, GRADIENT, OPTIMIZER, describe_from_content, reply_from_content,
                                train_config, update_from_content)
from baffle.perturbation import trainable_parameters
from baffle.server import check_reply

RETRY_AFTER = 5  # rounds before a node that failed to describe itself is asked again


def _short(text: str) -> str:
    return text if len(text) <= 600 else f"{text[:200]} [...] {text[-400:]}"  # keep the cause


class NodeBook:
    """Node id ↔ partition id, and the nodes' data facts (the first node's; others must agree)."""

    def __init__(self, num_partitions: int):
        self.num_partitions = num_partitions
        self.partition_of: dict[int, int] = {}
        self.node_of: dict[int, int] = {}
        self.facts: DataFacts | None = None
        self.failures: dict[int, tuple[int, str]] = {}  # node → (refresh count when it failed, reason)
        self._refreshes = 0

    def refresh(self, grid: Grid, timeout: float) -> None:
        """Forget nodes that left; describe the registered nodes not seen yet (one query round trip)."""
        self._refreshes += 1
        live = set(grid.get_node_ids())
        for node in [n for n in self.partition_of if n not in live]:
            del self.node_of[self.partition_of.pop(node)]
        unknown = sorted(n for n in live if n not in self.partition_of and (
            n not in self.failures or self._refreshes - self.failures[n][0] >= RETRY_AFTER))
        if not unknown:
            return
        queries = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
        answered = set()
        for msg in sorted(grid.send_and_receive(queries, timeout=timeout), key=lambda m: m.metadata.src_node_id):
            node = msg.metadata.src_node_id
            answered.add(node)
            try:
                self._add(node, msg)
            except ValueError as e:
                self._fail(node, str(e))
        for node in unknown:
            if node not in answered:
                self._fail(node, f"node {node}: no answer to the describe query within {timeout:.0f} s")

    def _add(self, node: int, msg: Message) -> None:
        if msg.has_error():
            raise ValueError(f"node {node}: error reply (code {msg.error.code}): {msg.error.reason}")
        partition, _, facts = describe_from_content(msg.content, node)
        if partition >= self.num_partitions:
            raise ValueError(f"node {node}: partition-id {partition} >= clients {self.num_partitions}")
        if self.facts is not None and facts != self.facts:
            raise ValueError(f"node {node}: its data ({facts}) differs from the other nodes' ({self.facts})")
        if partition in self.node_of:
            raise ValueError(f"node {node}: partition {partition} is already served by node {self.node_of[partition]}")
        self.facts = self.facts or facts
        self.partition_of[node], self.node_of[partition] = partition, node
        self.failures.pop(node, None)

    def _fail(self, node: int, reason: str) -> None:
        log(WARNING, "baffle: node %d not used: %s", node, _short(reason))
        self.failures[node] = (self._refreshes, _short(reason))

    def by_partition(self) -> list[int]:
        """The known nodes, lowest partition id first."""
        return [self.node_of[p] for p in sorted(self.node_of)]


class BaffleStrategy(FedAvg):
    """Rounds of the run's method over Flower; the server state lives in ``run`` (a ``ServerRun``)."""

    def __init__(self, run: ServerRun, options: FlowerOptions, rounds_log: str | Path | None = None,
                 book: NodeBook | None = None):
        check_flower_config(run.config)
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0,  # evaluation: server_app.evaluate_on_nodes
                         min_train_nodes=options.min_replies,
                         min_available_nodes=options.nodes_needed(run.config))
        self.run, self.options = run, options
        self.book = book or NodeBook(run.config.clients)
        self.rounds_log = None if rounds_log is None else Path(rounds_log)
        self.plan: R.RoundPlan | None = None
        self.sent: dict[int, int] = {}  # node → partition asked this round
        self.unserved: list[int] = []  # sampled partitions without a node
        self.last_info: dict = {}
        self._t0 = 0.0

    def summary(self) -> None:
        c = self.run.config
        if c.num_perturbations is None:
            log(INFO, "\t├──> %s: %d partitions, fraction %.2f", c.method, c.clients, c.fraction)
        else:
            log(INFO, "\t├──> %s: K=%d sigma=%g scheme=%s, %d partitions, fraction %.2f",
                c.method, c.num_perturbations, c.sigma, c.scheme, c.clients, c.fraction)
        log(INFO, "\t└──> min replies per round: %d", self.options.min_replies)

    # ---- server → clients -------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower round r is BAFFLE round t = r − 1: the same seed and clients as ``baffle train``."""
        self._t0 = time.perf_counter()
        c, t = self.run.config, server_round - 1
        self.plan = None if self.run.estimator is None else R.plan_round(c.seed, t, self.run.estimator,
                                                                          c.perturbations)
        self.book.refresh(grid, self.options.round_timeout)
        self.sent, self.unserved, messages = {}, [], []
        for partition in self.run.cursors.sampled(t):
            node = self.book.node_of.get(partition)
            if node is None:
                self.unserved.append(partition)
                continue
            messages.append(Message(content=self._task(t, partition, arrays), message_type=MessageType.TRAIN,
                                    dst_node_id=node))
            self.sent[node] = partition
        if self.unserved:
            log(WARNING, "round %d: no node serves partition(s) %s; continuing without them", server_round,
                ", ".join(map(str, self.unserved[:20])) + (" ..." if len(self.unserved) > 20 else ""))
        log(INFO, "configure_train: round %d (seed %s) to %d node(s)", server_round,
            "-" if self.plan is None else self.plan.seed, len(messages))
        return messages

    def _task(self, t: int, partition: int, arrays: ArrayRecord) -> RecordDict:
        """A partition's train message: the weights, the round plan and its cursor (the number of rounds
        that sampled it before, as batches or local epochs), and its optimizer state in epoch-level methods."""
        run, taken = self.run, self.run.cursors.taken(partition)
        if run.local_optimizers is None:
            return RecordDict({ARRAYS: arrays, CONFIG: train_config(t, self.plan, batches_taken=taken)})
        config = train_config(t, self.plan, epochs_taken=taken * run.config.local_epochs)
        state = ArrayRecord(run.local_optimizers[partition] or {})
        return RecordDict({ARRAYS: arrays, CONFIG: config, OPTIMIZER: state})

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
        self._used = sorted(valid)
        stepped, diffs = len(ordered) >= self.options.min_replies, None
        if stepped:
            diffs = self._server_step(server_round - 1, valid)
        else:
            log(WARNING, "round %d: %d valid repl%s < min-replies %d; model kept unchanged", server_round,
                len(ordered), "y" if len(ordered) == 1 else "ies", self.options.min_replies)
        self._account(server_round - 1, ordered)
        info = self._round_info(ordered, dropped, missing)
        self._log_round(server_round, info, dropped, missing, stepped, diffs)
        self.last_info = info
        metrics = MetricRecord({"replies-used": info["replies_used"], "replies-dropped": len(dropped),
                                "replies-missing": len(missing)})
        return (ArrayRecord(self.run.model.state_dict()) if stepped else None), metrics

    def _server_step(self, t: int, valid: dict):
        """The in-process server step of the run's method on the valid replies (by partition id);
        returns the aggregated ΔL for ``baffle`` (None otherwise)."""
        run, c, parts = self.run, self.run.config, sorted(valid)
        if c.method == "baffle":  # per-client directions are derived from the partition id, as in-process
            by_partition = [dataclasses.replace(valid[p], client_id=p) for p in parts]
            return R.baffle_server_update(run.server, by_partition, self.plan, weighting=c.client_weights,
                                          update_ema=run.ema_due(t))
        pairs = [(valid[p].tensors, valid[p].num_examples) for p in parts]
        if c.method == "bp-fedsgd":
            R.bp_fedsgd_server_update(run.server, pairs, weighting=c.client_weights, update_ema=run.ema_due(t))
            return None
        R.fedavg_server_update(run.server, pairs, c.client_weights)
        for p in parts:  # kept only for a round that stepped: a round without effect leaves no trace
            run.local_optimizers[p] = valid[p].optimizer_state
        return None

    def _validate(self, server_round: int, replies: list[Message]) -> tuple[dict, list[dict]]:
        """{partition id: ClientReply} of the usable replies, and [{node, reason}] of the dropped ones."""
        valid, dropped = {}, []
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                if msg.has_error():
                    raise ValueError(f"node {node}: error reply (code {msg.error.code}): {msg.error.reason}")
                partition, reply = self._parse(msg.content, node)
                if self.sent.get(node) != partition:
                    asked = self.sent.get(node)
                    raise ValueError(f"node {node}: replied for partition {partition}, but "
                                     + ("was not asked this round" if asked is None else f"was asked for {asked}"))
                if partition in valid:
                    raise ValueError(f"node {node}: partition {partition} already answered by another node")
            except ValueError as e:
                reason = _short(str(e))
                log(WARNING, "round %d: dropped reply of node %d: %s", server_round, node, reason)
                dropped.append({"node": node, "reason": reason})
                continue
            valid[partition] = reply
        return valid, dropped

    def _parse(self, content: RecordDict, node: int):
        """(partition id, ClientReply or ModelUpdate) of a reply; ValueError naming the node if it is unusable."""
        run = self.run
        if run.config.method == "baffle":
            partition, reply = reply_from_content(content, node)
            check_reply(reply, run.estimator.num_directions)
            return partition, reply
        if run.config.method == "bp-fedsgd":
            return update_from_content(content, node, GRADIENT, dict(trainable_parameters(run.model)))
        return update_from_content(content, node, ARRAYS, run.model.state_dict(), run.num_parameter_tensors)

    def _account(self, t: int, used: list) -> None:
        """Counters as ``baffle train`` keeps them (the method's payload: weights + 16 bytes up in the
        backprop and epoch-level methods, not the optimizer state the server keeps for the nodes);
        count round t in every sampled partition's cursor."""
        c, run = self.run.config, self.run
        if c.method == "baffle":
            run.counters.forward_passes += len(used) * forward_passes(c.num_perturbations, c.scheme)
            run.counters.bytes_up += len(used) * 8 * (run.estimator.num_directions + 2)
        else:
            steps = len(used) if c.method == "bp-fedsgd" else sum(u.local_steps for u in used)
            if c.method == "baffle-fedavg":
                run.counters.forward_passes += steps * forward_passes(c.num_perturbations, c.scheme)
            else:
                run.counters.forward_passes += steps
                run.counters.backward_passes += steps
            run.counters.bytes_up += len(used) * (run.model_bytes + 16)
        run.counters.bytes_down += len(self.sent) * (run.model_bytes + 32)
        run.cursors.advance(t)  # O(m): the in-process cursors advance for every sampled client

    def _round_info(self, used: list, dropped: list, missing: list) -> dict:
        total = sum(r.num_examples for r in used)
        losses = [(r.loss, r.num_examples) for r in used if r.loss is not None]
        loss = sum(v * n for v, n in losses) / sum(n for _, n in losses) if losses and total else None
        return {"clients": len(used), "train_loss": loss, "replies_used": len(used),
                "replies_dropped": len(dropped), "replies_missing": len(missing) + len(self.unserved),
                "replies_sent": len(self.sent)}

    def _log_round(self, server_round: int, info: dict, dropped: list, missing: list, stepped: bool, diffs) -> None:
        if self.rounds_log is None:
            return
        line = {"round": server_round, "seed": None if self.plan is None else self.plan.seed, **info,
                "partitions": self._used, "dropped": dropped, "missing_nodes": missing,
                "unserved_partitions": self.unserved, "round_s": time.perf_counter() - self._t0,
                "stepped": stepped, "loss_diffs": None if diffs is None else diffs.tolist()}
        with self.rounds_log.open("a") as f:
            f.write(json.dumps(line) + "\n")


__all__ = ["BaffleStrategy", "NodeBook"]
