"""What the attribution agent does with one message of `results`, with no Kafka in sight:
bytes in, the messages to send out. The agent and the tests share it.

- A valid ok result -> one AttributionRecord (status ok, or failed with a reason).
- A valid error result -> nothing: it served nothing, so nobody is paid for it.
- Bytes that do not decode -> a DeadLetter. If the only problem is the sketch (corrupt base64,
  wrong length, non-finite values) the result is still identifiable, so it also gets a failed
  record (`corrupt_sketch`) keyed by its request id: the request is accounted for, not lost.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pydantic import ValidationError

from pipeline.attribution.artifacts import ArtifactCache
from pipeline.attribution.engine import attribute, failed_record
from pipeline.attribution.failures import AttributionFailure, FailureCode
from schemas.codec import DecodeError, decode, encode
from schemas.events import AttributionRecord, DeadLetter, InferenceResult, Parameters
from schemas.topics import topic_spec

CONSUMER_NAME = "attribution"


@dataclass(frozen=True)
class Outgoing:
    topic: str  # logical topic name
    key: bytes
    value: bytes


def _outgoing(topic: str, event: AttributionRecord | DeadLetter) -> Outgoing:
    return Outgoing(topic, topic_spec(topic).key_of(event), encode(event))


def _salvage(raw: bytes) -> tuple[InferenceResult, str] | None:
    """The result without its sketch, and the sha256 of the sketch's JSON as sent, when the
    sketch is the only thing wrong with the message."""
    try:
        payload = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(payload, dict) or "sketch" not in payload:
        return None
    sketch_json = json.dumps(payload.pop("sketch"), sort_keys=True, separators=(",", ":"))
    try:
        result = InferenceResult.model_validate(payload)
    except ValidationError:
        return None
    return result, hashlib.sha256(sketch_json.encode("utf-8")).hexdigest()


def process_result(
    raw: bytes | None,
    *,
    source_topic: str,
    partition: int,
    offset: int,
    parameters: Parameters,
    cache: ArtifactCache,
) -> list[Outgoing]:
    try:
        result = decode("results", raw)
    except DecodeError as exc:
        dead = DeadLetter.for_bytes(
            raw or b"",
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            consumer=CONSUMER_NAME,
            reason=exc.reason,
        )
        out = [_outgoing("dead-letters", dead)]
        salvaged = _salvage(raw or b"")
        if salvaged is not None and salvaged[0].status == "ok":
            result, sketch_sha = salvaged
            failure = AttributionFailure(FailureCode.CORRUPT_SKETCH, exc.reason)
            record = failed_record(result, parameters, failure, sketch={"raw_sha256": sketch_sha})
            out.append(_outgoing("attributions", record))
        return out
    record = attribute(result, parameters, cache)
    return [] if record is None else [_outgoing("attributions", record)]
