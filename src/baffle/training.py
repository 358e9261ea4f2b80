"""A training run on disk: output layout, atomic checkpoints, bit-identical resume, metrics, progress.

Layout of ``--out``: ``metrics.jsonl`` (one JSON object per evaluation), ``rounds.jsonl`` (one per
round, appended as it finishes), ``summary.json``, ``model.pt`` (final global weights; EMA weights if
EMA is on) and ``checkpoint.pt`` (everything needed to continue: written atomically, with a checksum,
at every evaluation and by the ``checkpoint_every`` cadence).

A checkpoint also records the run's *runtime* settings, which are not part of ``TrainConfig``:
``threads`` (changes results in the last bits: a different explicit value is refused on resume),
``workers`` (client processes of one torch thread each, ``baffle.workers``: changes only speed, so
it is resolved afresh on every start; it needs ``threads`` 1, which it implies when ``threads`` is
neither given nor recorded) and
``checkpoint_every`` (changes only speed: a new explicit value is used and recorded) and ``device``
(the resolved ``--device``: cpu or cuda; ``device_name`` the card). Resuming on another device changes
results by floating-point rounding (other kernels), so it is never silent: ``--device auto`` that
resolves to another device than the checkpoint's is refused; naming the other device (``--device
cpu`` for a run computed on cuda) continues there and appends {"round", "from", "to"} to the
runtime's ``device_switches``. Checkpoints and ``model.pt`` hold CPU tensors (``devices.to_cpu``) and
load on any machine. Checkpoints written before these were recorded simply lack them: the flag or the
default is used (such runs computed on the CPU).
"""
from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from baffle.config import TrainConfig, flag, make_config, sampled_clients
from baffle.devices import device_name, resolve_device, to_cpu
from baffle.io import check_writable_folder, load_checked, save_checked, save_json, save_jsonl, save_torch
from baffle.rounds import RoundFailed
from baffle.simulation import Simulation

CHECKPOINT, METRICS, SUMMARY, MODEL, CONFIG = "checkpoint.pt", "metrics.jsonl", "summary.json", "model.pt", "config.json"
ROUNDS = "rounds.jsonl"
# Keys that may change when a run is resumed (they do not change what the finished rounds computed).
RESUMABLE_KEYS = frozenset({"rounds", "epochs", "eval_every", "out", "device"})  # device: see resolve_runtime
DEFAULT_CHECKPOINT_EVERY, DEFAULT_LOG_EVERY = "5m", "30s"
_CHECKPOINT_KEYS = {"config": dict, "round": int, "state": dict, "metrics": list, "wall_s": (int, float)}


@dataclass(frozen=True)
class Cadence:
    """Every ``rounds`` rounds and/or every ``seconds`` seconds, whichever comes first (neither: never)."""

    rounds: int | None = None
    seconds: float | None = None

    def due(self, rounds_since: int, seconds_since: float) -> bool:
        return ((self.rounds is not None and rounds_since >= self.rounds)
                or (self.seconds is not None and seconds_since >= self.seconds))

    def __str__(self) -> str:
        time_ = None
        if self.seconds:
            unit = next(u for u in "hms" if self.seconds % _UNITS[u] == 0 or u == "s")
            time_ = f"{self.seconds / _UNITS[unit]:g}{unit}"
        return ",".join(p for p in (self.rounds and str(self.rounds), time_) if p) or "none"


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_cadence(text: str, flag_name: str) -> Cadence:
    """``"100"`` (rounds), ``"300s"``/``"5m"``/``"1h"`` (time), ``"100,5m"`` (both), ``"none"``."""
    rounds = seconds = None
    parts = [p.strip().lower() for p in str(text).split(",")]
    for part in parts:
        number = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([smh]?)", part)
        if part == "none" and len(parts) == 1:
            return Cadence()
        if number is None or (not number[2] and "." in number[1]) or (rounds if not number[2] else seconds):
            raise ValueError(f"{flag_name} {text!r}: expected N (rounds), Ns, Nm or Nh (time), both as "
                             "'100,5m', or 'none'")
        if number[2]:
            seconds = float(number[1]) * _UNITS[number[2]]
        else:
            rounds = int(number[1])
    if rounds == 0 or seconds == 0:
        raise ValueError(f"{flag_name} {text!r}: must be >= 1 round or > 0 seconds")
    return Cadence(rounds, seconds)


