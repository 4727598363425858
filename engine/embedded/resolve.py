"""Which teacher a run talks to: the configured endpoint, or, when none is set, the embedded
demo teacher (``engine.embedded.demo``).

``resolve_teacher`` is the one place that decides, for every command that sends: it yields the
config to run with, and for the demo starts the local server for the block and stops it after.
``resolve_offline`` decides the same without starting anything, for the commands that send
nothing (``plan``, ``validate``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from engine.config import Config
from engine.embedded.demo import check_installed, demo_config, embedded_teacher
from engine.embedded.server import READY_TIMEOUT_S

# Where the embedded server would listen is decided when it starts; an offline resolution
# needs none.
EMBEDDED_PLACEHOLDER_URL = "http://127.0.0.1/v1"


@dataclass(frozen=True, slots=True)
class Resolved:
    """The teacher a run would use, decided without starting it."""

    config: Config  # the config to run with
    embedded: bool  # the embedded demo teacher's config, at EMBEDDED_PLACEHOLDER_URL
    # What the demo scales down, e.g. "limits.max_concurrency 50 -> 1"; () for an endpoint.
    changes: tuple[str, ...] = ()


def resolve_offline(config: Config, *, require_installed: bool = False) -> Resolved:
    """The teacher ``config`` runs with, without starting anything: ``config`` itself when it
    names an endpoint, else the demo's config (``demo_config``) at a placeholder URL.

    ``require_installed``: for the demo, also check that what it needs is installed, as
    ``resolve_teacher`` does before starting it (``ConfigError`` with the install command).
    """
    if config.teacher.mode != "embedded":
        return Resolved(config, embedded=False)
    if require_installed:
        check_installed()
    demo, changes = demo_config(config, EMBEDDED_PLACEHOLDER_URL)
    return Resolved(demo, embedded=True, changes=tuple(changes))


@asynccontextmanager
async def resolve_teacher(
    config: Config, *, ready_timeout_s: float = READY_TIMEOUT_S
) -> AsyncIterator[Config]:
    """Yield the config to run with: ``config`` itself when it names an endpoint (nothing is
    started); else the demo's config (mode "http", so that the manifest records the settings
    actually used), with the embedded server running for the block and stopped after it,
    however the block ends.

    Raises ``ConfigError`` when the demo is needed but not installed (nothing was started) and
    ``EmbeddedTeacherError`` when its server does not answer within ``ready_timeout_s``
    seconds.
    """
    if config.teacher.mode != "embedded":
        yield config
        return
    async with embedded_teacher(config, ready_timeout_s=ready_timeout_s) as served:
        yield served
