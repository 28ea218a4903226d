"""Getting the weekly digest to the team: the outbox row, its Slack handler, the cron trigger, the CLI.

The scheduled path never posts directly. `enqueue_due_digests` writes one outbox row of kind
``digest`` per team and ISO week, with the idempotency key ``digest:{team}:{iso_week}``, and
the outbox sender hands it to the handler from `digest_handlers`. So:

* several processes, a cron firing twice, or a start-up catch-up racing the cron write one row;
* a week whose digest was missed (the process was down at the team's digest time) is enqueued
  by the next run of `enqueue_due_digests` after start-up, once: the job looks at the most recent
  completed week of each team and enqueues it if the team's digest time for it has passed and
  its row does not exist yet;
* a crash while posting re-runs the handler (staff messages are at-least-once), and the
  handler records each finished step (text posted, chart uploaded) in the row's payload, so a
  retry skips what Slack already has instead of posting the text twice.

The digest is computed when it is sent, from the database as it is then.

Each team's digest time is ``[teams.<name>] digest`` (`Team.digest`, default Monday 09:00 in
the team calendar's zone): the weekday and time *after* the ISO week reported on. A team with
``digest = "off"`` (``Team.digest is None``) gets no cron trigger (`digest_trigger` returns None)
and no outbox row; a row queued before it was switched off is skipped when sent.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from slack_sdk import WebClient
from sqlalchemy import select, update

from bot.core.policy import WEEKDAY_NAMES, DigestSchedule
from bot.flow.context import AppContext
from bot.flow.outbox import Handler, OutboxMessage
from bot.reports.chart import render_chart
from bot.reports.digest import Digest, WeekRange, build_digest, render_text, team_week
from storage import repo
from storage.models import Conversation, Outbox

log = logging.getLogger("replyclock.digest")

DIGEST_KIND = "digest"
DIGEST_JOB_PREFIX = "digest:"


def schedule_of(ctx: AppContext, team: str) -> DigestSchedule | None:
    """The team's digest time (``[teams.<name>] digest``, default Monday 09:00), or None when it is off."""
    return ctx.policy.teams[team].digest


def team_timezone(ctx: AppContext, team: str) -> str:
    """The IANA zone of the team's calendar: its weeks and its digest time are local to it."""
    return ctx.calendar(ctx.policy.teams[team].calendar).spec.timezone


def digest_key(team: str, week: WeekRange) -> str:
    """The outbox idempotency key: one digest per team and ISO week."""
    return f"digest:{team}:{week.label}"


def digest_due_at(week: WeekRange, schedule: DigestSchedule) -> datetime:
    """When the digest of `week` is due: the schedule's weekday and time after the week, in UTC."""
    day: date = week.first_day + timedelta(days=7 + schedule.weekday)
    return datetime.combine(day, schedule.at, tzinfo=week.tz).astimezone(UTC)


def week_to_post(now: datetime, timezone: str, schedule: DigestSchedule) -> WeekRange | None:
    """The most recent completed week, if its digest time has come at `now`; else None."""
    week = WeekRange.containing(now, timezone).previous()
    return week if now >= digest_due_at(week, schedule) else None


def enqueue_due_digests(
    ctx: AppContext, *, now: datetime | None = None, teams: Iterable[str] | None = None
) -> list[str]:
    """Write the outbox row of each team's last completed week whose digest time has passed.

    Safe to call any number of times and from any number of processes: the idempotency key
    makes the second row a no-op. Call it from the cron trigger and once at start-up. Teams
    whose digest is off are skipped, also when named in `teams`.

    Returns:
        The keys of the rows written by this call.
    """
    moment = now or ctx.clock.now()
    written: list[str] = []
    for team in teams if teams is not None else ctx.policy.teams:
        try:
            schedule = schedule_of(ctx, team)
            if schedule is None:
                continue  # digest = "off"
            week = week_to_post(moment, team_timezone(ctx, team), schedule)
            if week is None:
                continue
            key = digest_key(team, week)
            with ctx.sessions() as session, session.begin():
                # repo.enqueue's own answer cannot be trusted on PostgreSQL (it reports True for
                # a conflict), so look first; the unique key still settles a race with another process.
                if session.scalar(select(Outbox.id).where(Outbox.idempotency_key == key)) is not None:
                    continue
                # A new install has nothing to report for the weeks before its first conversation.
                first_seen = session.scalar(
                    select(Conversation.id)
                    .where(Conversation.team == team, Conversation.opened_at < week.end)
                    .limit(1)
                )
                if first_seen is None:
                    continue
                repo.enqueue(
                    session=session,
                    kind=DIGEST_KIND,
                    key=key,
                    payload={"team": team, "week": week.label},
                    now=moment,
                )
            written.append(key)
            log.info("digest queued", extra={"team": team, "week": week.label})
        except Exception:
            # One team's broken calendar must not stop the others' digests.
            log.exception("could not queue the digest", extra={"team": team})
    return written


def digest_trigger(ctx: AppContext, team: str) -> Any | None:
    """An APScheduler cron trigger firing at the team's digest time in the team's own zone.

    Returns:
        The trigger, or None when the team's digest is off: then schedule no job for the team
        (do not pass None on to ``add_job``, which would take it for "run once, now").
    """
    from apscheduler.triggers.cron import CronTrigger

    schedule = schedule_of(ctx, team)
    if schedule is None:
        return None
    return CronTrigger(
        day_of_week=WEEKDAY_NAMES[schedule.weekday],
        hour=schedule.at.hour,
        minute=schedule.at.minute,
        timezone=team_timezone(ctx, team),
    )


