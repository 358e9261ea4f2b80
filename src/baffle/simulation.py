"""In-process federated runner: the fast, embedded default behind ``baffle train``.

One model instance serves every client (clients are data partitions plus a batch cursor), so a
round costs the clients' forward passes and the server step. Everything random derives from
``config.seed``: parameter init, partition, client sampling, batch order and the round seeds, which
is what makes ``resume`` bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.functional import cross_entropy

from baffle import rounds as R
from baffle.config import TrainConfig
from baffle.data import ArrayDataset, load_dataset, partition_indices
from baffle.estimator import forward_passes
from baffle.models import build_model
from baffle.perturbation import derive_seed, num_trainable, trainable_parameters
from baffle.server import OptimizerSpec, ServerState

_INIT_TAG, _SAMPLE_TAG, _ORDER_TAG = 0x1417, 0x5A3F, 0x0BD3


class ClientShards:
    """Per-client training indices and a batch cursor over seeded per-epoch permutations."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, clients, seed: int):
        self.inputs, self.targets, self.seed = inputs, targets, seed
        self.indices = [np.asarray(c, dtype=np.int64) for c in clients]
        self.epoch = np.zeros(len(self.indices), dtype=np.int64)
        self.cursor = np.zeros(len(self.indices), dtype=np.int64)
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # cid -> (epoch, that epoch's order)

    def __len__(self) -> int:
        return len(self.indices)

    def size(self, cid: int) -> int:
        return len(self.indices[cid])

    def _order(self, cid: int) -> np.ndarray:
        """The client's example order in its current local epoch (computed once per epoch)."""
        epoch = int(self.epoch[cid])
        cached = self._orders.get(cid)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, _ORDER_TAG, cid, epoch])
            cached = (epoch, self.indices[cid][rng.permutation(self.size(cid))])
            self._orders[cid] = cached
        return cached[1]

    def next_batch(self, cid: int, batch_size: int) -> R.Batch:
        """The client's next batch; the last batch of a local epoch may be smaller."""
        order, start = self._order(cid), int(self.cursor[cid])
        idx = order[start : start + batch_size]
        self.cursor[cid] = start + len(idx)
        if self.cursor[cid] >= self.size(cid):
            self.epoch[cid] += 1
            self.cursor[cid] = 0
        t = torch.from_numpy(idx)
        return self.inputs[t], self.targets[t]

    def seek(self, cid: int, batches_taken: int, batch_size: int) -> None:
        """Put client ``cid``'s cursor where ``batches_taken`` calls of ``next_batch`` leave it.

        Lets a runner without per-client state between rounds (a Flower ClientApp) derive the
        cursor from the round number instead of carrying it.
        """
        per_epoch = math.ceil(self.size(cid) / batch_size)
        self.epoch[cid], pos = divmod(int(batches_taken), per_epoch)
        self.cursor[cid] = pos * batch_size

    def epoch_batches(self, cid: int, batch_size: int, epochs: int) -> list[R.Batch]:
        per_epoch = math.ceil(self.size(cid) / batch_size)
        return [self.next_batch(cid, batch_size) for _ in range(per_epoch * epochs)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch.tolist(), "cursor": self.cursor.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch[:] = state["epoch"]
        self.cursor[:] = state["cursor"]


@dataclass
class Counters:
    forward_passes: int = 0
    backward_passes: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


def sample_clients(num_clients: int, fraction: float, seed: int, server_round: int) -> list[int]:
    """The round's clients: max(1, round(fraction·C)) without replacement, sorted."""
    m = max(1, round(fraction * num_clients))
    if m >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, _SAMPLE_TAG, server_round])
    return sorted(int(c) for c in rng.choice(num_clients, size=m, replace=False))


def rounds_sampled_before(num_clients: int, fraction: float, seed: int, cid: int, server_round: int) -> int:
    """How many of the rounds 0..server_round-1 sampled client ``cid`` (as ``sample_clients`` does)."""
    if max(1, round(fraction * num_clients)) >= num_clients:
        return server_round
    return sum(cid in sample_clients(num_clients, fraction, seed, t) for t in range(server_round))


