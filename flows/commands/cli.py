"""``yalm-forecast``: the pipeline's command line. Thin: parse, one library call, report.

Every command takes ``--config FILE`` (else ``$YALM_FORECAST_CONFIG``, else
``./yalm-forecast.yaml``). Results go to stdout (``--format table|json|csv``), summaries and
errors to stderr. Library errors print as one line and exit 1; ``--verbose`` adds the traceback.
Commands are entries in ``COMMANDS``; a later module adds its own with ``register``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from flows import __version__
from flows.commands.demo import DEMO_DIR
from flows.commands.output import FORMATS, write_rows
from flows.config import ENV_VAR, PipelineConfig, load_config, resolve_config_path
from flows.errors import PipelineError

EXIT_OK, EXIT_ERROR, EXIT_SOME_FEEDS_FAILED = 0, 1, 3
EXIT_SOME_FAILED = EXIT_SOME_FEEDS_FAILED  # a run in which some feeds or prompts failed
# Rows `news` and `results` print unless --limit says otherwise: a year of forecasts is 100k
# rows (hundreds of MB as a table); --limit 0 still prints them all.
DEFAULT_LIMIT = 100


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    example: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    COMMANDS[command.name] = command
    return command


def _common_options() -> argparse.ArgumentParser:
    # SUPPRESS so a flag given before the command is not reset by the command's own default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
        help=f"config file [env {ENV_VAR}; default ./yalm-forecast.yaml]",
    )  # fmt: skip
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
        help="show tracebacks and progress logs",
    )  # fmt: skip
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="yalm-forecast",
        description="News feeds in, templated prompts out, forecasts in a SQLite store.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        sub = subcommands.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            epilog=f"example: {command.example}",
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.configure(sub)
        sub.set_defaults(handler=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.handler(args)
    except (PipelineError, _runner_errors()) as exc:
        if verbose:
            traceback.print_exc(file=sys.stderr)
        print(f"yalm-forecast: error: {exc}", file=sys.stderr)
        from flows.commands.console import to_log_file

        to_log_file(f"yalm-forecast: error: {exc}", exc)  # where a command attached one
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", 2)
        print("yalm-forecast: interrupted", file=sys.stderr)
        return 128 + signum


def _runner_errors() -> type[Exception]:
    from yalm_runner.errors import YalmError

    return YalmError


# ---- helpers shared by commands ------------------------------------------------------------


def config_path(args: argparse.Namespace) -> Path:
    return resolve_config_path(getattr(args, "config", None))


def load(args: argparse.Namespace) -> PipelineConfig:
    return load_config(config_path(args))


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """``24h``, ``7d``, ``30m``, or an ISO date/time (UTC unless it says otherwise)."""
    now = now or datetime.now(timezone.utc)
    relative = re.fullmatch(r"(\d+)\s*([mhd])", text.strip())
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        return now - timedelta(**{{"m": "minutes", "h": "hours", "d": "days"}[unit]: amount})
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected 24h, 7d, 30m or an ISO date like 2024-05-01"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def cut_to_limit(rows: list, limit: int, what: str) -> list:
    """The first ``limit`` rows (0: all); says on stderr when more matched (``limit + 1`` were
    read to know)."""
    if limit and len(rows) > limit:
        print(
            f"showing the newest {limit} {what}; more match (--limit N for N, --limit 0 for all)",
            file=sys.stderr,
        )
        return rows[:limit]
    return rows


def non_negative(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 0")
    return int(text)


def add_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f", "--format", choices=FORMATS, default="table", help="output format (default table)"
    )


# ---- commands --------------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    from flows.config import write_starter_config

    path = write_starter_config(config_path(args))
    print(path)
    print(
        f"wrote a starter config to {path}; edit it, then run `yalm-forecast ingest`",
        file=sys.stderr,
    )
    return EXIT_OK


def _ingest(args: argparse.Namespace) -> int:
    from flows.sources.ingest import ingest_feeds
    from flows.store.database import open_store

    config = load(args)
    with open_store(config.database_url) as store:
        report = ingest_feeds(config, store, only=args.feed)
    columns = ("feed", "status", "http_status", "items_seen", "items_new", "reason")
    write_rows(report.rows(), columns, args.format, sys.stdout)
    new = sum(feed.items_new for feed in report.feeds)
    print(
        f"ingest run {report.run_id}: {len(report.feeds)} feeds, {new} new items, "
        f"{len(report.failed)} failed, {len(report.partial)} partial",
        file=sys.stderr,
    )
    if report.pruned is not None:
        print(
            f"retention: pruned {report.pruned.items} news items published before "
            f"{report.pruned.older_than:%Y-%m-%d %H:%M}Z "
            f"({report.pruned.bytes_freed / 1e6:.1f} MB freed)",
            file=sys.stderr,
        )
    # A partial feed stored less than it holds (malformed XML, text in an unknown encoding).
    return EXIT_SOME_FEEDS_FAILED if report.failed or report.partial else EXIT_OK


def _render(args: argparse.Namespace) -> int:
    from flows.generation.model import resolve_tokenizer_path
    from flows.prompting.rendering import outcome_rows, render_run
    from flows.store.database import open_store
    from yalm_runner.tokenizer import Tokenizer

    config = load(args)
    tokenizer = Tokenizer(resolve_tokenizer_path(config))
    with open_store(config.database_url) as store:
        outcomes = render_run(
            config, store, count_tokens=lambda text: len(tokenizer.encode(text)), as_of=args.as_of
        )
    columns = ("template", "ticker", "status", "token_count", "items_used", "items_dropped")
    write_rows(outcome_rows(outcomes), (*columns, "prompt_key"), args.format, sys.stdout)
    return EXIT_OK


def _news(args: argparse.Namespace) -> int:
    from flows.store.database import list_news, open_store

    config = load(args)
    with open_store(config.database_url) as store:
        rows = list_news(
            store,
            since=args.since,
            source=args.source,
            ticker=args.ticker,
            limit=args.limit + 1 if args.limit else None,
        )
    columns = ("published_at", "source", "tickers", "title", "summary", "link")
    if args.format != "table":  # a link-only item shows as an empty title in the table
        columns += ("has_text", "text_status")
    write_rows(cut_to_limit(rows, args.limit, "news items"), columns, args.format, sys.stdout)
    return EXIT_OK


def _results(args: argparse.Namespace) -> int:
    from flows.store.robot import COLUMNS, read_forecasts

    config = _config_to_read(args)
    forecasts = read_forecasts(
        config.database_url,
        since=args.since,
        ticker=args.ticker,
        template=args.template,
        limit=args.limit + 1 if args.limit else None,
    )
    forecasts = cut_to_limit(forecasts, args.limit, "forecasts")
    signals = _signals_by_prompt(config.database_url, forecasts)
    rows = [
        {**vars(forecast), "signal": signals.get(forecast.prompt_key)} for forecast in forecasts
    ]
    if args.format == "table":
        columns = ("generated_at", "ticker", "template", "signal", "forecast")
        for row in rows:
            row["signal"] = " ".join(f"{k} {v:.2f}" for k, v in (row["signal"] or {}).items())
    elif args.format == "csv":
        columns = (*COLUMNS, "signal")
        for row in rows:
            row["signal"] = json.dumps(row["signal"]) if row["signal"] else ""
    else:
        columns = (*COLUMNS, "signal")
    write_rows(rows, columns, args.format, sys.stdout)
    return EXIT_OK


def _config_to_read(args: argparse.Namespace) -> PipelineConfig:
    """The config ``results`` and ``signals`` read: the chosen one, or, when none was named with
    ``--config`` and the chosen one's SQLite database does not exist yet, the demo's beside it
    (the quickstart in a folder with someone's own config); stderr says which database."""
    from flows.commands.demo import demo_beside

    config = load(args)
    if getattr(args, "config", None) or not _missing_database(config):
        return config
    demo_path = demo_beside(Path.cwd())
    if demo_path is None:
        return config
    demo = load_config(demo_path)
    if _missing_database(demo):
        return config
    print(
        f"yalm-forecast: showing the demo's database {demo.database_path} ({demo_path}): "
        f"{config.database_path}, the database of {config_path(args).resolve()}, "
        "does not exist yet",
        file=sys.stderr,
    )
    return demo


def _missing_database(config: PipelineConfig) -> bool:
    """A SQLite database not created yet (a PostgreSQL one is never taken for missing)."""
    return config.database_url.startswith("sqlite:///") and not config.database_path.exists()


def _signals_by_prompt(database_url: str, forecasts) -> dict[str, dict[str, float]]:
    """Each forecast's signal (label -> calibrated probability), by prompt key."""
    from flows.store.robot import connect_readonly, read_signals

    if not forecasts:
        return {}
    connection = connect_readonly(database_url)
    try:
        return {
            forecast.prompt_key: {
                signal.label: signal.probability
                for signal in read_signals(connection, prompt_key=forecast.prompt_key)
            }
            for forecast in forecasts
        }
    finally:
        connection.close()


def _signals(args: argparse.Namespace) -> int:
    from flows.store.robot import SIGNAL_COLUMNS, read_signals

    config = _config_to_read(args)
    signals = read_signals(
        config.database_url, since=args.since, ticker=args.ticker, template=args.template,
        limit=args.limit,
    )  # fmt: skip
    rows = [vars(signal) for signal in signals]
    columns = SIGNAL_COLUMNS
    if args.format == "table":
        columns = ("scored_at", "ticker", "template", "label", "probability", "raw_probability",
                   "content_free_probability")  # fmt: skip
        rows = [{**row, **{name: f"{row[name]:.3f}" for name in columns[4:]}} for row in rows]
    write_rows(rows, columns, args.format, sys.stdout)
    return EXIT_OK


def _start_prefect(config: PipelineConfig | None = None, verbose: bool = False):
    """The flow module, with Prefect set up for a command; logging too when ``config`` is given
    (stderr and the log file)."""
    from flows.commands.console import configure_logging

    if config is not None:
        configure_logging(config.log_file, verbose=verbose)
    _prefect_defaults()
    temporary = not _prefect_server_configured()
    if temporary:  # Prefect will start a temporary server of its own
        from flows.commands.serverguard import guard_temporary_servers

        guard_temporary_servers(config.log_file if config is not None else None)
    from flows import pipeline

    if temporary:
        # Prefect stops its temporary server at exit with a line of its own, after the
        # command's last line: the last word on stderr must stay ours (what a cron wrapper
        # shows). The line goes; the stop does not (the guard's log line remains for a kill).
        logging.getLogger("prefect").addFilter(_not_the_servers_goodbye)
    return pipeline


def _not_the_servers_goodbye(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Stopping temporary server")


def _prefect_defaults() -> None:
    """Prefect's settings for this process, unless set otherwise: read when Prefect is first
    imported, so set before anything imports it."""
    # The pipeline's own log lines also go to the Prefect UI with each run.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "flows")
    # Offline by default: no usage reports from a temporary server (set it to true to allow).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # Two retries (after 2 s, then 4 s), not five with a doubling back-off (a minute a call):
    # a busy server's 503 is still retried, and one that went away costs the night seconds
    # before it goes on without it (flows.prefect_link).
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "2")
    # A temporary server has 120 s to answer, not Prefect's 20: on a host that is busy (another
    # shard loading its weights, a night's ingest) its database and web app can take longer, and
    # a command that gives up on it has done nothing (generate-shard).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _run_flow(config_file: Path, as_of: str | None, verbose: bool) -> int:
    """The preflight, then one night: in this process, or as a Prefect flow run when a Prefect
    server is configured. Ends with one line on stderr when the night is not ``done``, or when
    its Prefect server stopped answering (docs/night.md)."""
    from flows.commands.console import configure_logging
    from flows.night.preflight import preflight
    from flows.night.summaries import Outcome

    report = preflight(config_file)  # refuses the night before anything is fetched or written
    configure_logging(report.config.log_file, verbose=verbose)
    for failure in report.template_failures:
        logging.getLogger("flows.preflight").error("preflight: %s", failure.line())
    path = str(config_file.resolve())
    lost = None
    _prefect_defaults()
    if _prefect_server_configured():
        summary, lost = _night_as_flow_run(path, as_of)
    else:
        summary = _night_here(path, as_of)
    sys.stdout.write(summary.markdown)
    if summary.outcome is not Outcome.DONE:
        print(f"yalm-forecast: {summary.outcome.word}: {summary.cause()}", file=sys.stderr)
    elif lost is not None:
        print(
            f"yalm-forecast: done; the Prefect server stopped answering {lost}, so its record "
            "of this night is incomplete: runs_v1 has all of it",
            file=sys.stderr,
        )
    return summary.exit_code


def _night_as_flow_run(config_path: str, as_of: str | None):
    """The night as a flow run on the configured Prefect server, and why that server was lost
    (None: it answered throughout). The server is a view of the night, not a condition of it:
    one that stops answering is gone on without (``flows.prefect_link``), one that does not
    answer before the night starts has the night run here instead."""
    pipeline = _start_prefect()
    from flows.night.runner import one_line
    from flows.prefect_link import prefect_unreachable, quiet_after_loss, server_link

    log = logging.getLogger("flows.pipeline")
    with server_link() as link:
        try:
            state = pipeline.news_to_forecast(config_path=config_path, as_of=as_of,
                                              return_state=True)  # fmt: skip
        except Exception as exc:
            if not prefect_unreachable(exc):
                raise
            if link.summary is None:  # the server never let the night begin
                log.warning(
                    "the Prefect server does not answer (%s); running the night in this "
                    "process without it",
                    one_line(exc),
                )
                quiet_after_loss()
                return _night_here(config_path, as_of), "before the night began"
            link.lose(exc, "the end of the night")  # it ended; Prefect could not record that
    if link.lost is not None:
        quiet_after_loss()
        if link.summary is not None:
            return link.summary, link.lost
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, BaseException):  # the flow itself crashed: not one of ours
        raise summary
    return summary, None


