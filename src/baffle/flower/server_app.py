"""The BAFFLE ``ServerApp``: the same run as ``baffle train``, with the clients behind Flower.

The server holds no data. It waits until the expected number of SuperNodes is registered, asks
every node to describe its data (partition id and size, input shape, number of classes, total
training examples: ``NodeBook``), builds its ``ServerRun`` from that (same init seed, optimizer,
round count and evaluation schedule as ``baffle train``), then runs the rounds itself on Flower's
public ``Grid`` API (``BaffleStrategy.configure_train`` → ``Grid.send_and_receive`` →
``aggregate_train``). Test and validation metrics are computed on a node (the known node with the
lowest partition id that answers; every node holds the test set), after round 0 and every
``eval_every`` rounds. Outputs are written with ``baffle.training``'s own functions: ``metrics.jsonl``,
``summary.json``, ``model.pt``, ``checkpoint.pt`` (at every evaluation and every
``flower.checkpoint-every`` seconds), plus ``rounds.jsonl`` (one line per round).

Resume (``flower.resume = true``, ``baffle deploy --resume``): the server loads ``checkpoint.pt``
(model, optimizer, LR schedule, EMA, round counter, every partition's batch cursor, counters,
metrics), drops the ``rounds.jsonl`` lines of rounds after it, and continues; the rounds it redoes
compute what they computed before, so the run ends with the model an uninterrupted run ends with.
"""
from __future__ import annotations

import functools
import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from baffle.config import TrainConfig
from baffle.flower import trace
from baffle.flower.runconfig import FlowerOptions, parse_run_config
from baffle.flower.serverstate import ServerRun, check_flower_config, resume_checkpoint
from baffle.flower.strategy import BaffleStrategy, NodeBook
from baffle.flower.wire import ARRAYS, CONFIG, RAW, evaluation_from_content
from baffle.io import save_json, save_jsonl
from baffle.training import (CHECKPOINT, CONFIG as CONFIG_FILE, METRICS, SUMMARY, check_fresh_out, finish_run,
                             read_jsonl, record_evaluation, write_checkpoint)

ROUNDS_LOG = "rounds.jsonl"
RUNTIME = {"engine": "flower"}

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config, options = parse_run_config(context.run_config)
    summary = run_server(grid, config, options)
    log(INFO, "baffle: final test accuracy %.4f after %d rounds; outputs in %s",
        summary["final_test_accuracy"], summary["rounds"], config.out)


class PollingGrid:
    """A ``Grid`` whose ``send_and_receive`` pulls replies every ``interval`` seconds.

    Flower's deployment grid sleeps a fixed 3 s between pulls, which dominates a BAFFLE round
    (replies are a few hundred bytes). Built on the public ``push_messages`` / ``pull_messages``;
    everything else is delegated to the wrapped grid.
    """

    def __init__(self, grid: Grid, interval: float):
        self._grid, self._interval = grid, interval

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        pending = set(self._grid.push_messages(messages))
        trace.event("server-pushed", count=len(pending))
        replies: list[Message] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            got = list(self._grid.pull_messages(pending))
            for m in got:
                trace.event("server-got-reply", node=int(m.metadata.src_node_id))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._interval)
        return replies


def accelerate_grid(grid: Grid, interval: float) -> bool:
    """The accelerator's ServerApp part: reply objects not uploaded yet are retried after 20 ms, not 1 s
    (flwr internals; checked first, one warning and no change if they are missing)."""
    from baffle.flower import fastpath

    needs = [n for n in fastpath.NEEDS if n.target.startswith(("flwr.superlink.grid.http_grid",
                                                               fastpath._INFLATE + ":pull_objects"))]
    problem = fastpath.fast_path_problem(tuple(needs))
    if problem:
        log(WARNING, "baffle: %s", problem)
        return False
    from flwr.superlink.grid import http_grid

    from baffle.flower.node import fast_object_pulls

    if type(grid).__module__ != http_grid.__name__:
        return False  # the simulation engine's grid pulls nothing over the network
    if not isinstance(http_grid.pull_objects, functools.partial):
        fast_object_pulls(http_grid, interval)
    return True