@dataclass(frozen=True)
class RunOptions:
    """How a run is executed (not what it computes; see the module docstring for the stored ones).

    ``threads`` / ``checkpoint_every``: explicit values (None: the checkpoint's on resume, else torch's
    thread count / ``DEFAULT_CHECKPOINT_EVERY``). ``workers``: an integer, or "auto" (``resolve_workers``);
    ``start_method``: the workers' (``baffle.workers``; None: fork where available). ``clock``: seconds
    (tests pass a fake one).
    """

    threads: int | None = None
    workers: int | str = "auto"
    start_method: str | None = None
    checkpoint_every: Cadence | None = None
    log_every: Cadence = field(default_factory=lambda: parse_cadence(DEFAULT_LOG_EVERY, "log_every"))
    announce: bool = False  # print the start line (the CLI does)
    clock: Callable[[], float] = time.perf_counter
    stream: object = None  # progress output (None: sys.stderr); a TTY gets a bar, anything else log lines


def load_checkpoint(out: str | Path) -> dict:
    """The checkpoint in ``out``; ValueError (one line) if it is missing, truncated or corrupt."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"--resume: no {CHECKPOINT} in {out}; start the run without --resume")
    try:
        ckpt, verified = load_checked(path)
        _check_layout(ckpt, verified)
    except ValueError as e:  # written atomically, so this is a damaged or foreign file
        raise ValueError(f"--resume: truncated or corrupt checkpoint {path} ({e}); restore it from a backup "
                         "or start again in a new --out") from None
    return ckpt


def _check_layout(ckpt, verified: bool) -> None:
    if not isinstance(ckpt, dict):
        raise ValueError(f"not a baffle checkpoint ({type(ckpt).__name__})")
    extra = set(ckpt) - set(_CHECKPOINT_KEYS)
    if extra - ({"runtime"} if verified else set()):  # an unverified (older) checkpoint has exactly these keys
        raise ValueError(f"unexpected entries {sorted(map(str, extra))}")
    for key, kind in _CHECKPOINT_KEYS.items():
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool):
            raise ValueError(f"{key!r} is missing or malformed")
    if ckpt["round"] < 0 or not isinstance(ckpt.get("runtime", {}), dict):
        raise ValueError("malformed round or runtime record")
    for rec in ckpt["metrics"] or [None]:
        if not (isinstance(rec, dict) and isinstance(rec.get("round"), int)
                and isinstance(rec.get("test_accuracy"), (int, float))):
            raise ValueError("malformed metrics record")


def saved_config(out: str | Path) -> dict:
    """The configuration recorded in a run's checkpoint (the base layer for ``--resume``)."""
    return load_checkpoint(out)["config"]


def check_out_usable(out: str | Path) -> None:
    """ValueError (one line, naming --out) unless ``out`` is or can become a writable folder."""
    try:
        check_writable_folder(out)
    except ValueError as e:
        raise ValueError(f"--out {out}: {e}; choose another --out") from None


def check_fresh_out(out: Path) -> None:
    """ValueError unless ``out`` holds no run (a run stopped before its first checkpoint holds nothing of
    value: its empty metrics.jsonl does not count)."""
    taken = [name for name in (CHECKPOINT, METRICS, SUMMARY, MODEL) if (out / name).exists()
             and not (name == METRICS and (out / name).stat().st_size == 0)]
    if taken and CHECKPOINT in taken:
        raise ValueError(f"--out {out} already holds a run ({', '.join(taken)}); pass --resume to continue it "
                         "or choose another --out")
    if taken:
        raise ValueError(f"--out {out} holds files of a run without a checkpoint ({', '.join(taken)}); "
                         "remove them or choose another --out")


