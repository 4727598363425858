"""The safety net that keeps the API key out of free text: error excerpts and report reasons.

The engine never puts the key into a message, a log line or a file; the one way it could get
there is text from elsewhere, such as a gateway that echoes the Authorization header in an
error body. ``redact`` removes it from such text. It is applied to free-text values only,
never to field names or paths, so it cannot change the shape of what it is applied to.

An echoed key is rarely verbatim: a JSON error body escapes its ``"``, ``\\`` and ``/``
(``\\"``, ``\\\\``, ``\\/``; Go writes ``<``, ``>`` and ``&`` as ``\\u003c``...), a body quoted
inside another JSON string escapes it twice, a URL percent-encodes it and an HTML page writes
entities. So every character of the key also matches each encoding of it, and a key written
in any of them, or in a mix, is taken out whole. (The configuration only admits printable
ASCII keys, so these are all the forms there are.)

A key shorter than ``MIN_SECRET_CHARS`` is a placeholder for a local server (``x``,
``EMPTY``, ``token``): it guards nothing, and as a substring it matches ordinary words, so
removing it would only garble the text. It is left alone.
"""

from __future__ import annotations

import re
from functools import lru_cache

MIN_SECRET_CHARS = 8
REDACTED = "[redacted]"

# Characters a JSON encoder writes after a backslash, and HTML's named entities.
_JSON_BACKSLASHED = frozenset('"\\/')
_HTML_NAMES = {'"': "quot", "&": "amp", "<": "lt", ">": "gt", "'": "apos"}


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret``, verbatim or encoded (JSON string escapes,
    nested ones included, percent-encoding, HTML entities), replaced by ``[redacted]``;
    unchanged when ``secret`` is None or shorter than ``MIN_SECRET_CHARS``."""
    if secret is None or len(secret) < MIN_SECRET_CHARS:
        return text
    return _pattern(secret).sub(REDACTED, text)


@lru_cache(maxsize=8)
def _pattern(secret: str) -> re.Pattern[str]:
    return re.compile("".join(_char_forms(char) for char in secret))


def _char_forms(char: str) -> str:
    """A regular expression for ``char`` as it may be written in an echoed key."""
    code = ord(char)
    forms = [re.escape(char)]
    if char in _JSON_BACKSLASHED:
        forms.append(r"\\+" + re.escape(char))  # \" \\ \/, and escaped again: \\\" ...
    forms.append(rf"\\+(?i:u{code:04x})")  # \u0022, \u003c (Go), \\u003c when nested
    forms.append(rf"(?i:%(?:25)*{code:02x})")  # %22, and %2522 when encoded twice
    if char == " ":
        forms.append(r"\+")  # a form-encoded space
    forms.append(rf"&#0*{code};")
    forms.append(rf"(?i:&#x0*{code:x};)")
    if char in _HTML_NAMES:
        forms.append(rf"&{_HTML_NAMES[char]};")
    return "(?:" + "|".join(forms) + ")"
