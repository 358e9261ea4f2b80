"""Shared benchmark helpers: CPU-pressure gating, interleaved median timing, FLOPs, GEMM peak, memory."""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.functional import cross_entropy
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from baffle.models import build_model  # noqa: E402

SHAPES = {"mnist": (1, 32, 32), "cifar": (3, 32, 32)}  # MNIST resized to 32x32, as the paper's loaders do
MODELS = {"lenet": "lenet", "wrn": "wrn-10-2"}


def psi() -> float:
    """CPU pressure 'some avg10' in percent (Linux PSI), or -1 when unavailable."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(line.split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return -1.0


def wait_quiet(limit: float = 10.0, max_wait: float = 300.0) -> float:
    """Sleep until PSI avg10 < ``limit`` percent (at most ``max_wait`` s); returns the last reading."""
    t0 = time.time()
    while (p := psi()) >= limit and time.time() - t0 < max_wait:
        time.sleep(2.0)
    return p


def interleaved(methods: dict, repeats: int, warmup: int = 1, quiet: float = 10.0) -> dict:
    """Median wall time of each zero-argument callable, methods interleaved round by round."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in methods}
    readings = []
    for r in range(repeats):
        readings.append(wait_quiet(quiet))
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for name in order:
            t0 = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - t0)
    readings.append(psi())
    out = {name: statistics.median(ts) for name, ts in times.items()}
    out["_psi_max"] = max(readings)
    out["_psi_median"] = statistics.median(readings)
    return out


def make_model(name: str, dataset: str, dtype=torch.float32) -> torch.nn.Module:
    c = SHAPES[dataset][0]
    return build_model(MODELS[name], in_channels=c, num_classes=10, seed=0).to(dtype).eval()


def make_batch(dataset: str, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *SHAPES[dataset], generator=g), torch.randint(0, 10, (batch,), generator=g)


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward (multiply-add = 2), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def gemm_rates(sizes=(1024, 2048), repeats: int = 7) -> dict:
    """Float32 GEMM rates in FLOP/s: ``peak`` = best single square matmul over all sizes and repeats,
    ``sustained`` = median of the largest size."""
    best, last = 0.0, []
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        out = torch.empty(size, size)
        torch.mm(a, b, out=out)
        last = []
        for _ in range(repeats):
            wait_quiet()
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            last.append(2 * size**3 / (time.perf_counter() - t0))
        best = max(best, *last)
    return {"peak": best, "sustained": statistics.median(last)}


class GemmProbe:
    """``count`` float32 size³ matmuls: timed next to the methods of a cell, its rate sets that cell's floor."""

    def __init__(self, size: int = 1024, count: int = 10):
        self.a, self.b = torch.randn(size, size), torch.randn(size, size)
        self.out = torch.empty(size, size)
        self.flops = 2 * size**3 * count
        self.count = count

    def __call__(self) -> None:
        for _ in range(self.count):
            torch.mm(self.a, self.b, out=self.out)


def peak_tensor_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated inside ``fn`` above what existed before (profiler events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def inference_loop(model, x, y, count: int) -> None:
    """``count`` plain inference forwards + loss of the unperturbed model (the floor)."""
    with torch.no_grad():
        for _ in range(count):
            float(cross_entropy(model(x), y))


def backprop_step(model, x, y, optimizer) -> None:
    """One backprop training step: forward, backward, Adam."""
    optimizer.zero_grad(set_to_none=True)
    cross_entropy(model(x), y).backward()
    optimizer.step()


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def emit(path: str | None, record: dict) -> None:
    """Print a JSON line and append it to ``path``."""
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