def _night_here(config_path: str, as_of: str | None):
    """The night in this process, without Prefect: no temporary server to wait for or to lose
    to a Ctrl-C; the first signal stops the night (recorded), a second exits at once."""
    from flows.night.runner import publish_summary, run_night, signals_interrupt

    def again(signum: int) -> None:
        print("yalm-forecast: interrupted again: exiting now", file=sys.stderr)

    moment = datetime.fromisoformat(as_of.replace("Z", "+00:00")) if as_of else None
    with signals_interrupt(on_second=again):
        summary = run_night(config_path, moment)
        try:
            publish_summary(config_path, summary)
        except PipelineError as exc:  # the forecasts are stored; the table is a copy
            logging.getLogger("flows.pipeline").error("publish failed: %s", exc, exc_info=exc)
    return summary


def _prefect_server_configured() -> bool:
    """A Prefect server to report to: ``PREFECT_API_URL``, in the environment or a profile.
    Prefect's settings are read (and checked) here, before any flow runs."""
    import pydantic

    try:
        from prefect.settings import get_current_settings

        settings = get_current_settings()
    except pydantic.ValidationError as exc:
        raise PipelineError(_bad_prefect_setting(exc)) from exc
    return bool(os.environ.get("PREFECT_API_URL") or settings.api.url)


