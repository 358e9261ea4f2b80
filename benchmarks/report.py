"""Markdown tables (with target checks) from the JSON lines the benchmarks write.

  python benchmarks/report.py results/client_*.jsonl results/server.jsonl results/runner.jsonl
  python benchmarks/report.py --floor-rate 384 results/client_k100.jsonl   # floor at a given GEMM rate
"""
from __future__ import annotations

import json
import sys

MB = 1 << 20


def load(paths):
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.startswith("{"):
                    yield path, json.loads(line)


def ok(value: float, limit: float, upper: bool = True) -> str:
    met = value <= limit if upper else value >= limit
    return f"{value:.2f} {'✓' if met else '✗'}"


def floor_of(r, rate):
    """(floor seconds, GEMM FLOP/s used): the cell's own GEMM rate, else ``rate`` (--floor-rate)."""
    used = r.get("gemm_flops_in_cell") or rate or r["gemm_flops"]["peak"]
    return r["passes"] * r["flops_per_forward"] / used, used


def client_rows(records, default_alloc, rate=None):
    head = ("| model | data | B | K | scheme | layout | reference s | inference s | **baffle s** | fwd/s | "
            "backprop s | FLOP floor s (GEMM rate) | inference ÷ floor | baffle ÷ inference (≤1.15) | baffle ÷ floor (≤1.25) "
            "| reference ÷ baffle | glibc default: reference s, ref ÷ baffle | ΔL f32 rel. err | PSI max |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in records:
        t = r["times"]
        floor, used = floor_of(r, rate)
        key = (r["model"], r["dataset"], r["batch"], r["K"], r["scheme"])
        ref_default = default_alloc.get(key)
        ref_target = {"lenet": 2.0, "wrn": 1.8}[r["model"]]
        cells = [r["model"], r["dataset"], r["batch"], r["K"], r["scheme"], r["layout"],
                 f"{t.get('reference', float('nan')):.3f}", f"{t['inference']:.3f}", f"**{t['baffle']:.3f}**",
                 f"{r['fwd_per_s']:.0f}", f"{t.get('backprop', float('nan')) * 1e3:.1f} ms",
                 f"{floor:.3f} ({used / 1e9:.0f} GFLOP/s)", f"{t['inference'] / floor:.2f}",
                 ok(t["baffle"] / t["inference"], 1.15) if r["scheme"] == "forward" else
                 f"{t['baffle'] / t['inference']:.2f}",
                 ok(t["baffle"] / floor, 1.25),
                 ok(t["reference"] / t["baffle"], ref_target, upper=False) if "reference" in t else "–",
                 f"{ref_default[0]:.3f} s, {ref_default[0] / ref_default[1]:.2f}" if ref_default else "–",
                 f"{100 * r['dl_rel_err_f32']:.2f}%", f"{t['_psi_max']:.0f}%"]
        print("| " + " | ".join(str(c) for c in cells) + " |")


def memory_rows(records):
    print("| model | data | B | inference fwd MB | lean client MB | lean ÷ inference (≤1.2) | batched P=8 MB "
          "| backprop+Adam MB |")
    print("|---|---|---|---|---|---|---|---|")
    seen = set()
    for r in records:
        key = (r["model"], r["dataset"], r["batch"])
        if key in seen or "memory" not in r:
            continue
        seen.add(key)
        m = r["memory"]
        print(f"| {r['model']} | {r['dataset']} | {r['batch']} | {m['inference'] / MB:.2f} | {m['lean'] / MB:.2f} | "
              f"{ok(m['lean'] / m['inference'], 1.2)} | {m.get('batched8', float('nan')) / MB:.1f} | "
              f"{m['backprop'] / MB:.2f} |")


def main(paths, rate=None) -> None:
    client, default_alloc, other = [], {}, []
    for path, r in load(paths):
        if "times" in r and "model" in r:
            key = (r["model"], r["dataset"], r["batch"], r["K"], r["scheme"])
            if r.get("malloc") is None:  # the glibc-default run: reference ÷ baffle, both untuned
                default_alloc[key] = (r["times"]["reference"], r["times"]["baffle"])
            else:
                client.append(r)
        elif "bench" in r:
            other.append(r)
    if client:
        client_rows(client, default_alloc, rate)
        print()
        memory_rows(client)
        print()
    for r in other:
        print(json.dumps(r, sort_keys=True))


if __name__ == "__main__":
    args = sys.argv[1:]
    rate = None
    if args[:1] == ["--floor-rate"]:  # GFLOP/s for records without an in-cell GEMM timing
        rate, args = float(args[1]) * 1e9, args[2:]
    main(args, rate)
