from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from inference.datanets import DatanetStore, parse_ref, snapshot_hash
from schemas import DatanetContribution
from schemas.events import MAX_CONTRIBUTION_CHARS
from schemas.text import row_id_for


@pytest.fixture
def store(tmp_path: Path) -> DatanetStore:
    store = DatanetStore(tmp_path / "datanets")
    store.create("health", "local health guidance")
    return store


def test_same_content_is_credited_to_the_first_contributor(store: DatanetStore) -> None:
    first = store.add("health", "alice", "Boil  water\tfor ten minutes. ")
    again = store.add("health", "bob", "Boil water for ten minutes.")
    assert first.accepted and first.row_id == row_id_for("Boil water for ten minutes.")
    assert not again.accepted
    assert again.reason == "duplicate of a row already credited to alice"
    rows = store.rows("health")
    assert [(r.contributor_id, r.text) for r in rows] == [("alice", "Boil water for ten minutes.")]
    assert store.rejections("health") == [again]


def test_unicode_normalization_makes_one_row(store: DatanetStore) -> None:
    composed, decomposed = "Caf\u00e9 hours", "Cafe\u0301 hours"
    assert store.add("health", "alice", composed).accepted
    assert store.add("health", "bob", decomposed).reason.startswith("duplicate")


@pytest.mark.parametrize(
    ("datanet", "contributor", "text", "reason"),
    [
        ("health", "alice", "   \n\t ", "empty text"),
        ("health", "alice", "x" * (MAX_CONTRIBUTION_CHARS + 1), "text too long"),
        ("health", "alice", b"caf\xe9", "invalid UTF-8 at byte 3"),
        ("health", "alice", "bad \ud800 surrogate", "invalid UTF-8: unpaired surrogate"),
        ("nowhere", "alice", "hello", "unknown datanet"),
        ("../etc", "alice", "hello", "invalid datanet id"),
        ("health", "a/b", "hello", "invalid contributor id"),
    ],
)
def test_invalid_contributions_are_refused_with_a_reason(
    store: DatanetStore, datanet: str, contributor: str, text: str | bytes, reason: str
) -> None:
    outcome = store.add(datanet, contributor, text)
    assert not outcome.accepted
    assert outcome.reason.startswith(reason)
    assert store.rows("health") == []


def test_refusals_of_an_existing_datanet_are_kept(store: DatanetStore) -> None:
    store.add("health", "alice", "")
    reloaded = DatanetStore(store.root)
    assert [o.reason for o in reloaded.rejections("health")] == ["empty text"]


def test_the_store_is_a_fold_that_reloads_and_ignores_replays(store: DatanetStore) -> None:
    events = [
        DatanetContribution(datanet_id="health", contributor_id=c, text=t)
        for c, t in [("alice", "Wash hands."), ("bob", "Rest when ill."), ("carol", "Wash hands.")]
    ]
    outcomes = [store.apply(event) for event in events]
    replayed = [store.apply(event) for event in events]  # at-least-once delivery
    assert replayed == outcomes
    assert [o.accepted for o in outcomes] == [True, True, False]
    reloaded = DatanetStore(store.root)
    assert reloaded.rows("health") == store.rows("health")
    assert reloaded.info("health").rejected == 1
    assert reloaded.apply(events[0]) == outcomes[0]  # remembered across restarts
    assert len(reloaded.rows("health")) == 2


def test_a_torn_last_line_is_dropped_on_reload(store: DatanetStore) -> None:
    store.add("health", "alice", "Wash hands.")
    log = store.root / "health" / "contributions.jsonl"
    with log.open("a") as handle:
        handle.write('{"status": "accep')
    reloaded = DatanetStore(store.root)
    assert len(reloaded.rows("health")) == 1
    assert reloaded.add("health", "bob", "Rest when ill.").accepted
    assert len(DatanetStore(store.root).rows("health")) == 2


def test_snapshot_is_versioned_immutable_and_hashed_over_sorted_row_ids(
    store: DatanetStore,
) -> None:
    for contributor, text in [("alice", "b row"), ("bob", "a row"), ("carol", "c row")]:
        store.add("health", contributor, text)
    manifest = store.snapshot("health")
    ids = sorted(row_id_for(t) for t in ["a row", "b row", "c row"])
    expected = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    assert manifest.snapshot_hash == expected == snapshot_hash(list(reversed(ids)))
    assert (manifest.version, manifest.rows, manifest.contributors) == (
        1, 3, ["alice", "bob", "carol"],
    )  # fmt: skip
    directory = store.root / "health" / "v1"
    table = pq.read_table(directory / "rows.parquet")
    assert table.column("row_id").to_pylist() == ids
    assert json.loads((directory / "manifest.json").read_text())["snapshot_hash"] == expected
    assert not (directory / "rows.parquet").stat().st_mode & 0o222

    assert store.snapshot("health") == manifest  # nothing changed: no new version
    store.add("health", "dave", "d row")
    second = store.snapshot("health")
    assert second.version == 2 and second.rows == 4
    assert store.load_snapshot("health", 1).manifest == manifest
    assert store.load_snapshot("health").manifest == second
    assert store.info("health").snapshots == [1, 2]


def test_a_snapshot_whose_rows_do_not_match_its_hash_is_refused(store: DatanetStore) -> None:
    store.add("health", "alice", "a row")
    store.snapshot("health")
    manifest_path = store.root / "health" / "v1" / "manifest.json"
    manifest_path.chmod(0o644)
    record = json.loads(manifest_path.read_text())
    record["snapshot_hash"] = "0" * 64
    manifest_path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="does not match"):
        store.load_snapshot("health", 1)


def test_datanet_management_errors(store: DatanetStore) -> None:
    with pytest.raises(FileExistsError):
        store.create("health")
    with pytest.raises(ValueError, match="invalid datanet name"):
        store.create("../up")
    with pytest.raises(ValueError, match="no rows"):
        store.snapshot("health")
    with pytest.raises(KeyError, match="no snapshot"):
        store.load_snapshot("health")
    assert [info.datanet_id for info in store.list()] == ["health"]


def test_parse_ref() -> None:
    assert parse_ref("health") == ("health", None)
    assert parse_ref("health@3") == ("health", 3)
    assert parse_ref("health@v3") == ("health", 3)
    for bad in ("health@0", "health@x", "../x@1"):
        with pytest.raises(ValueError):
            parse_ref(bad)


@pytest.mark.parametrize("license", [5, None, "MIT\n", "", "../etc"])
def test_an_invalid_license_refuses_the_row_with_a_reason(store: DatanetStore, license) -> None:
    outcome = store.add("health", "alice", "Wash hands before meals.", license)
    assert not outcome.accepted
    assert outcome.reason.startswith("invalid license identifier")
    assert store.add("health", "alice", "Wash hands before meals.", "MIT").accepted


def test_zero_width_characters_make_no_new_row(store: DatanetStore) -> None:
    assert store.add("health", "alice", "Wash hands before meals.").accepted
    again = store.add("health", "bob", "Wash\u200b hands before\u00ad meals\uff0e")
    assert again.reason == "duplicate of a row already credited to alice"
