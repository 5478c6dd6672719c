"""Event models, the topic registry and the codec: the contract every component shares.

No I/O lives here.
"""

from schemas.codec import DecodeError, decode, encode
from schemas.events import (
    AdapterRegistered,
    AttributionRecord,
    ChatMessage,
    DatanetContribution,
    DatanetCreated,
    DeadLetter,
    EpochTick,
    InferenceRequest,
    InferenceResult,
    ParametersActivated,
    Proposal,
    ProposalTallied,
    RewardEntry,
    Vote,
)
from schemas.topics import TOPICS, TopicSpec, topic_name

__all__ = [
    "TOPICS",
    "AdapterRegistered",
    "AttributionRecord",
    "ChatMessage",
    "DatanetContribution",
    "DatanetCreated",
    "DeadLetter",
    "DecodeError",
    "EpochTick",
    "InferenceRequest",
    "InferenceResult",
    "ParametersActivated",
    "Proposal",
    "ProposalTallied",
    "RewardEntry",
    "TopicSpec",
    "Vote",
    "decode",
    "encode",
    "topic_name",
]
