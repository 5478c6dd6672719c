"""Signatures over events: what a producer signs is what a consumer verifies after the trip
through the codec, and any change to the event breaks it."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.codec import decode, encode, parse_object
from schemas.events import InferenceResult, Sketch, Vote
from schemas.signatures import canonical_bytes, public_key_b64, sign_event, signature_problem

KEY = Ed25519PrivateKey.generate()


def test_a_signed_result_verifies_after_the_codec_and_not_once_changed():
    result = sign_event(InferenceResult(
        request_id="r1", adapter_id="a1", status="ok", prompt="ünïcode prompt", worker_id="w1",
        prompt_token_ids=[1, 2], sketch=Sketch.from_array(np.arange(4, dtype=np.float32) / 3,
                                                          seed=1, projection="gaussian"),
    ), KEY)
    raw = encode(result)
    payload = parse_object(raw)
    assert decode("results", raw) == result
    assert signature_problem(payload, public_key_b64(KEY)) is None
    assert signature_problem(payload | {"worker_id": "w2"}, public_key_b64(KEY)) is not None
    other = public_key_b64(Ed25519PrivateKey.generate())
    assert "does not verify" in signature_problem(payload, other)


def test_the_signature_is_over_everything_but_itself():
    vote = Vote(proposal_id="p1", voter_id="v1", support=True)
    signed = sign_event(vote, KEY)
    assert canonical_bytes(parse_object(encode(signed))) == canonical_bytes(
        parse_object(encode(vote)))
    assert signature_problem(parse_object(encode(vote)), public_key_b64(KEY)) == (
        "the event is not signed")
    assert signature_problem(parse_object(encode(signed)), None) == (
        "no key is registered for the signer")
