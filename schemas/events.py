"""Every event on every topic. Models refuse unknown fields, carry `schema_version`, an id and a
UTC timestamp, and state their bounds so that a value outside them never reaches a consumer."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from schemas.ids import (
    AdapterId,
    ContributorId,
    DatanetId,
    EntityId,
    Sha256Hex,
    WorkerId,
    new_id,
)
from schemas.signatures import PublicKeyB64, SignatureB64
from schemas.text import identity_text, row_id_for

SCHEMA_VERSION = 1
MAX_PROMPT_CHARS = 8192
MAX_CHAT_MESSAGES = 64
MAX_CHAT_CHARS = 4 * MAX_PROMPT_CHARS  # all messages' contents together
MAX_NEW_TOKENS = 2048
MAX_CONTRIBUTION_CHARS = 16384
PPM_TOTAL = 1_000_000
BPS_TOTAL = 10_000

# Integer bounds match the ledger's column types (tests/pipeline/test_ledger_bounds.py checks
# every stored field), so every valid event can be written and replayed.
MAX_TOKENS = 2**32 - 1  # a token count: UInt32
MAX_MICRO_UNITS = 2**63 - 1  # an amount or a fee: UInt64, and a signed 64-bit integer too
# The highest price at which a fee, (prompt + completion tokens) x price, is still a valid amount.
MAX_PRICE_PER_TOKEN = MAX_MICRO_UNITS // (2 * MAX_TOKENS)
MAX_EPOCH = 2**63 - 1  # UInt64
MAX_VERSION = 2**32 - 1  # a parameters version: UInt32
# Timestamps: the ledger's rollups count by day (ClickHouse's Date ends on 2149-06-06), and an
# epoch counts from 1970 and is never negative.
EARLIEST_CREATED_AT = datetime(1970, 1, 1, tzinfo=UTC)
END_OF_CREATED_AT = datetime(2149, 6, 6, tzinfo=UTC)

Ppm = Annotated[int, Field(ge=0, le=PPM_TOTAL)]
Bps = Annotated[int, Field(ge=0, le=BPS_TOTAL)]
TokenCount = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
MicroUnits = Annotated[int, Field(ge=0, le=MAX_MICRO_UNITS)]
PricePerToken = Annotated[int, Field(ge=0, le=MAX_PRICE_PER_TOKEN)]
Epoch = Annotated[int, Field(ge=0, le=MAX_EPOCH)]
Version = Annotated[int, Field(ge=0, le=MAX_VERSION)]


def utc_now() -> datetime:
    return datetime.now(UTC)


class _AbsentWhenNone:
    """Field metadata: the JSON leaves the field out while it is None."""


_ABSENT_WHEN_NONE = _AbsentWhenNone()


# A field added to an event after events without it were written is left out of the JSON while
# it holds its default, so such an event encodes (and is signed) exactly as it was before the
# field existed, and consumers of the earlier shape (which refuse unknown fields) still read it.
def absent_when_none(**constraints: Any) -> Any:
    """An optional field, None by default, that the JSON leaves out while it is None."""
    info = Field(default=None, **constraints)
    info.metadata.append(_ABSENT_WHEN_NONE)
    return info


@cache
def _absent_when_none_fields(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(
        name for name, field in model.model_fields.items() if _ABSENT_WHEN_NONE in field.metadata
    )


class Event(BaseModel):
    """Base of every event: strict shape, immutable, versioned, timestamped in UTC."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    schema_version: Literal[1] = SCHEMA_VERSION
    created_at: AwareDatetime = Field(default_factory=utc_now)

    @field_validator("created_at")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        try:
            value = value.astimezone(UTC)
        except OverflowError:  # 9999-12-31T23:00-05:00 is in year 10000 in UTC
            raise ValueError("created_at is out of range in UTC") from None
        if not EARLIEST_CREATED_AT <= value < END_OF_CREATED_AT:
            raise ValueError(f"created_at is out of range: from {EARLIEST_CREATED_AT:%Y-%m-%d} "
                             f"to before {END_OF_CREATED_AT:%Y-%m-%d}")
        return value

    @model_serializer(mode="wrap")
    def _leave_out_absent_fields(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        for name in _absent_when_none_fields(type(self)):
            if name in data and data[name] is None:
                del data[name]
        return data


class Part(BaseModel):
    """Base of nested values inside events."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- requests and results -------------------------------------------------------------------


class ChatMessage(Part):
    """One turn of a conversation, rendered with the base model's chat template."""

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


def _bounded_chat(messages: list[ChatMessage]) -> list[ChatMessage]:
    if sum(len(message.content) for message in messages) > MAX_CHAT_CHARS:
        raise ValueError(f"the messages hold more than {MAX_CHAT_CHARS} characters together")
    return messages


Messages = Annotated[
    list[ChatMessage],
    Field(min_length=1, max_length=MAX_CHAT_MESSAGES),
    AfterValidator(_bounded_chat),
]


class InferenceRequest(Event):
    """A completion of `prompt`, or the assistant's next turn of the conversation `messages`:
    exactly one of the two. Without `adapter_id` the base model alone answers."""

    request_id: EntityId = Field(default_factory=new_id)
    adapter_id: AdapterId | None = absent_when_none()
    prompt: str | None = absent_when_none(min_length=1, max_length=MAX_PROMPT_CHARS)
    messages: Messages | None = absent_when_none()
    max_new_tokens: int = Field(default=64, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=8
    )
    client_id: EntityId | None = None
    # Ask the worker to publish token deltas on `token-deltas` as they are generated.
    stream: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> InferenceRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a request carries exactly one of prompt and messages")
        return self

    @property
    def prompt_input(self) -> str | list[ChatMessage]:
        """What the model is asked: the prompt text or the conversation."""
        return self.prompt if self.messages is None else self.messages

    @property
    def routing_key(self) -> str:
        """The message key: the adapter id, so that one adapter's requests meet in one batch;
        the request id for the base model alone, which every worker serves alike."""
        return self.request_id if self.adapter_id is None else self.adapter_id


class ErrorCode(StrEnum):
    UNKNOWN_ADAPTER = "unknown_adapter"
    ADAPTER_REFUSED = "adapter_refused"
    PROMPT_TOO_LONG = "prompt_too_long"
    INVALID_PARAMETERS = "invalid_parameters"
    INTERNAL = "internal_error"


class CacheTier(StrEnum):
    DEVICE = "device"
    HOST = "host"
    DISK = "disk"
    NONE = "none"


class Usage(Part):
    prompt_tokens: TokenCount
    completion_tokens: TokenCount

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Timings(Part):
    queue_ms: float = Field(ge=0.0)
    adapter_load_ms: float = Field(ge=0.0)
    prefill_ms: float = Field(ge=0.0)
    decode_ms: float = Field(ge=0.0)
    total_ms: float = Field(ge=0.0)


class Sketch(Part):
    """The projected gradient of the generated sequence's loss with respect to the adapter's
    LoRA parameters: float32 little-endian, base64, so it round-trips bit for bit."""

    k: int = Field(ge=1, le=65536)
    seed: int = Field(ge=0)
    projection: str = Field(min_length=1, max_length=64)
    values_b64: str

    @model_validator(mode="after")
    def _length_matches_k(self) -> Sketch:
        try:
            raw = base64.b64decode(self.values_b64, validate=True)
        except ValueError as exc:
            raise ValueError(f"sketch values are not base64: {exc}") from exc
        if len(raw) != 4 * self.k:
            raise ValueError(f"sketch holds {len(raw) // 4} values, expected k={self.k}")
        if not np.isfinite(np.frombuffer(raw, dtype="<f4")).all():
            raise ValueError("sketch holds non-finite values")
        return self

    @classmethod
    def from_array(cls, values: np.ndarray, *, seed: int, projection: str) -> Sketch:
        array = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
        return cls(
            k=array.size,
            seed=seed,
            projection=projection,
            values_b64=base64.b64encode(array.tobytes()).decode("ascii"),
        )

    def to_array(self) -> np.ndarray:
        return np.frombuffer(base64.b64decode(self.values_b64), dtype="<f4").copy()


class InferenceResult(Event):
    request_id: EntityId
    adapter_id: AdapterId | None = absent_when_none()  # None: the base model alone answered
    status: Literal["ok", "error"]
    error_code: ErrorCode | None = None
    error_message: str | None = Field(default=None, max_length=1024)
    prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    # The conversation of a chat request (prompt is then "").
    messages: Messages | None = absent_when_none()
    output_text: str = ""
    prompt_token_ids: list[NonNegativeInt] = Field(default_factory=list)
    output_token_ids: list[NonNegativeInt] = Field(default_factory=list)
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage = Field(default_factory=lambda: Usage(prompt_tokens=0, completion_tokens=0))
    timings: Timings | None = None
    cache_tier: CacheTier = CacheTier.NONE
    adapter_hash: Sha256Hex | None = None
    base_model_hash: Sha256Hex | None = None
    # The worker that served it: credited as compute operator only when `signature` verifies
    # against the key registered for this id (`WorkerRegistered`).
    worker_id: WorkerId
    sketch: Sketch | None = None
    signature: SignatureB64 | None = None

    @property
    def prompt_input(self) -> str | list[ChatMessage]:
        """What the model was asked: the prompt text or the conversation."""
        return self.prompt if self.messages is None else self.messages

    @property
    def prompt_text(self) -> str:
        """The text the client supplied: the prompt, or the messages' contents, one per line."""
        if self.messages is None:
            return self.prompt
        return "\n".join(message.content for message in self.messages)

    @model_validator(mode="after")
    def _status_consistent(self) -> InferenceResult:
        if self.status == "ok" and self.error_code is not None:
            raise ValueError("an ok result carries no error_code")
        if self.status == "error" and self.error_code is None:
            raise ValueError("an error result needs an error_code")
        return self


class TokenDelta(Event):
    """Text a streaming request's generation grew by, published as it is generated (outside any
    transaction). Best effort: the request's InferenceResult stays the truth; `text` is what
    its final text holds from character `offset` on, so a reader can drop repeats (a request
    served again after a rebalance) and notice gaps."""

    request_id: EntityId
    offset: NonNegativeInt
    text: str = Field(min_length=1)


class WorkerRegistered(Event):
    """Binds a worker id to the Ed25519 key its results are signed with. The first key
    registered for an id is its key: a later registration naming another key is refused."""

    worker_id: WorkerId
    public_key: PublicKeyB64

    @property
    def registry_key(self) -> str:
        """The message key: one per (worker, key), so compaction never drops the first
        registration of an id in favour of a later one."""
        return f"{self.worker_id}/{self.public_key}"


# --- attribution ------------------------------------------------------------------------------


class MethodInfo(Part):
    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=32)
    params: dict[str, float | int | str] = Field(default_factory=dict)


