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
from baffle.secure.dp import (DPSpec, clip_l2, effective_noise_multiplier, epsilon_of_rounds, gaussian_noise,
                              privatize_client)
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

    @property
    def replaces_sum(self) -> bool:
        """Whether ``combine_loss_diffs`` forms the round's vector (secure aggregation, DP, a robust
        aggregator or an attack on the vectors); a label-flip attack alone changes only the data."""
        attack = self.attack_spec
        return (self.secure_aggregation or self.dp is not None or self.aggregator != "mean"
                or (attack is not None and not attack.is_data_attack))


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


class PrivacyLedger:
    """The rounds a DP run has spent, run-length encoded as [q, z, count] (z: the effective multiplier,
    lower than the configured one in a round whose secure sum lost clients before masking), and ε."""

    def __init__(self, spec: DPSpec, sampling_rate: float):
        self.spec, self.sampling_rate, self.runs = spec, float(sampling_rate), []

    def record(self, noise_multiplier: float) -> None:
        q, z = self.sampling_rate, float(noise_multiplier)
        if self.runs and self.runs[-1][:2] == [q, z]:
            self.runs[-1][2] += 1
        else:
            self.runs.append([q, z, 1])

    @property
    def rounds(self) -> int:
        return sum(n for _, _, n in self.runs)

    @property
    def nominal(self) -> bool:
        """Every round so far carried the configured noise."""
        return all(z == self.spec.noise_multiplier for _, z, _ in self.runs)

    def epsilon(self, more_rounds: int = 0) -> float:
        """ε after the recorded rounds and ``more_rounds`` planned ones at the configured noise."""
        spent = [(q, z) for q, z, n in self.runs for _ in range(n)]
        planned = [(self.sampling_rate, self.spec.noise_multiplier)] * more_rounds
        return epsilon_of_rounds(spent + planned, self.spec.delta, self.spec.accountant)

    def rounds_within(self, target: float, upper: int) -> int:
        """The most planned rounds (≤ ``upper``) after the recorded ones that keep ε ≤ ``target``
        (bisection: ε grows with every round)."""
        lo, hi = 0, upper
        if self.epsilon() > target:
            return -1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.epsilon(mid) <= target else (lo, mid - 1)
        return lo

    def state_dict(self) -> dict:
        return {"sampling_rate": self.sampling_rate, "runs": [list(r) for r in self.runs]}

    def load_state_dict(self, state: dict) -> None:
        if float(state["sampling_rate"]) != self.sampling_rate:
            raise ValueError(f"the privacy ledger was kept at sampling rate {state['sampling_rate']}, this run "
                             f"samples at {self.sampling_rate}")
        self.runs = [[float(q), float(z), int(n)] for q, z, n in state["runs"]]


# Raw sizes of the secure-aggregation messages, every integer field as 8 bytes (``baffle.secure.messages``).
_ID, _KEY, _SHARE, _TAG = 8, 32, 66, 16
_SEALED = 2 * _ID + (2 * _ID + 2 * _SHARE + _TAG)  # EncryptedShares: sender, receiver, AE(ids ‖ 2 shares)
_CONFIG = 8 * _ID + 8  # SecAggConfig: eight integers and an 8-byte session


def secure_round_bytes(num_clients: int, vector_length: int, dropped_before_masking: int = 0,
                       silent_after_masking: int = 0) -> dict:
    """Bytes (all clients together) and messages per client of one secure-aggregation round on the
    complete graph, from the protocol's fields: m clients advertise and share keys, m − d mask,
    m − d − s answer the unmask request (d dropped before masking, s after)."""
    m, d, s, n = num_clients, dropped_before_masking, silent_after_masking, vector_length
    masked, answering = m - d, m - d - s
    up = (m * (_ID + 2 * _KEY)  # KeysAdvert
          + m * (_ID + _KEY + (m - 1) * _SEALED)  # SharesOut: commitment and one sealed pair per neighbour
          + masked * (_ID + 8 * n)  # MaskedInput
          + answering * (_ID + m * (_ID + _SHARE)))  # UnmaskResponse: one share per client that shared keys
    down = (m * _CONFIG
            + m * (_ID + m * _ID + (m - 1) * (_ID + 2 * _KEY))  # KeysBroadcast
            + m * (2 * _ID + (m - 1) * _SEALED)  # SharesIn
            + masked * (_ID + masked * _ID + d * _ID))  # UnmaskRequest: survivors and dropped ids
    return {"bytes_up": up, "bytes_down": down, "messages_up": 4, "messages_down": 4}


def _generator(*words: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*words))


__all__ = ["PrivacyLedger", "ProtectionSpec", "combine_loss_diffs", "malicious_clients", "flip_malicious_labels",
           "num_payload_entries", "quantization_bound", "secure_round_bytes"]
