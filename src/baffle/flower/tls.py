"""Throw-away credentials for one TLS run, made with ``cryptography`` (a Flower dependency).

* a self-signed CA (``ca.crt``) that SuperNodes and the ``flwr`` CLI trust (``--root-certificates``);
* the SuperLink's certificate for 127.0.0.1 / localhost signed by it (``server.pem``, ``server.key``);
* one EC key pair per SuperNode identity (``node<i>`` OpenSSH private key, ``node<i>.pub``), the form
  ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read.
The CA key is discarded after signing; all files are valid for two days.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Credentials:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys; the public key is the same path + ".pub"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: x509.Name, issuer: x509.Name, public_key, signing_key, *, ca: bool,
                 hosts: tuple[str, ...] = ()) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    else:
        names = [x509.IPAddress(ipaddress.ip_address(h)) if h.replace(".", "").isdigit() else x509.DNSName(h)
                 for h in hosts]
        builder = (builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(signing_key, hashes.SHA256())


def make_credentials(folder: str | Path, num_nodes: int,
                     hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Credentials:
    """Write a CA, a SuperLink certificate for ``hosts`` and ``num_nodes`` SuperNode key pairs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("baffle run CA")
    ca_cert = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _certificate(_name(hosts[0]), ca_name, server_key.public_key(), ca_key, ca=False, hosts=hosts)
    pem = serialization.Encoding.PEM
    nodes = []
    for i in range(num_nodes):
        key = ec.generate_private_key(ec.SECP384R1())  # NIST curve: required by SuperNode authentication
        path = _write(folder / f"node{i}", key.private_bytes(pem, serialization.PrivateFormat.OpenSSH,
                                                             serialization.NoEncryption()), private=True)
        _write(Path(f"{path}.pub"), key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                  serialization.PublicFormat.OpenSSH) + b"\n")
        nodes.append(path)
    return Credentials(_write(folder / "ca.crt", ca_cert.public_bytes(pem)),
                       _write(folder / "server.pem", server_cert.public_bytes(pem)),
                       _write(folder / "server.key", _pem_key(server_key), private=True), tuple(nodes))


__all__ = ["Credentials", "make_credentials"]
