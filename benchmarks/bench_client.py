"""Client step benchmark: published-style reference vs plain inference vs baffle's client vs backprop.

Per cell (model, data shape, batch, K, scheme), in one process, interleaved, medians over repeats:
  reference  benchmarks/reference.py (fresh randn per tensor, load_state_dict, forward, accumulate ĝ)
  inference  the K+1 (central: 2K) forwards of the unperturbed model on the same batch: the floor
  baffle     baffle.fast sequential engine (the lean mode), in the layout measured faster
  backprop   one forward + backward + Adam step
plus the FLOP floor (forwards × counted FLOPs / the float32 GEMM rate timed among the cell's methods), tensor memory peaks (profiler
events) and the float32-vs-float64 error of ΔL. One JSON line per cell.

  python benchmarks/bench_client.py --quick
  python benchmarks/bench_client.py --models lenet wrn --datasets mnist --batches 32 64 --ks 100 --out r.jsonl
  python benchmarks/bench_client.py --no-mallopt --methods reference baffle inference ...  (default glibc)
"""
from __future__ import annotations

import argparse
import copy
import itertools
import time

import torch
from torch.nn.functional import cross_entropy

import common as C
from reference import reference_client_step

from baffle import fast
from baffle.client import compute_loss_diffs
from baffle._alloc import malloc_settings, tune_malloc
from baffle.estimator import forward_passes

SIGMA = 1e-4


def choose_layout(model, x, y) -> str | None:
    """channels_last only where measured faster (5 interleaved forwards each, 3% margin)."""
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    t = C.interleaved({"nchw": lambda: C.inference_loop(model, x, y, 5),
                       "cl": lambda: C.inference_loop(cl_model, xc, y, 5)}, repeats=3)
    return "channels_last" if t["cl"] < 0.97 * t["nchw"] else None


def in_layout(model, x, layout):
    if layout is None:
        return model, x
    return copy.deepcopy(model).to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)


def client(model, x, y, k, scheme, layout, mode="sequential", max_slots=512, seed=1):
    opts = fast.FastOptions(mode=mode, memory_format=layout, max_slots=max_slots, budget_bytes=1 << 40)
    return compute_loss_diffs(model, (x, y), loss_fn=cross_entropy, seed=seed, num_perturbations=k, sigma=SIGMA,
                              scheme=scheme, engine=fast.ClientEngine(opts), return_loss=True)


def dl_error(model, x, y, scheme, layout, k=16) -> float:
    """‖ΔL32 − ΔL64‖ / ‖ΔL64‖ on the same seed (float64: same model and batch in double)."""
    d32 = client(model, x, y, k, scheme, layout)[0]
    d64 = client(copy.deepcopy(model).double(), x.double(), y, k, scheme, None)[0]
    return float((d32 - d64).norm() / d64.norm())


def memory(model, x, y, scheme, layout) -> dict:
    """Tensor peaks (bytes above what exists before the call)."""
    im, ix = in_layout(model, x, layout)
    bp_model = copy.deepcopy(model).train()
    opt = torch.optim.Adam(bp_model.parameters())
    C.backprop_step(bp_model, x, y, opt)  # Adam state exists: steady state
    out = {"inference": C.peak_tensor_bytes(lambda: C.inference_loop(im, ix, y, 1)),
           "lean": C.peak_tensor_bytes(lambda: client(model, x, y, 4, scheme, layout)),
           "backprop": C.peak_tensor_bytes(lambda: C.backprop_step(bp_model, x, y, opt))}
    try:
        out["batched8"] = C.peak_tensor_bytes(lambda: client(model, x, y, 8, scheme, None, "batched", 8))
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        out["batched8_error"] = f"{type(e).__name__}: {e}"[:200]
    return out


def cell(name, dataset, batch, k, scheme, repeats, methods, peak) -> dict:
    model, (x, y) = C.make_model(name, dataset), C.make_batch(dataset, batch)
    passes = forward_passes(k, scheme)
    layout = choose_layout(model, x, y)
    im, ix = in_layout(model, x, layout)
    ref_model = copy.deepcopy(model)
    bp_model = copy.deepcopy(model).train()
    opt = torch.optim.Adam(bp_model.parameters())
    gen = torch.Generator().manual_seed(0)
    table = {
        "reference": lambda: reference_client_step(ref_model, x, y, num_perturbations=k, sigma=SIGMA,
                                                   scheme=scheme, generator=gen),
        "inference": lambda: C.inference_loop(im, ix, y, passes),
        "baffle": lambda: client(model, x, y, k, scheme, layout),
        "backprop": lambda: C.backprop_step(bp_model, x, y, opt),
    }
    gemm = C.GemmProbe()
    t = C.interleaved({**{m: table[m] for m in methods}, "gemm": gemm}, repeats=repeats)
    flops, rate = C.forward_flops(model, x), gemm.flops / t["gemm"]
    rec = {"model": name, "dataset": dataset, "batch": batch, "K": k, "scheme": scheme, "passes": passes,
           "layout": layout or "nchw", "times": t, "flops_per_forward": flops, "gemm_flops": peak,
           "gemm_flops_in_cell": rate, "floor_s": passes * flops / rate,
           "floor_start_peak_s": passes * flops / peak["peak"], "malloc": malloc_settings(), "n": sum(p.numel() for p in model.parameters())}
    if "baffle" in t:
        rec["fwd_per_s"] = passes / t["baffle"]
        rec["dl_rel_err_f32"] = dl_error(model, x, y, scheme, layout)
        rec["memory"] = memory(model, x, y, scheme, layout)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet", "wrn"], choices=list(C.MODELS))
    ap.add_argument("--datasets", nargs="+", default=["mnist"], choices=list(C.SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 64])
    ap.add_argument("--ks", nargs="+", type=int, default=[100])
    ap.add_argument("--schemes", nargs="+", default=["forward"], choices=["forward", "central"])
    ap.add_argument("--methods", nargs="+", default=["reference", "inference", "baffle", "backprop"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-mallopt", action="store_true", help="keep glibc's default allocator settings")
    ap.add_argument("--quick", action="store_true", help="smoke test: LeNet, batch 32, K=10, 2 repeats")
    ap.add_argument("--out", help="append JSON lines here")
    a = ap.parse_args()
    if not a.no_mallopt:
        tune_malloc()
    else:  # the client engine would otherwise tune the allocator on first use
        import os

        os.environ["BAFFLE_TUNE_MALLOC"] = "0"
    if a.quick:
        a.models, a.datasets, a.batches, a.ks, a.schemes, a.repeats = ["lenet"], ["mnist"], [32], [10], ["forward"], 2
    peak = C.gemm_rates()
    C.emit(a.out, {"machine": C.machine(), "gemm_flops": peak, "psi": C.psi(), "malloc": malloc_settings(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    for name, ds, b, k, s in itertools.product(a.models, a.datasets, a.batches, a.ks, a.schemes):
        C.emit(a.out, cell(name, ds, b, k, s, a.repeats, a.methods, peak))


if __name__ == "__main__":
    main()