def wait_for_nodes(grid: Grid, needed: int, timeout: float, interval: float = 0.2) -> int:
    """Block until ``needed`` nodes are registered (Flower would otherwise sample the early ones)."""
    deadline, last = time.monotonic() + timeout, -1
    while (count := len(list(grid.get_node_ids()))) < needed:
        if count != last:
            log(INFO, "baffle: %d of %d SuperNodes registered; waiting", count, needed)
            last = count
        if time.monotonic() >= deadline:
            raise RuntimeError(f"only {count} of {needed} SuperNodes registered after {timeout:.0f} s; "
                               "start more SuperNodes or lower flower.min-nodes")
        time.sleep(interval)
    log(INFO, "baffle: %d SuperNodes registered", count)
    return count


class EvaluationUnavailable(RuntimeError):
    """No node could evaluate the model (the server has no data to do it itself)."""


def evaluate_on_nodes(grid: Grid, book: NodeBook, run: ServerRun, timeout: float) -> dict:
    """``Simulation.evaluate``'s metrics, computed by the first known node (by partition id) that answers."""
    weights, raw = run.eval_states()
    content = {ARRAYS: ArrayRecord(weights), CONFIG: ConfigRecord({"server-round": run.cursors.next_round})}
    if raw is not None:
        content[RAW] = ArrayRecord(raw)
    reasons = []
    for node in book.by_partition():
        msg = Message(content=RecordDict(content), message_type=MessageType.EVALUATE, dst_node_id=node)
        replies = grid.send_and_receive([msg], timeout=timeout)
        try:
            if not replies:
                raise ValueError(f"node {node}: no answer within {timeout:.0f} s")
            if replies[0].has_error():
                raise ValueError(f"node {node}: error reply: {replies[0].error.reason}")
            return evaluation_from_content(replies[0].content, node)
        except ValueError as e:
            log(WARNING, "baffle: evaluation on node %d failed: %s", node, str(e)[:600])
            reasons.append(str(e)[:300])
    raise EvaluationUnavailable("no node could evaluate the model: " + ("; ".join(reasons) or "no node known"))


def run_server(grid: Grid, config: TrainConfig, options: FlowerOptions) -> dict:
    """Run (or continue) ``config`` with Flower clients; returns the summary (as ``baffle.training.train``)."""
    check_flower_config(config)
    out = Path(config.out)
    ckpt = resume_checkpoint(out, config) if options.resume else None
    if ckpt is None:
        check_fresh_out(out)
    if options.fast_pulls:
        accelerate_grid(grid, options.poll_interval)
    grid = PollingGrid(grid, options.poll_interval)
    wait_for_nodes(grid, options.nodes_needed(config), options.node_wait_timeout)
    book = NodeBook(config.clients)
    book.refresh(grid, options.node_wait_timeout)  # start-up: a node's first message loads its data
    if book.facts is None:
        reasons = "; ".join(reason for _, reason in list(book.failures.values())[:3])
        raise RuntimeError(f"no SuperNode could describe its data ({reasons or 'no node answered'})")
    run = ServerRun(config, book.facts)
    run.evaluator = lambda r: evaluate_on_nodes(grid, book, r, options.eval_timeout)
    strategy = BaffleStrategy(run, options, out / ROUNDS_LOG, book)
    return _Loop(run, strategy, grid, out, options).run(ckpt)


