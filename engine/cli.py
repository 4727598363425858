"""Command line: ``python -m engine run|validate|plan CONFIG [--set section.key=value ...]``.

Exit codes: 0 done; 1 the run stopped on a fatal error (e.g. rejected credentials, or a full
or read-only disk: resumable once there is room);
2 bad configuration, seeds path or output directory, or the output directory in use by
another run (nothing was sent);
3 the run finished but some items failed (listed in failures.jsonl);
130/143 stopped by SIGINT/SIGTERM (resumable).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from engine import __version__
from engine.config import Config, TeacherConfig, load_config
from engine.embedded.resolve import resolve_offline
from engine.errors import ConfigError, FatalRunError, OutputWriteError
from engine.output import files, report
from engine.output.report import RunOutcome
from engine.pipeline.job import check_paths, probe_teacher, run_job
from engine.pipeline.stats import Stats
from engine.plan import DEFAULT_LATENCY_S, as_run, format_plan, make_plan
from engine.seeds import Reject, read_seeds
from engine.teacher import network

log = logging.getLogger("engine")

EXIT_OK, EXIT_FATAL, EXIT_CONFIG, EXIT_FAILED_ITEMS = 0, 1, 2, 3


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in ``argv`` (default: ``sys.argv[1:]``); return the exit code (module
    docstring). A refused configuration is printed to stderr as exit 2, never raised."""
    args = _parser().parse_args(argv)
    # validate and plan print their findings; their INFO logs would say it all a second time.
    quiet = args.command in ("validate", "plan")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config, args.set)
        if args.command == "validate":
            return _validate(config, probe=args.probe)
        if args.command == "plan":
            return _plan(config, args.latency, fresh=args.fresh)
        options = {
            "fresh": args.fresh,
            "force": args.force,
            "cache": not args.no_cache,
            "retry_failed": args.retry_failed,
            "preflight": not args.no_preflight,
        }
        return _run(config, options)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"engine {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "generate the datasets (resumes where the last run stopped)"),
        ("validate", "check the config and the seed file; send nothing (--probe: the teacher)"),
        ("plan", "count the requests and tokens a run would send, and its duration; send nothing"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("config", help="TOML config, e.g. config/default.toml")
        sub.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override a config key; VALUE is TOML (repeatable)",
        )
        sub.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        if name == "plan":
            _plan_arguments(sub)
        if name == "validate":
            sub.add_argument(
                "--probe",
                action="store_true",
                help="also check the teacher with the run's preflight (a handful of tiny "
                "requests), and send nothing else",
            )
        if name == "run":
            sub.add_argument(
                "--no-preflight",
                action="store_true",
                help="skip the check of the teacher before the first seed row",
            )
            sub.add_argument(
                "--fresh",
                action="store_true",
                help="start over: move the existing output directory aside (never deleted)",
            )
            sub.add_argument(
                "--force",
                action="store_true",
                help="resume even though the generation settings changed since the output began",
            )
            sub.add_argument(
                "--retry-failed",
                action="store_true",
                help="run again only the units with items in failures.jsonl",
            )
            sub.add_argument(
                "--no-cache",
                action="store_true",
                help="ask the teacher again even for requests it has answered before "
                "(the response cache is neither read nor written)",
            )
    return parser


def _plan_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--latency",
        type=_positive_seconds,
        default=DEFAULT_LATENCY_S,
        metavar="SECONDS",
        help=f"assumed mean time per request (default {DEFAULT_LATENCY_S:g})",
    )
    sub.add_argument(
        "--fresh",
        action="store_true",
        help="count the units already done in the output directory too",
    )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _plan(config: Config, latency_s: float, *, fresh: bool) -> int:
    config, note = as_run(config)
    if note:
        print(textwrap.fill(note, 96, subsequent_indent="  ") + "\n")
    print(format_plan(make_plan(config, fresh=fresh), config, latency_s))
    return EXIT_OK


def _run(config: Config, options: dict[str, bool]) -> int:
    stats = Stats()
    try:
        outcome = _outcome(config, stats, options)
    except ConfigError:
        raise  # refused before sending anything: the last run's report stays as it was
    except BaseException as err:  # a bug: still report what was done, then the traceback
        _report(
            config, stats, options, RunOutcome(EXIT_FATAL, "crashed", report.describe_crash(err))
        )
        raise
    return _report(config, stats, options, outcome)


def _outcome(config: Config, stats: Stats, options: dict[str, bool]) -> RunOutcome:
    """Run the job; say how it ended (logging what the user should do about it)."""
    interrupted, fatal = _run_job(config, stats, options)
    log.info("%s", stats.summary())
    if interrupted is not None:
        log.warning("interrupted: finished units are saved; run the same command to resume")
        name = signal.Signals(interrupted - 128).name
        return RunOutcome(
            interrupted, "interrupted", f"{name}: finished units are saved; resumable"
        )
    causes = _distinct(fatal)
    for cause in causes:
        log.error("run stopped: %s", cause)
    if causes and stats.failures:
        log.info("fix the cause and run the same command: it runs again what was lost too")
    elif causes:
        log.info("nothing was marked failed; fix the cause and run the same command to resume")
    if causes:
        return RunOutcome(EXIT_FATAL, "fatal", "; ".join(str(cause) for cause in causes))
    log.info("output in %s", config.output.dir)
    if stats.failures:
        failed = sum(stats.failures.values())
        log.warning("%d items failed: see %s", failed, config.output.dir / "failures.jsonl")
        return RunOutcome(EXIT_FAILED_ITEMS, "failed_items", f"{failed} items failed")
    return RunOutcome(EXIT_OK, "done", "every unit finished")