class ExampleScore(Part):
    example_index: NonNegativeInt
    row_id: Sha256Hex
    contributor_id: ContributorId
    datanet_id: DatanetId
    score: float = Field(allow_inf_nan=False)


class ContributorWeight(Part):
    contributor_id: ContributorId
    datanet_id: DatanetId
    ppm: Ppm


class AttributionRecord(Event):
    request_id: EntityId
    adapter_id: AdapterId | None = absent_when_none()  # None: a result of the base model alone
    adapter_hash: Sha256Hex | None = None
    status: Literal["ok", "failed"]
    failure_reason: str | None = Field(default=None, max_length=1024)
    method: MethodInfo
    index_hash: Sha256Hex | None = None
    top_examples: list[ExampleScore] = Field(default_factory=list)
    contributor_weights: list[ContributorWeight] = Field(default_factory=list)
    evidence_hash: Sha256Hex

    @model_validator(mode="after")
    def _weights_sum_exactly(self) -> AttributionRecord:
        if self.status == "failed":
            if self.failure_reason is None:
                raise ValueError("a failed attribution needs a failure_reason")
            return self
        total = sum(weight.ppm for weight in self.contributor_weights)
        if self.contributor_weights and total != PPM_TOTAL:
            raise ValueError(f"contributor weights sum to {total} ppm, not {PPM_TOTAL}")
        return self


