-- Base ledger tables. Every row has a deterministic id in its ORDER BY key, so a retried or
-- replayed insert of the same event collapses on merge (ReplacingMergeTree); queries that must
-- not count a not-yet-merged duplicate read with FINAL or GROUP BY the id.

CREATE TABLE IF NOT EXISTS {db}.inference_results
(
    request_id String,
    adapter_id String,
    worker_id String,
    status LowCardinality(String),
    error_code LowCardinality(String),
    prompt_tokens UInt32,
    completion_tokens UInt32,
    total_ms Float64,
    cache_tier LowCardinality(String),
    adapter_hash String,
    created_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY request_id;

-- One row per attribution record: failed records have no contributor rows but still appear here.
CREATE TABLE IF NOT EXISTS {db}.attributions
(
    request_id String,
    adapter_id String,
    status LowCardinality(String),
    failure_reason String,
    method LowCardinality(String),
    method_version LowCardinality(String),
    index_hash String,
    evidence_hash String,
    contributors UInt32,
    created_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY request_id;

-- One row per contributor per datanet per request.
CREATE TABLE IF NOT EXISTS {db}.attribution_rows
(
    request_id String,
    contributor_id String,
    datanet_id String,
    adapter_id String,
    ppm UInt32,
    method LowCardinality(String),
    created_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (request_id, contributor_id, datanet_id);

-- epoch and beneficiary_id are functions of entry_id (it hashes request, beneficiary and role,
-- and an entry's epoch comes from its request), so leading the key with them keeps
-- deduplication exact while making per-epoch and per-beneficiary reads cheap.
CREATE TABLE IF NOT EXISTS {db}.reward_entries
(
    entry_id String,
    request_id String,
    adapter_id String,
    epoch UInt64,
    beneficiary_id String,
    role LowCardinality(String),
    amount UInt64,
    fee_total UInt64,
    parameters_version UInt32,
    reason String,
    created_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (epoch, beneficiary_id, entry_id);