def _bad_prefect_setting(exc) -> str:
    """One line for a Prefect setting its own validation refused, named as it is set (the
    environment variable), instead of pydantic's traceback from deep inside a flow run."""
    import importlib
    import pkgutil

    import prefect.settings.models as models

    error = exc.errors()[0]
    field = "_".join(str(part) for part in error["loc"])
    name = f"{exc.title}.{field}"
    for info in pkgutil.walk_packages(models.__path__, f"{models.__name__}."):
        owner = getattr(importlib.import_module(info.name), exc.title, None)
        prefix = getattr(owner, "model_config", {}).get("env_prefix")
        if prefix:
            name = f"{prefix}{field}".upper()
            break
    return f"Prefect setting {name}={error.get('input')!r}: {error['msg']}"


def _run(args: argparse.Namespace) -> int:
    as_of = args.as_of.isoformat() if args.as_of else None
    return _run_flow(config_path(args), as_of, getattr(args, "verbose", False))


def _generate_shard(args: argparse.Namespace) -> int:
    path = config_path(args)
    config = load_config(path)
    pipeline = _start_prefect(config, getattr(args, "verbose", False))
    index, count = args.shard
    try:
        report = pipeline.generate_shard(
            config_path=str(path.resolve()), shard_index=index, shard_count=count, keys=args.key
        )
    except RuntimeError as exc:
        if not _temporary_server_did_not_start(exc):
            raise
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as wait

        raise PipelineError(
            f"generate-shard: Prefect's temporary server did not answer within {wait.value():g} s "
            "of starting, so the shard did not start and nothing was claimed: run it again, "
            "allow longer (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS) or set "
            "PREFECT_API_URL to a running server"
        ) from exc
    print(
        f"shard {index}/{count} ({report.worker_id}): {report.generated} forecasts stored, "
        f"{len(report.failures)} failed, {report.resumed} resumed, "
        f"{report.held} held by other workers; {report.signals} signals stored",
        file=sys.stderr,
    )
    return EXIT_SOME_FAILED if report.failures else EXIT_OK