# --- rewards ----------------------------------------------------------------------------------


class RewardRole(StrEnum):
    CONTRIBUTOR = "contributor"
    ADAPTER_OWNER = "adapter_owner"
    COMPUTE_OPERATOR = "compute_operator"
    TREASURY = "treasury"


def reward_entry_id(
    request_id: str, beneficiary_id: str, role: str, datanet_id: str | None = None
) -> str:
    """Deterministic, so the same request paid twice (a replay, a retry) yields the same id.

    A contributor is paid once per datanet their weight came from, so a contributor entry's id
    also hashes its datanet. Without a datanet the id is the original (request, beneficiary,
    role) hash, so entries written before datanets were recorded keep their ids.
    """
    key = f"{request_id}\0{beneficiary_id}\0{role}"
    if datanet_id is not None:
        key += f"\0{datanet_id}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class RewardEntry(Event):
    entry_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    request_id: EntityId
    adapter_id: AdapterId | None = absent_when_none()  # None: a request to the base model alone
    epoch: Epoch
    beneficiary_id: EntityId
    role: RewardRole
    amount: MicroUnits
    fee_total: MicroUnits
    parameters_version: Version
    reason: str = Field(default="", max_length=256)
    # The datanet a contributor entry pays for; None on other roles (and on contributor entries
    # recorded before datanets were, which still decode).
    datanet_id: DatanetId | None = None

    @model_validator(mode="after")
    def _id_is_derived(self) -> RewardEntry:
        if self.datanet_id is not None and self.role != RewardRole.CONTRIBUTOR:
            raise ValueError(f"a {self.role.value} entry carries no datanet_id")
        expected = reward_entry_id(
            self.request_id, self.beneficiary_id, self.role.value, self.datanet_id
        )
        if self.entry_id != expected:
            raise ValueError(
                "entry_id is not derived from (request_id, beneficiary_id, role, datanet_id)"
            )
        if self.amount > self.fee_total:
            raise ValueError("an entry cannot exceed its request's fee")
        return self


