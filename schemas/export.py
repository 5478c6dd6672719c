"""JSON Schema for every event, for clients written in other languages."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas import events

EXPORTED: tuple[type[BaseModel], ...] = (
    events.InferenceRequest,
    events.InferenceResult,
    events.TokenDelta,
    events.WorkerRegistered,
    events.AttributionRecord,
    events.RewardEntry,
    events.DatanetCreated,
    events.DatanetContribution,
    events.AdapterRegistered,
    events.Proposal,
    events.Vote,
    events.ProposalTallied,
    events.ParametersActivated,
    events.EpochTick,
    events.VoterKeyRegistered,
    events.DeadLetter,
)


def export_json_schemas(directory: Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for model in EXPORTED:
        path = directory / f"{model.__name__}.schema.json"
        path.write_text(json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
