"""Signing keys on disk: one Ed25519 private key per identity, in a file only its owner can
read, under the stack's home (`<home>/keys/<role>/<id>.ed25519`, PKCS#8 PEM, mode 0600).

A worker signs its results with its key and a voter its votes; the public halves are
registered by event (`WorkerRegistered`, `VoterKeyRegistered`), so consumers check who produced
an event against the log, never against a name the event gives itself.
"""

from __future__ import annotations

import os
import stat
from enum import StrEnum
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.events import VoterKeyRegistered, WorkerRegistered
from schemas.ids import check_id
from schemas.signatures import public_key_b64

KEY_SUFFIX = ".ed25519"


class KeyRole(StrEnum):
    WORKER = "workers"
    VOTER = "voters"


def key_path(home: Path, role: KeyRole, identity: str) -> Path:
    return Path(home) / "keys" / role.value / f"{check_id(identity, 'key owner id')}{KEY_SUFFIX}"


def load_key(home: Path, role: KeyRole, identity: str) -> Ed25519PrivateKey:
    """The identity's private key; FileNotFoundError with what to run when it has none, and
    PermissionError when others may read it."""
    path = key_path(home, role, identity)
    if not path.is_file():
        command = "workers register" if role == KeyRole.WORKER else "governance keygen"
        raise FileNotFoundError(
            f"no signing key for {identity} at {path}: run `loraledger {command}` first"
        )
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise PermissionError(f"{path} is readable by others: chmod 600 it or make a new key")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 key")
    return key


def create_key(home: Path, role: KeyRole, identity: str) -> Ed25519PrivateKey:
    """A new key for the identity, written with mode 0600; an existing key is kept, so a
    registered identity never loses the key the log knows it by."""
    path = key_path(home, role, identity)
    if path.exists():
        return load_key(home, role, identity)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # O_EXCL: two processes creating the same identity's key cannot both write one.
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_key(home, role, identity)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    return key


def worker_registration(home: Path, worker_id: str) -> WorkerRegistered:
    """The event registering the worker's key (made if it has none), for `workers`."""
    key = create_key(home, KeyRole.WORKER, worker_id)
    return WorkerRegistered(worker_id=worker_id, public_key=public_key_b64(key))


def voter_registration(home: Path, voter_id: str) -> VoterKeyRegistered:
    """The event registering the voter's existing key, for `governance`."""
    key = load_key(home, KeyRole.VOTER, voter_id)
    return VoterKeyRegistered(voter_id=voter_id, public_key=public_key_b64(key))