# --- datanets and adapters --------------------------------------------------------------------

MAX_DATANET_DESCRIPTION_CHARS = 2048


class DatanetCreated(Event):
    """A datanet comes into being; contributions to it count from then on. The first creation
    of a name in the log wins."""

    datanet_id: DatanetId
    description: str = Field(default="", max_length=MAX_DATANET_DESCRIPTION_CHARS)


class DatanetContribution(Event):
    contribution_id: EntityId = Field(default_factory=new_id)
    datanet_id: DatanetId
    contributor_id: ContributorId
    text: str = Field(min_length=1, max_length=MAX_CONTRIBUTION_CHARS)
    license: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+-]{0,63}$")] = "CC-BY-4.0"
    row_id: Sha256Hex

    @model_validator(mode="before")
    @classmethod
    def _derive_row_id(cls, data: object) -> object:
        if isinstance(data, dict) and "row_id" not in data and isinstance(data.get("text"), str):
            data = {**data, "row_id": row_id_for(data["text"])}
        return data

    @model_validator(mode="after")
    def _row_id_matches_text(self) -> DatanetContribution:
        if not identity_text(self.text):
            raise ValueError("text is empty once whitespace and invisible characters are removed")
        if self.row_id != row_id_for(self.text):
            raise ValueError("row_id is not the sha256 of the normalized text")
        return self


class AdapterFacts(BaseModel):
    """What a trained adapter is: its owner, and the hashes that pin its base model, weights,
    training snapshot and attribution index. AdapterRegistered announces them and the manifest
    stored beside the adapter's weights records them: both are typed here, once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter_id: AdapterId
    owner_id: EntityId
    base_model_hash: Sha256Hex
    weights_hash: Sha256Hex
    rank: int = Field(ge=1, le=256)
    datanet_id: DatanetId
    snapshot_version: NonNegativeInt
    snapshot_hash: Sha256Hex
    index_hash: Sha256Hex | None = None
    training_config: dict[str, float | int | str | bool | list[str]] = Field(default_factory=dict)
    contributors: list[ContributorId] = Field(default_factory=list)


# A trained adapter, announced on `adapters`. AdapterFacts comes first among the bases so that
# the event's own fields (schema_version, created_at) stay first in its JSON; no docstring, so
# the exported JSON schema is what it was.
class AdapterRegistered(AdapterFacts, Event):
    pass


# --- governance -------------------------------------------------------------------------------


class FeeSplit(Part):
    """Basis points of each fee per role; they sum to exactly 10,000."""

    contributors: Bps
    adapter_owner: Bps
    compute_operator: Bps
    treasury: Bps

    @model_validator(mode="after")
    def _sums_to_whole(self) -> FeeSplit:
        total = self.contributors + self.adapter_owner + self.compute_operator + self.treasury
        if total != BPS_TOTAL:
            raise ValueError(f"fee split sums to {total} bps, not {BPS_TOTAL}")
        return self


class Parameters(Part):
    """Everything governance sets. A reward entry records the version it was computed with."""

    fee_split: FeeSplit = FeeSplit(
        contributors=5000, adapter_owner=2500, compute_operator=1500, treasury=1000
    )
    # The lexical method's share of the mix; the rest is split between the gradient and the
    # span method by `gradient_weight_ppm` (so parameters from before the lexical method keep
    # their meaning).
    lexical_weight_ppm: Ppm = 300_000
    gradient_weight_ppm: Ppm = 800_000  # of what the lexical method leaves; the rest is span's
    top_k: int = Field(default=16, ge=1, le=1024)
    min_weight_ppm: Ppm = 0
    default_price_per_token: PricePerToken = 10
    adapter_prices: dict[AdapterId, PricePerToken] = Field(default_factory=dict)


class ParameterChanges(Part):
    """A proposal's changes; fields left out keep their current value."""

    fee_split: FeeSplit | None = None
    lexical_weight_ppm: Ppm | None = None
    gradient_weight_ppm: Ppm | None = None
    top_k: int | None = Field(default=None, ge=1, le=1024)
    min_weight_ppm: Ppm | None = None
    default_price_per_token: PricePerToken | None = None
    adapter_prices: dict[AdapterId, PricePerToken] | None = None

    @model_validator(mode="after")
    def _changes_something(self) -> ParameterChanges:
        if not self.model_dump(exclude_none=True):
            raise ValueError("a proposal must change at least one parameter")
        return self

    def apply(self, parameters: Parameters) -> Parameters:
        changes = self.model_dump(exclude_none=True)
        if "adapter_prices" in changes:
            changes["adapter_prices"] = {**parameters.adapter_prices, **changes["adapter_prices"]}
        return Parameters.model_validate({**parameters.model_dump(), **changes})