def _check_compatible(config: TrainConfig, saved: dict) -> None:
    now = config.to_dict()
    try:
        before = make_config(saved).to_dict()
    except ValueError as e:
        raise ValueError(f"--resume: the checkpoint's configuration is not valid here ({e})") from None
    changed = [k for k in now if k not in RESUMABLE_KEYS and before[k] != now[k]]
    if changed:
        detail = ", ".join(f"{flag(k)} {before[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"--resume: settings differ from the checkpoint's ({detail}); only --rounds, --epochs, "
                         "--eval-every, --checkpoint-every and --device may change")


def resolve_runtime(options: RunOptions, stored: dict | None, out: Path, device: str = "cpu", done: int = 0,
                    config: TrainConfig | None = None) -> dict:
    """The run's runtime settings: explicit options, else the checkpoint's, else defaults; ``device`` is
    the config's ``--device`` and ``done`` the checkpoint's round (see the module docstring); ``config``
    (None: one process) sizes ``workers``."""
    stored = stored or {}
    saved_threads = stored.get("threads")
    if not (isinstance(saved_threads, int) and saved_threads >= 1):
        saved_threads = None  # not recorded (a checkpoint from before runtime settings were stored)
    if options.threads is not None and saved_threads is not None and options.threads != saved_threads:
        raise ValueError(f"--threads {options.threads}: the run in {out} was computed with --threads "
                         f"{saved_threads}, and CPU reductions can differ in the last bits between thread "
                         f"counts (the resumed run would not match an uninterrupted one); resume with "
                         f"--threads {saved_threads} or without --threads")
    every = options.checkpoint_every
    if every is None:
        every = parse_cadence(stored.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY), "--checkpoint-every")
    placed = _device_runtime(device, stored if stored else None, out, done)
    threads = options.threads or saved_threads
    workers = 1 if config is None else resolve_workers(options.workers, config, threads, placed["device"],
                                                        explicit_threads=options.threads is not None, out=out)
    return {"threads": threads or (1 if workers > 1 else torch.get_num_threads()), "workers": workers,
            "checkpoint_every": str(every), "torch": str(torch.__version__), **placed}


def resolve_workers(setting: int | str, config: TrainConfig, threads: int | None, device: str = "cpu", *,
                    explicit_threads: bool = True, out: Path | None = None) -> int:
    """Client worker processes for a run. "auto": min(CPUs this process may use, clients per round) for
    method baffle on the CPU when ``threads`` (given or recorded) is at most 1, else 1 (one process, as
    before workers existed). An explicit N > 1 is refused where it does not apply (another method, a
    GPU, ``threads`` > 1: each worker runs one torch thread)."""
    from baffle.simulation import check_workers
    from baffle.workers import available_cpus

    if setting == "auto":
        if config.method != "baffle" or device != "cpu" or (threads or 1) > 1:
            return 1
        return max(1, min(available_cpus(), sampled_clients(config)))
    check_workers(setting, config)
    if setting > 1 and (threads or 1) > 1:
        if explicit_threads:
            raise ValueError(f"--workers {setting} with --threads {threads}: each worker runs one torch thread; "
                             f"use --threads 1 (or leave it out) with --workers {setting}, or --workers 1 for "
                             f"{threads} threads in one process")
        raise ValueError(f"--workers {setting}: the run in {out} was computed with --threads {threads} in one "
                         "process, and the thread count can change the last bits; resume with --workers 1 "
                         "(or without --workers)")
    return setting


