"""The rewards agents: join each ok result with its attribution record and pay the fee.

Results arrive keyed by adapter and attributions keyed by request, so the two halves of a
request sit on different partitions. `pending` is therefore a global table: every worker reads
all of it, and each write goes to the changelog partition of the event that caused it. Because
a restart restores those partitions in no particular order, every key is written once with one
value and never changed: "<request>/result", "<request>/attribution" and "<request>/paid". When
the second half arrives the agent emits the request's reward entries and sets "<request>/paid",
so a redelivered result or record pays nothing twice whatever order recovery read the
changelog in. (The table grows by three keys per request; pruning old epochs is future work.)

Faust's exactly_once runs one Kafka transaction per partition number and commits it with the
consumed offsets of that partition; a record sent to another partition number would wait in
another transaction. Entries are therefore sent to the partition the triggering event came
from (the rewards topic has as many partitions as results and attributions), so entries, table
update and consumer offset commit together. The key is still the beneficiary id.

One Faust worker runs this join: with several, two halves of one request processed at the same
moment on different workers could each miss the other (the global table replicates through its
changelog), and the request would wait unpaid.
"""

from __future__ import annotations

import faust

from pipeline.app import app, settings, topic
from pipeline.governance_agent import parameters_for_epoch
from pipeline.rewards import epoch_of, split_fee
from schemas.codec import DecodeError, decode, encode
from schemas.events import AdapterRegistered, AttributionRecord, DeadLetter, InferenceResult

CONSUMER = "rewards"
PAID = "paid"

results_topic = topic("results")
attributions_topic = topic("attributions")
adapters_topic = topic("adapters")
rewards_topic = topic("rewards")
dead_letters = topic("dead-letters")

# "<request id>/result" and "<request id>/attribution" -> the event's JSON, "<request id>/paid".
pending = app.GlobalTable("rewards-pending", default=None, partitions=8)
# adapter id -> owner id, from AdapterRegistered (the adapters topic is compacted).
adapter_owners = app.GlobalTable("adapter-owners", default=None, partitions=4)


async def _dead_letter(event: faust.EventT, reason: str) -> None:
    message = event.message
    letter = DeadLetter.for_bytes(
        event.value or b"", source_topic=message.topic, partition=message.partition,
        offset=message.offset, consumer=CONSUMER, reason=reason,
    )
    await dead_letters.send(key=message.topic.encode(), value=encode(letter))


async def _join(event: faust.EventT, half: InferenceResult | AttributionRecord) -> None:
    kind = "result" if isinstance(half, InferenceResult) else "attribution"
    other_kind = "attribution" if kind == "result" else "result"
    request_id = half.request_id
    if pending.get(f"{request_id}/{PAID}") is not None:
        return
    pending[f"{request_id}/{kind}"] = half.model_dump_json()
    other = pending.get(f"{request_id}/{other_kind}")
    if other is None:
        return
    if isinstance(half, InferenceResult):
        result, attribution = half, AttributionRecord.model_validate_json(other)
    else:
        result, attribution = InferenceResult.model_validate_json(other), half
    epoch = epoch_of(result.created_at, settings.epoch_seconds)
    activation = parameters_for_epoch(epoch)
    entries = split_fee(
        result, attribution, activation.parameters,
        parameters_version=activation.version,
        adapter_owner=adapter_owners.get(result.adapter_id),
        epoch=epoch,
    )
    for entry in entries:
        await rewards_topic.send(
            key=entry.beneficiary_id.encode(), value=encode(entry),
            partition=event.message.partition,
        )
    pending[f"{request_id}/{PAID}"] = PAID


@app.agent(adapters_topic, name="rewards-adapter-owners")
async def track_owners(stream: faust.StreamT) -> None:
    async for event in stream.events():
        try:
            registered: AdapterRegistered = decode("adapters", event.value)
        except DecodeError as exc:
            await _dead_letter(event, exc.reason)
            continue
        adapter_owners[registered.adapter_id] = registered.owner_id


@app.agent(results_topic, name="rewards-results")
async def pay_results(stream: faust.StreamT) -> None:
    async for event in stream.events():
        try:
            result: InferenceResult = decode("results", event.value)
        except DecodeError:
            continue  # the attribution agent consumes the same topic and dead-letters it
        if result.status == "ok":
            await _join(event, result)


@app.agent(attributions_topic, name="rewards-attributions")
async def pay_attributions(stream: faust.StreamT) -> None:
    async for event in stream.events():
        try:
            record: AttributionRecord = decode("attributions", event.value)
        except DecodeError as exc:
            await _dead_letter(event, exc.reason)
            continue
        await _join(event, record)
