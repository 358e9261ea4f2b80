"""Pure-layer cost of one secure-aggregation round (baffle.secure), against the plain round.

For each client count C: the four stages run in one process (``secure_sum``'s order, each stage timed
on its own side), K-vectors of ``--k`` float64 values plus the weight coordinate. Reported per round:
  client_s_mean / client_s_max   one client's time over its four stages (advertise, share, mask, unmask)
  server_s                       the server's time over its four stages
  bytes_up / bytes_down          what one client sends / receives, serialised with messages.to_bytes
  plain_bytes_up, plain_server_s the plain round: K + 1 float64 values up, aggregate_loss_diffs at the server
  max_abs_error_vs_plain         |secure weighted mean − plain weighted mean|, max over coordinates
Complete graph up to --dense-max clients, the SecAgg+ Harary graph (degree ≈ 4·log2 C) above it,
unless --degree says otherwise; threshold t = ⌊holders · --threshold-frac⌋ + 1.

  python benchmarks/bench_secagg.py --clients 5                       # smoke
  python benchmarks/bench_secagg.py --clients 10 100 1000 --k 100 --out benchmarks/results/secagg.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from baffle.secure import SecAggConfig, to_bytes, weighted_mean, weighted_payload  # noqa: E402
from baffle.secure.graph import num_holders  # noqa: E402
from baffle.secure.secagg_client import client_advertise, client_mask, client_share_keys, client_unmask  # noqa: E402
from baffle.server import ClientReply, aggregate_loss_diffs  # noqa: E402
from baffle.secure.secagg_server import (server_collect_keys, server_collect_masked, server_route_shares,  # noqa: E402
                                         server_unmask)


def pick_degree(clients: int, degree: str, dense_max: int) -> int | None:
    if degree == "none" or (degree == "auto" and clients <= dense_max):
        return None
    if degree == "auto":
        return min(2 * math.ceil(2 * math.log2(clients)), 2 * ((clients - 1) // 2))
    return int(degree)


class Clock:
    """Accumulates wall time per key: ``with clock("server"): ...``."""

    def __init__(self):
        self.total: dict = {}

    def __call__(self, key):
        clock = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock.total[key] = clock.total.get(key, 0.0) + time.perf_counter() - self.t0
        return _Span()


def one_round(clients: int, k: int, degree: int | None, threshold: int, dropout: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = list(range(clients))
    dls = {u: torch.from_numpy(rng.normal(scale=1e-3, size=k)) for u in ids}
    counts = {u: int(rng.integers(100, 6000)) for u in ids}
    pays = {u: weighted_payload(dls[u], counts[u]) for u in ids}
    drop = set(rng.choice(ids, size=int(dropout * clients), replace=False).tolist())
    cfg = SecAggConfig(server_round=1, vector_length=k + 1, threshold=threshold, max_clients=clients, degree=degree,
                       graph_seed=seed)
    rand = {u: random.Random(seed * 1_000_003 + u).randbytes for u in ids}
    clock, up, down = Clock(), dict.fromkeys(ids, 0), dict.fromkeys(ids, 0)
    states, adverts = {}, []
    for u in ids:
        with clock(u):
            states[u], a = client_advertise(cfg, u, rand[u])
        adverts.append(a)
        up[u] += len(to_bytes(a))
        down[u] += len(to_bytes(cfg))
    with clock("server"):
        server, casts = server_collect_keys(cfg, adverts)
    outs = []
    for u in ids:
        down[u] += len(to_bytes(casts[u]))
        with clock(u):
            states[u], o = client_share_keys(states[u], casts[u], rand[u])
        outs.append(o)
        up[u] += len(to_bytes(o))
    with clock("server"):
        server, inboxes = server_route_shares(server, outs)
    masked = []
    for u in ids:
        down[u] += len(to_bytes(inboxes[u]))
        if u in drop:
            continue
        with clock(u):
            states[u], m = client_mask(states[u], inboxes[u], pays[u])
        masked.append(m)
        up[u] += len(to_bytes(m))
    with clock("server"):
        server, request = server_collect_masked(server, masked)
    responses = []
    for u in request.survivors:
        down[u] += len(to_bytes(request))
        with clock(u):
            states[u], r = client_unmask(states[u], request)
        responses.append(r)
        up[u] += len(to_bytes(r))
    with clock("server"):
        result = server_unmask(server, responses)
    replies = [ClientReply(u, dls[u], counts[u]) for u in request.survivors]
    t0 = time.perf_counter()
    reference = aggregate_loss_diffs(replies, k, "examples")  # the plain round's server aggregation
    plain_s = time.perf_counter() - t0
    error = float((weighted_mean(result.values) - reference).abs().max())
    client_times = [clock.total.get(u, 0.0) for u in ids]
    return {"clients": clients, "k": k, "degree": degree, "threshold": threshold, "dropped": len(drop),
            "client_s_mean": float(np.mean(client_times)), "client_s_max": float(np.max(client_times)),
            "server_s": clock.total["server"], "bytes_up": float(np.mean(list(up.values()))),
            "bytes_down": float(np.mean(list(down.values()))), "plain_bytes_up": 8 * (k + 1),
            "plain_server_s": plain_s, "max_abs_error_vs_plain": error}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--k", type=int, default=100, help="num_perturbations (the payload has K + 1 words)")
    p.add_argument("--degree", default="auto", help="'auto', 'none' (complete graph) or an even integer")
    p.add_argument("--dense-max", type=int, default=100, help="largest C that uses the complete graph under auto")
    p.add_argument("--threshold-frac", type=float, default=0.5)
    p.add_argument("--dropout", type=float, default=0.0, help="fraction of clients that drop before masking")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="append one JSON line per client count")
    args = p.parse_args(argv)
    meta = {"python": platform.python_version(), "machine": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads()}
    for clients in args.clients:
        degree = pick_degree(clients, args.degree, args.dense_max)
        threshold = max(2, int(num_holders(clients, degree) * args.threshold_frac) + 1)
        row = {**one_round(clients, args.k, degree, threshold, args.dropout, args.seed), **meta}
        print(json.dumps(row))
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
