"""replyclock: every customer post gets a deadline, a named expert and a real answer on time.

Start with `replyclock init` (a starter replyclock.toml and .env), `replyclock check`, then
`replyclock db upgrade` and `replyclock run` (and `replyclock web` for webhooks and Slack over HTTP).
Settings come from the environment and from a .env file in the current directory (or --env-file);
the real environment wins.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from dotenv import load_dotenv

from bot.core.policy import Policy, parse_duration

if TYPE_CHECKING:
    from slack_sdk import WebClient
    from sqlalchemy import Engine

    from bot.config.settings import Settings

EXIT_FAILURE = 1  # the command ran and failed (a lock held, a digest not posted)
EXIT_CONFIG = 2  # the policy file, the environment or the command line is wrong
EXIT_DATABASE = 3  # the database is unreachable, missing or not migrated
EXIT_INTERRUPTED = 130  # Ctrl-C
DEFAULT_CONFIG = "replyclock.toml"


class CliError(Exception):
    """An expected failure: printed as one `error:` line, the process exits with `status`."""

    def __init__(self, message: str, status: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.status = status


@functools.cache
def version() -> str:
    """The installed distribution's version (looked up once, and only when asked for)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("replyclock")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


@dataclass(frozen=True)
class SlackSettings:
    """Slack credentials from the environment; Slack is optional (staff messages are logged without it)."""

    bot_token: str
    app_token: str
    signing_secret: str
    api_url: str
    timeout: int = 30  # seconds per Web API call (SLACK_TIMEOUT; slack_sdk's default is 30)

    @classmethod
    def from_settings(cls, settings: Settings) -> SlackSettings:
        return cls(
            bot_token=settings.slack_bot_token,
            app_token=settings.slack_app_token,
            signing_secret=settings.slack_signing_secret,
            api_url=str(settings.slack_api_url) if settings.slack_api_url else "",
            timeout=max(1, int(settings.slack_timeout)),
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


def load_env_file(given: str | None) -> Path | None:
    """Load `--env-file`, else ./.env if there is one, into the environment (the real environment wins).

    Returns:
        The file loaded, or None.

    Raises:
        CliError: `--env-file` names a file that does not exist.
    """
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise CliError(f"--env-file {given}: no such file")
    else:
        path = Path.cwd() / ".env"
        if not path.is_file():
            return None
    load_dotenv(path, override=False)
    return path


def _settings() -> Settings:
    """The environment settings, validated (SettingsError is reported by `main`, one line each)."""
    from bot.config.settings import load_settings

    return load_settings()


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
            f"error: {path}: no such policy file (write one with `replyclock init`, copy"
            " examples/replyclock.toml, or pass --config)",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_CONFIG) from None


