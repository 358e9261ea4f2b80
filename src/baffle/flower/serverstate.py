"""What the Flower server keeps between rounds: model, optimizer, round cursors, counters. No data.

The in-process ``Simulation`` loads the dataset to build the model, count the rounds of an epoch and
hold every client's batch cursor. A federated server must not need the clients' data, so
``ServerRun`` is built from ``DataFacts`` the nodes report (input shape, number of classes, the
number of training examples over all partitions) and keeps, per client, only the number of rounds
that have sampled it (``baffle.cursors.SampleCounts``: the cursor the node turns into its batch).
For the epoch-level methods it also keeps every partition's local optimizer state (opaque tensors
the node returns with its weights and is sent with its next task: ``baffle train``'s per-client
optimizers, which are never reset, so that resume and a server without data stay exact).
It has the attributes ``baffle.training``'s ``record_evaluation`` / ``write_checkpoint`` /
``finish_run`` read from a ``Simulation``; its ``evaluate`` runs on a node (set by the ServerApp).

This module does not import flwr.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import SimpleNamespace

from pathlib import Path

from baffle.config import FEDAVG_METHODS, METHODS, TrainConfig, flag, make_config
from baffle.cursors import SampleCounts
from baffle.perturbation import num_trainable, trainable_parameters
from baffle.server import ServerState
from baffle.simulation import Counters, build_run_model, estimator_spec, optimizer_spec
from baffle.training import CHECKPOINT, RESUMABLE_KEYS, load_checkpoint

FLOWER_METHODS = METHODS  # every method of `baffle train`: baffle, baffle-fedavg, bp-fedsgd, bp-fedavg


def check_flower_config(config: TrainConfig) -> None:
    """ValueError (one line) for a run config the Flower adapter cannot run."""
    if config.method not in FLOWER_METHODS:
        raise ValueError(f"--method {config.method}: not available on Flower (it runs {', '.join(FLOWER_METHODS)}); "
                         "run it in-process with `baffle train`")
    if config.device != "cpu":
        raise ValueError(f"--device {config.device}: not available on Flower (its clients and server compute on "
                         "the CPU); use cpu, or run on a GPU in-process with `baffle train --device`")
    if config.memory_format == "channels_last":
        raise ValueError("--memory-format channels_last: not available on Flower (its clients compute in NCHW); "
                         "use nchw")
    on = [name for name, value in (("secure_aggregation", config.secure_aggregation), ("dp_clip", config.dp_clip),
                                   ("aggregator", config.aggregator not in (None, "mean")),
                                   ("attack", config.attack)) if value]
    if on:
        raise ValueError(f"{flag(on[0])}: not available on Flower yet (secure aggregation, DP, robust aggregators and "
                         "attacks run in-process); run it with `baffle train`")


@dataclass(frozen=True)
class DataFacts:
    """What the server needs to know about the clients' data (reported by the nodes)."""

    image_size: int
    in_channels: int
    num_classes: int
    train_examples: int  # Σ over all partitions of their sizes (the held-out validation excluded)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def shape(self) -> dict:
        return {"image_size": self.image_size, "in_channels": self.in_channels, "num_classes": self.num_classes}


def rounds_per_epoch(config: TrainConfig, train_examples: int) -> int:
    """``baffle.simulation.rounds_per_epoch`` from the partition's total size (equal; tested)."""
    sampled = max(1, round(config.fraction * config.clients)) / config.clients
    if config.method in ("baffle", "bp-fedsgd"):
        mean_size = train_examples / config.clients
        return max(1, math.ceil(math.ceil(mean_size / config.batch_size) / sampled))
    return max(1, math.ceil(1 / (sampled * config.local_epochs)))


