"""Client-sampling bookkeeping per round: the O(rounds) cursor replay vs the O(1) cursor counts.

    python benchmarks/bench_sampling.py                          # 1,000 virtual clients, fraction 0.1, 100 rounds
    python benchmarks/bench_sampling.py --clients 50 --rounds 10 # tiny (a smoke run)

What a Flower server has to do per round for the batch cursors of the sampled clients (no client
compute, no server step, no network), measured in this process:

  replay   what the adapter did before: for each sampled client, ``rounds_sampled_before`` (replays
           ``sample_clients`` for every earlier round: O(rounds) draws per client per round), once
           to send the cursor and once to advance it
  counts   ``baffle.cursors.SampleCounts``: read each sampled client's count (O(1)) and advance the
           round (one ``sample_clients`` draw, O(m) increments)
  strategy (with ``--strategy``, needs the [flower] extra) the real ``BaffleStrategy.configure_train``
           for that many virtual nodes (node book lookup, cursor, one ``Message`` per sampled node)
           plus the cursor advance of ``aggregate_train``; node descriptions come from a fake grid

Both cursor columns are checked to give the same values every round. Reported: total seconds,
per-round median over the first and the last 10 rounds (the replay grows with the round number,
the counts do not), and the CPU pressure during the run (another job on the machine inflates
every number; compare columns of the same run only).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from baffle.cursors import SampleCounts  # noqa: E402
from baffle.simulation import rounds_sampled_before, sample_clients  # noqa: E402


def cpu_pressure_total() -> float | None:
    try:
        with open("/proc/pressure/cpu") as f:
            return float(next(x for x in f.read().split() if x.startswith("total=")).split("=")[1])
    except (OSError, StopIteration, ValueError):
        return None


def replay_round(clients: int, fraction: float, seed: int, t: int) -> list[int]:
    sampled = sample_clients(clients, fraction, seed, t)
    sent = [rounds_sampled_before(clients, fraction, seed, c, t) for c in sampled]  # cursor sent with the model
    for c in sampled:  # the old strategy's _account: seek every sampled client after the round
        rounds_sampled_before(clients, fraction, seed, c, t + 1)
    return sent


def counts_round(counts: SampleCounts, t: int) -> list[int]:
    sent = [counts.taken(c) for c in counts.sampled(t)]
    counts.advance(t)
    return sent


def strategy_rounds(clients: int, fraction: float, seed: int, rounds: int) -> list[float]:
    """Per-round seconds of BaffleStrategy.configure_train + the cursor advance, with ``clients`` nodes."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata
    from flwr.supercore.task_identity import TaskIdentity

    from baffle.config import make_config
    from baffle.flower import wire
    from baffle.flower.runconfig import FlowerOptions
    from baffle.flower.serverstate import DataFacts, ServerRun
    from baffle.flower.strategy import BaffleStrategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    facts = DataFacts(8, 1, 10, 1347)  # the digits dataset's shape and training-set size

    class DescribingGrid:
        def get_node_ids(self):
            return list(range(1000, 1000 + clients))

        def send_and_receive(self, messages, *, timeout=None):
            out = []
            for m in messages:
                node = m.metadata.dst_node_id
                meta = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                                reply_to_message_id="", group_id="", created_at=0.0, ttl=60.0, message_type="query")
                out.append(Message(wire.describe_content(node - 1000, 10, facts), metadata=meta))
            return out

    config = make_config({"dataset": "digits", "model": "mlp", "hidden": [16], "clients": clients,
                          "fraction": fraction, "num_perturbations": 20, "seed": seed, "rounds": rounds})
    run = ServerRun(config, facts)
    strategy = BaffleStrategy(run, FlowerOptions(), None)
    grid, arrays, times = DescribingGrid(), ArrayRecord(run.model.state_dict()), []
    strategy.book.refresh(grid, 60)  # the start-up description of every node (not timed)
    for t in range(rounds):
        began = time.perf_counter()
        strategy.configure_train(t + 1, arrays, ConfigRecord(), grid)
        run.cursors.advance(t)
        times.append(time.perf_counter() - began)
    return times


def summary(times: list[float]) -> dict:
    return {"total_s": sum(times), "first10_median_s": statistics.median(times[:10]),
            "last10_median_s": statistics.median(times[-10:])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", action="store_true", help="also time the real BaffleStrategy (needs flwr)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    pressure0, wall0 = cpu_pressure_total(), time.monotonic()
    counts, replay_t, counts_t = SampleCounts(args.clients, args.fraction, args.seed), [], []
    for t in range(args.rounds):
        began = time.perf_counter()
        old = replay_round(args.clients, args.fraction, args.seed, t)
        replay_t.append(time.perf_counter() - began)
        began = time.perf_counter()
        new = counts_round(counts, t)
        counts_t.append(time.perf_counter() - began)
        assert old == new, f"round {t}: cursors differ"
    results = {"clients": args.clients, "fraction": args.fraction, "rounds": args.rounds,
               "sampled_per_round": len(sample_clients(args.clients, args.fraction, args.seed, 0)),
               "replay": summary(replay_t), "counts": summary(counts_t)}
    if args.strategy:
        results["strategy"] = summary(strategy_rounds(args.clients, args.fraction, args.seed, args.rounds))
    pressure1, wall = cpu_pressure_total(), time.monotonic() - wall0
    if pressure0 is not None and pressure1 is not None and wall > 0:
        results["cpu_pressure"] = (pressure1 - pressure0) / 1e6 / wall
    print(f"{args.clients} clients, fraction {args.fraction:g} ({results['sampled_per_round']} per round), "
          f"{args.rounds} rounds; cursors equal every round")
    print("| bookkeeping | total (s) | per round, first 10 (median, s) | per round, last 10 (median, s) |")
    print("|---|---|---|---|")
    for name in ("replay", "counts", "strategy"):
        if name in results:
            r = results[name]
            print(f"| {name} | {r['total_s']:.4f} | {r['first10_median_s']:.2e} | {r['last10_median_s']:.2e} |")
    if "cpu_pressure" in results:
        print(f"CPU pressure during the run: {100 * results['cpu_pressure']:.0f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
