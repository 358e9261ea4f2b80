"""Parallel CPU workers for the in-process runner: a round's clients spread over processes.

``ClientPool(model, workers)`` starts ``workers`` processes (``concurrent.futures.ProcessPoolExecutor``),
each with ONE torch thread and its own copy of the model's architecture. Every round the parent sends
each worker the current weights (numbers, not a shared tensor), the round plan, the engine options
and a contiguous slice of the round's clients with their batches; the worker answers with
``baffle.rounds.baffle_client_update`` — the function the single-process path calls — over one
``ClientEngine`` for its slice, and ``baffle_replies`` returns the replies in client order. A
worker keeps nothing between rounds (it loads the weights it is sent and builds a fresh engine), so
a run's results do not depend on the worker count: they are bit-identical to one process with one
torch thread. The server step stays in the parent.

Start method: ``fork`` where the platform has it (the children start without re-importing torch and
share the parent's pages copy-on-write), else ``spawn`` (the model is pickled to each child); both
compute the same numbers. Workers ignore SIGINT: the parent handles Ctrl-C and ``close`` shuts the
pool down, waiting for the workers to exit. On Linux each worker also asks the kernel for SIGTERM when
its parent dies (``prctl(PR_SET_PDEATHSIG)``), so a runner killed with SIGKILL leaves no worker behind.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch import nn

from baffle import rounds as R
from baffle._alloc import auto_tune_malloc
from baffle.fast import ClientEngine, FastOptions
from baffle.server import ClientReply

class WorkerFailed(R.RoundFailed):
    """A worker process raised or died during a round; raised before the server step."""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_start_method() -> str:
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def split_evenly(items: list, parts: int) -> list[list]:
    """``items`` in order, cut into min(parts, len(items)) contiguous slices whose sizes differ by <= 1."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


class ClientPool:
    """``workers`` processes computing BAFFLE client replies; ``close`` (or ``with``) shuts them down."""

    def __init__(self, model: nn.Module, workers: int, *, start_method: str | None = None):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 2:
            raise ValueError(f"workers must be an integer >= 2 for a pool, got {workers!r}")
        method = start_method or default_start_method()
        if method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"start method {method!r} is not available here; use one of "
                             f"{', '.join(multiprocessing.get_all_start_methods())}")
        self.workers, self.start_method = workers, method
        context = multiprocessing.get_context(method)
        self._executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                             initargs=(model, os.getpid()))

    def baffle_replies(self, model: nn.Module, items: list[tuple[int, R.Batch]], plan: R.RoundPlan, loss_fn,
                       options: FastOptions) -> list[ClientReply]:
        """[baffle_client_update(model, [batch], plan, loss_fn, cid, engine) for cid, batch in items], in
        that order, computed by the workers (one engine per worker slice, as the parent's per round)."""
        state = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
        futures = [self._executor.submit(_client_replies, state, plan,
                                         [(cid, (x.numpy(), y.numpy())) for cid, (x, y) in part], loss_fn, options)
                   for part in split_evenly(items, self.workers)]
        try:
            answers = [f.result() for f in futures]
        except Exception as e:  # a worker raised, or died (BrokenProcessPool)
            for f in futures:
                f.cancel()
            raise WorkerFailed(f"round {plan.server_round + 1}: a client worker failed ({type(e).__name__}: "
                               f"{_first_line(e)}); rerun with --workers 1 to see it in the main process") from e
        except BaseException:  # KeyboardInterrupt: the caller closes the pool
            for f in futures:
                f.cancel()
            raise
        return [ClientReply(cid, torch.from_numpy(diffs).clone(), n, loss)
                for answer in answers for cid, diffs, n, loss in answer]

    def close(self) -> None:
        """Cancel queued work and wait for every worker process to exit (idempotent)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ClientPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:200] if lines else "no message"


_MODEL: nn.Module | None = None  # the worker's copy of the model (set by _init_worker)
_PARENT_PID = 0
_PR_SET_PDEATHSIG = 1


def _exit_with_parent() -> None:
    """Linux: have the kernel send this worker SIGTERM when the parent dies, however it dies (SIGKILL too)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the pool's own shutdown still applies
        return
    if os.getppid() != _PARENT_PID:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(model: nn.Module, parent_pid: int) -> None:
    global _MODEL, _PARENT_PID
    _PARENT_PID = parent_pid
    _exit_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)
    auto_tune_malloc()  # as the parent's first client call does (inherited under fork; spawn starts afresh)
    _MODEL = model


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A torch-allocated copy (the alignment torch's own tensors have, so kernels take the same paths)."""
    return torch.from_numpy(array).clone(memory_format=torch.contiguous_format)


def _client_replies(state: dict, plan: R.RoundPlan, items: list, loss_fn, options: FastOptions) -> list[tuple]:
    _MODEL.load_state_dict({k: _tensor(v) for k, v in state.items()})
    engine = ClientEngine(options)
    out = []
    for cid, (x, y) in items:
        r = R.baffle_client_update(_MODEL, [(_tensor(x), _tensor(y))], plan, loss_fn, cid, engine)
        out.append((r.client_id, r.loss_diffs.detach().cpu().numpy(), r.num_examples, r.loss))
    return out


__all__ = ["ClientPool", "WorkerFailed", "available_cpus", "default_start_method", "split_evenly"]
