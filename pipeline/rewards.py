"""Fee and reward maths: pure functions, integers throughout.

Rounding rules (the ledger's contract):
- A fee is `total_tokens * price_per_token` in integer micro-units, so the fee itself is
  never rounded. The price is `adapter_prices[adapter_id]`, else `default_price_per_token`.
- The fee splits into four role shares by basis points with largest-remainder rounding
  (`pipeline.largest_remainder`): each share is floored, and the units left over go one each
  to the largest remainders, ties broken by the fixed role order contributors, adapter owner,
  compute operator, treasury.
- The contributors' share splits by attribution ppm the same way, over (contributor, datanet)
  pairs, ties broken by (contributor id, datanet id) ascending, so the result never depends on
  the order weights arrive in.
- A contributor is paid one entry per datanet their weight came from, and the entry records
  that datanet. Its id hashes (request, beneficiary, role, datanet), so it stays deterministic
  and unique; the value a datanet earned is then a plain sum of its contributor entries (the
  per-datanet rollup is a materialized view), never a split of a mixed entry at query time.
  Other roles carry no datanet and keep the (request, beneficiary, role) id.
- A failed (or empty) attribution sends the contributors' share to the treasury, and a
  result whose adapter has no known owner sends the owner's share to the treasury: a fee is
  never paid to nobody. The entries of one request always sum to its fee exactly.
- A request to the base model alone (no adapter id) is priced at `default_price_per_token`
  and split by the same basis points. No datanet and no adapter owner took part, so the
  contributors' and the owner's shares go to the treasury: the compute operator earns what it
  would for an adapter's request of the same length, and the protocol keeps the rest.
- Zero amounts produce no entry; a zero fee produces no entries at all.
"""

from __future__ import annotations

from datetime import datetime

from pipeline.largest_remainder import largest_remainder
from schemas.events import (
    BPS_TOTAL,
    PPM_TOTAL,
    AttributionRecord,
    InferenceResult,
    Parameters,
    RewardEntry,
    RewardRole,
    reward_entry_id,
)

TREASURY_ID = "treasury"
MAX_REASON_CHARS = 256

# Tie-break order of the role shares in largest-remainder rounding.
ROLE_ORDER: tuple[RewardRole, ...] = (
    RewardRole.CONTRIBUTOR,
    RewardRole.ADAPTER_OWNER,
    RewardRole.COMPUTE_OPERATOR,
    RewardRole.TREASURY,
)


def epoch_of(timestamp: datetime, seconds: int) -> int:
    """Epoch number of a UTC timestamp for epochs of `seconds` (the settings'
    `epoch_seconds`): whole epochs since the Unix epoch (epoch 0 starts at 1970-01-01T00:00Z),
    so every component derives the same epoch from an event's timestamp."""
    if seconds <= 0:
        raise ValueError(f"epoch length must be positive, got {seconds}")
    return int(timestamp.timestamp()) // seconds


def price_per_token(parameters: Parameters, adapter_id: str | None) -> int:
    """The adapter's price, else the default (always for the base model alone)."""
    if adapter_id is None:
        return parameters.default_price_per_token
    return parameters.adapter_prices.get(adapter_id, parameters.default_price_per_token)


def fee_for(result: InferenceResult, parameters: Parameters) -> int:
    """The fee of a result in micro-units; error results cost nothing. Its usage is trusted
    here: the processor pays only results whose usage recounts from their token ids
    (`pipeline.attribution.facts`)."""
    if result.status != "ok":
        return 0
    return result.usage.total_tokens * price_per_token(parameters, result.adapter_id)


def role_shares(fee: int, parameters: Parameters) -> dict[RewardRole, int]:
    split = parameters.fee_split
    bps = {
        RewardRole.CONTRIBUTOR: split.contributors,
        RewardRole.ADAPTER_OWNER: split.adapter_owner,
        RewardRole.COMPUTE_OPERATOR: split.compute_operator,
        RewardRole.TREASURY: split.treasury,
    }
    if sum(bps.values()) != BPS_TOTAL:
        raise ValueError(f"fee split sums to {sum(bps.values())} bps, not {BPS_TOTAL}")
    # Keyed by rank in ROLE_ORDER, so that ties go to the earlier role.
    parts = largest_remainder(fee, {rank: bps[role] for rank, role in enumerate(ROLE_ORDER)})
    return {role: parts[rank] for rank, role in enumerate(ROLE_ORDER)}


