"""What the attribution agent does with one message of `results`, with no Kafka I/O: bytes
in, the events to send out. The agent and the tests share it.

- A valid ok result -> one AttributionRecord (status ok, or failed with a reason) and the
  request's RewardEntry records (`pipeline.rewards.split_fee`).
- A valid error result -> nothing: it served nothing, so nobody is paid for it.
- Bytes that do not decode -> a DeadLetter. If the only problem is the sketch (corrupt base64,
  wrong length, non-finite values) the result is still identifiable, so it also gets a failed
  record (`corrupt_sketch`) keyed by its request id, and is paid like any failed attribution:
  the request is accounted for, not lost.

Rewards are computed here, from the result and the record just made, rather than by a separate
agent joining `results` with `attributions`: the agent sends all of one result's outputs in one
Kafka transaction with its input offset, so a request is paid exactly once exactly when it is
attributed, and no join state has to survive a restart. The fee is priced with the parameters
in force at the result's epoch (`pricing`), the owner's share goes to the owner named in the
adapter's manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from pydantic import ValidationError

from infra.kafka.dead_letters import dead_letter
from infra.kafka.events import Outgoing
from pipeline.attribution.artifacts import ArtifactCache
from pipeline.attribution.attributor import attribute, failed_record
from pipeline.attribution.failures import AttributionFailure, FailureCode
from pipeline.rewards import epoch_of, split_fee
from schemas.codec import DecodeError, decode, parse_object
from schemas.events import (
    AttributionRecord,
    InferenceResult,
    Parameters,
    ParametersActivated,
    RewardEntry,
)

CONSUMER_NAME = "attribution"

# epoch -> the activation (version and parameters) in force then.
Pricing = Callable[[int], ParametersActivated]


def _salvage(raw: bytes) -> tuple[InferenceResult, str] | None:
    """The result without its sketch, and the sha256 of the sketch's JSON as sent, when the
    sketch is the only thing wrong with the message."""
    try:
        payload = parse_object(raw)
    except DecodeError:
        return None
    if "sketch" not in payload:
        return None
    sketch_json = json.dumps(payload.pop("sketch"), sort_keys=True, separators=(",", ":"))
    try:
        result = InferenceResult.model_validate(payload)
    except ValidationError:
        return None
    return result, hashlib.sha256(sketch_json.encode("utf-8")).hexdigest()


def reward_entries(
    result: InferenceResult,
    record: AttributionRecord,
    *,
    cache: ArtifactCache,
    pricing: Pricing,
    epoch_seconds: int,
) -> list[RewardEntry]:
    """The entries paying for `result`, attributed by `record` (a failed record sends the
    contributors' share to the treasury, an adapter with no known owner the owner's share)."""
    epoch = epoch_of(result.created_at, epoch_seconds)
    activation = pricing(epoch)
    return split_fee(
        result,
        record,
        activation.parameters,
        parameters_version=activation.version,
        adapter_owner=cache.owner_of(result.adapter_id),
        epoch=epoch,
    )


def _attributed(
    result: InferenceResult,
    record: AttributionRecord,
    cache: ArtifactCache,
    pricing: Pricing,
    epoch_seconds: int,
) -> list[Outgoing]:
    entries = reward_entries(
        result, record, cache=cache, pricing=pricing, epoch_seconds=epoch_seconds
    )
    return [Outgoing.of(record), *(Outgoing.of(entry) for entry in entries)]


def process_result(
    raw: bytes | None,
    *,
    source_topic: str,
    partition: int,
    offset: int,
    parameters: Parameters,
    cache: ArtifactCache,
    pricing: Pricing,
    epoch_seconds: int,
) -> list[Outgoing]:
    """`parameters` are those attribution computes with (the current ones); `pricing` gives
    those the fee is priced with (the result's epoch's, epochs of `epoch_seconds`)."""
    try:
        result = decode("results", raw)
    except DecodeError as exc:
        out = [
            dead_letter(
                raw,
                source_topic=source_topic,
                partition=partition,
                offset=offset,
                consumer=CONSUMER_NAME,
                reason=exc.reason,
            )
        ]
        salvaged = _salvage(raw or b"")
        if salvaged is not None and salvaged[0].status == "ok":
            result, sketch_sha = salvaged
            failure = AttributionFailure(FailureCode.CORRUPT_SKETCH, exc.reason)
            record = failed_record(result, parameters, failure, sketch={"raw_sha256": sketch_sha})
            out.extend(_attributed(result, record, cache, pricing, epoch_seconds))
        return out
    record = attribute(result, parameters, cache)
    if record is None:
        return []
    return _attributed(result, record, cache, pricing, epoch_seconds)
