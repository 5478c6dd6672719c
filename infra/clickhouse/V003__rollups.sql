-- Materialized rollups. A materialized view sees every inserted block, so a duplicate insert
-- into a ReplacingMergeTree base table would inflate a summing rollup even after the base
-- table merges it away. The ledger writer therefore inserts only rows whose ids are not in the
-- base table yet (one writer per partition, and an event's partition is fixed by its key), so
-- each id reaches a view exactly once. `loraledger replay` rebuilds base tables and rollups
-- together from the Kafka log. Rollup targets merge lazily: read them with sum()/GROUP BY.

CREATE TABLE IF NOT EXISTS {db}.rewards_by_beneficiary_epoch
(
    epoch UInt64,
    beneficiary_id String,
    role LowCardinality(String),
    amount UInt64,
    entries UInt64
)
ENGINE = SummingMergeTree
ORDER BY (epoch, beneficiary_id, role);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.rewards_by_beneficiary_epoch_mv
TO {db}.rewards_by_beneficiary_epoch AS
SELECT epoch, beneficiary_id, role, amount, toUInt64(1) AS entries
FROM {db}.reward_entries;

CREATE TABLE IF NOT EXISTS {db}.usage_by_adapter_day
(
    adapter_id String,
    day Date,
    requests UInt64,
    errors UInt64,
    prompt_tokens UInt64,
    completion_tokens UInt64,
    fees UInt64
)
ENGINE = SummingMergeTree
ORDER BY (adapter_id, day);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_by_adapter_day_results_mv
TO {db}.usage_by_adapter_day AS
SELECT
    adapter_id,
    toDate(created_at) AS day,
    toUInt64(status = 'ok') AS requests,
    toUInt64(status != 'ok') AS errors,
    toUInt64(prompt_tokens) AS prompt_tokens,
    toUInt64(completion_tokens) AS completion_tokens,
    toUInt64(0) AS fees
FROM {db}.inference_results;

-- A reward entry carries its result's timestamp, so fees land on the day of the request.
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_by_adapter_day_fees_mv
TO {db}.usage_by_adapter_day AS
SELECT
    adapter_id,
    toDate(created_at) AS day,
    toUInt64(0) AS requests,
    toUInt64(0) AS errors,
    toUInt64(0) AS prompt_tokens,
    toUInt64(0) AS completion_tokens,
    amount AS fees
FROM {db}.reward_entries;

CREATE TABLE IF NOT EXISTS {db}.attribution_by_contributor
(
    contributor_id String,
    datanet_id String,
    requests UInt64,
    ppm_total UInt64
)
ENGINE = SummingMergeTree
ORDER BY (contributor_id, datanet_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.attribution_by_contributor_mv
TO {db}.attribution_by_contributor AS
SELECT contributor_id, datanet_id, toUInt64(1) AS requests, toUInt64(ppm) AS ppm_total
FROM {db}.attribution_rows;

-- ppm_total / 1e6 is the number of whole requests' worth of influence a datanet earned.
CREATE TABLE IF NOT EXISTS {db}.value_by_datanet
(
    datanet_id String,
    requests AggregateFunction(uniqExact, String),
    contributors AggregateFunction(uniqExact, String),
    ppm_total SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
ORDER BY datanet_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.value_by_datanet_mv
TO {db}.value_by_datanet AS
SELECT
    datanet_id,
    uniqExactState(request_id) AS requests,
    uniqExactState(contributor_id) AS contributors,
    sum(toUInt64(ppm)) AS ppm_total
FROM {db}.attribution_rows
GROUP BY datanet_id;
