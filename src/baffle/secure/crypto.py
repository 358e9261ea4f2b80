"""The cryptographic primitives of secure aggregation, all from the ``cryptography`` package.

    KA    X25519 key agreement: s = X25519(sk_u, pk_v) = X25519(sk_v, pk_u)
    KDF   HKDF-SHA256(s, info = context ‖ purpose ‖ ids) → 32-byte keys, one per purpose and pair
    PRG   ChaCha20(key, nonce 0) keystream read as little-endian uint64 words (mod 2^b)
    AE    ChaCha20-Poly1305, used to send Shamir shares between clients through the server

Every derived key binds the session, the server round and the client ids, so no key, keystream or
nonce is ever reused across rounds, pairs or purposes (hence the fixed all-zero nonces).
"""
from __future__ import annotations

import hashlib
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
_PREFIX = b"baffle-secagg/v1"


class SecAggError(RuntimeError):
    """A secure-aggregation round cannot complete (too many dropouts, a tampered or inconsistent
    message); the message says which clients and which stage."""


def context(session: bytes, server_round: int) -> bytes:
    """The bytes every derivation of one round starts with: prefix ‖ len(session) ‖ session ‖ round."""
    return _PREFIX + struct.pack(">I", len(session)) + session + struct.pack(">Q", server_round)


def private_key(secret: bytes) -> X25519PrivateKey:
    """An X25519 private key from 32 random bytes (so the caller controls the randomness)."""
    if len(secret) != KEY_BYTES:
        raise ValueError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(secret)}")
    return X25519PrivateKey.from_private_bytes(secret)


def public_bytes(secret: bytes) -> bytes:
    """pk = X25519(sk, 9), raw 32 bytes."""
    return private_key(secret).public_key().public_bytes_raw()


def agree(secret: bytes, peer_public: bytes) -> bytes:
    """KA.agree: the 32-byte X25519 shared secret (ValueError for a low-order peer key)."""
    return private_key(secret).exchange(X25519PublicKey.from_public_bytes(peer_public))


def derive_key(shared: bytes, ctx: bytes, purpose: bytes, *ids: int) -> bytes:
    """HKDF-SHA256(shared, salt = none, info = ctx ‖ purpose ‖ ids as 8-byte words) → 32 bytes."""
    info = ctx + b"|" + purpose + b"|" + b"".join(struct.pack(">Q", i) for i in ids)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def prg_words(key: bytes, length: int) -> np.ndarray:
    """PRG(key): the first ``length`` 64-bit words of the ChaCha20 keystream under ``key``."""
    encryptor = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    stream = encryptor.update(b"\0" * (8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def pairwise_key(secret: bytes, peer_public: bytes, ctx: bytes, a: int, b: int) -> bytes:
    """s_{a,b} = KDF(KA(sk_a, pk_b)) for the pairwise mask; symmetric in (a, b)."""
    lo, hi = min(a, b), max(a, b)
    return derive_key(agree(secret, peer_public), ctx, b"pairwise-mask", lo, hi)


def self_mask_key(seed: bytes, ctx: bytes, owner: int) -> bytes:
    """The ChaCha20 key of client ``owner``'s self mask PRG(b_u)."""
    return derive_key(seed, ctx, b"self-mask", owner)


def commitment(seed: bytes, ctx: bytes, owner: int) -> bytes:
    """SHA-256(ctx ‖ owner ‖ b_u): lets the server check a reconstructed self-mask seed; b_u has 256
    random bits, so the hash reveals nothing usable about it."""
    return hashlib.sha256(ctx + b"|commit|" + struct.pack(">Q", owner) + seed).digest()


def _channel_key(secret: bytes, peer_public: bytes, ctx: bytes, sender: int, receiver: int) -> bytes:
    # one key per direction: the same (key, zero nonce) never encrypts two messages
    return derive_key(agree(secret, peer_public), ctx, b"share-channel", sender, receiver)


def _aad(ctx: bytes, sender: int, receiver: int) -> bytes:
    return ctx + struct.pack(">QQ", sender, receiver)


def seal(secret: bytes, peer_public: bytes, ctx: bytes, sender: int, receiver: int, plaintext: bytes) -> bytes:
    """AE.enc: ChaCha20-Poly1305 under the sender→receiver key, the header (round, ids) authenticated."""
    key = _channel_key(secret, peer_public, ctx, sender, receiver)
    return ChaCha20Poly1305(key).encrypt(b"\0" * 12, plaintext, _aad(ctx, sender, receiver))


def open_sealed(secret: bytes, peer_public: bytes, ctx: bytes, sender: int, receiver: int, ciphertext: bytes) -> bytes:
    """AE.dec; SecAggError when the tag does not verify (tampered, misrouted or replayed from another round)."""
    key = _channel_key(secret, peer_public, ctx, sender, receiver)
    try:
        return ChaCha20Poly1305(key).decrypt(b"\0" * 12, ciphertext, _aad(ctx, sender, receiver))
    except InvalidTag as exc:
        raise SecAggError(f"the encrypted shares from client {sender} to client {receiver} failed authentication: "
                          "they were tampered with, misrouted or belong to another round; abort the round") from exc
