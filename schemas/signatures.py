"""Ed25519 signatures over events: who produced an event is proven by a key, never by a name
the event gives itself.

An event is signed over its canonical bytes: the JSON object of the event as it travels, less
its `signature` field, with sorted keys, no spaces and UTF-8 text. A consumer checks the
signature over the object it parsed from the message, so a value that the JSON round trip
preserves (every value of our events) verifies exactly as it was signed.

Keys and signatures travel as standard base64: a public key is 32 raw bytes (44 characters),
a signature 64 raw bytes (88 characters).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, StringConstraints

SIGNATURE_FIELD = "signature"

E = TypeVar("E", bound=BaseModel)

PublicKeyB64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{43}=$")]
SignatureB64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{86}==$")]


def canonical_bytes(payload: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: `payload` without its signature, in canonical JSON."""
    unsigned = {key: value for key, value in payload.items() if key != SIGNATURE_FIELD}
    return json.dumps(
        unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def event_payload(event: BaseModel) -> dict[str, Any]:
    """The JSON object an event travels as."""
    return event.model_dump(mode="json")


def public_key_b64(private_key: Ed25519PrivateKey) -> str:
    raw = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(raw).decode("ascii")


def sign_payload(private_key: Ed25519PrivateKey, payload: Mapping[str, Any]) -> str:
    return base64.b64encode(private_key.sign(canonical_bytes(payload))).decode("ascii")


def sign_event(event: E, private_key: Ed25519PrivateKey) -> E:
    """`event` with its `signature` field set over the rest of it."""
    signature = sign_payload(private_key, event_payload(event))
    return event.model_copy(update={SIGNATURE_FIELD: signature})


def signature_problem(payload: Mapping[str, Any], public_key: str | None) -> str | None:
    """Why `payload` is not signed by `public_key`, in one line; None when it is."""
    if public_key is None:
        return "no key is registered for the signer"
    signature = payload.get(SIGNATURE_FIELD)
    if not isinstance(signature, str):
        return "the event is not signed"
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key, validate=True))
        key.verify(base64.b64decode(signature, validate=True), canonical_bytes(payload))
    except (InvalidSignature, ValueError, binascii.Error):
        return "the signature does not verify against the signer's registered key"
    return None
