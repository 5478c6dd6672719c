"""Governance and analytics queries over the ledger. Every value is a bound parameter
(`{name:Type}` placeholders); only the validated database name is part of the SQL text.

Rollup tables (SummingMergeTree / AggregatingMergeTree) merge lazily, so they are always read
with sum()/...Merge() and GROUP BY. Base tables are ReplacingMergeTree and are read with FINAL
wherever a not-yet-merged duplicate would double count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clickhouse_connect.driver.client import Client

from infra.clickhouse_client import DEFAULT_DATABASE, check_database


@dataclass(frozen=True)
class QueryResult:
    title: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def _run(client: Client, title: str, sql: str, parameters: dict[str, Any]) -> QueryResult:
    result = client.query(sql, parameters=parameters)
    return QueryResult(title, tuple(result.column_names), list(result.result_rows))


def rewards(
    client: Client,
    database: str = DEFAULT_DATABASE,
    *,
    epoch: int | None = None,
    beneficiary: str | None = None,
) -> QueryResult:
    """Rewards per beneficiary per epoch and role, from the rollup."""
    db = check_database(database)
    filters, parameters = [], {}
    if epoch is not None:
        filters.append("epoch = {epoch:UInt64}")
        parameters["epoch"] = epoch
    if beneficiary is not None:
        filters.append("beneficiary_id = {beneficiary:String}")
        parameters["beneficiary"] = beneficiary
    where = f"WHERE {' AND '.join(filters)}" if filters else ""
    sql = f"""
        SELECT epoch, beneficiary_id, role, sum(amount) AS amount, sum(entries) AS entries
        FROM {db}.rewards_by_beneficiary_epoch
        {where}
        GROUP BY epoch, beneficiary_id, role
        ORDER BY epoch, amount DESC, beneficiary_id, role
    """
    return _run(client, "Rewards per beneficiary per epoch", sql, parameters)


def usage(client: Client, database: str = DEFAULT_DATABASE, *, adapter: str | None = None
          ) -> QueryResult:
    """Requests, tokens and fees per adapter per day, from the rollup."""
    db = check_database(database)
    where, parameters = "", {}
    if adapter is not None:
        where, parameters = "WHERE adapter_id = {adapter:String}", {"adapter": adapter}
    sql = f"""
        SELECT adapter_id, day, sum(requests) AS requests, sum(errors) AS errors,
               sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
               sum(fees) AS fees
        FROM {db}.usage_by_adapter_day
        {where}
        GROUP BY adapter_id, day
        ORDER BY adapter_id, day
    """
    return _run(client, "Usage per adapter per day", sql, parameters)


def datanets(
    client: Client, database: str = DEFAULT_DATABASE, *, epoch: int | None = None
) -> QueryResult:
    """Value per datanet, read from rollups only (no join over base tables).

    All time: the requests and contributors a datanet's attribution weight touched, its ppm
    mass in whole-request equivalents, and the micro-units paid to its contributors. Each
    contributor entry names the datanet it pays for, so `paid` is that rollup's plain sum.

    With `epoch`: for that epoch, the requests that paid the datanet's contributors, the
    contributors paid, the entries and the micro-units paid.
    """
    db = check_database(database)
    if epoch is not None:
        sql = f"""
            SELECT epoch, datanet_id, uniqExactMerge(requests) AS requests,
                   uniqExactMerge(contributors) AS contributors, sum(entries) AS entries,
                   sum(paid) AS paid
            FROM {db}.value_by_datanet_epoch
            WHERE epoch = {{epoch:UInt64}}
            GROUP BY epoch, datanet_id
            ORDER BY paid DESC, datanet_id
        """
        return _run(client, f"Value per datanet in epoch {epoch}", sql, {"epoch": epoch})
    sql = f"""
        SELECT v.datanet_id AS datanet_id, v.requests AS requests,
               v.contributors AS contributors, v.request_equivalents AS request_equivalents,
               p.paid AS paid
        FROM (
            SELECT datanet_id, uniqExactMerge(requests) AS requests,
                   uniqExactMerge(contributors) AS contributors,
                   round(sum(ppm_total) / 1000000, 6) AS request_equivalents
            FROM {db}.value_by_datanet
            GROUP BY datanet_id
        ) AS v
        LEFT JOIN (
            SELECT datanet_id, sum(paid) AS paid
            FROM {db}.value_by_datanet_epoch
            GROUP BY datanet_id
        ) AS p ON p.datanet_id = v.datanet_id
        ORDER BY paid DESC, datanet_id
    """
    return _run(client, "Value per datanet", sql, {})


def contributor_statement(client: Client, contributor: str, database: str = DEFAULT_DATABASE
                          ) -> QueryResult:
    """Each payment to `contributor`: how much, and why (attribution weight, method).

    An entry that names its datanet shows the weight in that datanet; an entry recorded before
    entries named datanets shows the contributor's weight summed over the request's datanets.
    """
    db = check_database(database)
    sql = f"""
        SELECT e.created_at AS at, e.epoch AS epoch, e.request_id AS request_id,
               e.adapter_id AS adapter_id, e.amount AS amount, e.fee_total AS fee_total,
               if(e.datanet_id = '', w.total_ppm,
                  arrayElement(w.ppms, indexOf(w.datanet_list, e.datanet_id))) AS weight_ppm,
               if(e.datanet_id = '', arrayStringConcat(w.datanet_list, ','), e.datanet_id)
                   AS datanets,
               a.method AS method, a.method_version AS method_version,
               e.parameters_version AS parameters_version
        FROM (SELECT * FROM {db}.reward_entries FINAL
              WHERE beneficiary_id = {{contributor:String}} AND role = 'contributor') AS e
        LEFT JOIN (SELECT request_id, sum(ppm) AS total_ppm,
                          groupArray(datanet_id) AS datanet_list,
                          groupArray(ppm) AS ppms
                   FROM (SELECT request_id, datanet_id, ppm FROM {db}.attribution_rows FINAL
                         WHERE contributor_id = {{contributor:String}}
                         ORDER BY datanet_id)
                   GROUP BY request_id) AS w ON w.request_id = e.request_id
        LEFT JOIN (SELECT request_id, method, method_version FROM {db}.attributions FINAL) AS a
            ON a.request_id = e.request_id
        ORDER BY at, request_id, datanets
    """
    return _run(client, f"Statement for {contributor}", sql, {"contributor": contributor})


def proposals(client: Client, database: str = DEFAULT_DATABASE) -> QueryResult:
    """Every proposal with its votes (a voter's latest vote counts), tally and activation."""
    db = check_database(database)
    sql = f"""
        SELECT p.proposal_id AS proposal_id, p.proposer_id AS proposer_id, p.epoch AS epoch,
               p.changes AS changes, v.yes_votes AS yes_votes, v.no_votes AS no_votes,
               if(t.proposal_id = '', 'open', if(t.passed = 1, 'passed', 'rejected')) AS status,
               t.yes_weight AS yes_weight, t.no_weight AS no_weight,
               pv.version AS activated_version, pv.effective_epoch AS effective_epoch
        FROM (SELECT * FROM {db}.proposals FINAL) AS p
        LEFT JOIN (SELECT proposal_id, countIf(support = 1) AS yes_votes,
                          countIf(support = 0) AS no_votes
                   FROM (SELECT proposal_id, voter_id, argMax(support, created_at) AS support
                         FROM {db}.votes FINAL GROUP BY proposal_id, voter_id)
                   GROUP BY proposal_id) AS v ON v.proposal_id = p.proposal_id
        LEFT JOIN (SELECT * FROM {db}.proposal_tallies FINAL) AS t
            ON t.proposal_id = p.proposal_id
        LEFT JOIN (SELECT * FROM {db}.parameter_versions FINAL) AS pv
            ON pv.proposal_id = p.proposal_id
        ORDER BY p.epoch, p.created_at, p.proposal_id
    """
    return _run(client, "Proposals", sql, {})
