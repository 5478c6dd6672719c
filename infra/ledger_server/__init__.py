"""The ledger server: one process owns the embedded ClickHouse directory (chdb) and serves
ClickHouse's HTTP interface on it, so the sink, `loraledger query`, `loraledger replay` and any
ClickHouse client read and write the ledger at the same time.

Modules: `ownership` (the directory lock), `sql` (where an INSERT's data begins, which format a
query names), `protocol` (an HTTP request as a statement to run, errors as ClickHouse shapes
them), `engine` (statements on chdb), `server` (the aiohttp application), `process` (the
background process that `loraledger stack up` starts).
"""