class Proposal(Event):
    kind: Literal["proposal"] = "proposal"
    proposal_id: EntityId = Field(default_factory=new_id)
    proposer_id: EntityId
    epoch: Epoch  # tallied at the end of this epoch; activates at epoch + 1 if passed
    changes: ParameterChanges
    description: str = Field(default="", max_length=2048)


class Vote(Event):
    kind: Literal["vote"] = "vote"
    vote_id: EntityId = Field(default_factory=new_id)
    proposal_id: EntityId
    voter_id: EntityId
    support: bool
    # Ed25519 over the rest of the vote, by the key registered for `voter_id`
    # (`VoterKeyRegistered`); a vote without a valid one counts for nobody.
    signature: SignatureB64 | None = None


class VoterKeyRegistered(Event):
    """Binds a voter id to the Ed25519 key its votes are signed with; the first key registered
    for an id is its key."""

    kind: Literal["voter_key"] = "voter_key"
    voter_id: EntityId
    public_key: PublicKeyB64

    @property
    def proposal_id(self) -> None:
        """The governance topic is keyed by proposal id; a key registration concerns none."""
        return None


class ProposalTallied(Event):
    kind: Literal["tallied"] = "tallied"
    proposal_id: EntityId
    epoch: Epoch
    yes_weight: MicroUnits
    no_weight: MicroUnits
    passed: bool


class ParametersActivated(Event):
    kind: Literal["activated"] = "activated"
    version: Version
    effective_epoch: Epoch
    parameters: Parameters
    proposal_id: EntityId | None = None


class EpochTick(Event):
    """Marks that `epoch` has begun, so proposals of earlier epochs are tallied even when no
    proposal or vote arrives (published by an operator or a timer at epoch boundaries)."""

    kind: Literal["tick"] = "tick"
    epoch: NonNegativeInt

    @property
    def proposal_id(self) -> None:
        """The governance topic is keyed by proposal id; a tick concerns no proposal."""
        return None


# What anyone allowed to govern submits (the `governance` topic) and what only the governance
# agent decides (`governance-decisions`, which the broker lets no one else write): a tally or
# an activation on `governance` does not decode.
GovernanceInput = Annotated[
    Proposal | Vote | EpochTick | VoterKeyRegistered, Field(discriminator="kind")
]
GovernanceDecision = Annotated[ProposalTallied | ParametersActivated, Field(discriminator="kind")]


# --- dead letters -----------------------------------------------------------------------------

MAX_DEAD_LETTER_BYTES = 64 * 1024


class DeadLetter(Event):
    dead_letter_id: EntityId = Field(default_factory=new_id)
    source_topic: str = Field(min_length=1, max_length=255)
    partition: NonNegativeInt
    offset: NonNegativeInt
    consumer: str = Field(min_length=1, max_length=128)
    reason: str = Field(min_length=1, max_length=2048)
    raw_b64: str
    raw_size: NonNegativeInt
    truncated: bool

    @classmethod
    def for_bytes(
        cls, raw: bytes, *, source_topic: str, partition: int, offset: int, consumer: str,
        reason: str,
    ) -> DeadLetter:
        kept = raw[:MAX_DEAD_LETTER_BYTES]
        return cls(
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            consumer=consumer,
            reason=reason[:2048],
            raw_b64=base64.b64encode(kept).decode("ascii"),
            raw_size=len(raw),
            truncated=len(kept) < len(raw),
        )
