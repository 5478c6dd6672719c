"""Signing keys on disk: made once with mode 0600, refused when others may read them."""

from __future__ import annotations

import stat

import pytest

from infra.keys import KeyRole, create_key, key_path, load_key, voter_registration
from schemas.signatures import public_key_b64


def test_a_key_is_made_once_readable_by_its_owner_only(tmp_path):
    key = create_key(tmp_path, KeyRole.WORKER, "gpu-0")
    path = key_path(tmp_path, KeyRole.WORKER, "gpu-0")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = create_key(tmp_path, KeyRole.WORKER, "gpu-0")
    assert public_key_b64(again) == public_key_b64(key)
    assert public_key_b64(load_key(tmp_path, KeyRole.WORKER, "gpu-0")) == public_key_b64(key)


def test_a_key_others_may_read_is_refused(tmp_path):
    create_key(tmp_path, KeyRole.VOTER, "alice")
    key_path(tmp_path, KeyRole.VOTER, "alice").chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_key(tmp_path, KeyRole.VOTER, "alice")


def test_a_missing_key_says_what_to_run_and_ids_cannot_leave_the_key_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="governance keygen"):
        voter_registration(tmp_path, "bob")
    with pytest.raises(ValueError, match="invalid key owner id"):
        key_path(tmp_path, KeyRole.VOTER, "../bob")