def _temporary_server_did_not_start(exc: BaseException) -> bool:
    """Prefect's own words when the temporary server it started never answered its health
    check (``SubprocessASGIServer.start``): before any flow run, so nothing has happened."""
    return "attempting to connect to ephemeral Prefect API server" in str(exc)


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N``: shard I (from 0) of N."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 0 <= I < N, like 0/2")
    return int(match.group(1)), int(match.group(2))


def _configure_generate_shard(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shard", type=parse_shard, default=(0, 1), metavar="I/N",
        help="shard I (from 0) of N: the pending prompts whose key falls in it (default 0/1: all)",
    )  # fmt: skip
    parser.add_argument(
        "--key", action="append", metavar="KEY",
        help="exactly these prompts instead (repeatable); --shard then only names the worker",
    )  # fmt: skip


def _serve(args: argparse.Namespace) -> int:
    path = config_path(args)
    config = load_config(path)
    _start_prefect(config, getattr(args, "verbose", False)).serve(str(path.resolve()))
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from flows.commands.console import configure_logging
    from flows.commands.demo import DEMO_AS_OF, prepare_demo

    configure_logging(None, verbose=getattr(args, "verbose", False))
    setup = prepare_demo(Path(args.dir), Path.cwd())
    config = load_config(setup.config_path)
    code = _run_flow(setup.config_path, DEMO_AS_OF, getattr(args, "verbose", False))
    flag = "" if setup.config_written else f" --config {setup.config_path}"
    print(
        f"\nThe demo's forecasts are in {setup.database.resolve()} (view forecasts_v1).\n"
        f"The model is tiny and random: the text is noise, the pipeline around it is real.\n"
        f"  yalm-forecast results{flag}                 # the forecasts, newest first\n"
        f"  yalm-forecast results{flag} --format json   # with provenance\n"
        f"  yalm-forecast signals{flag}                 # each answer's calibrated probability\n"
        f"  sqlite3 'file:{setup.database.resolve()}?mode=ro' "
        f"'SELECT ticker, template, forecast FROM forecasts_v1'\n"
        f"  sqlite3 'file:{setup.database.resolve()}?mode=ro' "
        f"'SELECT ticker, template, label, probability FROM signals_v1'\n"
        f"Config: {setup.config_path}; log: {config.log_file}",
    )
    return code