def contributor_ppm(attribution: AttributionRecord) -> dict[tuple[str, str], int]:
    """Ppm per (contributor, datanet); a pair listed twice gets the sum."""
    merged: dict[tuple[str, str], int] = {}
    if attribution.status != "ok":
        return merged
    for weight in attribution.contributor_weights:
        key = (weight.contributor_id, weight.datanet_id)
        merged[key] = merged.get(key, 0) + weight.ppm
    return {key: ppm for key, ppm in merged.items() if ppm > 0}


def _reason(text: str) -> str:
    return text[:MAX_REASON_CHARS]


def split_fee(
    result: InferenceResult,
    attribution: AttributionRecord,
    parameters: Parameters,
    *,
    parameters_version: int,
    adapter_owner: str | None,
    epoch: int,
    at: datetime | None = None,
) -> list[RewardEntry]:
    """The reward entries of one request; their amounts sum to its fee exactly. `epoch` and
    `at` (the entries' timestamp, default the result's) are the processor's: the epoch and
    time at which the broker appended the result.

    Entries are fully determined by their inputs (ids, timestamps, amounts), so computing them
    again after a crash or a replay yields identical events.
    """
    if result.request_id != attribution.request_id:
        raise ValueError(
            f"result {result.request_id} and attribution {attribution.request_id} differ"
        )
    fee = fee_for(result, parameters)
    if fee == 0:
        return []
    shares = role_shares(fee, parameters)
    weights = contributor_ppm(attribution)
    # (beneficiary, role, datanet or "") -> amount; "" because None does not sort with str.
    amounts: dict[tuple[str, RewardRole, str], int] = {}
    reasons: dict[tuple[str, RewardRole, str], list[str]] = {}

    def credit(
        beneficiary: str, role: RewardRole, amount: int, reason: str, datanet: str = ""
    ) -> None:
        if amount <= 0:
            return
        key = (beneficiary, role, datanet)
        amounts[key] = amounts.get(key, 0) + amount
        reasons.setdefault(key, []).append(reason)

    treasury = RewardRole.TREASURY
    if weights and sum(weights.values()) == PPM_TOTAL:
        parts = largest_remainder(shares[RewardRole.CONTRIBUTOR], weights)
        method = attribution.method.name
        for (contributor, datanet), part in sorted(parts.items()):
            credit(
                contributor,
                RewardRole.CONTRIBUTOR,
                part,
                f"attribution {weights[(contributor, datanet)]} ppm in {datanet} by {method}",
                datanet,
            )
    else:
        why = attribution.failure_reason or "no contributor weights"
        credit(TREASURY_ID, treasury, shares[RewardRole.CONTRIBUTOR], f"unattributed: {why}")
    if adapter_owner:
        credit(adapter_owner, RewardRole.ADAPTER_OWNER, shares[RewardRole.ADAPTER_OWNER],
               "adapter owner")
    elif result.adapter_id is None:
        credit(TREASURY_ID, treasury, shares[RewardRole.ADAPTER_OWNER],
               "base model alone: no adapter owner")
    else:
        credit(TREASURY_ID, treasury, shares[RewardRole.ADAPTER_OWNER], "adapter has no owner")
    credit(result.worker_id, RewardRole.COMPUTE_OPERATOR, shares[RewardRole.COMPUTE_OPERATOR],
           "compute operator")
    credit(TREASURY_ID, treasury, shares[RewardRole.TREASURY], "protocol treasury")

    return [
        RewardEntry(
            entry_id=reward_entry_id(result.request_id, beneficiary, role.value, datanet or None),
            datanet_id=datanet or None,
            request_id=result.request_id,
            adapter_id=result.adapter_id,
            epoch=epoch,
            beneficiary_id=beneficiary,
            role=role,
            amount=amount,
            fee_total=fee,
            parameters_version=parameters_version,
            reason=_reason("; ".join(reasons[(beneficiary, role, datanet)])),
            created_at=result.created_at if at is None else at,
        )
        for (beneficiary, role, datanet), amount in sorted(
            amounts.items(),
            key=lambda item: (ROLE_ORDER.index(item[0][1]), item[0][0], item[0][2]),
        )
    ]
