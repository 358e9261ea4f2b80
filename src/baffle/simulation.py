"""In-process federated runner: the fast, embedded default behind ``baffle train``.

One model instance serves every client (clients are data partitions plus a batch cursor), so a
round costs the clients' forward passes and the server step. Everything random derives from
``config.seed``: parameter init, partition, client sampling, batch order and the round seeds, which
is what makes ``resume`` bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.functional import cross_entropy

from baffle import rounds as R
from baffle.config import FEDAVG_METHODS, TrainConfig, sampled_clients
from baffle.data import ArrayDataset, augment_batch, load_dataset, partition_indices
from baffle.devices import resolve_device
from baffle.estimator import forward_passes
from baffle.models import build_model
from baffle.perturbation import derive_seed, num_trainable, trainable_parameters
from baffle.fast import ClientEngine, FastOptions, choose_memory_format, runner_options
from baffle.server import OptimizerSpec, ServerState, build_optimizer

_INIT_TAG, _SAMPLE_TAG, _ORDER_TAG, _AUGMENT_TAG = 0x1417, 0x5A3F, 0x0BD3, 0xA06E


class ClientShards:
    """Per-client training indices and a batch cursor over seeded per-epoch permutations."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, clients, seed: int, augment: str = "none"):
        if augment not in ("none", "crop-flip"):
            raise ValueError(f"unknown augment {augment!r}; use 'none' or 'crop-flip'")
        self.inputs, self.targets, self.seed, self.augment = inputs, targets, seed, augment
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
        """The client's next batch; the last batch of a local epoch may be smaller. With
        ``augment="crop-flip"`` its images are augmented (seeded by client, local epoch and position)."""
        order, start, epoch = self._order(cid), int(self.cursor[cid]), int(self.epoch[cid])
        idx = order[start : start + batch_size]
        self.cursor[cid] = start + len(idx)
        if self.cursor[cid] >= self.size(cid):
            self.epoch[cid] += 1
            self.cursor[cid] = 0
        t = torch.from_numpy(idx)
        x = self.inputs[t]
        if self.augment == "crop-flip":
            x = augment_batch(x, seed=derive_seed(self.seed, _AUGMENT_TAG, cid, epoch, start))
        return x, self.targets[t]

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


def optimizer_spec(config: TrainConfig, rounds_per_epoch: int = 1) -> OptimizerSpec:
    """The method's optimizer (the server's in FedSGD methods, each client's in epoch-level ones)."""
    c = config
    unit = rounds_per_epoch if c.schedule_unit == "epoch" else 1
    return OptimizerSpec(name=c.optimizer, lr=c.lr, momentum=c.momentum or 0.0, nesterov=bool(c.nesterov),
                         betas=c.adam_betas or (0.9, 0.999), weight_decay=c.weight_decay, unit_rounds=unit,
                         warmup=c.warmup or 0, warmup_lr=c.warmup_lr, lr_milestones=c.lr_milestones or (),
                         lr_gamma=c.lr_gamma or 0.1, clip=c.clip, clip_norm_type=c.clip_norm_type or math.inf,
                         clip_scope=c.clip_scope or "server", ema_decay=c.ema_decay, ema_ramp=bool(c.ema_ramp))


def estimator_spec(config: TrainConfig) -> R.EstimatorSpec | None:
    if config.num_perturbations is None:  # a backprop method
        return None
    return R.EstimatorSpec(config.num_perturbations, config.sigma, config.scheme, config.distribution,
                           config.direction_stream)


def protection_spec(config: TrainConfig):
    """The run's ``baffle.protection.ProtectionSpec``, or None when every protection key is off."""
    c = config
    if c.method != "baffle" or not (c.secure_aggregation or c.dp_clip is not None or c.aggregator != "mean"
                                    or c.attack is not None):
        return None
    from baffle.protection import ProtectionSpec  # loads the cryptography package: only when asked for
    from baffle.secure.dp import DPSpec

    dp = None if c.dp_clip is None else DPSpec(c.dp_clip, c.dp_noise_multiplier, c.dp_delta, c.dp_target_epsilon)
    return ProtectionSpec(secure_aggregation=bool(c.secure_aggregation), secagg_threshold=c.secagg_threshold,
                          dp=dp, aggregator=c.aggregator, attack=c.attack)


LAYOUTS = {"nchw": None, "channels_last": "channels_last"}


