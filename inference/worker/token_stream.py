"""Token deltas of streaming requests: the text a generation grew by since the last step.

A delta is only ever text the final result will start with: a trailing incomplete character
(the tokenizer's U+FFFD while a multi-byte character is half generated) and the last characters
that could still turn out to begin a stop string (which the result cuts off) are held back
until later tokens settle them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.events import TokenDelta

_INCOMPLETE = "\ufffd"


def settled_text(text: str, stop_strings: tuple[str, ...] | list[str]) -> str:
    """The part of a generation's text so far that no later token can change."""
    cut = text
    for stop in stop_strings:
        cut = cut.split(stop, 1)[0]
    if cut == text and stop_strings:  # no stop string yet: its first characters may be here
        hold = max(len(stop) for stop in stop_strings) - 1
        cut = text[: max(0, len(text) - hold)]
    return cut.rstrip(_INCOMPLETE)


@dataclass
class TokenStream:
    """One streaming request's deltas and the text they add up to."""

    request_id: str
    sent: str = ""
    pending: list[TokenDelta] = field(default_factory=list)

    def advance(self, text: str) -> None:
        """Queue the growth of `text` (a settled text, or the final one) beyond what was sent."""
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return
        self.pending.append(
            TokenDelta(request_id=self.request_id, offset=len(self.sent),
                       text=text[len(self.sent):])
        )
        self.sent = text

    def take(self) -> list[TokenDelta]:
        taken, self.pending = self.pending, []
        return taken