def _check(args: argparse.Namespace) -> int:
    from flows.night.preflight import preflight

    report = preflight(config_path(args))
    for line in report.lines():
        print(line)
    if report.template_failures:
        failure = report.template_failures[0]
        more = len(report.template_failures) - 1
        print(f"yalm-forecast: error: {failure.line()}" + (f" (and {more} more)" if more else ""),
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    return EXIT_OK


def _configure_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--as-of", type=parse_since, default=None, metavar="TIME",
        help="render as if it were this time (ISO, UTC unless stated; default now)",
    )  # fmt: skip


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", default=DEMO_DIR, metavar="DIR",
        help=f"where the demo keeps its model, database and log (default ./{DEMO_DIR})",
    )  # fmt: skip


def _configure_ingest(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--feed", action="append", metavar="NAME", help="only this feed (repeatable)"
    )
    add_format(parser)


def _configure_render(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--as-of", type=parse_since, default=None, metavar="TIME",
        help="render as if it were this time (ISO, UTC unless stated; default now)",
    )  # fmt: skip
    add_format(parser)


def _configure_filters(parser: argparse.ArgumentParser, *extra: str) -> None:
    parser.add_argument(
        "--since", type=parse_since, metavar="WHEN", help="24h, 7d, 30m or an ISO date/time"
    )
    parser.add_argument("--ticker", metavar="TICKER", help="only this ticker, e.g. SBER")
    for name in extra:
        parser.add_argument(f"--{name}", metavar=name.upper(), help=f"only this {name}")
    parser.add_argument(
        "--limit", type=non_negative, default=DEFAULT_LIMIT, metavar="N",
        help=f"at most N rows, newest first (default {DEFAULT_LIMIT}; 0 = all)",
    )  # fmt: skip
    add_format(parser)


