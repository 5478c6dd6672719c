"""The GPU worker: consumes `requests`, batches them by adapter in the engine, and produces
`results` (with attribution sketches) exactly once. `service` is the Kafka loop, `backend` the
compute side, `scheduler` admission order, `ledger` per-partition commit bookkeeping."""