def _device_runtime(setting: str, stored: dict | None, out: Path, done: int) -> dict:
    """{"device", "device_name"[, "device_switches"]}; ValueError if ``auto`` would switch devices."""
    now = resolve_device(setting)
    saved = None if stored is None else stored.get("device", "cpu")  # recorded since --device exists
    switches = list((stored or {}).get("device_switches", []))
    if saved is not None and saved != now.type:
        if setting == "auto":
            raise ValueError(f"--device auto: the run in {out} was computed on {saved}, and auto picks {now.type} "
                             f"on this machine; resume with --device {now.type} to continue on {now.type} (the "
                             f"rounds after {done} then differ from an uninterrupted run by float rounding), or "
                             f"where {saved} is available")
        switches.append({"round": done, "from": saved, "to": now.type})
    record = {"device": now.type, "device_name": device_name(now)}
    return {**record, "device_switches": switches} if switches else record


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True, options: RunOptions | None = None,
          checkpoint: dict | None = None) -> dict:
    """Run (or continue) ``config`` in-process and write the outputs; returns the summary.

    Everything is checked before data loads (the folder, the checkpoint, the settings), then the data,
    partition and model before anything is written. ``checkpoint``: an already loaded one (resume).
    """
    options = options or RunOptions()
    out = Path(config.out)
    check_out_usable(out)
    ckpt = checkpoint if checkpoint is not None else load_checkpoint(out) if resume else None
    if ckpt is None:
        check_fresh_out(out)
    else:
        _check_compatible(config, ckpt["config"])
    runtime = resolve_runtime(options, ckpt.get("runtime") if ckpt else None, out, config.device,
                              ckpt["round"] if ckpt else 0, config=config)
    if ckpt is not None and config.rounds is not None:
        _check_rounds(config, config.rounds, ckpt["round"], out)  # before the data loads, when it can be
    if options.announce:
        print(f"baffle: output folder {out}" + (f" (resuming at round {ckpt['round']})" if ckpt else ""), flush=True)
        switch = runtime.get("device_switches", [None])[-1]
        if ckpt and switch and switch["round"] == ckpt["round"]:
            print(f"baffle: continuing on {switch['to']} a run computed on {switch['from']}: from round "
                  f"{switch['round']} on, results differ from an uninterrupted run by float rounding", flush=True)
    before = torch.get_num_threads()
    torch.set_num_threads(runtime["threads"])
    try:
        # validates data, partition and model before anything is written
        sim = Simulation(config, workers=runtime["workers"], start_method=options.start_method)
        with sim:  # shuts the workers down, also on an error or Ctrl-C
            _check_rounds(config, sim.rounds, ckpt["round"] if ckpt else 0, out)
            _check_privacy_budget(sim, ckpt, out)
            return _Run(sim, out, runtime, options, progress).run(ckpt)
    finally:
        torch.set_num_threads(before)


def _check_rounds(config: TrainConfig, rounds: int, done: int, out: Path) -> None:
    if rounds >= done:
        return
    given = (f"--rounds {config.rounds}" if config.rounds is not None
             else f"--epochs {config.epochs:g} ({rounds} rounds)")
    raise ValueError(f"{given}: the run in {out} has already done {done} rounds; give at least --rounds {done} "
                     "(more extends the run)")


def _check_privacy_budget(sim: Simulation, ckpt: dict | None, out: Path) -> None:
    """With --dp-target-epsilon: refuse a run (new, resumed or extended) whose planned rounds would spend more."""
    ledger, target = sim.ledger, sim.config.dp_target_epsilon
    if ledger is None or target is None:
        return
    if ckpt is not None:
        _load_ledger(ledger, ckpt, out)
    left = sim.rounds - ledger.rounds
    eps = ledger.epsilon(left)
    if eps <= target:
        return
    fit = ledger.rounds + ledger.rounds_within(target, left)
    dp = ledger.spec
    detail = (f"{sim.rounds} rounds would spend ε = {eps:.4g} (q = {ledger.sampling_rate:g}, z = "
              f"{dp.noise_multiplier:g}, δ = {dp.delta:g})")
    if fit < ledger.rounds:
        raise ValueError(f"--dp-target-epsilon {target:g}: the run in {out} has already spent ε = "
                         f"{ledger.epsilon():.4g}; no further round fits")
    raise ValueError(f"--dp-target-epsilon {target:g}: {detail}; {fit} rounds fit: use --rounds {fit}, or raise "
                     "--dp-noise-multiplier")


