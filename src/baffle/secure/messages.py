"""The configuration, messages and states of one secure-aggregation round, as plain frozen dataclasses
of ints, bytes and tuples, with a JSON codec (``to_bytes`` / ``from_bytes``) that any transport can carry.

Message flow of one round (server S, client u; the stages of Bonawitz et al. 2017, §4):

  0  S → u  SecAggConfig                      (with the round plan)
     u → S  KeysAdvert        (c_pk, s_pk)    ``client_advertise``
  1  S → u  KeysBroadcast     (neighbours' keys)                     ``server_collect_keys``
     u → S  SharesOut         (AE-sealed Shamir shares of s_sk, b_u) ``client_share_keys``
  2  S → u  SharesIn          (the shares addressed to u)            ``server_route_shares``
     u → S  MaskedInput       (y_u = x_u + PRG(b_u) ± Σ PRG(s_uv))   ``client_mask``
  3  S → u  UnmaskRequest     (survivors, dropped)                   ``server_collect_masked``
     u → S  UnmaskResponse    (b-shares of survivors, s_sk-shares of the dropped)  ``client_unmask``
     S      SecAggResult      Σ_{u ∈ survivors} x_u                  ``server_unmask``
"""
from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass, field

from baffle.secure.crypto import context
from baffle.secure.fixedpoint import FixedPoint
from baffle.secure.graph import check_degree


@dataclass(frozen=True)
class SecAggConfig:
    """Public parameters of one round. ``vector_length`` counts the weight coordinate if any
    (K + 1 with ``weighted_payload``); ``threshold`` t of each client's share holders must answer."""

    server_round: int
    vector_length: int
    threshold: int
    max_clients: int
    frac_bits: int = 32
    bits: int = 64
    degree: int | None = None  # SecAgg+ neighbours per client (even); None: the complete graph
    graph_seed: int = 0
    session: bytes = b""  # e.g. a run id: keys of different runs never coincide

    def __post_init__(self):
        for name in ("server_round", "vector_length", "threshold", "graph_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"secure aggregation: {name} must be a non-negative integer, got {value!r}")
        if self.vector_length < 1:
            raise ValueError("secure aggregation: vector_length must be >= 1")
        if self.threshold < 2:
            raise ValueError(f"secure aggregation: threshold must be >= 2 (with t = 1 a single share reveals a "
                             f"client's keys), got {self.threshold}")
        if not isinstance(self.session, bytes):
            raise ValueError("secure aggregation: session must be bytes")
        check_degree(self.degree)
        self.fixed_point  # validates bits / frac_bits / max_clients

    @property
    def fixed_point(self) -> FixedPoint:
        return FixedPoint(frac_bits=self.frac_bits, bits=self.bits, max_clients=self.max_clients)

    @property
    def ctx(self) -> bytes:
        return context(self.session, self.server_round)


@dataclass(frozen=True)
class KeysAdvert:
    client_id: int
    cipher_public: bytes  # c_pk: key agreement for the share channel
    mask_public: bytes  # s_pk: key agreement for the pairwise masks


@dataclass(frozen=True)
class KeysBroadcast:
    server_round: int
    participants: tuple[int, ...]  # U1: every client that advertised keys
    adverts: tuple[KeysAdvert, ...]  # the receiving client's neighbours' keys


@dataclass(frozen=True)
class EncryptedShares:
    sender: int
    receiver: int
    ciphertext: bytes  # AE(sender ‖ receiver ‖ share of s_sk ‖ share of b_sender)


@dataclass(frozen=True)
class SharesOut:
    client_id: int
    commitment: bytes  # SHA-256 commitment to b_u (checked when the server reconstructs it)
    shares: tuple[EncryptedShares, ...]


@dataclass(frozen=True)
class SharesIn:
    server_round: int
    receiver: int
    shares: tuple[EncryptedShares, ...]  # from the receiver's neighbours in U2


@dataclass(frozen=True)
class MaskedInput:
    client_id: int
    masked: bytes  # y_u as little-endian uint64 words


@dataclass(frozen=True)
class UnmaskRequest:
    server_round: int
    survivors: tuple[int, ...]  # U3: masked inputs received
    dropped: tuple[int, ...]  # U2 \ U3: shared keys, then dropped


@dataclass(frozen=True)
class RevealedShare:
    owner: int
    value: bytes  # the holder's Shamir share (SHARE_BYTES)


@dataclass(frozen=True)
class UnmaskResponse:
    client_id: int
    seed_shares: tuple[RevealedShare, ...]  # shares of b_v for survivors v
    key_shares: tuple[RevealedShare, ...]  # shares of s_sk_v for dropped v


@dataclass(frozen=True)
class HeldShares:
    owner: int
    key_share: bytes
    seed_share: bytes


@dataclass(frozen=True)
class ClientState:
    """What a client keeps between stages (secrets included: it never leaves the client)."""

    config: SecAggConfig
    client_id: int
    stage: str
    cipher_secret: bytes
    mask_secret: bytes
    neighbours: tuple[KeysAdvert, ...] = ()
    self_seed: bytes = b""
    held: tuple[HeldShares, ...] = ()  # shares this client holds, its own included
    partners: tuple[int, ...] = ()  # neighbours in U2: the pairwise masks it added


@dataclass(frozen=True)
class ServerState:
    config: SecAggConfig
    stage: str
    adverts: dict[int, KeysAdvert] = field(default_factory=dict)
    graph: dict[int, tuple[int, ...]] = field(default_factory=dict)
    senders: tuple[int, ...] = ()  # U2
    commitments: dict[int, bytes] = field(default_factory=dict)
    masked_sum: bytes = b""
    survivors: tuple[int, ...] = ()  # U3
    dropped: tuple[int, ...] = ()


_TYPES = {cls.__name__: cls for cls in (
    SecAggConfig, KeysAdvert, KeysBroadcast, EncryptedShares, SharesOut, SharesIn, MaskedInput, UnmaskRequest,
    RevealedShare, UnmaskResponse, HeldShares, ClientState, ServerState)}


def _pack(value):
    if dataclasses.is_dataclass(value):
        return {"@": type(value).__name__,
                **{f.name: _pack(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, bytes):
        return {"b": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {"d": [[_pack(k), _pack(v)] for k, v in value.items()]}
    if isinstance(value, (tuple, list)):
        return [_pack(v) for v in value]
    if value is None or isinstance(value, (int, str)):
        return value
    raise TypeError(f"cannot serialise {type(value).__name__} in a secure-aggregation message")


def _unpack(value):
    if isinstance(value, list):
        return tuple(_unpack(v) for v in value)
    if not isinstance(value, dict):
        return value
    if "b" in value:
        return base64.b64decode(value["b"], validate=True)
    if "d" in value:
        return {_unpack(k): _unpack(v) for k, v in value["d"]}
    cls = _TYPES.get(value.get("@"))
    if cls is None:
        raise ValueError(f"unknown secure-aggregation message type {value.get('@')!r}")
    return cls(**{k: _unpack(v) for k, v in value.items() if k != "@"})


def to_bytes(message) -> bytes:
    """Serialise a message or state (compact JSON; bytes as base64)."""
    return json.dumps(_pack(message), separators=(",", ":")).encode()


def from_bytes(data: bytes):
    """The message or state ``to_bytes`` wrote (ValueError for unknown types)."""
    return _unpack(json.loads(data))