class ServerRun:
    """The Flower server's state for one run, from the config and the nodes' ``DataFacts``."""

    def __init__(self, config: TrainConfig, facts: DataFacts):
        check_flower_config(config)
        self.config = c = config
        self.facts = facts
        self.model = build_run_model(c, SimpleNamespace(**facts.shape()))  # same init seed: same weights
        self.rounds_per_epoch = rounds_per_epoch(c, facts.train_examples)
        self.server = ServerState(self.model, optimizer_spec(c, self.rounds_per_epoch))
        self.estimator = estimator_spec(c)
        self.cursors = SampleCounts(c.clients, c.fraction, c.seed)
        self.counters = Counters()
        self.num_parameters = num_trainable(self.model)
        self.num_parameter_tensors = len(trainable_parameters(self.model))  # an optimizer state's entries
        self.model_bytes = sum(p.numel() * p.element_size() for _, p in trainable_parameters(self.model))
        self.rounds = c.rounds or math.ceil(c.epochs * self.rounds_per_epoch)
        self.eval_every = c.eval_every or self.rounds_per_epoch
        self.layout = "nchw"  # Flower clients compute in NCHW
        # epoch-level methods: partition → its local optimizer's state (None until its first round)
        self.local_optimizers: list[dict | None] | None = None
        if c.method in FEDAVG_METHODS:
            self.local_optimizers = [None] * c.clients
        self.evaluator: Callable[[ServerRun], dict] | None = None

    def ema_due(self, server_round: int) -> bool:
        """As ``Simulation.ema_due``: after every round, or at the end of each epoch."""
        return self.config.ema_every != "epoch" or (server_round + 1) % self.rounds_per_epoch == 0

    def evaluate(self) -> dict:
        """Test (and validation) metrics of the current model, computed where the data is (a node)."""
        if self.evaluator is None:
            raise RuntimeError("this server has no data; set ServerRun.evaluator to evaluate on a node")
        return self.evaluator(self)

    def eval_states(self) -> tuple[dict, dict | None]:
        """(weights to evaluate and export, raw weights when EMA is on else None), as ``Simulation.evaluate``."""
        model = self.server.eval_model()
        return model.state_dict(), (None if model is self.model else self.model.state_dict())

    def state_dict(self) -> dict:
        return {"server": self.server.state_dict(), "cursors": self.cursors.state_dict(),
                "counters": vars(self.counters).copy(), "local_optimizers": self.local_optimizers,
                "layout": self.layout, "data_facts": asdict(self.facts), "engine": "flower"}

    def load_state_dict(self, state: dict) -> None:
        if state.get("engine") != "flower":
            raise ValueError("the checkpoint was written by `baffle train` (in-process), not by `baffle deploy`; "
                             "resume it with `baffle train --resume`")
        saved = DataFacts(**state["data_facts"])
        if saved != self.facts:
            raise ValueError(f"the nodes' data ({self.facts}) differs from the checkpoint's ({saved})")
        self.server.load_state_dict(state["server"])
        self.cursors.load_state_dict(state["cursors"])
        self.counters = Counters(**state["counters"])
        saved = state.get("local_optimizers")
        if (saved is None) != (self.local_optimizers is None) or (saved is not None
                                                                  and len(saved) != self.config.clients):
            raise ValueError(f"its local optimizer states ({'none' if saved is None else len(saved)}) do not fit "
                             f"--method {self.config.method} with {self.config.clients} clients")
        self.local_optimizers = None if saved is None else list(saved)


def resume_checkpoint(out: str | Path, config: TrainConfig) -> dict:
    """The checkpoint to continue from; ValueError (one line) if it is missing, damaged or incompatible."""
    out = Path(out)
    ckpt = load_checkpoint(out)
    try:
        before = make_config(ckpt["config"]).to_dict()
    except ValueError as e:
        raise ValueError(f"--resume: the checkpoint's configuration is not valid here ({e})") from None
    now = config.to_dict()
    changed = [k for k in now if k not in RESUMABLE_KEYS and before[k] != now[k]]
    if changed:
        detail = ", ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"--resume: settings differ from the checkpoint's ({detail}); only "
                         f"{', '.join(sorted(RESUMABLE_KEYS))} may change")
    if ckpt.get("state", {}).get("engine") != "flower":
        raise ValueError(f"--resume: {out / CHECKPOINT} was written by `baffle train` (in-process); continue it "
                         "with `baffle train --resume`")
    return ckpt


__all__ = ["DataFacts", "FLOWER_METHODS", "ServerRun", "check_flower_config", "resume_checkpoint", "rounds_per_epoch"]
