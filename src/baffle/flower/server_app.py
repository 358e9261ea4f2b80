"""The BAFFLE ``ServerApp``: the same run as ``baffle train``, with the clients behind Flower.

The server builds the in-process ``Simulation`` for its state (same init seed, partition, optimizer,
round count, evaluation schedule), waits until the expected number of SuperNodes is registered, runs
``BaffleStrategy`` through ``Strategy.start`` and evaluates on the held-out test set after round 0 and
every ``eval_every`` rounds, writing ``metrics.jsonl`` / ``summary.json`` / ``model.pt`` /
``checkpoint.pt`` with ``baffle.training``'s own functions, plus ``rounds.jsonl`` (one line per round).
"""
from __future__ import annotations

import functools
import time
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from baffle.config import TrainConfig
from baffle.flower import trace
from baffle.flower.runconfig import FlowerOptions, parse_run_config
from baffle.flower.strategy import BaffleStrategy
from baffle.io import save_jsonl
from baffle.simulation import Simulation
from baffle.training import METRICS, check_fresh_out, finish_run, record_evaluation

ROUNDS_LOG = "rounds.jsonl"

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
    (replies are a few hundred bytes). Everything else is delegated to the wrapped grid.
    """

    def __init__(self, grid: Grid, interval: float):
        self._grid, self._interval = grid, interval

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
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


def _numeric(record: dict) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in record.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})


def run_server(grid: Grid, config: TrainConfig, options: FlowerOptions) -> dict:
    """Run ``config`` with Flower clients; returns the summary (as ``baffle.training.train`` does)."""
    out = Path(config.out)
    check_fresh_out(out)
    sim = Simulation(config)
    strategy = BaffleStrategy(sim, options, out / ROUNDS_LOG)  # validates method before writing anything
    out.mkdir(parents=True, exist_ok=True)
    save_jsonl([], out / METRICS)
    (out / ROUNDS_LOG).write_text("")
    if options.poll_interval > 0 and type(grid).__module__ == "flwr.superlink.grid.http_grid":
        from flwr.superlink.grid import http_grid

        from baffle.flower.node import fast_object_pulls

        if not isinstance(http_grid.pull_objects, functools.partial):
            fast_object_pulls(http_grid, options.poll_interval)  # replies: retry after 20 ms, not 1 s
    grid = PollingGrid(grid, options.poll_interval)
    wait_for_nodes(grid, options.nodes_needed(config), options.node_wait_timeout)
    metrics: list[dict] = []
    t0 = time.perf_counter()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            info = {"clients": 0, "train_loss": None}
        elif server_round % sim.eval_every == 0 or server_round == sim.rounds:
            info = strategy.last_info
        else:
            return None
        return _numeric(record_evaluation(sim, out, metrics, server_round, info, time.perf_counter() - t0))

    strategy.start(grid=grid, initial_arrays=ArrayRecord(sim.model.state_dict()), num_rounds=sim.rounds,
                   timeout=options.round_timeout, evaluate_fn=evaluate_fn)
    return finish_run(sim, out, metrics, time.perf_counter() - t0)


__all__ = ["PollingGrid", "app", "run_server", "wait_for_nodes"]
