"""Protecting what clients send: secure aggregation, client-level DP and robust aggregation of ΔL.

Pure layer: no model, no I/O, no transport. The in-process simulator and a Flower strategy call the
same stage functions; only how the messages travel differs (``messages.to_bytes`` / ``from_bytes``).

  fixedpoint     float64 ↔ Z_{2^b} encoding; weighted payloads (w·ΔL, w) that hide client weights
  shamir         t-of-n Shamir sharing over GF(2^521 − 1)
  crypto         X25519, HKDF, ChaCha20 PRG, ChaCha20-Poly1305 (the ``cryptography`` package)
  graph          complete or SecAgg+ Harary neighbour graph from public values
  messages       config, messages and states (frozen dataclasses) and their codec
  secagg_client  client_advertise → client_share_keys → client_mask → client_unmask
  secagg_server  server_collect_keys → server_route_shares → server_collect_masked → server_unmask
  inprocess      secure_sum: the four stages in one process (with dropout injection)
  dp             L2 clipping, central / distributed Gaussian noise, dp-accounting ε
  robust         mean, median, trimmed-mean:F, krum:F, norm-bound:B over per-client vectors
  attacks        sign flip, scaling, Gaussian noise, label flip for the robustness harness

Threat model of the secure aggregation here: an honest-but-curious server and clients (the
semi-honest protocol of Bonawitz et al. 2017; no consistency-check round with signatures, so a server
that lies about who dropped is not defended against), authenticated client–server channels (TLS).
Against such a server colluding with fewer than t clients, only Σ_{survivors} x_u is revealed.
"""
from baffle.secure.crypto import SecAggError
from baffle.secure.fixedpoint import FixedPoint, split_weighted_sum, weighted_mean, weighted_payload
from baffle.secure.inprocess import secure_sum
from baffle.secure.messages import (ClientState, KeysAdvert, KeysBroadcast, MaskedInput, SecAggConfig, ServerState,
                                    SharesIn, SharesOut, UnmaskRequest, UnmaskResponse, from_bytes, to_bytes)
from baffle.secure.secagg_client import client_advertise, client_mask, client_share_keys, client_unmask
from baffle.secure.secagg_server import (SecAggResult, server_collect_keys, server_collect_masked,
                                         server_route_shares, server_unmask)

__all__ = [
    "SecAggError", "FixedPoint", "split_weighted_sum", "weighted_mean", "weighted_payload", "secure_sum",
    "ClientState", "KeysAdvert", "KeysBroadcast", "MaskedInput", "SecAggConfig", "ServerState", "SharesIn",
    "SharesOut", "UnmaskRequest", "UnmaskResponse", "from_bytes", "to_bytes", "client_advertise", "client_mask",
    "client_share_keys", "client_unmask", "SecAggResult", "server_collect_keys", "server_collect_masked",
    "server_route_shares", "server_unmask",
]
