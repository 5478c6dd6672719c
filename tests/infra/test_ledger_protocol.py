"""The ledger server's reading of ClickHouse's HTTP interface, without a server: where an
INSERT's data begins, which format a query names, request parameters, compressed bodies and
the shape of errors."""

from __future__ import annotations

import gzip
import zlib

import lz4.frame
import pytest

from infra.ledger_server.protocol import (
    LedgerError,
    credentials,
    decompressed,
    parse_request,
)
from infra.ledger_server.sql import (
    NEED_MORE,
    InlineInsert,
    output_format,
    returns_rows,
    split_inline_insert,
)

try:
    from compression import zstd  # Python 3.14+
except ImportError:
    from backports import zstd

FORMATS = {"native": "Native", "jsoneachrow": "JSONEachRow", "tabseparated": "TabSeparated"}


def test_an_insert_with_a_format_clause_carries_its_data_after_one_line_break():
    head = b"INSERT INTO db.t (a, `b c`) FORMAT Native\n\x02\x00\nbinary"
    found = split_inline_insert(head, complete=True)
    assert found == InlineInsert(b"INSERT INTO db.t (a, `b c`) ", "Native", head.index(b"\x02"))
    assert head[found.data_start:] == b"\x02\x00\nbinary"


def test_the_insert_statement_may_carry_settings_and_a_crlf():
    head = b"insert into t SETTINGS async_insert = 0 format CSV  \r\n1,2\n"
    found = split_inline_insert(head, complete=True)
    assert isinstance(found, InlineInsert)
    assert found.statement == b"insert into t SETTINGS async_insert = 0 "
    assert (found.input_format, head[found.data_start:]) == ("CSV", b"1,2\n")


def test_insert_values_and_insert_select_run_as_one_query():
    # VALUES may bind parameters, which only the whole statement can.
    assert split_inline_insert(b"INSERT INTO t (a) VALUES ({a:UInt8})", complete=True) is None
    assert split_inline_insert(b"INSERT INTO t SELECT * FROM s FORMAT x", complete=True) is None
    assert split_inline_insert(b"SELECT 'INSERT INTO t FORMAT CSV'", complete=True) is None


def test_words_inside_literals_comments_and_brackets_do_not_count():
    head = (b"INSERT INTO t (`FORMAT`, \"VALUES\") -- FORMAT JSON\n"
            b"/* VALUES */ SETTINGS x = 'FORMAT y' FORMAT TSV\n1\t2\n")
    found = split_inline_insert(head, complete=True)
    assert isinstance(found, InlineInsert)
    assert found.input_format == "TSV"
    assert head[found.data_start:] == b"1\t2\n"


@pytest.mark.parametrize("cut", [b"INS", b"INSERT INTO t FORM", b"INSERT INTO t FORMAT Nat",
                                 b"INSERT INTO t FORMAT Native", b"INSERT INTO t (a, 'b"])
def test_a_head_cut_short_asks_for_more_rather_than_guessing(cut):
    assert split_inline_insert(cut, complete=False) is NEED_MORE


def test_the_named_output_format_and_whether_rows_come_back():
    assert output_format(b"SELECT 1\n FORMAT Native", FORMATS) == "Native"
    assert output_format(b"SELECT format FROM t", FORMATS) is None
    assert output_format(b"SELECT 'FORMAT Native' FORMAT jsoneachrow", FORMATS) == "JSONEachRow"
    assert returns_rows(b"  with x AS (SELECT 1) SELECT * FROM x")
    assert returns_rows(b"(SELECT 1) UNION ALL (SELECT 2)")
    assert not returns_rows(b"CREATE TABLE t (a UInt8) ENGINE = Memory")
    assert not returns_rows(b"INSERT INTO t VALUES (1)")


def test_parameters_split_into_transport_bound_values_and_settings():
    request = parse_request("POST", [
        ("query", "SELECT {x:UInt8}"), ("database", "ledger"), ("param_x", "7"),
        ("session_id", "s1"), ("max_threads", "2"), ("send_progress_in_http_headers", "1"),
        ("wait_end_of_query", "1"), ("default_format", "JSONEachRow"),
    ])
    assert request.query == b"SELECT {x:UInt8}"
    assert request.database == "ledger"
    assert request.parameters == {"x": "7"}
    assert request.settings == {"max_threads": "2"}
    assert (request.session_id, request.default_format) == ("s1", "JSONEachRow")
    assert not request.read_only


def test_a_get_is_read_only_and_block_compression_is_refused():
    assert parse_request("GET", [("query", "SELECT 1")]).settings == {"readonly": "2"}
    with pytest.raises(LedgerError, match="Content-Encoding") as info:
        parse_request("POST", [("compress", "1")])
    assert info.value.http_status == 501
    with pytest.raises(LedgerError, match="session_timeout"):
        parse_request("POST", [("session_timeout", "forever")])


def test_credentials_from_basic_auth_headers_or_the_url():
    assert credentials({"Authorization": "Basic ZGVmYXVsdDpzM2NyZXQ="}, {}) == ("default", "s3cret")
    assert credentials({"X-ClickHouse-User": "u", "X-ClickHouse-Key": "k"}, {}) == ("u", "k")
    assert credentials({}, {"user": "v", "password": "p"}) == ("v", "p")
    assert credentials({}, {}) == ("default", "")


PAYLOAD = [b"first block " * 50, b"second block", b"third"]


@pytest.mark.parametrize("encoding, compress", [
    ("gzip", gzip.compress),
    ("deflate", zlib.compress),
    ("lz4", lz4.frame.compress),
    ("zstd", zstd.compress),
])
def test_a_body_of_many_frames_split_anywhere_decodes_whole(encoding, compress):
    # Clients compress each block as a frame of its own; the network splits where it likes.
    body = b"".join(compress(block) for block in PAYLOAD)
    chunks = [body[i:i + 7] for i in range(0, len(body), 7)]
    assert b"".join(decompressed(chunks, encoding)) == b"".join(PAYLOAD)


def test_truncated_or_unknown_bodies_are_errors():
    body = lz4.frame.compress(b"x" * 1000)
    with pytest.raises(LedgerError, match="truncated") as info:
        b"".join(decompressed([body[:-4]], "lz4"))
    assert (info.value.code, info.value.http_status) == (271, 400)
    with pytest.raises(LedgerError, match="not supported"):
        b"".join(decompressed([b"x"], "compress"))


def test_engine_errors_keep_clickhouse_code_name_and_status():
    error = LedgerError.from_engine(RuntimeError(
        "Streaming insert append failed: Code: 60. DB::Exception: Table x.y does not exist. "
        "(UNKNOWN_TABLE)"))
    assert (error.code, error.name, error.http_status) == (60, "UNKNOWN_TABLE", 404)
    assert error.body("26.1") == ("Code: 60. DB::Exception: Table x.y does not exist. "
                                  "(UNKNOWN_TABLE) (version 26.1)\n")
    syntax = LedgerError(62, "SYNTAX_ERROR", "Empty query")
    assert syntax.body("26.1") == ("Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR) "
                                   "(version 26.1)\n")
    assert syntax.http_status == 400
