"""What the server may learn of the clients' K-vectors: one combination step that every runner calls.

    combine_loss_diffs(replies, plan, spec, ...)  → ΔL = the round's aggregate K-vector

  plain                ΔL = Σ_c w_c ΔL_c                               (``aggregate_loss_diffs``)
  robust aggregator    ΔL = A({ΔL_c})  (median, trimmed mean, Krum, norm bound; weighted mean)
  differential privacy ΔL = (Σ_c clip_C(ΔL_c) + N(0, (zC)² I)) / m      (unweighted; m clients)
  secure aggregation   the server learns only Σ_c x_c for the survivors: x_c = (n_c ΔL_c, n_c) hides the
                       weights (ΔL = Σ n_c ΔL_c / Σ n_c), or, with DP, x_c = clip_C(ΔL_c) + N(0, (zC)²/m I)
                       (each client adds its share of the noise before masking)

Attacks for the robustness harness replace the vectors of a fixed set of F malicious clients (or, for
label flipping, their labels; see ``flip_malicious_labels``). The randomness of attacks and noise is
derived from the run seed, so a simulated run is reproducible; a real deployment draws the noise from
``os.urandom`` on the client. The secure sum is exact in Z_{2^64}, so its result does not depend on
the masks' randomness.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from baffle.perturbation import derive_seed
from baffle.secure import SecAggConfig, secure_sum, weighted_mean, weighted_payload
from baffle.secure.attacks import AttackSpec, apply_attack, choose_malicious, flip_labels, parse_attack
from baffle.secure.dp import DPSpec, clip_l2, effective_noise_multiplier, gaussian_noise, privatize_client
from baffle.secure.robust import aggregate_vectors, parse_aggregator
from baffle.server import ClientReply, aggregate_loss_diffs, check_reply, client_weights

_ATTACK_TAG, _NOISE_TAG, _DP_TAG = 0xA77AC, 0x0150, 0xD1FF


@dataclass(frozen=True)
class ProtectionSpec:
    """How the round's K-vectors are combined (all off by default: the plain weighted sum)."""

    secure_aggregation: bool = False
    secagg_threshold: int | None = None  # None: a majority of the round's clients, C // 2 + 1
    secagg_frac_bits: int = 32
    dp: DPSpec | None = None
    aggregator: str = "mean"
    attack: str | None = None

    def __post_init__(self):
        parse_aggregator(self.aggregator)
        if self.attack is not None:
            parse_attack(self.attack)
        if self.secure_aggregation and self.aggregator != "mean":
            raise ValueError("--aggregator: a robust aggregator needs every client's vector, which secure "
                             "aggregation hides; use --aggregator mean or drop --secure-aggregation")
        if self.dp is not None and self.aggregator != "mean":
            raise ValueError("--aggregator: differential privacy is calibrated for the sum of clipped vectors; "
                             "use --aggregator mean with --dp-clip")

    @property
    def plain(self) -> bool:
        return not self.secure_aggregation and self.dp is None and self.aggregator == "mean" and not self.attack

    @property
    def attack_spec(self) -> AttackSpec | None:
        return None if self.attack is None else parse_attack(self.attack)


def malicious_clients(spec: ProtectionSpec, num_clients: int, seed: int) -> tuple[int, ...]:
    """The F malicious client ids of a run: fixed for the whole run, drawn from the run seed."""
    attack = spec.attack_spec
    if attack is None or attack.num_malicious == 0:
        return ()
    if attack.num_malicious >= num_clients:
        raise ValueError(f"--attack {spec.attack}: F = {attack.num_malicious} malicious clients of "
                         f"{num_clients}; use F < --clients")
    return choose_malicious(range(num_clients), attack.num_malicious, _generator(seed, _ATTACK_TAG))


def flip_malicious_labels(batch, client_id: int, malicious: Collection[int], num_classes: int):
    """The label-flip attack: a malicious client trains on y → (num_classes − 1 − y)."""
    x, y = batch
    return (x, flip_labels(y, num_classes)) if client_id in malicious else batch


