"""`loraledger governance keygen | register-key | propose | vote | tick | show`: governance
events on the `governance` topic. A vote is signed with the voter's local key (made by
`keygen`, registered by `register-key`); an unsigned one counts for nobody."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from infra.kafka.events import publish_sync, read_topic
from infra.keys import KeyRole, create_key, key_path, load_key, voter_registration
from infra.settings import Settings, load_settings
from pipeline.governance import Logged, active_parameters, changes_from_options, fold_log
from pipeline.rewards import epoch_of
from schemas.codec import parse_object
from schemas.events import EpochTick, Proposal, Vote
from schemas.ids import check_id
from schemas.signatures import public_key_b64, sign_event


def _id(value: str, what: str) -> str:
    try:
        return check_id(value, what)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def parse_fee_split(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    if len(parts) != 4 or not all(part.strip().isdigit() for part in parts):
        raise typer.BadParameter(
            f"--fee-split {text!r}: give four basis points C,O,W,T (contributors, owner, "
            "worker, treasury) summing to 10000"
        )
    contributors, owner, operator, treasury = (int(part) for part in parts)
    return contributors, owner, operator, treasury


def parse_prices(values: list[str]) -> dict[str, int]:
    prices: dict[str, int] = {}
    for value in values:
        adapter, sep, amount = value.partition("=")
        if not sep or not amount.strip().isdigit():
            raise typer.BadParameter(f"--price {value!r}: use ADAPTER=MICRO_UNITS_PER_TOKEN")
        prices[_id(adapter.strip(), "adapter id")] = int(amount)
    return prices


def build_tick(epoch: int | None, now: datetime, epoch_seconds: int) -> EpochTick:
    """A tick for `epoch` (default: the epoch `now` falls in); a future epoch is refused,
    because a tick says that epoch has begun."""
    current = epoch_of(now, epoch_seconds)
    if epoch is not None and epoch > current:
        raise typer.BadParameter(
            f"--epoch {epoch} has not begun (the current epoch is {current}): give {current} "
            "or an earlier one"
        )
    return EpochTick(epoch=current if epoch is None else epoch, created_at=now)


async def _governance_log(settings: Settings) -> list[Logged]:
    """Proposals, votes, keys and ticks, then the tallies and activations decided on them."""
    return [
        Logged(decoded.event, parse_object(decoded.record.value),
               datetime.fromtimestamp(decoded.record.timestamp / 1000, UTC))
        for topic in ("governance", "governance-decisions")
        async for decoded in read_topic(settings, topic)
        if decoded.event is not None
    ]


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Propose parameter changes, vote, and show governance state.",
                        no_args_is_help=True)
    app.add_typer(group, name="governance")

    @group.command("keygen")
    def keygen(voter: Annotated[str, typer.Option("--voter", help="voter id")]) -> None:
        """Make the voter's signing key (kept if it exists), mode 0600 under LORALEDGER_HOME."""
        settings = load_settings()
        identity = _id(voter, "voter id")
        key = create_key(settings.home, KeyRole.VOTER, identity)
        path = key_path(settings.home, KeyRole.VOTER, identity)
        typer.echo(f"voter {identity}: key {public_key_b64(key)} in {path}")

    @group.command("register-key")
    def register_key(voter: Annotated[str, typer.Option("--voter", help="voter id")]) -> None:
        """Publish the voter's public key: votes signed with it count for the voter. The first
        key registered for a voter is the one that counts."""
        settings = load_settings()
        try:
            event = voter_registration(settings.home, _id(voter, "voter id"))
        except (FileNotFoundError, PermissionError) as exc:
            raise typer.BadParameter(str(exc)) from None
        publish_sync(settings, [event])
        typer.echo(f"voter {event.voter_id} registered with key {event.public_key}")

    @group.command("propose")
    def propose(
        proposer: Annotated[str, typer.Option("--proposer", help="proposer id")],
        fee_split: Annotated[str | None, typer.Option(
            "--fee-split", help="C,O,W,T basis points: contributors, owner, worker, treasury",
        )] = None,
        top_k: Annotated[int | None, typer.Option("--top-k", min=1)] = None,
        gradient_weight_ppm: Annotated[int | None, typer.Option(
            "--gradient-weight-ppm", min=0,
            help="share of the gradient method in what the lexical method leaves")] = None,
        lexical_weight_ppm: Annotated[int | None, typer.Option(
            "--lexical-weight-ppm", min=0, help="share of the lexical method in the mix")] = None,
        min_weight_ppm: Annotated[int | None, typer.Option("--min-weight-ppm", min=0)] = None,
        price: Annotated[list[str] | None, typer.Option(
            "--price", help="ADAPTER=N micro-units per token (repeatable)")] = None,
        default_price: Annotated[int | None, typer.Option("--default-price", min=0)] = None,
        epoch: Annotated[int | None, typer.Option(
            "--epoch", min=0, help="epoch to tally at the end of (default: the current one)",
        )] = None,
        description: Annotated[str, typer.Option("--description")] = "",
    ) -> None:
        """Publish a proposal; it is tallied when its epoch ends."""
        try:
            changes = changes_from_options(
                fee_split=parse_fee_split(fee_split) if fee_split else None,
                top_k=top_k, gradient_weight_ppm=gradient_weight_ppm,
                lexical_weight_ppm=lexical_weight_ppm,
                min_weight_ppm=min_weight_ppm, prices=parse_prices(price or []),
                default_price=default_price,
            )
        except ValueError as exc:
            first_line = str(exc).splitlines()
            raise typer.BadParameter(" ".join(first_line[:3])) from None
        settings = load_settings()
        proposal = Proposal(
            proposer_id=_id(proposer, "proposer id"),
            epoch=epoch_of(datetime.now(UTC), settings.epoch_seconds) if epoch is None else epoch,
            changes=changes,
            description=description,
        )
        publish_sync(settings, [proposal])
        typer.echo(f"proposal {proposal.proposal_id} for epoch {proposal.epoch}")

    @group.command("vote")
    def vote(
        proposal_id: Annotated[str, typer.Argument(help="proposal id")],
        voter: Annotated[str, typer.Option("--voter", help="voter id")],
        support: Annotated[bool, typer.Option("--yes/--no", help="for or against")],
    ) -> None:
        """Publish a vote signed with the voter's key; its weight is the voter's rewards from
        earlier epochs."""
        settings = load_settings()
        identity = _id(voter, "voter id")
        try:
            key = load_key(settings.home, KeyRole.VOTER, identity)
        except (FileNotFoundError, PermissionError) as exc:
            raise typer.BadParameter(str(exc)) from None
        cast = sign_event(
            Vote(proposal_id=_id(proposal_id, "proposal id"), voter_id=identity, support=support),
            key,
        )
        publish_sync(settings, [cast])
        typer.echo(f"vote {cast.vote_id}: {voter} {'yes' if support else 'no'} on {proposal_id}")

    @group.command("tick")
    def tick(
        epoch: Annotated[int | None, typer.Option(
            "--epoch", min=0, help="the epoch that has begun (default: the current one)",
        )] = None,
    ) -> None:
        """Publish an epoch tick: proposals of earlier epochs are tallied without waiting for
        other governance traffic (run it from cron at epoch boundaries)."""
        settings = load_settings()
        published = build_tick(epoch, datetime.now(UTC), settings.epoch_seconds)
        publish_sync(settings, [published])
        typer.echo(f"tick for epoch {published.epoch}: proposals of earlier epochs are tallied")

    @group.command("show")
    def show() -> None:
        """The active parameters and the proposals, read from the governance log."""
        settings = load_settings()
        view = fold_log(asyncio.run(_governance_log(settings)), settings.epoch_seconds)
        epoch = epoch_of(datetime.now(UTC), settings.epoch_seconds)
        active = active_parameters(view.history, epoch)
        console = Console()
        console.print(f"epoch {epoch}: parameters version {active.version} "
                      f"(effective from epoch {active.effective_epoch})")
        console.print_json(active.parameters.model_dump_json())
        table = Table(title="Proposals")
        for column in ("proposal", "proposer", "epoch", "changes", "votes", "status"):
            table.add_column(column, overflow="fold")
        for proposal_id, entry in view.open_proposals.items():
            yes = sum(entry.votes.values())
            votes = f"{yes} yes / {len(entry.votes) - yes} no"
            table.add_row(proposal_id, entry.proposal.proposer_id, str(entry.proposal.epoch),
                          entry.proposal.changes.model_dump_json(exclude_none=True), votes, "open")
        for proposal_id, tallied in view.tallies.items():
            status = "passed" if tallied.passed else "rejected"
            table.add_row(proposal_id, "", str(tallied.epoch), "",
                          f"{tallied.yes_weight} yes / {tallied.no_weight} no (weight)", status)
        console.print(table)
