"""Why an attribution could not be computed. Each failure becomes an AttributionRecord with
status `failed` and `failure_reason` = "<code>: <detail>", so a result is never dropped
silently and a reader can group failures by code."""

from __future__ import annotations

from enum import StrEnum


class FailureCode(StrEnum):
    # The base model answered alone: no adapter, so no training data to attribute to.
    BASE_MODEL = "base_model"
    NO_SKETCH = "no_sketch"
    CORRUPT_SKETCH = "corrupt_sketch"
    UNKNOWN_ADAPTER = "unknown_adapter"
    MISSING_INDEX = "missing_index"
    INVALID_INDEX = "invalid_index"
    HASH_MISMATCH = "hash_mismatch"
    SKETCH_MISMATCH = "sketch_mismatch"
    # A bug or an artifact no check foresaw: the record fails, not the processor, so one bad
    # result never blocks its partition.
    INTERNAL = "internal_error"


class AttributionFailure(Exception):
    def __init__(self, code: FailureCode, detail: str) -> None:
        super().__init__(f"{code.value}: {detail}")
        self.code = code
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.code.value}: {self.detail}"[:1024]