def combine_loss_diffs(replies: Sequence[ClientReply], num_directions: int, spec: ProtectionSpec, *,
                       weighting: str, server_round: int, seed: int, malicious: Collection[int] = (),
                       drop_before_masking: Collection[int] = (),
                       drop_after_masking: Collection[int] = ()) -> tuple[torch.Tensor, dict]:
    """The round's aggregate ΔL under ``spec`` and telemetry (clipped fraction, secure-sum survivors).

    Secure aggregation only (dropout injection): ``drop_before_masking`` clients shared their keys, then
    vanished (their pairwise masks are rebuilt from the others' shares; their vectors are not in the
    sum); ``drop_after_masking`` clients sent their masked vector and then stopped answering (their self
    masks are rebuilt from the others' shares; their vectors are in the sum)."""
    if not replies:
        raise ValueError("no client replies to aggregate")
    vectors = {r.client_id: check_reply(r, num_directions) for r in replies}
    if spec.attack_spec is not None and not spec.attack_spec.is_data_attack and malicious:
        vectors = apply_attack(spec.attack_spec, vectors, malicious, _generator(seed, _NOISE_TAG, server_round))
    info: dict = {}
    if spec.dp is not None:
        norms = [float(torch.linalg.vector_norm(v)) for v in vectors.values()]
        info["dp_clipped_fraction"] = sum(n > spec.dp.clip for n in norms) / len(norms)
    if spec.secure_aggregation:
        drops = (tuple(drop_before_masking), tuple(drop_after_masking))
        return _secure(replies, vectors, spec, weighting, server_round, seed, drops, info)
    if drop_before_masking or drop_after_masking:
        raise ValueError("dropouts after masking only exist with secure aggregation")
    if spec.dp is not None:
        total = sum(clip_l2(v, spec.dp.clip)[0] for v in vectors.values())
        std = spec.dp.noise_multiplier * spec.dp.clip
        noisy = total + gaussian_noise(num_directions, std, _generator(seed, _DP_TAG, server_round))
        return noisy / len(vectors), info
    if spec.aggregator == "mean" and not malicious:
        return aggregate_loss_diffs(replies, num_directions, weighting), info
    weights = client_weights([r.num_examples for r in replies], weighting)
    return aggregate_vectors(spec.aggregator, list(vectors.values()), weights), info


def _secure(replies, vectors, spec, weighting, server_round, seed, dropped, info):
    ids = [int(r.client_id) for r in replies]
    if spec.dp is not None:  # each client clips and adds its share of the noise before masking
        payloads = {u: privatize_client(vectors[u], spec.dp, len(ids), _generator(seed, _DP_TAG, server_round, u))
                    for u in ids}
    else:
        raw = {r.client_id: (r.num_examples if weighting == "examples" else 1) for r in replies}
        payloads = {u: weighted_payload(vectors[u], raw[u]) for u in ids}
    length = num_payload_entries(len(next(iter(vectors.values()))), spec)
    threshold = spec.secagg_threshold or len(ids) // 2 + 1
    config = SecAggConfig(server_round=server_round, vector_length=length, threshold=threshold,
                          max_clients=max(len(ids), 2), frac_bits=spec.secagg_frac_bits,
                          session=seed.to_bytes(8, "little"))
    result = secure_sum(config, payloads, drop_before_masking=dropped[0], drop_before_unmasking=dropped[1])
    info["secagg_survivors"] = len(result.survivors)
    if spec.dp is not None:
        info["dp_noise_multiplier_effective"] = effective_noise_multiplier(
            spec.dp.noise_multiplier, len(ids), len(result.survivors))
        return result.values / len(result.survivors), info
    return weighted_mean(result.values), info


def num_payload_entries(num_directions: int, spec: ProtectionSpec) -> int:
    """Entries a client masks: K, plus its weight unless DP makes the sum unweighted."""
    return num_directions if spec.dp is not None else num_directions + 1


def quantization_bound(num_clients: int, spec: ProtectionSpec) -> float:
    """|decoded secure sum − float sum| ≤ C · 2^-s / 2 per coordinate (before the division by Σ w)."""
    return num_clients * 2.0 ** -spec.secagg_frac_bits / 2


def _generator(*words: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*words))


__all__ = ["ProtectionSpec", "combine_loss_diffs", "malicious_clients", "flip_malicious_labels",
           "num_payload_entries", "quantization_bound"]