class Simulation:
    """Everything a run holds between rounds; ``run_round`` advances it by one server round.

    ``secagg_dropouts(server_round, client_ids) -> (dropped before masking, silent after masking)``
    injects secure-aggregation dropouts (tests, benchmarks); in-process, clients never drop out otherwise.

    ``workers`` > 1 computes the clients' replies of method "baffle" in that many processes with one
    torch thread each (``baffle.workers.ClientPool``, started at the first round, ``start_method``
    as there); the replies, and so the run, are bit-identical to one process with one thread. Call
    ``close`` (or use ``with``) to shut the workers down.
    """

    def __init__(self, config: TrainConfig, *, secagg_dropouts=None, workers: int = 1,
                 start_method: str | None = None):
        self.config = c = config
        check_workers(workers, c)
        self.workers, self.start_method, self._pool = workers, start_method, None
        data = load_dataset(c.dataset, c.data_dir, image_size=c.image_size, normalize=c.normalize)
        if c.clients > len(data.train_targets):  # refused before partitioning allocates per-client lists
            raise ValueError(f"--clients {c.clients}: more clients than the {len(data.train_targets)} training "
                             f"examples of {c.dataset}; use fewer clients")
        try:
            part = partition_indices(data.train_targets, c.clients, c.partition, seed=c.seed,
                                     val_per_class=c.val_per_class, num_classes=data.num_classes)
        except ValueError as e:
            raise ValueError(f"{_partition_culprit(str(e), c)}: {e}") from None
        self.device = resolve_device(c.device)  # model, data, directions and rebuild live there
        data = _on_device(data, self.device)
        self.data, self.validation = data, torch.from_numpy(np.asarray(part.validation, dtype=np.int64))
        self.shards = ClientShards(data.train_inputs, data.train_targets, part.clients, c.seed, c.augment)
        self.model = build_run_model(c, data).to(self.device)  # initialised on the CPU: the same weights
        self.rounds_per_epoch = rounds_per_epoch(c, self.shards)
        spec = optimizer_spec(c, self.rounds_per_epoch)
        self.server = ServerState(self.model, spec)
        self.local_optimizers = None  # epoch-level methods: each client's own, kept across rounds
        if c.method in FEDAVG_METHODS:
            self.local_optimizers = [build_optimizer(self.server.params, spec) for _ in range(len(self.shards))]
        self.estimator = estimator_spec(c)
        self.counters = Counters()
        self.num_parameters = num_trainable(self.model)
        self.model_bytes = sum(p.numel() * p.element_size() for _, p in trainable_parameters(self.model))
        self.rounds = c.rounds or math.ceil(c.epochs * self.rounds_per_epoch)
        self.eval_every = c.eval_every or self.rounds_per_epoch
        self.layout = None if c.memory_format == "auto" else c.memory_format  # "auto": probed in round 1
        self._init_protection(secagg_dropouts)

    def _init_protection(self, secagg_dropouts) -> None:
        c = self.config
        self.protection, self.malicious, self.ledger = protection_spec(c), (), None
        self.secagg_dropouts = secagg_dropouts
        if self.protection is None:
            return
        from baffle.protection import PrivacyLedger, malicious_clients

        self.malicious = malicious_clients(self.protection, len(self.shards), c.seed)
        attack = self.protection.attack_spec
        self.label_flip = attack is not None and attack.is_data_attack
        if self.protection.dp is not None:
            self.ledger = PrivacyLedger(self.protection.dp, sampled_clients(c) / c.clients)

    def run_round(self, server_round: int) -> dict:
        """One server round of the configured method; returns round telemetry."""
        c = self.config
        clients = sample_clients(len(self.shards), c.fraction, c.seed, server_round)
        plan = None if self.estimator is None else R.plan_round(c.seed, server_round, self.estimator, c.perturbations)
        step = {"baffle": self._baffle_fedsgd, "bp-fedsgd": self._bp_fedsgd}.get(c.method, self._fedavg)
        self._ema_now = self.ema_due(server_round)
        self._protection_info = {}
        loss = step(clients, plan)
        self.counters.bytes_down += len(clients) * (self.model_bytes + 32)  # weights + round plan
        return {"clients": len(clients), "train_loss": loss, **self._protection_info}

    def ema_due(self, server_round: int) -> bool:
        """Whether the EMA is updated after ``server_round`` (every round, or at the end of each epoch)."""
        return self.config.ema_every != "epoch" or (server_round + 1) % self.rounds_per_epoch == 0

    def _client_options(self, batch: R.Batch) -> FastOptions:
        if self.layout is None:  # measured once per run, then recorded in the checkpoint
            probed = choose_memory_format(self.model, batch, cross_entropy) if self.device.type == "cpu" else None
            self.layout = "channels_last" if probed == "channels_last" else "nchw"  # a GPU batches in NCHW
        return runner_options(self.device, LAYOUTS[self.layout])

    def _baffle_fedsgd(self, clients, plan) -> float:
        c = self.config
        batches = {cid: self.client_batch(cid) for cid in clients}
        options = self._client_options(batches[clients[0]])
        if self.workers > 1:
            replies = self._client_pool().baffle_replies(self.model, [(cid, batches[cid]) for cid in clients],
                                                         plan, cross_entropy, options)
        else:
            engine = ClientEngine(options)  # shared by the round's clients
            replies = [R.baffle_client_update(self.model, [batches[cid]], plan, cross_entropy, cid, engine)
                       for cid in clients]
        combined = self._combine(replies, plan)
        R.baffle_server_update(self.server, replies, plan, weighting=c.client_weights, update_ema=self._ema_now,
                               combined=combined)
        self.counters.forward_passes += len(replies) * forward_passes(c.num_perturbations, c.scheme)
        if not (self.protection and self.protection.secure_aggregation):  # else counted by _combine
            self.counters.bytes_up += len(replies) * 8 * (self.estimator.num_directions + 2)
        return _weighted_mean([(r.loss, r.num_examples) for r in replies])

    def _client_pool(self):
        if self._pool is None:
            from baffle.workers import ClientPool

            self._pool = ClientPool(self.model, self.workers, start_method=self.start_method)
        return self._pool

    def close(self) -> None:
        """Shut the worker processes down, if any were started (idempotent)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __enter__(self) -> "Simulation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def client_batch(self, cid: int) -> R.Batch:
        """Client ``cid``'s next training batch (labels flipped for a malicious client under label-flip)."""
        batch = self.shards.next_batch(cid, self.config.batch_size)
        if self.protection is not None and self.label_flip:
            from baffle.protection import flip_malicious_labels

            batch = flip_malicious_labels(batch, cid, self.malicious, self.data.num_classes)
        return batch

    def _combine(self, replies, plan):
        """The round's K-vector under the protection options (None: the plain weighted sum)."""
        spec = self.protection
        if spec is None or not spec.replaces_sum:
            return None
        from baffle.protection import combine_loss_diffs, num_payload_entries, secure_round_bytes
        from baffle.secure import SecAggError

        ids = [r.client_id for r in replies]
        before, after = (self.secagg_dropouts(plan.server_round, ids)
                         if self.secagg_dropouts and spec.secure_aggregation else ((), ()))
        done = plan.server_round + 1  # the round's number in rounds.jsonl and in error messages
        self._check_budget_left(done)
        try:
            combined, info = combine_loss_diffs(replies, self.estimator.num_directions, spec,
                                                weighting=self.config.client_weights, server_round=done,
                                                seed=self.config.seed, malicious=self.malicious,
                                                drop_before_masking=before, drop_after_masking=after)
        except (SecAggError, ValueError) as e:
            text = str(e) if str(e).startswith(f"round {done}:") else f"round {done}: {e}"
            raise R.RoundFailed(text) from None
        if spec.secure_aggregation:
            wire = secure_round_bytes(len(ids), num_payload_entries(self.estimator.num_directions, spec),
                                      len(before), len(after))
            self.counters.bytes_up += wire["bytes_up"]
            self.counters.bytes_down += wire["bytes_down"]
        if self.ledger is not None:
            self.ledger.record(info.get("dp_noise_multiplier_effective", spec.dp.noise_multiplier))
        self._protection_info = info
        return combined

    def _check_budget_left(self, done: int) -> None:
        """With --dp-target-epsilon the planned rounds were checked at start at the configured noise; only
        a round that carried less (secure-sum dropouts) can make a later one exceed the target."""
        target = self.config.dp_target_epsilon
        if self.ledger is None or target is None or self.ledger.nominal:
            return
        eps = self.ledger.epsilon(1)
        if eps > target:
            raise R.RoundFailed(f"round {done}: it would bring ε to {eps:.4g} > --dp-target-epsilon {target:g} "
                                "(earlier rounds lost clients before masking and carried less noise); the run "
                                f"ends after round {done - 1}")

    def privacy_metrics(self) -> dict:
        """{"epsilon": ε spent so far} with DP on (for every metrics line and the summary), else {}."""
        return {} if self.ledger is None else {"epsilon": self.ledger.epsilon()}

    def _bp_fedsgd(self, clients, plan) -> float:
        grads, losses = [], []
        for cid in clients:
            batch = self.shards.next_batch(cid, self.config.batch_size)
            g, loss = R.bp_gradient(self.model, batch, cross_entropy)
            grads.append((g, len(batch[1])))
            losses.append((loss, len(batch[1])))
        R.bp_fedsgd_server_update(self.server, grads, weighting=self.config.client_weights,
                                  update_ema=self._ema_now)
        self._count_model_uploads(len(clients), len(clients))
        return _weighted_mean(losses)

    def _fedavg(self, clients, plan) -> float:
        c, start = self.config, {k: v.clone() for k, v in self.model.state_dict().items()}
        states, losses, steps = [], [], 0
        for cid in clients:
            self.model.load_state_dict(start)  # in place: the client optimizers keep their parameters
            batches = self.shards.epoch_batches(cid, c.batch_size, c.local_epochs)
            opt = self.local_optimizers[cid]
            if c.method == "baffle-fedavg":
                spec = self.server.spec  # the one parsed copy of the clip settings
                seen, loss = R.baffle_local_training(self.model, batches, plan, cross_entropy, opt, client_id=cid,
                                                     clip=spec.clip, clip_norm_type=spec.clip_norm_type)
            else:
                seen, loss = R.bp_local_training(self.model, batches, cross_entropy, opt)
            states.append(({k: v.clone() for k, v in self.model.state_dict().items()}, seen))
            losses.append((loss, seen))
            steps += len(batches)
        R.fedavg_server_update(self.server, states, c.client_weights)
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
        if model is not self.model:  # EMA on: also the raw weights (the EMA may lag by an epoch)
            out["raw_test_loss"], out["raw_test_accuracy"] = evaluate(self.model, self.data.test_inputs,
                                                                      self.data.test_targets, c.eval_batch_size)
        if len(self.validation):
            x, y = self.data.train_inputs[self.validation], self.data.train_targets[self.validation]
            out["val_loss"], out["val_accuracy"] = evaluate(model, x, y, c.eval_batch_size)
        return out

    def state_dict(self) -> dict:
        local = None if self.local_optimizers is None else [o.state_dict() for o in self.local_optimizers]
        state = {"server": self.server.state_dict(), "clients": self.shards.state_dict(),
                 "counters": vars(self.counters).copy(), "local_optimizers": local, "layout": self.layout}
        if self.ledger is not None:
            state["privacy"] = self.ledger.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.server.load_state_dict(state["server"])
        self.shards.load_state_dict(state["clients"])
        self.counters = Counters(**state["counters"])
        for opt, saved in zip(self.local_optimizers or [], state.get("local_optimizers") or []):
            opt.load_state_dict(saved)
        self.layout = state.get("layout", self.layout)
        if self.ledger is not None:
            self.ledger.load_state_dict(state["privacy"])


