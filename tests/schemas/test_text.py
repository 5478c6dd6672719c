"""A row's identity: text that differs only in invisible characters or compatibility forms is
one row; plain text keeps the id it always had."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from schemas.events import DatanetContribution
from schemas.text import identity_text, normalize_text, row_id_for

PLAIN = "Boil water for ten minutes."


def test_plain_text_keeps_its_id():
    assert row_id_for(PLAIN) == hashlib.sha256(PLAIN.encode()).hexdigest()
    assert row_id_for("  Boil  water\tfor ten minutes.\n") == row_id_for(PLAIN)


@pytest.mark.parametrize(
    "variant",
    [
        "Boil wa\u200bter for ten minutes.",  # zero-width space
        "Boil\u200d water for ten\u2060 minutes.",  # zero-width joiner, word joiner
        "Boil wa\u00adter for ten minutes.",  # soft hyphen
        "\ufeffBoil water for ten minutes.\u200e",  # byte order mark, left-to-right mark
        "Boil water for ten minutes\uff0e",  # full-width full stop
        "\uff22oil water for ten minutes.",  # full-width B
        "Boil water for ten minutes.".replace(" ", "\u2003"),  # em spaces
    ],
)
def test_invisible_and_compatibility_characters_do_not_make_a_new_row(variant):
    assert row_id_for(variant) == row_id_for(PLAIN)


def test_ligatures_fold_but_other_scripts_stay_distinct():
    assert row_id_for("\ufb01sh stew") == row_id_for("fish stew")
    assert row_id_for("p\u0430y the tax") != row_id_for("pay the tax")  # Cyrillic a


def test_a_dropped_format_character_lets_its_neighbours_compose():
    assert identity_text("Cafe\u200b\u0301") == "Caf\u00e9"


def test_the_kept_text_is_only_nfc_and_whitespace():
    assert normalize_text(" \ufb01sh\u200b  stew ") == "\ufb01sh\u200b stew"


def test_a_contribution_of_invisible_characters_only_is_refused():
    with pytest.raises(ValidationError, match="text is empty"):
        DatanetContribution(datanet_id="d1", contributor_id="c1", text="\u200b\u200d \u2060")