def _shown(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _engine(settings: Settings, *, must_exist: bool = False) -> Engine:
    """The engine for DATABASE_URL; with `must_exist`, a missing SQLite file is an error, not created."""
    from storage.db import make_engine

    engine = make_engine(settings.database_url)
    database = engine.url.database
    in_a_file = engine.dialect.name == "sqlite" and database and database != ":memory:"
    if must_exist and in_a_file and not Path(str(database)).is_file():
        raise CliError(
            f"no database at {database} (DATABASE_URL={_shown(engine)}): set DATABASE_URL to your"
            " database, or create this one with `replyclock db upgrade`",
            EXIT_DATABASE,
        )
    return engine


def _require_schema(engine: Engine, *, migrate: bool = False) -> str:
    """Refuse a database whose schema is not this version's (or bring it there with `migrate`).

    Returns:
        The schema state, for the start-up line.
    """
    from storage.migrate import schema_state, upgrade

    state = schema_state(engine)
    if state.is_current:
        return state.describe()
    if migrate:
        upgrade(engine)
        return schema_state(engine).describe()
    raise CliError(
        f"{state.describe()} ({_shown(engine)}): run `replyclock db upgrade` first (or start with --migrate)",
        EXIT_DATABASE,
    )


def database_problem(error: Exception, url: str) -> str:
    """One line for a database failure: what went wrong and what to do."""
    detail = str(getattr(error, "orig", None) or error).strip().splitlines()[0] if str(error).strip() else ""
    lowered = detail.lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return f"the database has no replyclock schema ({url}): run `replyclock db upgrade` first"
    if "database" in lowered and "does not exist" in lowered:
        return f"{detail} ({url}): create it (e.g. `createdb NAME`) or correct DATABASE_URL"
    if "resolve" in lowered or "name or service not known" in lowered or "nodename" in lowered:
        return f"cannot find the database host ({url}): {detail}"
    return f"cannot use the database {url}: {detail}"


def _startup_line(
    role: str,
    *,
    engine: Engine,
    schema: str,
    policy: Policy,
    slack: str,
    listen: str | None,
    operator: str | None = None,
) -> None:
    accounts = ", ".join(f"{name} ({account.kind})" for name, account in sorted(policy.accounts.items()))
    logging.getLogger(f"replyclock.{role}").info(
        "replyclock running",
        extra={
            "role": role,
            "version": version(),
            "database": _shown(engine),
            "schema": schema,
            "accounts": accounts or "none",
            "slack": slack,
            "listen": listen or "-",
            **({"operator": operator} if operator else {}),
        },
    )


def cmd_check(args: argparse.Namespace) -> int:
    from bot.config import summarize
    from bot.config.settings import SettingsError

    try:
        _settings()
        settings_ok = True
    except SettingsError as error:
        for problem in error.problems:
            print(f"error: environment: {problem}", file=sys.stderr)
        settings_ok = False
    path = config_path(args.config)
    policy = _load(path, accounts=True, secrets=not args.no_secrets)
    if not settings_ok:
        return EXIT_CONFIG
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
    from storage.migrate import schema_state, upgrade

    engine = _engine(_settings())
    try:
        upgrade(engine, args.revision)
        print(f"database at revision {args.revision} ({schema_state(engine).describe()}): {_shown(engine)}")
    finally:
        engine.dispose()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from bot.demo.story import DEMO_POLICY, run_demo

    if args.keep is None:
        return run_demo(minutes=args.minutes)
    database = Path(args.keep)
    policy_file = database.with_suffix(".toml")
    for path in (database, policy_file):
        if path.exists():
            print(f"{path} exists: the demo keeps its data only in a new file", file=sys.stderr)
            return 2
    code = run_demo(minutes=args.minutes, database=database.resolve(), history_weeks=args.history_weeks)
    policy_file.write_text(DEMO_POLICY)
    print(
        f"\nkept: the database in {database} (DATABASE_URL=sqlite:///{database}), the policy in {policy_file}"
    )
    return code


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
    from bot.jobs import Jobs, wake_outbox
    from bot.reports.digest_delivery import digest_handlers
    from bot.runlock import single_writer_lock
    from bot.slack.delivery import slack_handlers
    from bot.slack.pacing import SharedPacer, pacing_engine

    settings = _settings()
    logs.configure(settings.log_level)
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
    engine = _engine(settings)
    # SQLite is the embedded default: run keeps the file's schema current without a release step
    # (the run lease below lives in it). Elsewhere an out-of-date schema stops it, unless --migrate.
    schema = _require_schema(engine, migrate=args.migrate or engine.dialect.name == "sqlite")
    # A lease held by another run raises RunLockError, which `main` reports as one line.
    lock = single_writer_lock(engine)
    lock.__enter__()
    with contextlib.ExitStack() as held:
        held.push(lock)
        ctx = AppContext(policy=policy, engine=engine)
        slack = SlackSettings.from_settings(settings)
        client = slack.client()
        if client is not None:
            # Slack's limits are the workspace's: every process paces from one budget in the database.
            pacer = SharedPacer(ctx.clock.now, pacing_engine(engine)) if settings.slack_pacing else None
            staff = slack_handlers(ctx, client, pacer=pacer)
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
        listen = None
        if settings.metrics_port is not None:
            from prometheus_client import start_http_server

            from bot.reports.metrics import build_registry

            # The worker's own counters (ladder lateness, connector and Slack errors) on :METRICS_PORT/metrics.
            try:
                start_http_server(
                    settings.metrics_port, addr=settings.metrics_host, registry=build_registry(ctx)
                )
            except OSError as error:
                raise CliError(
                    f"METRICS_PORT: cannot listen on {settings.metrics_host}:{settings.metrics_port}: {error}"
                ) from None
            listen = f"{settings.metrics_host}:{settings.metrics_port} (metrics)"
        scheduler = BackgroundScheduler(timezone="UTC")
        jobs = Jobs(ctx, connectors, sender)
        jobs.install(scheduler, outbox_interval=timedelta(seconds=settings.outbox_interval))

        socket = None
        if client is not None and slack.app_token:
            from bot.slack.app import create_bolt_app, start_socket_mode

            try:
                bolt = create_bolt_app(
                    ctx,
                    token=slack.bot_token,
                    signing_secret=slack.signing_secret,
                    client=client,
                    on_change=lambda: wake_outbox(scheduler),
                )
                socket = start_socket_mode(bolt, slack.app_token)
            except Exception as error:
                print(f"error: Slack refused to start: {error}", file=sys.stderr)
                return EXIT_CONFIG
        _startup_line(
            "run",
            engine=engine,
            schema=schema,
            policy=policy,
            slack="socket mode" if socket else ("web api only" if client else "not configured"),
            listen=listen,
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

    settings = _settings()
    policy = _load(config_path(args.config))
    client = SlackSettings.from_settings(settings).client() if args.post else None
    engine = _engine(settings, must_exist=True)
    try:
        _require_schema(engine)
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
    from storage.db import make_sessionmaker

    engine = _engine(_settings(), must_exist=True)
    try:
        _require_schema(engine)  # before the CSV header goes out
        with make_sessionmaker(engine, read_only=True)() as session:
            return export_command(session, since=args.since, until=args.until, team=args.team)
    finally:
        engine.dispose()


def cmd_web(args: argparse.Namespace) -> int:
    from bot import logs
    from bot.flow.channels import ConnectorSetupError, build_connectors
    from bot.flow.context import AppContext
    from bot.web import create_app, create_operator_app, operator_address, operator_token, serve

    settings = _settings()
    logs.configure(settings.log_level)
    policy = _load(config_path(args.config), accounts=True)
    slack = SlackSettings.from_settings(settings)
    if slack.bot_token and not slack.signing_secret:
        raise CliError(
            "SLACK_BOT_TOKEN is set but SLACK_SIGNING_SECRET is not: web cannot verify Slack's requests"
            " to /slack/events (set it from the app's Basic Information page, or unset SLACK_BOT_TOKEN)"
        )
    try:
        connectors = build_connectors(policy, os.environ)
    except ConnectorSetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    engine = _engine(settings)
    schema = _require_schema(engine, migrate=args.migrate)
    ctx = AppContext(policy=policy, engine=engine)
    client = slack.client()
    routes = []
    if client is not None:
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
        raise CliError(str(error)) from None
    _startup_line(
        "web",
        engine=engine,
        schema=schema,
        policy=policy,
        slack="events over HTTP at /slack/events" if routes else "not configured",
        listen=f"{settings.host}:{settings.port}",
        operator=f"{operator[0]}:{operator[1]}" if operator else None,
    )
    public = create_app(ctx, connectors, extra_routes=routes, operator_token=token)
    # On Ctrl-C uvicorn shuts down gracefully, then re-raises the signal: that is a normal stop.
    with contextlib.suppress(KeyboardInterrupt):
        serve(
            public,
            settings.host,
            settings.port,
            operator=(create_operator_app(ctx), *operator) if operator else None,
        )
    engine.dispose()
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    """Erase one customer's posts and text everywhere (issue 11; bot.flow.retention.forget_author)."""
    from bot.flow.context import AppContext
    from bot.flow.retention import forget_author

    account, separator, author_id = str(args.author).partition(":")
    if not separator or not account or not author_id:
        raise CliError("--author must be ACCOUNT:AUTHOR_ID, e.g. shop:cust-7")
    policy = _load(config_path(args.config))
    settings = _settings()
    engine = _engine(settings, must_exist=True)
    _require_schema(engine, migrate=False)
    ctx = AppContext(policy=policy, engine=engine)
    with ctx.sessions() as session, session.begin():
        done = forget_author(session, account, author_id, ctx.clock.now())
    print(
        f"forgot {account}:{author_id}: {done.posts} posts blanked, {done.conversations} conversations "
        f"anonymised, {done.outbox} queued messages and {done.events} events cleared"
    )
    engine.dispose()
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from bot.slack.manifest import manifest, render

    try:
        document = manifest(args.name, socket_mode=args.request_url is None, request_url=args.request_url)
        print(render(document, args.format), end="")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from bot.config.starter import StarterError, write_starter

    try:
        written = write_starter(
            config=config_path(args.config),
            env_file=Path(args.env_output),
            team=args.team,
            channel=args.channel,
            timezone=args.timezone,
            connectors=args.connector,
            force=args.force,
            interactive=not args.yes and sys.stdin.isatty(),
        )
    except StarterError as error:
        raise CliError(str(error)) from None
    for path in written:
        print(f"wrote {path}")
    print("next: `replyclock check`, then `replyclock db upgrade` and `replyclock run`")
    return 0


class _VersionAction(argparse.Action):
    """`--version`, with the version looked up only when asked for (it scans the installed packages)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_args: object) -> None:
        print(f"replyclock {version()}")
        parser.exit()


CONFIG_HELP = "the policy file (default: $REPLYCLOCK_CONFIG, else ./replyclock.toml)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replyclock",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 ok, 1 failed, 2 configuration or usage error, 3 database error, 130 Ctrl-C.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        help="read settings from this file instead of ./.env (variables already set win)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    init = sub.add_parser("init", help="write a starter replyclock.toml and .env (asks, or takes flags)")
    init.add_argument("--config", help="where to write the policy file (default: ./replyclock.toml)")
    init.add_argument(
        "--env-output", default=".env", metavar="PATH", help="where to write the settings (default: ./.env)"
    )
    init.add_argument("--team", help="the first team's id, e.g. support")
    init.add_argument("--channel", help="its Slack channel, e.g. '#support'")
    init.add_argument("--timezone", help="its IANA time zone, e.g. Europe/Berlin")
    init.add_argument(
        "--connector",
        action="append",
        choices=("webhook", "mastodon", "feed", "x"),
        help="an account to add (repeatable; default: webhook)",
    )
    init.add_argument("--force", action="store_true", help="overwrite files that exist")
    init.add_argument("--yes", "-y", action="store_true", help="never ask: take flags and defaults")
    init.set_defaults(func=cmd_init)

    check = sub.add_parser("check", help="validate the policy file and the environment, print a summary")
    check.add_argument("--config", help=CONFIG_HELP)
    check.add_argument(
        "--no-secrets",
        action="store_true",
        help="skip the secrets connectors read from the environment (for CI without them)",
    )
    check.set_defaults(func=cmd_check)

    db = sub.add_parser("db", help="database commands")
    db_sub = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    up = db_sub.add_parser("upgrade", help="apply migrations to DATABASE_URL (creates a SQLite file)")
    up.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    up.set_defaults(func=cmd_db)

    run = sub.add_parser("run", help="run connectors, the sweep and the outbox sender (the worker)")
    run.add_argument("--config", help=CONFIG_HELP)
    run.add_argument(
        "--migrate", action="store_true", help="apply pending migrations first (always done on SQLite)"
    )
    run.set_defaults(func=cmd_run)

    web = sub.add_parser("web", help="serve HTTP: webhooks, Slack events, /healthz, /metrics (HOST, PORT)")
    web.add_argument("--config", help=CONFIG_HELP)
    web.add_argument("--migrate", action="store_true", help="apply pending migrations first")
    web.set_defaults(func=cmd_web)

    forget = sub.add_parser("forget", help="erase one customer's posts and text (GDPR), keeping figures")
    forget.add_argument(
        "--author",
        required=True,
        metavar="ACCOUNT:ID",
        help="the customer, as account:author id, e.g. shop:cust-7",
    )
    forget.add_argument("--config", help=CONFIG_HELP)
    forget.set_defaults(func=cmd_forget)

    man = sub.add_parser("manifest", help="print the Slack app manifest (paste it at api.slack.com/apps)")
    man.add_argument("--name", default="replyclock", help="the app's name in Slack (default: replyclock)")
    man.add_argument(
        "--request-url",
        metavar="URL",
        help="public base URL of `replyclock web` for HTTP mode, e.g. https://replyclock.example.com"
        " (/slack/events is appended); default: Socket Mode",
    )
    man.add_argument("--format", choices=("yaml", "json"), default="yaml", help="output format")
    man.set_defaults(func=cmd_manifest)

    schema = sub.add_parser(
        "schema", help="print the JSON Schema of replyclock.toml (for Taplo / Even Better TOML)"
    )
    schema.set_defaults(func=cmd_schema)

    deadline = sub.add_parser("deadline", help="when is a post due? (business time on a calendar)")
    deadline.add_argument("--config", help=CONFIG_HELP)
    deadline.add_argument("--calendar", required=True, help="a calendar id of the policy file")
    deadline.add_argument("--target", required=True, help="e.g. 8h, 1h30m, 2d")
    deadline.add_argument(
        "--at", action="append", help="start time, ISO 8601 (repeatable; default: stdin lines)"
    )
    deadline.set_defaults(func=cmd_deadline)

    digest = sub.add_parser("digest", help="a team's weekly digest: print it, post it, or write its chart")
    digest.add_argument("--config", help=CONFIG_HELP)
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
    demo.add_argument(
        "--keep",
        metavar="FILE",
        help="keep the demo's SQLite database in FILE (new) and its policy next to it (FILE with .toml)",
    )
    demo.add_argument(
        "--history-weeks",
        type=int,
        default=8,
        metavar="N",
        help="with --keep: also store N weeks of generated past conversations (default 8; 0: none)",
    )
    demo.set_defaults(func=cmd_demo)

    from bot.reports.simulate_command import register as register_simulate

    register_simulate(sub, load=_load, config_path=config_path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; expected failures end as one `error:` line and an exit code, not a traceback."""
    from sqlalchemy.exc import DBAPIError

    from bot.config.settings import SettingsError
    from bot.runlock import RunLockError
    from storage.migrate import MigrationError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        load_env_file(args.env_file)
        if args.command is None:
            parser.print_help()
            return 0
        status: int = args.func(args)
        return status
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.status
    except SettingsError as error:
        for problem in error.problems:
            print(f"error: environment: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except MigrationError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except RunLockError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except DBAPIError as error:
        from storage.db import database_url

        shown = _hide_password(os.environ.get("DATABASE_URL", "") or database_url())
        print(f"error: {database_problem(error, shown)}", file=sys.stderr)
        return EXIT_DATABASE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "DATABASE_URL"


if __name__ == "__main__":
    raise SystemExit(main())