def _run_job(
    config: Config, stats: Stats, options: dict[str, bool]
) -> tuple[int | None, list[Exception]]:
    """Run the job: the exit code a signal asked for (or None), and the fatal errors that
    stopped it (a full or read-only disk among them, however it surfaced)."""
    try:
        return asyncio.run(run_job(config, stats, **options)), []
    except FatalRunError as err:
        return None, [err]
    except OSError as err:
        if (problem := _write_fault(config.output.dir, err)) is None:
            raise
        return None, [problem]
    except BaseExceptionGroup as group:
        return None, _fatal_leaves(group, config.output.dir)
    except KeyboardInterrupt:  # before the engine's own signal handling was in place
        return 128 + signal.SIGINT, []


def _report(config: Config, stats: Stats, options: dict[str, bool], outcome: RunOutcome) -> int:
    """Write run_report.json and print its summary; return the run's exit code. A report that
    cannot be written is logged; when the disk is full or read-only (``OutputWriteError``) a
    run that ended well exits 1 all the same, since its output directory needs room."""
    content = report.build(config, stats, outcome, options)
    code = outcome.exit_code
    try:
        report.write(config.output.dir, content)
    except OutputWriteError as err:
        log.error("run stopped: %s", err)
        if code in (EXIT_OK, EXIT_FAILED_ITEMS):
            code = EXIT_FATAL
    except OSError as err:
        log.error("could not write %s: %s", report.REPORT_FILE, err)
    print(report.summary(content), flush=True)
    return code


def _distinct(errors: list[Exception]) -> list[Exception]:
    """One of each cause, in order: every worker that met the same fault raised it."""
    first: dict[tuple[type[Exception], str], Exception] = {}
    for err in errors:
        first.setdefault((type(err), str(err)), err)
    return list(first.values())


def _fatal_leaves(group: BaseExceptionGroup[BaseException], out_dir: Path) -> list[Exception]:
    """The FatalRunErrors inside ``group`` (a full or read-only disk among them, however it
    surfaced: ``_write_fault``); anything else is a bug and is re-raised."""

    def fatal(err: BaseException) -> bool:
        return isinstance(err, FatalRunError) or (
            isinstance(err, OSError) and _write_fault(out_dir, err) is not None
        )

    matched, rest = group.split(fatal)
    if rest is not None or matched is None:
        raise group
    leaves: list[Exception] = []
    for err in matched.exceptions:
        if isinstance(err, BaseExceptionGroup):
            leaves.extend(_fatal_leaves(err, out_dir))
        elif isinstance(err, OSError):
            leaves.append(_write_fault(out_dir, err) or err)
        elif isinstance(err, Exception):
            leaves.append(err)
    return leaves


def _write_fault(out_dir: Path, err: OSError) -> OutputWriteError | None:
    """A full disk, an exceeded quota or a read-only file system that no narrower handler
    translated: the run's ``OutputWriteError`` all the same, naming the file when the error
    does (else the output directory)."""
    where = Path(err.filename) if isinstance(err.filename, str) else out_dir
    return files.write_problem(where, err)


def _routes(teacher: TeacherConfig) -> str:
    """Each endpoint and the proxy it goes through; ``ConfigError`` for an unusable proxy or
    certificate setting, as the run would meet it."""
    proxies = network.proxies_for(teacher.urls)
    if any(url.startswith("https:") for url in teacher.urls) and (
        problems := network.cert_env_problems()
    ):
        raise ConfigError(problems)
    routes = []
    for url in teacher.urls:
        proxy = proxies.get(url)
        via = "" if proxy is None else f" via proxy {proxy.public} ({proxy.variable})"
        routes.append(report.public_url(url) + via)
    return ", ".join(routes)


def _validate(config: Config, *, probe: bool = False) -> int:
    check_paths(config)
    teacher = config.teacher
    # A missing extra is found now, not when the run starts.
    if resolve_offline(config, require_installed=True).embedded:
        print("teacher: none set: the embedded demo teacher (a tiny local model) would run")
    else:
        if probe:
            print(f"teacher: {teacher.model} at {_routes(teacher)}")
        else:
            print(f"teacher: {teacher.model} at {_routes(teacher)} (not contacted)")
            print("  (validate --probe checks it with the run's preflight: a few tiny requests)")
    good = rejected = 0
    for item in read_seeds(config.input.seeds, config.input.max_document_chars):
        if isinstance(item, Reject):
            rejected += 1
            print(f"line {item.line_no}: {item.reason}")
        else:
            good += 1
    print(f"config OK; {config.input.seeds}: {good} valid rows, {rejected} rejected")
    return _probe(config) if probe else EXIT_OK


def _probe(config: Config) -> int:
    """``validate --probe``: the preflight alone; what it found, or the one line to fix."""
    stats = Stats()
    try:
        findings = asyncio.run(probe_teacher(config, stats))
    except FatalRunError as err:
        print(f"teacher check failed ({stats.teacher.preflight_requests} requests): {err}")
        return EXIT_FATAL
    print(
        f"teacher OK ({stats.teacher.preflight_requests} requests): "
        + "; ".join(findings.summary())
    )
    return EXIT_OK
