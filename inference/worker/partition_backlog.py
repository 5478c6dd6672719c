"""What a worker owes for one input partition: every consumed record, in offset order, until
its outgoing messages are committed together with the offset after it.

Results finish out of order (short generations overtake long ones), but a committed offset
says "everything before this is done". So only the finished prefix of a partition is ever
committed, and its messages go out in the same transaction; a record finished beyond an
unfinished one waits. After a crash the uncommitted suffix is consumed again and none of its
messages were visible, so every record yields its messages exactly once.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from infra.kafka.events import Outgoing


@dataclass
class Entry:
    offset: int
    key: str  # the worker's handle for the record, unique per consumption
    received_at: float = field(default_factory=time.monotonic)
    messages: list[Outgoing] | None = None  # None until the record is finished
    payload: object | None = None  # what produced the messages (for metrics), if anything

    @property
    def finished(self) -> bool:
        return self.messages is not None


@dataclass
class ReadyPrefix:
    entries: list[Entry]
    next_offset: int  # the offset to commit: one past the last entry

    @property
    def messages(self) -> list[Outgoing]:
        return [message for entry in self.entries for message in entry.messages or ()]


class PartitionBacklog:
    """The consumed, not yet committed records of one partition."""

    def __init__(self) -> None:
        self._entries: deque[Entry] = deque()
        self._by_key: dict[str, Entry] = {}
        self._last_offset = -1

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def unfinished(self) -> int:
        return sum(1 for entry in self._entries if not entry.finished)

    def keys(self) -> list[str]:
        return [entry.key for entry in self._entries]

    def track(self, offset: int, key: str) -> Entry | None:
        """Record a consumed offset; None (ignore the record) when it is not past the last one,
        as happens when a fetch from before a rebalance overlaps the re-fetch after it."""
        if offset <= self._last_offset:
            return None
        entry = Entry(offset, key)
        self._entries.append(entry)
        self._by_key[key] = entry
        self._last_offset = offset
        return entry

    def finish(self, key: str, messages: list[Outgoing], payload: object | None = None) -> bool:
        """Attach a record's outgoing messages; False when the key is not tracked here."""
        entry = self._by_key.get(key)
        if entry is None or entry.finished:
            return False
        entry.messages = list(messages)
        entry.payload = payload
        return True

    def ready(self) -> ReadyPrefix | None:
        """The finished prefix, without removing it (call `confirm` once it is committed)."""
        entries = []
        for entry in self._entries:
            if not entry.finished:
                break
            entries.append(entry)
        if not entries:
            return None
        return ReadyPrefix(entries, entries[-1].offset + 1)

    def confirm(self, prefix: ReadyPrefix) -> None:
        """Forget a prefix that was committed."""
        if len(prefix.entries) > len(self._entries) or any(
            held is not entry for held, entry in zip(self._entries, prefix.entries, strict=False)
        ):
            raise RuntimeError("ledger confirmed out of order: a prefix was committed twice")
        for entry in prefix.entries:
            self._entries.popleft()
            del self._by_key[entry.key]