# --- sending -------------------------------------------------------------------------------------


def chart_filename(digest: Digest) -> str:
    return f"replyclock-{digest.team}-{digest.week.label}.png"


def post_digest(
    client: WebClient,
    channel: str,
    digest: Digest,
    *,
    done: dict[str, Any] | None = None,
    remember: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Post the digest text to `channel` and upload its chart there.

    Args:
        client: A Slack Web API client with chat:write and files:write.
        channel: The team channel (``#care`` or an id).
        digest: What to post.
        done: Steps already finished by an earlier attempt (``text_ts``, ``channel_id``,
            ``file_id``); they are skipped.
        remember: Called with the steps finished so far after each step, to record them.

    Returns:
        The ``ts`` of the text message.
    """
    steps: dict[str, Any] = dict(done or {})
    if not steps.get("text_ts"):
        response = client.chat_postMessage(
            channel=channel, text=render_text(digest), mrkdwn=True, unfurl_links=False
        )
        # files.completeUploadExternal wants a channel id; chat.postMessage tells us the id.
        steps.update(text_ts=response["ts"], channel_id=response["channel"])
        if remember is not None:
            remember(dict(steps))
    if not steps.get("file_id"):
        upload = client.files_upload_v2(
            channel=str(steps.get("channel_id") or channel),
            content=render_chart(digest),
            filename=chart_filename(digest),
            title=f"{digest.team_label} {digest.week.label}: first responses against the deadline",
            initial_comment=f"First responses per day, {digest.week.label}",
        )
        files = upload.get("files") or [upload.get("file") or {}]
        steps["file_id"] = str(files[0].get("id", "")) if files else ""
        if remember is not None:
            remember(dict(steps))
    return str(steps["text_ts"])


def digest_handlers(
    ctx: AppContext, client: WebClient | None, emit: Callable[[str], None]
) -> dict[str, Handler]:
    """The outbox handler for ``digest`` rows.

    With a Slack client the digest is posted to the team channel (text, then the chart as a
    file); without one its plain text goes to `emit` (print, log), like the other staff messages
    before Slack is configured.
    """

    def handle(message: OutboxMessage) -> str | None:
        team = str(message.payload["team"])
        if team not in ctx.policy.teams:
            return f"skipped: team {team!r} is no longer in the policy"
        if ctx.policy.teams[team].digest is None:
            return f"skipped: the digest of team {team!r} is off"
        week = WeekRange.parse(str(message.payload["week"]), team_timezone(ctx, team))
        with ctx.read_sessions() as session:
            digest = build_digest(session, ctx, team, week)
        if client is None:
            emit(f"{ctx.policy.teams[team].channel}: {render_text(digest, mrkdwn=False)}")
            return "text"

        def remember(steps: dict[str, Any]) -> None:
            with ctx.sessions() as session, session.begin():
                session.execute(
                    update(Outbox)
                    .where(Outbox.id == message.id)
                    .values(payload={**dict(message.payload), **steps})
                )

        return post_digest(
            client, ctx.policy.teams[team].channel, digest, done=dict(message.payload), remember=remember
        )

    return {DIGEST_KIND: handle}


# --- `replyclock digest` -------------------------------------------------------------------------


def png_path(base: Path, team: str, several: bool) -> Path:
    """`base` itself for one team; ``base-<team>.png`` beside it when several teams are shown."""
    return base.with_name(f"{base.stem}-{team}{base.suffix or '.png'}") if several else base


def digest_command(
    ctx: AppContext,
    *,
    team: str | None = None,
    week: str | None = None,
    post: bool = False,
    png: Path | None = None,
    client: WebClient | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``replyclock digest [--team T] [--week 2026-W47] [--post] [--png FILE]``.

    Prints each team's digest (default: every team, last completed week in each team's zone),
    or with `post` posts it to the team channel through `client` (directly, not through the
    outbox: an explicit request is carried out even if the scheduled digest went out already).

    Returns:
        The exit status: 0, or 2 for an unknown team, a malformed week or --post without Slack.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    teams = [team] if team else list(ctx.policy.teams)
    if team and team not in ctx.policy.teams:
        known = ", ".join(sorted(ctx.policy.teams)) or "none"
        print(f"error: unknown team {team!r} (known: {known})", file=err)
        return 2
    if post and client is None:
        print("error: --post needs SLACK_BOT_TOKEN (a bot token with chat:write and files:write)", file=err)
        return 2
    try:
        for name in teams:
            try:
                wanted = team_week(ctx, name, week)
            except ValueError as error:
                print(f"error: --week: {error}", file=err)
                return 2
            with ctx.read_sessions() as session:
                digest = build_digest(session, ctx, name, wanted)
            if png is not None:
                target = png_path(png, name, len(teams) > 1)
                target.write_bytes(render_chart(digest))
                print(f"chart written to {target}", file=err)
            if post:
                assert client is not None
                channel = ctx.policy.teams[name].channel
                ts = post_digest(client, channel, digest)
                print(f"posted the {wanted.label} digest of {name} to {channel} (ts {ts})", file=out)
            else:
                print(render_text(digest, mrkdwn=False), file=out)
                if len(teams) > 1:
                    print(file=out)
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, and keep Python from complaining
        # again when it flushes stdout at exit.
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
