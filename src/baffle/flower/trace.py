"""Optional per-phase timestamps for Flower runs (no flwr import; costs nothing when off).

Set ``BAFFLE_FLOWER_TRACE=/path/trace.jsonl`` in the environment of the Flower processes (``baffle
deploy`` passes its environment on) and every process appends JSON lines
``{"t": unix time, "event": ..., "pid": ..., **fields}``; ``benchmarks/flower_rounds.py --trace``
turns them into a per-round timeline (server push → ClientApp start → data ready → reply pulled).
One ``write`` per line in append mode, so lines from concurrent processes do not interleave.
"""
from __future__ import annotations

import json
import os
import time

ENV = "BAFFLE_FLOWER_TRACE"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def event(name: str, **fields) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"t": time.time(), "event": name, "pid": os.getpid(), **fields}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def process_start_time() -> float:
    """Unix time this process was started (Linux /proc; the current time elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


__all__ = ["ENV", "enabled", "event", "process_start_time"]
