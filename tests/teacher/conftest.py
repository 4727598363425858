"""Fixtures of the teacher's tests: aiohttp mocked by aioresponses, for the client's own tests."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from yarl import URL


class _MockResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates the ``stream_writer`` argument aiohttp 3.14 requires
    (pnuckowski/aioresponses#289); it only reads the upload size, which a mock never has.
    """

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


_NEEDS_STREAM_WRITER = "stream_writer" in inspect.signature(aiohttp.ClientResponse).parameters


@pytest.fixture
def mocked(monkeypatch: pytest.MonkeyPatch) -> Iterator[aioresponses]:
    """aiohttp answering from a script: ``mocked.post(url, status=..., payload=...)``."""
    if _NEEDS_STREAM_WRITER:
        monkeypatch.setattr("aioresponses.core.ClientResponse", _MockResponse)
    with aioresponses() as m:
        yield m