def rounds_per_epoch(config: TrainConfig, shards: ClientShards) -> int:
    """Rounds in which each client, on average, passes once over its data."""
    sampled = max(1, round(config.fraction * len(shards))) / len(shards)
    if config.method in ("baffle", "bp-fedsgd"):
        mean_size = sum(shards.size(c) for c in range(len(shards))) / len(shards)
        return max(1, math.ceil(math.ceil(mean_size / config.batch_size) / sampled))
    return max(1, math.ceil(1 / (sampled * config.local_epochs)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int):
    """(mean cross-entropy, accuracy) of ``model`` on a labelled set."""
    loss_sum, correct = 0.0, 0
    for start in range(0, len(targets), batch_size):
        x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
        out = model(x)
        loss_sum += float(cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    return loss_sum / len(targets), correct / len(targets)


def build_run_model(config: TrainConfig, data: ArrayDataset) -> torch.nn.Module:
    options = dict(image_size=data.image_size, activation=config.activation, norm=config.norm)
    if config.model_name == "mlp":
        options["hidden"] = config.hidden
    return build_model(config.model_name, in_channels=data.in_channels, num_classes=data.num_classes,
                       seed=derive_seed(config.seed, _INIT_TAG), **options)


def optimizer_spec(config: TrainConfig) -> OptimizerSpec:
    return OptimizerSpec(name=config.optimizer, lr=config.lr, momentum=config.momentum,
                         weight_decay=config.weight_decay, warmup_rounds=config.warmup_rounds,
                         lr_milestones=config.lr_milestones, lr_gamma=config.lr_gamma, clip=config.clip,
                         clip_norm_type=config.clip_norm_type, ema_decay=config.ema_decay)


def estimator_spec(config: TrainConfig) -> R.EstimatorSpec:
    return R.EstimatorSpec(config.num_perturbations, config.sigma, config.scheme, config.distribution)


class Simulation:
    """Everything a run holds between rounds; ``run_round`` advances it by one server round."""

    def __init__(self, config: TrainConfig):
        self.config = config
        data = load_dataset(config.dataset, config.data_dir, image_size=config.image_size)
        try:
            part = partition_indices(data.train_targets, config.clients, config.partition, seed=config.seed,
                                     val_fraction=config.val_fraction, num_classes=data.num_classes)
        except ValueError as e:
            raise ValueError(f"--clients {config.clients} / --partition {config.partition}: {e}") from None
        self.data, self.validation = data, torch.from_numpy(np.asarray(part.validation, dtype=np.int64))
        self.shards = ClientShards(data.train_inputs, data.train_targets, part.clients, config.seed)
        self.model = build_run_model(config, data)
        self.server = ServerState(self.model, optimizer_spec(config))
        self.estimator = estimator_spec(config)
        self.counters = Counters()
        self.num_parameters = num_trainable(self.model)
        self.model_bytes = sum(p.numel() * p.element_size() for _, p in trainable_parameters(self.model))
        self.rounds = config.rounds or math.ceil(config.epochs * rounds_per_epoch(config, self.shards))
        self.eval_every = config.eval_every or rounds_per_epoch(config, self.shards)

    def run_round(self, server_round: int) -> dict:
        """One server round of the configured method; returns round telemetry."""
        c = self.config
        clients = sample_clients(len(self.shards), c.fraction, c.seed, server_round)
        plan = R.plan_round(c.seed, server_round, self.estimator)
        step = {"baffle": self._baffle_fedsgd, "bp-fedsgd": self._bp_fedsgd}.get(c.method, self._fedavg)
        loss = step(clients, plan)
        self.counters.bytes_down += len(clients) * (self.model_bytes + 32)  # weights + round plan
        return {"clients": len(clients), "train_loss": loss}

    def _baffle_fedsgd(self, clients, plan) -> float:
        c = self.config
        engine = R.client_engine(self.model, plan)  # one per round, shared by its clients
        replies = [R.baffle_client_update(self.model, [self.shards.next_batch(cid, c.batch_size)], plan,
                                          cross_entropy, cid, engine) for cid in clients]
        R.baffle_server_update(self.server, replies, plan)
        self.counters.forward_passes += len(replies) * forward_passes(c.num_perturbations, c.scheme)
        self.counters.bytes_up += len(replies) * 8 * (self.estimator.num_directions + 2)
        return _weighted_mean([(r.loss, r.num_examples) for r in replies])

    def _bp_fedsgd(self, clients, plan) -> float:
        grads, losses = [], []
        for cid in clients:
            batch = self.shards.next_batch(cid, self.config.batch_size)
            g, loss = R.bp_gradient(self.model, batch, cross_entropy)
            grads.append((g, len(batch[1])))
            losses.append((loss, len(batch[1])))
        R.bp_fedsgd_server_update(self.server, grads)
        self._count_model_uploads(len(clients), len(clients))
        return _weighted_mean(losses)

    def _fedavg(self, clients, plan) -> float:
        c, start = self.config, {k: v.clone() for k, v in self.model.state_dict().items()}
        states, losses, steps = [], [], 0
        for cid in clients:
            self.model.load_state_dict(start)
            batches = self.shards.epoch_batches(cid, c.batch_size, c.local_epochs)
            if c.method == "baffle-fedavg":
                seen, loss = R.baffle_local_training(self.model, batches, plan, cross_entropy, c.local_lr)
            else:
                seen, loss = R.bp_local_training(self.model, batches, cross_entropy, c.local_lr)
            states.append(({k: v.clone() for k, v in self.model.state_dict().items()}, seen))
            losses.append((loss, seen))
            steps += len(batches)
        R.fedavg_server_update(self.server, states)
        if c.method == "baffle-fedavg":
            self.counters.forward_passes += steps * forward_passes(c.num_perturbations, c.scheme)
            self.counters.bytes_up += len(clients) * (self.model_bytes + 16)
        else:
            self._count_model_uploads(len(clients), steps)
        return _weighted_mean(losses)

    def _count_model_uploads(self, clients: int, steps: int) -> None:
        self.counters.forward_passes += steps
        self.counters.backward_passes += steps
        self.counters.bytes_up += clients * (self.model_bytes + 16)

    def evaluate(self) -> dict:
        model, c = self.server.eval_model(), self.config
        loss, acc = evaluate(model, self.data.test_inputs, self.data.test_targets, c.eval_batch_size)
        out = {"test_loss": loss, "test_accuracy": acc}
        if len(self.validation):
            x, y = self.data.train_inputs[self.validation], self.data.train_targets[self.validation]
            out["val_loss"], out["val_accuracy"] = evaluate(model, x, y, c.eval_batch_size)
        return out

    def state_dict(self) -> dict:
        return {"server": self.server.state_dict(), "clients": self.shards.state_dict(),
                "counters": vars(self.counters).copy()}

    def load_state_dict(self, state: dict) -> None:
        self.server.load_state_dict(state["server"])
        self.shards.load_state_dict(state["clients"])
        self.counters = Counters(**state["counters"])


def _weighted_mean(pairs) -> float:
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total


__all__ = ["ClientShards", "Simulation", "evaluate", "rounds_sampled_before", "sample_clients"]