def _load_ledger(ledger, ckpt: dict, out: Path) -> None:
    try:
        ledger.load_state_dict(ckpt["state"]["privacy"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--resume: truncated or corrupt checkpoint {out / CHECKPOINT} (its privacy ledger does "
                         f"not fit this run: {e})") from None


class _Run:
    """The loop of one process's part of a run: rounds, per-round log, evaluations, checkpoints, display."""

    def __init__(self, sim: Simulation, out: Path, runtime: dict, options: RunOptions, progress: bool):
        self.sim, self.out, self.runtime, self.options, self.clock = sim, out, runtime, options, options.clock
        self.checkpoint_every = parse_cadence(runtime["checkpoint_every"], "--checkpoint-every")
        self.progress = progress

    def run(self, ckpt: dict | None) -> dict:
        sim, out = self.sim, self.out
        metrics, start, wall0 = [], 0, 0.0
        if ckpt is not None:
            _load_state(sim, ckpt, out)
            metrics, start, wall0 = list(ckpt["metrics"]), ckpt["round"], float(ckpt["wall_s"])
        out.mkdir(parents=True, exist_ok=True)
        save_json(sim.config.to_dict(), out / CONFIG)  # readable while the run is in progress (baffle report)
        if start < sim.rounds:
            (out / SUMMARY).unlink(missing_ok=True)  # in progress again: written back when it finishes
        save_jsonl(metrics, out / METRICS)
        log = RoundsLog(out / ROUNDS, keep_through=start)
        t0 = self.clock()
        self.wall = lambda: wall0 + self.clock() - t0
        if self.options.announce:
            print(start_line(sim, start, self.runtime), flush=True)
        if start == 0:
            record_evaluation(sim, out, metrics, 0, {"clients": 0, "train_loss": None}, self.wall(),
                              runtime=self.runtime)
        elif start == sim.rounds and metrics[-1]["round"] != start:  # ends at a checkpoint between evaluations
            last = next((r for r in reversed(read_jsonl(out / ROUNDS)) if r.get("round") == start), {})
            info = {"clients": last.get("clients"), "train_loss": last.get("train_loss")}
            record_evaluation(sim, out, metrics, start, info, self.wall(), runtime=self.runtime)
        display = Display(sim.rounds, start, self.progress, self.options)
        try:
            self._loop(start, metrics, log, display)
        finally:
            display.close()
            log.close()
        return finish_run(sim, out, metrics, self.wall(), runtime=self.runtime)

    def _loop(self, start: int, metrics: list, log: "RoundsLog", display: "Display") -> None:
        sim, saved_round, saved_at = self.sim, start, self.clock()
        for server_round in range(start, sim.rounds):
            began = self.clock()
            try:
                info = sim.run_round(server_round)
            except RoundFailed as e:
                raise RoundFailed(f"{e}; {CHECKPOINT} and {METRICS} in {self.out} are intact at round {saved_round}: "
                                  f"continue with `baffle train --out {self.out} --resume`") from None
            done = server_round + 1
            log.write({"round": done, **info, **vars(sim.counters), "round_s": self.clock() - began,
                       "wall_s": self.wall()})
            if done % sim.eval_every == 0 or done == sim.rounds:
                record_evaluation(sim, self.out, metrics, done, info, self.wall(), runtime=self.runtime)
                saved_round, saved_at = done, self.clock()
            elif self.checkpoint_every.due(done - saved_round, self.clock() - saved_at):
                write_checkpoint(sim, self.out, metrics, done, self.wall(), runtime=self.runtime)
                saved_round, saved_at = done, self.clock()
            display.update(done, info, metrics[-1], self.wall())


def _load_state(sim: Simulation, ckpt: dict, out: Path) -> None:
    if ckpt["state"].get("engine") == "flower":
        raise ValueError(f"--resume: {out / CHECKPOINT} was written by `baffle deploy` (Flower), not by "
                         "`baffle train`; resume it with `baffle deploy --resume`")
    try:
        sim.load_state_dict(ckpt["state"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ValueError(f"--resume: truncated or corrupt checkpoint {out / CHECKPOINT} (its state does not "
                         f"fit this run: {first})") from None


class RoundsLog:
    """``rounds.jsonl``: one line per finished round, flushed as it is written. On resume, lines after
    the checkpoint's round (rounds that will be redone) and a cut-off last line are dropped."""

    def __init__(self, path: Path, keep_through: int):
        kept = [r for r in read_jsonl(path) if isinstance(r.get("round"), int) and r["round"] <= keep_through]
        save_jsonl(kept, path)
        self.file = path.open("a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, sort_keys=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file up to the first line that is not one (none if it is absent)."""
    records = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return records
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            break
        if not isinstance(rec, dict):
            break
        records.append(rec)
    return records


def start_line(sim: Simulation, start: int, runtime: dict) -> str:
    """The config summary and the expected rounds, printed before the first round."""
    c = sim.config
    method = c.method if c.num_perturbations is None else (
        f"{c.method} (K={c.num_perturbations}, {c.scheme}, {c.perturbations}, {c.direction_stream} directions)")
    epochs = sim.rounds / sim.rounds_per_epoch
    length = (f"{sim.rounds} rounds (= {epochs:.4g} epoch{'' if epochs == 1 else 's'} × {sim.rounds_per_epoch} rounds)"
              + (f", resuming after round {start}" if start else ""))
    return (f"baffle: {c.dataset}, {c.model_name} ({sim.num_parameters:,} parameters), {c.clients} clients "
            f"{c.partition}, {method}{protection_text(sim)}, {c.optimizer} lr {c.lr:g}, batch {c.batch_size}, "
            f"seed {c.seed}; {length}; "
            f"evaluation every {sim.eval_every} rounds, checkpoint every {runtime['checkpoint_every']}, "
            f"threads {runtime['threads']}{_workers_text(runtime)}, device {runtime.get('device_name', 'cpu')}")


def _workers_text(runtime: dict) -> str:
    workers = runtime.get("workers", 1)
    return f", {workers} client workers" if workers > 1 else ""


def protection_text(sim: Simulation) -> str:
    """', secure aggregation (t = 6 of 10), DP (...)', ... for the start line ('' for a plain run)."""
    c, spec, parts = sim.config, sim.protection, []
    if spec is None:
        return ""
    m = sampled_clients(c)
    if spec.secure_aggregation:
        parts.append(f"secure aggregation (t = {c.secagg_threshold or m // 2 + 1} of {m})")
    if sim.ledger is not None:
        parts.append(f"DP (clip {c.dp_clip:g}, z {c.dp_noise_multiplier:g}, δ {c.dp_delta:g}; "
                     f"ε after {sim.rounds} rounds {sim.ledger.epsilon(sim.rounds - sim.ledger.rounds):.4g})")
    if c.aggregator != "mean":
        parts.append(f"aggregator {c.aggregator}")
    if c.attack is not None:
        parts.append(f"attack {c.attack} by clients {', '.join(map(str, sim.malicious)) or 'none'}")
    return "".join(f", {p}" for p in parts)


class Display:
    """A progress bar on a terminal; elsewhere (a file, a pipe) a plain line per ``log_every``."""

    def __init__(self, total: int, start: int, enabled: bool, options: RunOptions):
        self.total, self.options, self.clock = total, options, options.clock
        self.stream = options.stream or sys.stderr
        self.enabled = enabled and start < total
        self.tty = self.enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        if self.tty:
            self.bar = tqdm(total=total, initial=start, desc="baffle", unit="round", file=self.stream,
                            dynamic_ncols=True)
        self.logged_round, self.logged_at, self.first = start, self.clock(), True

    def update(self, done: int, info: dict, last_eval: dict, wall_s: float) -> None:
        if not self.enabled:
            return
        acc = f"test acc {last_eval['test_accuracy']:.4f} at round {last_eval['round']}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {info['train_loss']:.4f}, {acc}", refresh=False)
            self.bar.update(1)
            return
        due = self.options.log_every.due(done - self.logged_round, self.clock() - self.logged_at)
        if not (due or self.first or done == self.total):
            return
        rate = (self.clock() - self.logged_at) / max(1, done - self.logged_round)
        left = f", about {_duration(rate * (self.total - done))} left" if done < self.total else ""
        print(f"baffle: round {done}/{self.total} ({100 * done / self.total:.0f}%), loss {info['train_loss']:.4f}, "
              f"{acc}, {wall_s:.1f} s{left}", file=self.stream, flush=True)
        self.logged_round, self.logged_at, self.first = done, self.clock(), False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def write_checkpoint(sim: Simulation, out: Path, metrics: list, done: int, wall_s: float, *,
                     runtime: dict | None = None) -> None:
    """Atomically write everything needed to continue after round ``done`` (with a checksum)."""
    ckpt = {"config": sim.config.to_dict(), "round": done, "state": to_cpu(sim.state_dict()), "metrics": metrics,
            "wall_s": wall_s}
    if runtime is not None:
        ckpt["runtime"] = runtime
    save_checked(ckpt, out / CHECKPOINT)


def privacy_metrics(sim) -> dict:
    """``sim.privacy_metrics()`` ({"epsilon": ...} with DP); {} for a runner without the protection options
    (the Flower server, which refuses them)."""
    method = getattr(sim, "privacy_metrics", None)
    return method() if method is not None else {}


def record_evaluation(sim: Simulation, out: Path, metrics: list, done: int, info: dict, wall_s: float, *,
                      runtime: dict | None = None) -> dict:
    """Evaluate, checkpoint atomically, then append the metrics line (resume rewrites it if cut off)."""
    rec = {"round": done, "epoch": done / sim.rounds_per_epoch, **sim.evaluate(), **info, **vars(sim.counters),
           **privacy_metrics(sim), "wall_s": wall_s,
           "lr": sim.server.optimizer.param_groups[0]["lr"]}
    metrics.append(rec)
    write_checkpoint(sim, out, metrics, done, wall_s, runtime=runtime)
    with (out / METRICS).open("a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    return rec


def best_validation(metrics: list[dict]) -> dict:
    """Model selection on validation: the test accuracy of the evaluation with the best validation
    accuracy (the earliest on ties); null without a validation set. No field reports a maximum over
    test evaluations."""
    scored = [m for m in metrics if m.get("val_accuracy") is not None]
    if not scored:
        return {"best_val_accuracy": None, "best_val_round": None, "test_accuracy_at_best_val": None}
    best = max(scored, key=lambda m: (m["val_accuracy"], -m["round"]))
    return {"best_val_accuracy": best["val_accuracy"], "best_val_round": best["round"],
            "test_accuracy_at_best_val": best["test_accuracy"]}


def finish_run(sim: Simulation, out: Path, metrics: list, wall_s: float, *, runtime: dict | None = None) -> dict:
    last = metrics[-1]
    save_torch(to_cpu(sim.server.eval_model().state_dict()), out / MODEL)
    summary = {
        "final_test_accuracy": last["test_accuracy"],
        "final_test_loss": last["test_loss"],
        **best_validation(metrics),
        "rounds": sim.rounds,
        "epochs": sim.rounds / sim.rounds_per_epoch,
        "wall_s": wall_s,
        "forward_passes": last["forward_passes"],
        "backward_passes": last["backward_passes"],
        "bytes_up": last["bytes_up"],
        "bytes_down": last["bytes_down"],
        "num_parameters": sim.num_parameters,
        **({"epsilon": last["epsilon"], "dp_delta": sim.config.dp_delta} if "epsilon" in last else {}),
        "config": sim.config.to_dict(),
    }
    if runtime is not None:
        summary["runtime"] = runtime
    save_json(summary, out / SUMMARY)
    return summary
