"""The attribution processor's transactional identity names the input partition, never the
instance: whichever instance owns a partition next fences the one before."""

from __future__ import annotations

from aiokafka import TopicPartition

from infra.settings import load_settings
from pipeline.attribution.agent import loop_config


def _config(worker_id: str, prefix: str):
    return loop_config(load_settings({"LORALEDGER_WORKER_ID": worker_id,
                                      "LORALEDGER_TOPIC_PREFIX": prefix}))


def test_transactional_ids_name_the_partition_not_the_instance():
    one, two = _config("one", "s."), _config("two", "s.")
    tp = TopicPartition("s.results", 3)
    assert one.transactional_id(tp) == two.transactional_id(tp) == (
        "s.loraledger-attribution.s.results.3")
    assert one.transactional_id(tp) != one.transactional_id(TopicPartition("s.results", 4))
    other_stack = _config("one", "t.")
    assert other_stack.transactional_id(TopicPartition("t.results", 3)) != one.transactional_id(tp)
