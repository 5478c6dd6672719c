-- Governance events, one table per kind, each keyed by the event's natural id.

CREATE TABLE IF NOT EXISTS {db}.proposals
(
    proposal_id String,
    proposer_id String,
    epoch UInt64,
    changes String,
    description String,
    created_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY proposal_id;

CREATE TABLE IF NOT EXISTS {db}.votes
(
    vote_id String,
    proposal_id String,
    voter_id String,
    support UInt8,
    created_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (proposal_id, vote_id);

CREATE TABLE IF NOT EXISTS {db}.proposal_tallies
(
    proposal_id String,
    epoch UInt64,
    yes_weight UInt64,
    no_weight UInt64,
    passed UInt8,
    created_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY proposal_id;

CREATE TABLE IF NOT EXISTS {db}.parameter_versions
(
    version UInt32,
    effective_epoch UInt64,
    parameters String,
    proposal_id String,
    created_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY version;
