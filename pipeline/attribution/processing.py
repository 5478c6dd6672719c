"""What the attribution agent does with one message of `results`, with no Kafka I/O: bytes
in, the events to send out. The agent and the tests share it.

- A valid ok result that passes the checks of `pipeline.attribution.facts` (signed by a
  registered worker, answering a visible request, usage recounted from its token ids, request
  not paid yet) -> one AttributionRecord (status ok, or failed with a reason) and the
  request's RewardEntry records (`pipeline.rewards.split_fee`).
- A valid ok result that fails them -> a DeadLetter saying why it is not paid, and nothing
  else: no record, no entry.
- A valid error result -> nothing: it served nothing, so nobody is paid for it.
- Bytes that do not decode -> a DeadLetter. If the only problem is the sketch (corrupt base64,
  wrong length, non-finite values) the result is still identifiable, so it also gets a failed
  record (`corrupt_sketch`) keyed by its request id, and is paid like any failed attribution:
  the request is accounted for, not lost.

Rewards are computed here, from the result and the record just made, rather than by a separate
agent joining `results` with `attributions`: the agent sends all of one result's outputs in one
Kafka transaction with its input offset, so a request is paid exactly once exactly when it is
attributed, and no join state has to survive a restart. The result is attributed, and its fee
priced, with the parameters in force at the result's epoch (`pricing`): a result processed
late, after a parameter change, or again from the log, gets the same mix and the same price as
when it was appended. The owner's share goes to the owner named in the adapter's manifest. The
epoch is that of the time the broker appended the result (`results` has log-append
timestamps), never the result's own `created_at`, which its producer chose.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from infra.kafka.dead_letters import dead_letter
from infra.kafka.events import Outgoing
from pipeline.attribution.artifacts import ArtifactCache
from pipeline.attribution.attributor import attribute, failed_record
from pipeline.attribution.facts import Facts, refusal
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


def _salvage(raw: bytes) -> tuple[InferenceResult, dict[str, Any], str] | None:
    """The result without its sketch, the message's JSON object (whole, for its signature),
    and the sha256 of the sketch's JSON as sent, when the sketch is the only thing wrong with
    the message."""
    try:
        payload = parse_object(raw)
    except DecodeError:
        return None
    if "sketch" not in payload:
        return None
    rest = {key: value for key, value in payload.items() if key != "sketch"}
    sketch_json = json.dumps(payload["sketch"], sort_keys=True, separators=(",", ":"))
    try:
        result = InferenceResult.model_validate(rest)
    except ValidationError:
        return None
    return result, payload, hashlib.sha256(sketch_json.encode("utf-8")).hexdigest()


def reward_entries(
    result: InferenceResult,
    record: AttributionRecord,
    *,
    cache: ArtifactCache,
    activation: ParametersActivated,
    epoch: int,
    appended_at: datetime,
) -> list[RewardEntry]:
    """The entries paying for `result`, appended to `results` by the broker at `appended_at`
    (in `epoch`, when `activation` was in force) and attributed by `record` (a failed record
    sends the contributors' share to the treasury, an adapter with no known owner the owner's
    share)."""
    return split_fee(
        result,
        record,
        activation.parameters,
        parameters_version=activation.version,
        adapter_owner=cache.owner_of(result.adapter_id),
        epoch=epoch,
        at=appended_at,
    )


@dataclass(frozen=True)
class Origin:
    """Where a message of `results` was read, and when the broker appended it (None when the
    record's time is its producer's: the topic predates log-append timestamps)."""

    topic: str
    partition: int
    offset: int
    appended_at: datetime | None

    def refused(self, raw: bytes | None, reason: str) -> Outgoing:
        return dead_letter(
            raw, source_topic=self.topic, partition=self.partition, offset=self.offset,
            consumer=CONSUMER_NAME, reason=reason,
        )


def _paid(
    result: InferenceResult,
    payload: dict[str, Any],
    make_record: Callable[[Parameters], AttributionRecord | None],
    *,
    raw: bytes | None,
    origin: Origin,
    facts: Facts,
    cache: ArtifactCache,
    pricing: Pricing,
    epoch_seconds: int,
) -> list[Outgoing]:
    """The record and entries of an ok result that passes the checks; a dead letter saying
    why when it does not."""
    if origin.appended_at is None:
        return [origin.refused(raw, (
            "not paid: the broker did not stamp this result's time (the topic needs "
            "message.timestamp.type=LogAppendTime: run `loraledger stack up`)"
        ))]
    reason = refusal(result, payload, facts)
    if reason is not None:
        return [origin.refused(raw, f"not paid: {reason}")]
    epoch = epoch_of(origin.appended_at, epoch_seconds)
    activation = pricing(epoch)
    record = make_record(activation.parameters)
    if record is None:
        return []
    facts.pending.add(result.request_id)
    entries = reward_entries(
        result, record, cache=cache, activation=activation, epoch=epoch,
        appended_at=origin.appended_at,
    )
    return [Outgoing.of(record), *(Outgoing.of(entry) for entry in entries)]


def process_result(
    raw: bytes | None,
    *,
    origin: Origin,
    facts: Facts,
    cache: ArtifactCache,
    pricing: Pricing,
    epoch_seconds: int,
) -> list[Outgoing]:
    """`facts` are what the log shows (requests, worker keys, payments made); `pricing` gives
    the parameters the result is attributed and priced with: those of the epoch, of
    `epoch_seconds`, in which the broker appended it."""
    paying = {
        "raw": raw, "origin": origin, "facts": facts, "cache": cache, "pricing": pricing,
        "epoch_seconds": epoch_seconds,
    }
    try:
        result = decode("results", raw)
    except DecodeError as exc:
        out = [origin.refused(raw, exc.reason)]
        salvaged = _salvage(raw or b"")
        if salvaged is not None and salvaged[0].status == "ok":
            result, payload, sketch_sha = salvaged
            failure = AttributionFailure(FailureCode.CORRUPT_SKETCH, exc.reason)
            out.extend(_paid(
                result, payload,
                lambda parameters: failed_record(
                    result, parameters, failure, sketch={"raw_sha256": sketch_sha}
                ),
                **paying,
            ))
        return out
    if result.status != "ok":
        return []
    return _paid(
        result, parse_object(raw), lambda parameters: attribute(result, parameters, cache),
        **paying,
    )
