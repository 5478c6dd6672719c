"""The datanets step: deterministic rows, distinct contributors, a snapshot hash known ahead."""

from __future__ import annotations

from demo_support import SMALL

from inference.datanets import DatanetStore
from loraledger.demo.options import DATANETS
from loraledger.demo.steps.datanets import demo_rows, expected_snapshot_hash


def test_contributor_ids_are_distinct_across_datanets():
    first, _ = demo_rows(DATANETS[0], SMALL)
    second, _ = demo_rows(DATANETS[1], SMALL)
    assert {e.contributor_id for e in first}.isdisjoint({e.contributor_id for e in second})
    assert all(e.contributor_id.startswith(f"{DATANETS[0].tag}-") for e in first)


def test_rows_are_deterministic_so_a_rerun_republishes_the_same_contributions():
    once, facts_once = demo_rows(DATANETS[0], SMALL)
    again, facts_again = demo_rows(DATANETS[0], SMALL)
    assert [e.contribution_id for e in once] == [e.contribution_id for e in again]
    assert [e.row_id for e in once] == [e.row_id for e in again]
    assert facts_once == facts_again
    assert len({e.contribution_id for e in once}) == len(once)


def test_expected_snapshot_hash_matches_the_store_after_applying_the_rows(tmp_path):
    spec = DATANETS[0]
    events, facts = demo_rows(spec, SMALL)
    store = DatanetStore(tmp_path)
    store.create(spec.name)
    for event in events:
        store.apply(event)
    assert store.snapshot(spec.name).snapshot_hash == expected_snapshot_hash(events)
    planted = {fact.contributor_id for fact in facts}
    assert planted <= set(store.info(spec.name).contributors)
