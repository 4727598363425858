"""Command line: ``python -m engine run|validate CONFIG [--set section.key=value ...]``.

Exit codes: 0 done; 1 the run stopped on a fatal error (e.g. rejected credentials);
2 bad configuration, seeds path or output directory (nothing was sent);
3 the run finished but some items failed (listed in failures.jsonl);
130/143 stopped by SIGINT/SIGTERM (resumable).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from engine import __version__
from engine.config import Config, load_config
from engine.errors import ConfigError, FatalRunError
from engine.job import check_paths, run_job
from engine.seeds import Reject, read_seeds
from engine.stats import Stats

log = logging.getLogger("engine")

EXIT_OK, EXIT_FATAL, EXIT_CONFIG, EXIT_FAILED_ITEMS = 0, 1, 2, 3


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config, args.set)
        if args.command == "validate":
            return _validate(config)
        options = {
            "fresh": args.fresh,
            "force": args.force,
            "cache": not args.no_cache,
            "retry_failed": args.retry_failed,
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
        ("validate", "check the config and the seed file; send nothing"),
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
        if name == "run":
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


def _run(config: Config, options: dict[str, bool]) -> int:
    stats = Stats()
    fatal: list[Exception] = []
    interrupted: int | None = None
    try:
        interrupted = asyncio.run(run_job(config, stats, **options))
    except FatalRunError as err:
        fatal.append(err)
    except BaseExceptionGroup as group:
        fatal.extend(_fatal_leaves(group))
    except KeyboardInterrupt:  # before the engine's own signal handling was in place
        interrupted = 128 + signal.SIGINT
    log.info("%s", stats.summary())
    if interrupted is not None:
        log.warning("interrupted: finished units are saved; run the same command to resume")
        return interrupted
    for cause in fatal:
        log.error("run stopped: %s", cause)
    if fatal:
        log.info("nothing was marked failed; fix the cause and run the same command to resume")
        return EXIT_FATAL
    log.info("output in %s", config.output.dir)
    if stats.failures:
        failed = sum(stats.failures.values())
        log.warning("%d items failed: see %s", failed, config.output.dir / "failures.jsonl")
        return EXIT_FAILED_ITEMS
    return EXIT_OK


def _fatal_leaves(group: BaseExceptionGroup[BaseException]) -> list[Exception]:
    """The FatalRunErrors inside ``group``; anything else is a bug and is re-raised."""
    matched, rest = group.split(FatalRunError)
    if rest is not None or matched is None:
        raise group
    leaves: list[Exception] = []
    for err in matched.exceptions:
        if isinstance(err, BaseExceptionGroup):
            leaves.extend(_fatal_leaves(err))
        elif isinstance(err, Exception):
            leaves.append(err)
    return leaves


def _validate(config: Config) -> int:
    check_paths(config)
    good = rejected = 0
    for item in read_seeds(config.input.seeds, config.input.max_document_chars):
        if isinstance(item, Reject):
            rejected += 1
            print(f"line {item.line_no}: {item.reason}")
        else:
            good += 1
    print(f"config OK; {config.input.seeds}: {good} valid rows, {rejected} rejected")
    return EXIT_OK
