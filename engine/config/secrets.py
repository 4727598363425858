"""The safety net that keeps the API key out of free text: error excerpts and report reasons.

The engine never puts the key into a message, a log line or a file; the one way it could get
there is text from elsewhere, such as a gateway that echoes the Authorization header in an
error body. ``redact`` removes it from such text. It is applied to free-text values only,
never to field names or paths, so it cannot change the shape of what it is applied to.

A key shorter than ``MIN_SECRET_CHARS`` is a placeholder for a local server (``x``,
``EMPTY``, ``token``): it guards nothing, and as a substring it matches ordinary words, so
removing it would only garble the text. It is left alone.
"""

from __future__ import annotations

MIN_SECRET_CHARS = 8
REDACTED = "[redacted]"


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced by ``[redacted]``; unchanged when
    ``secret`` is None or shorter than ``MIN_SECRET_CHARS``."""
    if secret is None or len(secret) < MIN_SECRET_CHARS:
        return text
    return text.replace(secret, REDACTED)