class _Loop:
    """Rounds, evaluations and checkpoints of one server process's part of a run (``training._Run``'s shape)."""

    def __init__(self, run: ServerRun, strategy: BaffleStrategy, grid: Grid, out: Path, options: FlowerOptions):
        self.state, self.strategy, self.grid, self.out, self.options = run, strategy, grid, out, options

    def run(self, ckpt: dict | None) -> dict:
        run, out = self.state, self.out
        metrics, start, wall0 = [], 0, 0.0
        if ckpt is not None:
            try:
                run.load_state_dict(ckpt["state"])
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"--resume: {out / CHECKPOINT} does not fit this run ({e})") from None
            metrics, start, wall0 = list(ckpt["metrics"]), ckpt["round"], float(ckpt["wall_s"])
            if run.rounds < start:
                raise ValueError(f"--rounds {run.rounds}: the run in {out} has already done {start} rounds")
            log(INFO, "baffle: resuming after round %d of %d", start, run.rounds)
        out.mkdir(parents=True, exist_ok=True)
        save_json(run.config.to_dict(), out / CONFIG_FILE)
        if start < run.rounds:
            (out / SUMMARY).unlink(missing_ok=True)
        save_jsonl(metrics, out / METRICS)
        save_jsonl([r for r in read_jsonl(out / ROUNDS_LOG) if isinstance(r.get("round"), int) and r["round"] <= start],
                   out / ROUNDS_LOG)
        t0 = time.perf_counter()
        self.wall = lambda: wall0 + time.perf_counter() - t0
        if start == 0:
            self._evaluate(metrics, 0, {"clients": 0, "train_loss": None})
        elif (start % run.eval_every == 0 or start == run.rounds) and metrics[-1]["round"] != start:
            # the checkpoint is of a round whose evaluation did not happen (the last round of a run
            # extended later, or no node could evaluate): evaluate it now
            last = next((r for r in reversed(read_jsonl(out / ROUNDS_LOG)) if r.get("round") == start), {})
            self._evaluate(metrics, start, {"clients": last.get("clients"), "train_loss": last.get("train_loss")})
        saved_at, saved_round = time.perf_counter(), start
        for t in range(start, run.rounds):
            messages = self.strategy.configure_train(t + 1, ArrayRecord(run.model.state_dict()), ConfigRecord(),
                                                     self.grid)
            replies = self.grid.send_and_receive(messages, timeout=self.options.round_timeout)
            self.strategy.aggregate_train(t + 1, replies)
            done, info = t + 1, self.strategy.last_info
            if done % run.eval_every == 0 or done == run.rounds:
                self._evaluate(metrics, done, info)
                saved_at, saved_round = time.perf_counter(), done
            elif self._checkpoint_due(done - saved_round, time.perf_counter() - saved_at):
                write_checkpoint(run, out, metrics, done, self.wall(), runtime=RUNTIME)
                saved_at, saved_round = time.perf_counter(), done
            acc = f", test accuracy {metrics[-1]['test_accuracy']:.4f} at round {metrics[-1]['round']}"
            log(INFO, "baffle: round %d/%d: %d of %d replies used, %d missing%s", done, run.rounds,
                info["replies_used"], info["replies_sent"], info["replies_missing"], acc)
        return finish_run(run, out, metrics, self.wall(), runtime=RUNTIME)

    def _checkpoint_due(self, rounds_since: int, seconds_since: float) -> bool:
        o = self.options
        return bool((o.checkpoint_rounds and rounds_since >= o.checkpoint_rounds)
                    or (o.checkpoint_every and seconds_since >= o.checkpoint_every))

    def _evaluate(self, metrics: list, done: int, info: dict) -> None:
        try:
            record_evaluation(self.state, self.out, metrics, done, info, self.wall(), runtime=RUNTIME)
        except EvaluationUnavailable as e:  # keep the finished rounds: resume redoes none of them
            if not metrics:
                raise RuntimeError(f"{e}; nothing was trained yet") from None
            write_checkpoint(self.state, self.out, metrics, done, self.wall(), runtime=RUNTIME)
            raise RuntimeError(f"{e}; checkpoint written after round {done}: fix the nodes and continue with "
                               "`baffle deploy --resume`") from None


__all__ = ["PollingGrid", "accelerate_grid", "app", "evaluate_on_nodes", "run_server", "wait_for_nodes"]
