-- Contributor reward entries name the datanet they pay for, and value per datanet per epoch is
-- a materialized rollup of those entries, so reading it needs no join with attribution rows.
-- Entries recorded before datanets were (an empty datanet_id) are not counted here: which
-- datanet such an entry paid is not known from the entry alone.

ALTER TABLE {db}.reward_entries ADD COLUMN IF NOT EXISTS datanet_id String DEFAULT '';

CREATE TABLE IF NOT EXISTS {db}.value_by_datanet_epoch
(
    epoch UInt64,
    datanet_id String,
    paid SimpleAggregateFunction(sum, UInt64),
    entries SimpleAggregateFunction(sum, UInt64),
    requests AggregateFunction(uniqExact, String),
    contributors AggregateFunction(uniqExact, String)
)
ENGINE = AggregatingMergeTree
ORDER BY (epoch, datanet_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.value_by_datanet_epoch_mv
TO {db}.value_by_datanet_epoch AS
SELECT
    epoch,
    datanet_id,
    sum(amount) AS paid,
    count() AS entries,
    uniqExactState(request_id) AS requests,
    uniqExactState(beneficiary_id) AS contributors
FROM {db}.reward_entries
WHERE role = 'contributor' AND datanet_id != ''
GROUP BY epoch, datanet_id;