register(Command(
    "init", "Write a commented starter config (never overwrites an existing file).",
    "yalm-forecast init --config ~/forecast/yalm-forecast.yaml", lambda parser: None, _init,
))  # fmt: skip
register(Command(
    "ingest", "Fetch every enabled feed now and store the new items (exit 3 if some failed).",
    "yalm-forecast ingest --feed interfax --format json", _configure_ingest, _ingest,
))  # fmt: skip
register(Command(
    "render", "Render the configured templates over stored news into pending prompts.",
    "yalm-forecast render --as-of 2024-05-01T03:00Z", _configure_render, _render,
))  # fmt: skip
register(Command(
    "news", "List stored news items, newest first.",
    "yalm-forecast news --since 24h --source interfax --format csv",
    lambda parser: _configure_filters(parser, "source"), _news,
))  # fmt: skip
register(Command(
    "results", "List finished forecasts from the robot's view forecasts_v1, newest first.",
    "yalm-forecast results --since 2024-05-01 --ticker SBER --format json",
    lambda parser: _configure_filters(parser, "template"), _results,
))  # fmt: skip
register(Command(
    "signals", "List the calibrated answer probabilities from the robot's view signals_v1.",
    "yalm-forecast signals --ticker SBER --since 24h --format csv",
    lambda parser: _configure_filters(parser, "template"), _signals,
))  # fmt: skip

register(Command(
    "check", "Run the preflight alone: config, model, tokenizer, device, memory plan, templates.",
    "yalm-forecast check --config ~/forecast/yalm-forecast.yaml", lambda parser: None, _check,
))  # fmt: skip
register(Command(
    "run", "Run the whole news-to-forecast night once now (exit codes: docs/night.md).",
    "yalm-forecast run --config ~/forecast/yalm-forecast.yaml", _configure_run, _run,
))  # fmt: skip
register(Command(
    "generate-shard",
    "Run the generate-shard flow once: claim and generate one shard of the pending prompts.",
    "yalm-forecast generate-shard --config ~/forecast/yalm-forecast.yaml --shard 0/2",
    _configure_generate_shard, _generate_shard,
))  # fmt: skip
register(Command(
    "serve", "Serve the flow on the config's nightly cron schedule and time zone (blocks).",
    "yalm-forecast serve --config ~/forecast/yalm-forecast.yaml", lambda parser: None, _serve,
))  # fmt: skip
register(Command(
    "demo", "Run the whole pipeline offline: tiny model, bundled sample feeds, local SQLite.",
    "yalm-forecast demo && yalm-forecast results", _configure_demo, _demo,
))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
