"""The event schemas and the ledger's DDL agree: every integer field an event stores has a
bound that its column's type holds, and events with every stored integer or timestamp at its
bound are written and read back exactly, the rollups summing them without overflow (embedded
engine)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import types
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from infra.clickhouse_client import apply_ddl, drop_database, get_client
from infra.settings import load_settings
from pipeline.ledger import LEDGER_EVENTS, LedgerWriter
from pipeline.rewards import split_fee
from schemas.events import (
    EARLIEST_CREATED_AT,
    END_OF_CREATED_AT,
    MAX_EPOCH,
    MAX_MICRO_UNITS,
    MAX_PRICE_PER_TOKEN,
    MAX_TOKENS,
    MAX_VERSION,
    PPM_TOTAL,
    AttributionRecord,
    ContributorWeight,
    InferenceResult,
    MethodInfo,
    ParameterChanges,
    Parameters,
    ParametersActivated,
    Proposal,
    ProposalTallied,
    RewardEntry,
    RewardRole,
    Usage,
    reward_entry_id,
)

# (event, field path) -> (table, column) for every integer field the ledger stores.
STORED = {
    (InferenceResult, "usage.prompt_tokens"): ("inference_results", "prompt_tokens"),
    (InferenceResult, "usage.completion_tokens"): ("inference_results", "completion_tokens"),
    (AttributionRecord, "contributor_weights[].ppm"): ("attribution_rows", "ppm"),
    (RewardEntry, "epoch"): ("reward_entries", "epoch"),
    (RewardEntry, "amount"): ("reward_entries", "amount"),
    (RewardEntry, "fee_total"): ("reward_entries", "fee_total"),
    (RewardEntry, "parameters_version"): ("reward_entries", "parameters_version"),
    (Proposal, "epoch"): ("proposals", "epoch"),
    (ProposalTallied, "epoch"): ("proposal_tallies", "epoch"),
    (ProposalTallied, "yes_weight"): ("proposal_tallies", "yes_weight"),
    (ProposalTallied, "no_weight"): ("proposal_tallies", "no_weight"),
    (ParametersActivated, "version"): ("parameter_versions", "version"),
    (ParametersActivated, "effective_epoch"): ("parameter_versions", "effective_epoch"),
}
# Integer fields the ledger does not store in an integer column, by path prefix.
NOT_STORED = {
    InferenceResult: ("prompt_token_ids[]", "output_token_ids[]", "sketch."),
    AttributionRecord: ("top_examples[].", "method.params{}"),
    Proposal: ("changes.",),  # the changes are stored as JSON text
    ParametersActivated: ("parameters.",),  # likewise
}


def _bounds(metadata: list[Any]) -> tuple[int | None, int | None]:
    low = high = None
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low = item.gt + 1
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.Lt):
            high = item.lt - 1
    return low, high


def _walk(annotation: Any, path: str, metadata: list[Any], found: dict) -> None:
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extra = get_args(annotation)
        for item in extra:
            metadata = [*metadata, *(item.metadata if isinstance(item, FieldInfo) else [item])]
        _walk(base, path, metadata, found)
    elif origin in (Union, types.UnionType):
        for member in get_args(annotation):
            _walk(member, path, metadata, found)
    elif origin is list:
        _walk(get_args(annotation)[0], f"{path}[]", [], found)
    elif origin is dict:
        _walk(get_args(annotation)[1], f"{path}{{}}", [], found)
    elif origin is Literal:
        return
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, field in annotation.model_fields.items():
            _walk(field.annotation, f"{path}.{name}" if path else name, list(field.metadata),
                  found)
    elif annotation is int:
        found[path] = _bounds(metadata)


def integer_fields(model: type[BaseModel]) -> dict[str, tuple[int | None, int | None]]:
    """Every integer field of `model`, nested ones included, with its (low, high) bounds."""
    found: dict[str, tuple[int | None, int | None]] = {}
    _walk(model, "", [], found)
    return found


def column_range(column_type: str) -> tuple[int, int]:
    for wrapper in ("LowCardinality(", "Nullable("):
        if column_type.startswith(wrapper):
            column_type = column_type[len(wrapper):-1]
    if column_type.startswith("UInt"):
        return 0, 2 ** int(column_type[4:]) - 1
    if column_type.startswith("Int"):
        bits = int(column_type[3:])
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    raise AssertionError(f"{column_type} is not an integer type")


@pytest.fixture(scope="module")
def client():
    # The embedded engine serves one directory per process: every test module in this process
    # shares it, and each test works in its own database.
    path = Path(tempfile.gettempdir()) / f"loraledger-test-chdb-{os.getpid()}"
    atexit.register(shutil.rmtree, path, True)
    return get_client(load_settings({"CLICKHOUSE_URL": f"chdb://{path}"}))


@pytest.fixture
def database(client):
    name = f"t_{uuid.uuid4().hex[:12]}"
    apply_ddl(client, name)
    yield name
    drop_database(client, name)


def test_every_integer_field_of_a_ledger_event_is_mapped_to_a_column_or_known_not_stored():
    for model in LEDGER_EVENTS:
        for path in integer_fields(model):
            stored = (model, path) in STORED
            skipped = path.startswith(NOT_STORED.get(model, ()))
            assert stored != skipped, f"{model.__name__}.{path}: map it to its column"
    for model, path in STORED:
        assert path in integer_fields(model), f"{model.__name__}.{path} is no integer field"


def test_every_stored_integer_is_bounded_within_its_column_type(client, database):
    types_of = {
        (table, column): column_type
        for table, column, column_type in client.query(
            "SELECT table, name, type FROM system.columns WHERE database = {db:String}",
            parameters={"db": database},
        ).result_rows
    }
    for (model, path), column in STORED.items():
        low, high = integer_fields(model)[path]
        column_low, column_high = column_range(types_of[column])
        where = f"{model.__name__}.{path} -> {'.'.join(column)} {types_of[column]}"
        assert low is not None and high is not None, f"{where}: the schema leaves it unbounded"
        assert column_low <= low and high <= column_high, f"{where}: [{low}, {high}] overflows"


def test_the_highest_price_on_the_most_tokens_makes_a_fee_that_is_a_valid_amount():
    result = InferenceResult(request_id="r-max", adapter_id="ad-1", status="ok", worker_id="w",
                             usage=Usage(prompt_tokens=MAX_TOKENS, completion_tokens=MAX_TOKENS))
    attribution = AttributionRecord(request_id="r-max", adapter_id="ad-1", status="failed",
                                    failure_reason="none", method=MethodInfo(name="m", version="1"),
                                    evidence_hash="b" * 64)
    highest = Parameters(default_price_per_token=MAX_PRICE_PER_TOKEN)
    entries = split_fee(result, attribution, highest, parameters_version=MAX_VERSION,
                        adapter_owner="olga", epoch=MAX_EPOCH)
    assert sum(entry.amount for entry in entries) == 2 * MAX_TOKENS * MAX_PRICE_PER_TOKEN
    assert {entry.fee_total for entry in entries} == {2 * MAX_TOKENS * MAX_PRICE_PER_TOKEN}


def _entry_at_the_bounds(request_id: str) -> RewardEntry:
    return RewardEntry(
        entry_id=reward_entry_id(request_id, "carol", "contributor", "commons"),
        request_id=request_id, adapter_id="ad-1", epoch=MAX_EPOCH, beneficiary_id="carol",
        role=RewardRole.CONTRIBUTOR, amount=MAX_MICRO_UNITS, fee_total=MAX_MICRO_UNITS,
        parameters_version=MAX_VERSION, datanet_id="commons",
        created_at=datetime(2026, 3, 1, tzinfo=UTC),
    )


def test_events_at_the_bounds_are_written_and_read_back_exactly(client, database):
    when = datetime(2026, 3, 1, tzinfo=UTC)
    requests = [f"r{index}" for index in range(3)]
    events = [
        *(InferenceResult(request_id=request_id, adapter_id="ad-1", status="ok", worker_id="w",
                          usage=Usage(prompt_tokens=MAX_TOKENS, completion_tokens=MAX_TOKENS),
                          created_at=when)
          for request_id in requests),
        AttributionRecord(request_id="r0", adapter_id="ad-1", status="ok",
                          method=MethodInfo(name="m", version="1"), evidence_hash="b" * 64,
                          contributor_weights=[ContributorWeight(
                              contributor_id="carol", datanet_id="commons", ppm=PPM_TOTAL)]),
        # Three entries at the highest amount: their sum overflows 64 bits.
        *(_entry_at_the_bounds(request_id) for request_id in requests),
        Proposal(proposal_id="p1", proposer_id="olga", epoch=MAX_EPOCH,
                 changes=ParameterChanges(default_price_per_token=MAX_PRICE_PER_TOKEN)),
        ProposalTallied(proposal_id="p1", epoch=MAX_EPOCH, yes_weight=MAX_MICRO_UNITS,
                        no_weight=MAX_MICRO_UNITS, passed=True),
        ParametersActivated(version=MAX_VERSION, effective_epoch=MAX_EPOCH,
                            parameters=Parameters(default_price_per_token=MAX_PRICE_PER_TOKEN),
                            proposal_id="p1"),
    ]
    LedgerWriter(client, database).write(events)

    def one(sql: str) -> tuple:
        return client.query(sql.format(db=database)).result_rows[0]

    assert one("SELECT min(prompt_tokens), max(completion_tokens), count() "
               "FROM {db}.inference_results") == (MAX_TOKENS, MAX_TOKENS, 3)
    assert one("SELECT ppm FROM {db}.attribution_rows") == (PPM_TOTAL,)
    assert one("SELECT min(epoch), min(amount), max(fee_total), min(parameters_version), "
               "count() FROM {db}.reward_entries") == (
        MAX_EPOCH, MAX_MICRO_UNITS, MAX_MICRO_UNITS, MAX_VERSION, 3)
    assert one("SELECT epoch FROM {db}.proposals") == (MAX_EPOCH,)
    assert one("SELECT epoch, yes_weight, no_weight FROM {db}.proposal_tallies") == (
        MAX_EPOCH, MAX_MICRO_UNITS, MAX_MICRO_UNITS)
    assert one("SELECT version, effective_epoch FROM {db}.parameter_versions") == (
        MAX_VERSION, MAX_EPOCH)
    # The rollups add the three amounts up exactly.
    assert one("SELECT sum(amount) FROM {db}.rewards_by_beneficiary_epoch") == (
        3 * MAX_MICRO_UNITS,)
    assert one("SELECT sum(fees), sum(prompt_tokens) FROM {db}.usage_by_adapter_day") == (
        3 * MAX_MICRO_UNITS, 3 * MAX_TOKENS)
    assert one("SELECT sum(paid) FROM {db}.value_by_datanet_epoch") == (3 * MAX_MICRO_UNITS,)


def test_results_at_the_first_and_last_moment_are_written_and_counted_on_their_day(
    client, database
):
    last = END_OF_CREATED_AT - timedelta(milliseconds=1)
    events = [InferenceResult(request_id=f"r{index}", adapter_id="ad-1", status="ok",
                              worker_id="w", created_at=when)
              for index, when in enumerate((EARLIEST_CREATED_AT, last))]
    LedgerWriter(client, database).write(events)
    assert client.query(
        f"SELECT created_at FROM {database}.inference_results ORDER BY created_at"
    ).result_rows == [(EARLIEST_CREATED_AT.replace(tzinfo=None),), (last.replace(tzinfo=None),)]
    assert client.query(
        f"SELECT day, sum(requests) FROM {database}.usage_by_adapter_day GROUP BY day "
        "ORDER BY day"
    ).result_rows == [(date(1970, 1, 1), 1), (last.date(), 1)]


@pytest.mark.parametrize(
    "when", [EARLIEST_CREATED_AT - timedelta(microseconds=1), END_OF_CREATED_AT])
def test_timestamps_past_the_bounds_are_invalid(when):
    with pytest.raises(ValueError, match="created_at is out of range"):
        InferenceResult(request_id="r", adapter_id="a", status="ok", worker_id="w",
                        created_at=when)


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (Usage, {"prompt_tokens": MAX_TOKENS + 1, "completion_tokens": 0}),
        (Parameters, {"default_price_per_token": MAX_PRICE_PER_TOKEN + 1}),
    ],
)
def test_values_past_the_bounds_are_invalid(model, fields):
    with pytest.raises(ValueError, match="less than or equal to"):
        model(**fields)
