-- Money rollups get room to grow. An amount is below 2^63 (schemas/events.py bounds every
-- stored integer to fit its column), so a sum of three of them can overflow UInt64: the
-- rollups that add amounts up hold UInt128. The per-datanet view sums within each inserted
-- block, so it is recreated to sum in UInt128 too.

ALTER TABLE {db}.rewards_by_beneficiary_epoch MODIFY COLUMN amount UInt128;

ALTER TABLE {db}.usage_by_adapter_day MODIFY COLUMN fees UInt128;

ALTER TABLE {db}.value_by_datanet_epoch MODIFY COLUMN paid SimpleAggregateFunction(sum, UInt128);

DROP VIEW IF EXISTS {db}.value_by_datanet_epoch_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.value_by_datanet_epoch_mv
TO {db}.value_by_datanet_epoch AS
SELECT
    epoch,
    datanet_id,
    sum(toUInt128(amount)) AS paid,
    count() AS entries,
    uniqExactState(request_id) AS requests,
    uniqExactState(beneficiary_id) AS contributors
FROM {db}.reward_entries
WHERE role = 'contributor' AND datanet_id != ''
GROUP BY epoch, datanet_id;
