#!/usr/bin/env bash
# Every benchmark behind benchmarks/README.md, in priority order. Run from the repository root with the
# venv active; takes about an hour on a quiet 2-core machine (each repeat waits for CPU PSI < 10%).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p results
python bench_client.py --models lenet wrn --datasets mnist --batches 32 64 --ks 100 --repeats 5 --out results/client_k100.jsonl
python bench_client.py --no-mallopt --methods reference baffle --models lenet wrn --datasets mnist --batches 32 --ks 100 --repeats 3 --out results/client_default_glibc.jsonl
python bench_server.py --out results/server.jsonl
[ -d /tmp/baffle_before/src ] || { mkdir -p /tmp/baffle_before && git -C .. archive 2531262 src | tar -x -C /tmp/baffle_before; }
python bench_runner.py overhead scale train --before-src /tmp/baffle_before/src --out results/runner.jsonl
python bench_client.py --models lenet wrn --datasets mnist --batches 32 64 --ks 500 --repeats 3 --out results/client_k500.jsonl
python bench_client.py --models lenet wrn --datasets cifar --batches 32 64 --ks 100 500 --repeats 3 --out results/client_cifar.jsonl
python bench_client.py --models lenet wrn --datasets mnist --batches 32 64 --ks 100 --schemes central --repeats 3 --out results/client_central.jsonl
python report.py results/*.jsonl > results/report.md
