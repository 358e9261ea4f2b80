"""GPU check (prepared, run by hand where a CUDA device exists): batched perturbations vs sequential.

LeNet (MNIST shape), batch 32, K=500, forward scheme, on ``--device`` (default cuda):
  reference   benchmarks/reference.py on the device (fresh randn per tensor, load_state_dict, forward)
  sequential  baffle.fast sequential engine (one slot per forward)
  batched:P   baffle.fast batched engine, P perturbations per vmap(functional_call) call
Directions are always generated on the CPU (bit-identical stream) and copied to the device per chunk.
Prints one JSON line per method with the median time and forwards/s, plus the max |ΔL| difference
between batched and sequential (float32 rounding of the loss is expected, nothing larger).

  python benchmarks/gpu_batched.py                  # on a CUDA machine
  python benchmarks/gpu_batched.py --device cpu --k 20 --repeats 1   # smoke test anywhere
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.functional import cross_entropy

import common as C
from reference import reference_client_step

from baffle import fast


def timed(fn, device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--k", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--slots", nargs="+", type=int, default=[16, 64, 128, 256])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; pass --device cpu for a smoke test")
    model = C.make_model("lenet", "mnist").to(a.device)
    x, y = (t.to(a.device) for t in C.make_batch("mnist", a.batch))
    kw = dict(loss_fn=cross_entropy, seed=1, num_perturbations=a.k, sigma=1e-4)
    gen = torch.Generator(device=a.device).manual_seed(0)
    C.emit(None, {"device": a.device, "name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
                  "torch": torch.__version__, "K": a.k, "batch": a.batch})
    t = timed(lambda: reference_client_step(model, x, y, num_perturbations=a.k, sigma=1e-4, generator=gen),
              a.device, a.repeats)
    C.emit(None, {"method": "reference", "s": t, "fwd_per_s": (a.k + 1) / t})
    seq = fast.loss_diffs(model, (x, y), options=fast.FastOptions(mode="sequential"), **kw)[0]
    t = timed(lambda: fast.loss_diffs(model, (x, y), options=fast.FastOptions(mode="sequential"), **kw),
              a.device, a.repeats)
    C.emit(None, {"method": "sequential", "s": t, "fwd_per_s": (a.k + 1) / t})
    for p in a.slots:
        opts = fast.FastOptions(mode="batched", max_slots=p, budget_bytes=1 << 40)
        try:
            got = fast.loss_diffs(model, (x, y), options=opts, **kw)[0]
            t = timed(lambda: fast.loss_diffs(model, (x, y), options=opts, **kw), a.device, a.repeats)
            C.emit(None, {"method": f"batched:{p}", "s": t, "fwd_per_s": (a.k + 1) / t,
                          "max_abs_dl_diff_vs_sequential": float((got - seq).abs().max())})
        except RuntimeError as e:  # e.g. out of memory at large P
            C.emit(None, {"method": f"batched:{p}", "error": str(e)[:200]})


if __name__ == "__main__":
    main()