def check_workers(workers, config: TrainConfig) -> None:
    """ValueError (one line) unless ``workers`` applies: an integer >= 1; > 1 only for method "baffle" on
    the CPU (the other methods and a GPU run in one process)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be an integer >= 1 or 'auto', got {workers!r}")
    if workers == 1:
        return
    if config.method != "baffle":
        raise ValueError(f"--workers {workers}: parallel workers cover method baffle (FedSGD) only, not "
                         f"--method {config.method}; use --workers 1")
    if config.device != "cpu" and resolve_device(config.device).type != "cpu":
        raise ValueError(f"--workers {workers}: workers are CPU processes, and --device {config.device} "
                         "computes on the GPU; use --workers 1 or --device cpu")


def _partition_culprit(message: str, c: TrainConfig) -> str:
    """The flag(s) a partition error is about (its message names the partitioner's parameter)."""
    if message.startswith("val_per_class"):
        return f"--val-per-class {c.val_per_class}"
    if message.startswith(("shards", "bad partition")):
        return f"--partition {c.partition} with --clients {c.clients}"
    if c.val_per_class and "val_per_class" in message:
        return f"--clients {c.clients} / --val-per-class {c.val_per_class}"
    return f"--clients {c.clients}"


def _on_device(data: ArrayDataset, device: torch.device) -> ArrayDataset:
    if device.type == "cpu":
        return data
    return dataclasses.replace(data, **{f"{split}_{part}": getattr(data, f"{split}_{part}").to(device)
                                        for split in ("train", "test") for part in ("inputs", "targets")})


def _weighted_mean(pairs) -> float:
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total


__all__ = ["ClientShards", "Simulation", "check_workers", "evaluate", "protection_spec", "rounds_sampled_before", "sample_clients"]
