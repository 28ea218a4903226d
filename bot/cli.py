"""The `replyclock` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from dotenv import load_dotenv

from bot.core.policy import Policy, parse_duration

if TYPE_CHECKING:
    from slack_sdk import WebClient

EXIT_CONFIG = 2
DEFAULT_CONFIG = "replyclock.toml"


@dataclass(frozen=True)
class SlackSettings:
    """Slack credentials from the environment; Slack is optional (staff messages are logged without it)."""

    bot_token: str
    app_token: str
    signing_secret: str
    api_url: str
    timeout: int = 30  # seconds per Web API call (SLACK_TIMEOUT; slack_sdk's default is 30)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SlackSettings:
        return cls(
            bot_token=environ.get("SLACK_BOT_TOKEN", "").strip(),
            app_token=environ.get("SLACK_APP_TOKEN", "").strip(),
            signing_secret=environ.get("SLACK_SIGNING_SECRET", "").strip(),
            api_url=environ.get("SLACK_API_URL", "").strip(),
            timeout=max(1, int(float(environ.get("SLACK_TIMEOUT", "").strip() or 30))),
        )

    def client(self) -> WebClient | None:
        """A Web API client, or None without a bot token. SLACK_API_URL points it elsewhere (a proxy)."""
        if not self.bot_token:
            return None
        from slack_sdk import WebClient

        if self.api_url:
            return WebClient(token=self.bot_token, base_url=self.api_url, timeout=self.timeout)
        return WebClient(token=self.bot_token, timeout=self.timeout)


def config_path(given: str | None) -> Path:
    """`--config`, else `REPLYCLOCK_CONFIG`, else ./replyclock.toml."""
    return Path(given or os.environ.get("REPLYCLOCK_CONFIG") or DEFAULT_CONFIG)


def _load(path: Path, *, accounts: bool = False, secrets: bool = True) -> Policy:
    """The policy, or exit 2 listing every problem. `accounts`: also check the accounts' connectors
    and (with `secrets`) their secrets, the one validation shared by check, run and web."""
    from bot.config import ConfigError, load_policy
    from bot.flow.channels import validate_setup

    try:
        if accounts:
            return validate_setup(path, os.environ, secrets=secrets)
        return load_policy(path)
    except ConfigError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(error.problems)} problem(s) in {path}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    except FileNotFoundError:
        print(
            f"error: {path}: no such policy file (copy examples/replyclock.toml, or pass --config)",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_CONFIG) from None


def cmd_check(args: argparse.Namespace) -> int:
    from bot.config import summarize

    path = config_path(args.config)
    policy = _load(path, accounts=True, secrets=not args.no_secrets)
    print(summarize(policy))
    print(f"{path}: OK")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from bot.config.shape import json_schema_text
    from connectors.base import connector_classes

    keys = {
        kind: cls.settings_keys for kind, cls in connector_classes().items() if cls.settings_keys is not None
    }
    sys.stdout.write(json_schema_text(keys))
    return 0


def cmd_deadline(args: argparse.Namespace) -> int:
    from bot.core.sla import BusinessCalendar, deadline_lines

    policy = _load(config_path(args.config))
    spec = policy.calendars.get(args.calendar)
    if spec is None:
        known = ", ".join(sorted(policy.calendars)) or "none"
        print(f"error: unknown calendar {args.calendar!r} (known: {known})", file=sys.stderr)
        return EXIT_CONFIG
    try:
        target = parse_duration(args.target)
    except ValueError as error:
        print(f"error: --target: {error}", file=sys.stderr)
        return EXIT_CONFIG
    starts = args.at if args.at else (line.strip() for line in sys.stdin)
    status = 0
    for line in deadline_lines(BusinessCalendar(spec), target, starts):
        print(line)
        if line.startswith("error: "):
            status = 1
    return status


def cmd_db(args: argparse.Namespace) -> int:
    from storage.db import make_engine
    from storage.migrate import upgrade

    engine = make_engine()
    upgrade(engine, args.revision)
    print(f"database at revision {args.revision}: {engine.url.render_as_string(hide_password=True)}")
    engine.dispose()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from bot.demo.story import run_demo

    return run_demo(minutes=args.minutes)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
STOP_GRACE = timedelta(seconds=8)


def _hard_exit(log: logging.Logger) -> None:
    log.error(
        "jobs still running after the stop signal; exiting now", extra={"grace": STOP_GRACE.total_seconds()}
    )
    logging.shutdown()
    os._exit(0)


def cmd_run(args: argparse.Namespace) -> int:
    from apscheduler.schedulers.background import BackgroundScheduler

    # SIGTERM/SIGINT are taken by sigwait in the main thread, never by a handler: a handler runs
    # between any two bytecodes, also inside the scheduler's locked sections (ThreadPoolExecutor.
    # submit holds its shutdown lock), and shutting the scheduler down from there deadlocks.
    # Blocked before any thread starts, so that every thread inherits the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    policy = _load(config_path(args.config), accounts=True)  # before the heavy imports: fail fast

    from bot import logs
    from bot.flow.channels import ConnectorSetupError, build_connectors
    from bot.flow.context import AppContext
    from bot.flow.delivery import customer_handlers, text_handlers
    from bot.flow.outbox import OutboxSender
    from bot.jobs import OUTBOX_JOB, Jobs
    from bot.reports.digest_delivery import digest_handlers
    from bot.runlock import RunLockError, single_writer_lock
    from bot.slack.delivery import slack_handlers
    from storage.db import make_engine
    from storage.migrate import upgrade

    logs.configure()
    import logging

    log = logging.getLogger("replyclock.run")
    # The stop signal is awaited on a thread of its own from here on, so that it is taken even
    # while the main thread is still starting (migrating, recovering) and waits on the database.
    # From the signal, the process has STOP_GRACE to end cleanly, then it ends anyway.
    stop_requested = threading.Event()
    received: list[int] = []

    def await_stop() -> None:
        received.append(signal.sigwait(STOP_SIGNALS))
        stop_requested.set()
        watchdog = threading.Timer(STOP_GRACE.total_seconds(), _hard_exit, args=(log,))
        watchdog.daemon = True
        watchdog.start()

    threading.Thread(target=await_stop, name="stop-signal", daemon=True).start()
    try:
        connectors = build_connectors(policy, os.environ)
    except ConnectorSetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    engine = make_engine()
    if engine.dialect.name == "sqlite":
        upgrade(engine)  # embedded default: keep the file's schema current without a release step
    try:
        lock = single_writer_lock(engine)
        lock.__enter__()
    except RunLockError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    with contextlib.ExitStack() as held:
        held.push(lock)
        ctx = AppContext(policy=policy, engine=engine)
        slack = SlackSettings.from_env(os.environ)
        client = slack.client()
        if client is not None:
            staff = slack_handlers(ctx, client)
        else:
            staff = text_handlers(
                ctx, lambda line: log.info("staff message (Slack not configured)", extra={"text": line})
            )
        digests = digest_handlers(
            ctx, client, lambda text: log.info("digest (Slack not configured)", extra={"text": text})
        )
        sender = OutboxSender(ctx, {**staff, **digests, **customer_handlers(ctx, connectors)})
        beating = threading.Event()
        held.callback(beating.set)
        sender.heartbeat()
        sender.start_heartbeat(beating)
        settled = sender.recover(all_sending=engine.dialect.name == "sqlite")
        if settled:
            log.warning("settled messages left sending by a previous run", extra={"count": settled})
        metrics_port = os.environ.get("METRICS_PORT", "").strip()
        if metrics_port:
            from prometheus_client import start_http_server

            from bot.reports.metrics import build_registry

            # The worker's own counters (ladder lateness, connector and Slack errors) on :METRICS_PORT/metrics.
            start_http_server(
                int(metrics_port),
                addr=os.environ.get("METRICS_HOST", "127.0.0.1"),  # operator-only (issue 11)
                registry=build_registry(ctx),
            )
        scheduler = BackgroundScheduler(timezone="UTC")
        jobs = Jobs(ctx, connectors, sender)
        jobs.install(
            scheduler, outbox_interval=timedelta(seconds=float(os.environ.get("OUTBOX_INTERVAL", "2")))
        )

        socket = None
        if client is not None and slack.app_token:
            from bot.slack.app import create_bolt_app, start_socket_mode

            def wake_outbox() -> None:
                scheduler.modify_job(OUTBOX_JOB, next_run_time=datetime.now(UTC))

            try:
                bolt = create_bolt_app(
                    ctx,
                    token=slack.bot_token,
                    signing_secret=slack.signing_secret,
                    client=client,
                    on_change=wake_outbox,
                )
                socket = start_socket_mode(bolt, slack.app_token)
            except Exception as error:
                print(f"error: Slack refused to start: {error}", file=sys.stderr)
                return EXIT_CONFIG
        log.info(
            "replyclock running",
            extra={
                "accounts": sorted(connectors),
                "database": engine.dialect.name,
                "slack": "socket mode" if socket else ("web api only" if client else "not configured"),
            },
        )
        scheduler.start()
        stop_requested.wait()
        log.info("stopping", extra={"signal": signal.Signals(received[0]).name})
        # Whatever a job waits on (a database that is away, a busy SQLite, a slow platform), the
        # process ends within STOP_GRACE of the signal: a send cut short is settled by the next
        # start's recovery.
        sender.stop()
        scheduler.shutdown(wait=False)
        if socket is not None:
            socket.close()  # type: ignore[no-untyped-call]
    engine.dispose()
    return 0


def cmd_digest(args: argparse.Namespace) -> int:
    from bot.flow.context import AppContext
    from bot.reports.digest_delivery import digest_command
    from storage.db import make_engine

    policy = _load(config_path(args.config))
    client = SlackSettings.from_env(os.environ).client() if args.post else None
    engine = make_engine()
    try:
        return digest_command(
            AppContext(policy=policy, engine=engine),
            team=args.team,
            week=args.week,
            post=args.post,
            png=Path(args.png) if args.png else None,
            client=client,
        )
    finally:
        engine.dispose()


def cmd_export(args: argparse.Namespace) -> int:
    from bot.reports.export import export_command
    from storage.db import make_engine, make_sessionmaker

    engine = make_engine()
    try:
        with make_sessionmaker(engine, read_only=True)() as session:
            return export_command(session, since=args.since, until=args.until, team=args.team)
    finally:
        engine.dispose()


def cmd_web(args: argparse.Namespace) -> int:
    from bot import logs
    from bot.flow.channels import ConnectorSetupError, build_connectors
    from bot.flow.context import AppContext
    from bot.web import (
        bind_address,
        create_app,
        create_operator_app,
        operator_address,
        operator_token,
        serve,
    )
    from storage.db import make_engine

    logs.configure()
    policy = _load(config_path(args.config), accounts=True)
    try:
        connectors = build_connectors(policy, os.environ)
        host, port = bind_address(os.environ)
    except (ConnectorSetupError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    ctx = AppContext(policy=policy, engine=make_engine())
    slack = SlackSettings.from_env(os.environ)
    client = slack.client()
    routes = []
    if client is not None and slack.signing_secret:
        from bot.slack.app import create_bolt_app, slack_routes

        try:
            routes = slack_routes(
                create_bolt_app(
                    ctx, token=slack.bot_token, signing_secret=slack.signing_secret, client=client
                )
            )
        except Exception as error:
            print(f"error: Slack refused to start: {error}", file=sys.stderr)
            return EXIT_CONFIG
    try:  # issue 11: /metrics and the detailed health apart, on the operator listener
        token, operator = operator_token(os.environ), operator_address(os.environ)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    public = create_app(ctx, connectors, extra_routes=routes, operator_token=token)
    serve(public, host, port, operator=(create_operator_app(ctx), *operator) if operator else None)
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    """Erase one customer's posts and text everywhere (issue 11; bot.flow.retention.forget_author)."""
    from bot.flow.context import AppContext
    from bot.flow.retention import forget_author
    from storage.db import make_engine

    account, separator, author_id = str(args.author).partition(":")
    if not separator or not account or not author_id:
        print("error: --author must be ACCOUNT:AUTHOR_ID, e.g. shop:cust-7", file=sys.stderr)
        return EXIT_CONFIG
    policy = _load(config_path(args.config))
    ctx = AppContext(policy=policy, engine=make_engine())
    with ctx.sessions() as session, session.begin():
        done = forget_author(session, account, author_id, ctx.clock.now())
    print(
        f"forgot {account}:{author_id}: {done.posts} posts blanked, {done.conversations} conversations "
        f"anonymised, {done.outbox} queued messages and {done.events} events cleared"
    )
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from bot.slack.manifest import manifest, render

    try:
        document = manifest(args.name, socket_mode=args.request_url is None, request_url=args.request_url)
        print(render(document, args.format))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replyclock", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run connectors, the sweep and the outbox sender")
    run.add_argument("--config", help="policy file (default: $REPLYCLOCK_CONFIG or ./replyclock.toml)")
    run.set_defaults(func=cmd_run)

    web = sub.add_parser("web", help="serve HTTP: webhooks, /healthz, /metrics (HOST, PORT)")
    web.add_argument("--config")
    web.set_defaults(func=cmd_web)

    forget = sub.add_parser("forget", help="erase one customer's posts and text (GDPR), keeping figures")
    forget.add_argument("--author", required=True, metavar="ACCOUNT:ID", help="e.g. shop:cust-7")
    forget.add_argument("--config")
    forget.set_defaults(func=cmd_forget)

    man = sub.add_parser("manifest", help="print the Slack app manifest (paste it at api.slack.com/apps)")
    man.add_argument("--name", default="replyclock")
    man.add_argument("--request-url", help="public base URL for HTTP mode (default: Socket Mode)")
    man.add_argument("--format", choices=("yaml", "json"), default="yaml")
    man.set_defaults(func=cmd_manifest)

    db = sub.add_parser("db", help="database commands")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="apply migrations to DATABASE_URL")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=cmd_db)

    check = sub.add_parser("check", help="validate the policy file and print a summary")
    check.add_argument("--config")
    check.add_argument(
        "--no-secrets",
        action="store_true",
        help="skip the secrets connectors read from the environment (for CI without them)",
    )
    check.set_defaults(func=cmd_check)

    schema = sub.add_parser(
        "schema", help="print the JSON Schema of replyclock.toml (for Taplo / Even Better TOML)"
    )
    schema.set_defaults(func=cmd_schema)

    deadline = sub.add_parser("deadline", help="when is a post due? (business time on a calendar)")
    deadline.add_argument("--config")
    deadline.add_argument("--calendar", required=True)
    deadline.add_argument("--target", required=True, help="e.g. 8h, 1h30m, 2d")
    deadline.add_argument(
        "--at", action="append", help="start time, ISO 8601 (repeatable; default: stdin lines)"
    )
    deadline.set_defaults(func=cmd_deadline)

    digest = sub.add_parser("digest", help="a team's weekly digest: print it, post it, or write its chart")
    digest.add_argument("--config")
    digest.add_argument("--team", help="one team (default: every team)")
    digest.add_argument("--week", help="ISO week such as 2026-W47 (default: the last completed week)")
    digest.add_argument(
        "--post", action="store_true", help="post to the team channel (needs SLACK_BOT_TOKEN)"
    )
    digest.add_argument(
        "--png", metavar="FILE", help="write the chart as PNG (FILE-<team>.png for several teams)"
    )
    digest.set_defaults(func=cmd_digest)

    export = sub.add_parser("export", help="conversations opened in a period, as CSV on stdout")
    export.add_argument(
        "--since", required=True, help="date or date-time, inclusive (UTC unless an offset is given)"
    )
    export.add_argument("--until", help="date (inclusive: the whole day) or date-time (exclusive)")
    export.add_argument("--team", help="one team (default: all)")
    export.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo", help="the whole pipeline on a temporary database, sped up")
    demo.add_argument("--minutes", type=int, default=240, help="simulated minutes to run (default 240)")
    demo.set_defaults(func=cmd_demo)

    from bot.reports.simulate_command import register as register_simulate

    register_simulate(sub, load=_load, config_path=config_path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    load_dotenv(override=False)
    args = build_parser().parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
