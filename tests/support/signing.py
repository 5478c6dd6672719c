"""Signed identities for tests: a worker or voter key, the event registering it, and events
signed with it, as `loraledger workers register` / `governance register-key` make them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel

from schemas.events import VoterKeyRegistered, WorkerRegistered
from schemas.signatures import public_key_b64, sign_event

E = TypeVar("E", bound=BaseModel)


@dataclass(frozen=True)
class Identity:
    name: str
    key: Ed25519PrivateKey

    @classmethod
    def new(cls, name: str) -> Identity:
        return cls(name, Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> str:
        return public_key_b64(self.key)

    def as_worker(self) -> WorkerRegistered:
        return WorkerRegistered(worker_id=self.name, public_key=self.public_key)

    def as_voter(self, created_at: datetime | None = None) -> VoterKeyRegistered:
        stamp = {} if created_at is None else {"created_at": created_at}
        return VoterKeyRegistered(voter_id=self.name, public_key=self.public_key, **stamp)

    def sign(self, event: E) -> E:
        return sign_event(event, self.key)
