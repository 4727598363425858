"""The circuit breaker: stop the run when items are lost the same way, over and over.

Retries handle a fault that passes; ``engine.teacher.health`` handles a server that is gone. What is
left is a fault that every request of a stage will hit (a wrong URL, a ``max_tokens`` over
the context, a feature the server refuses, a model that never writes valid JSON). Item by
item it would lose the whole corpus overnight, so the breaker watches the items the flows
lose and win, by stage, and trips when either

- ``documents`` different documents lost items of a stage with one *signature* (stage, kind,
  and the HTTP status or the reply check that failed) before any item of that stage was won;
- or, of the last ``window`` items of a stage (won or lost), at least ``share`` were lost with
  one signature, from at least ``documents`` different documents;
- or, of the last ``window`` reply choices of a stage, at least ``reject_share`` were rejected
  by the reply checks (schema or content, ``engine.flows.quality``), from at least ``documents``
  different documents: a teacher whose replies are mostly junk. Each item is asked again
  within its budget, so few items may be lost yet; the run would still pay several requests
  for each record, for records of a teacher that mostly writes junk.

Counting documents, not items, is what keeps one bad chunk (over the context, say) from
stopping a healthy run: it fails every item of its own units and nothing else.

Pure state, no I/O and no clock: the flows report outcomes (``won``, ``lost``, ``replied``)
and stop the run on the ``Trip`` that ``lost`` or ``replied`` returns.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.errors import InvalidReply, ItemError, RetryableError

EXCERPT_CHARS = 200


@dataclass(frozen=True, slots=True)
class Signature:
    """How an item was lost: its stage, the error kind, and the HTTP status or reply check."""

    stage: str
    kind: str
    status: int | None = None
    check: str = ""

    @classmethod
    def of(cls, stage: str, err: ItemError) -> Signature:
        """The signature of an item of ``stage`` lost to ``err``."""
        if isinstance(err, InvalidReply):
            return cls(stage, err.kind, check=err.check)
        if err.status is None and isinstance(err.__cause__, RetryableError):
            # Retries used up on timeouts or resets: the kind of the last failure.
            return cls(stage, err.kind, check=err.__cause__.kind)
        return cls(stage, err.kind, status=err.status)

    @property
    def cause(self) -> str:
        """E.g. "HTTP 400 (request_rejected)" or "invalid_reply: cut_off"."""
        if self.status is not None:
            return f"HTTP {self.status} ({self.kind})"
        return f"{self.kind}: {self.check}" if self.check else self.kind


@dataclass(frozen=True, slots=True)
class Trip:
    """Why the breaker stopped the run."""

    signature: Signature
    documents: int  # different documents that lost items with the signature
    lost: int  # items lost with the signature (in the window, for a share trip)
    window: int  # 0: no item of the stage was won; else the items looked at
    message: str  # the last such error, as the engine worded it
    body: str  # an excerpt of the server's answer (or of the reply)
    # For a trip on rejected replies: the rejections in the window by check, most first.
    rejected: tuple[tuple[str, int], ...] = ()

    @property
    def reason(self) -> str:
        """Why the run stopped, in words: how many items or replies, of what, from how many
        documents."""
        sig = self.signature
        if self.rejected:
            checks = ", ".join(f"{check} {n}" for check, n in self.rejected)
            return (
                f"{self.lost} of the last {self.window} {sig.stage} replies were rejected by "
                f"the reply checks ({checks}), from {self.documents} different documents"
            )
        if self.window == 0:
            return (
                f"{self.documents} different documents lost {sig.stage} items the same way "
                f"({sig.cause}) and none of that stage succeeded"
            )
        return (
            f"{self.lost} of the last {self.window} {sig.stage} items were lost the same way "
            f"({sig.cause}), from {self.documents} different documents"
        )


# What a trip's message suggests: a fix for a signature and the server's answer.
Fixes = Callable[[Signature, str], str]


def _no_fix(signature: Signature, body: str) -> str:
    return ""


# An OpenAI-style error's message inside a (possibly cut) JSON body excerpt.
_MESSAGE = re.compile(r'"message"\s*:\s*"((?:[^"\\]|\\.)*)')


def server_words(body: str) -> str:
    """What the server said: an OpenAI-style error's message if the body holds one, else the
    body itself, on one line."""
    found = _MESSAGE.search(body)
    text = found.group(1).replace('\\"', '"').replace("\\n", " ") if found else body
    return " ".join(text.split())


def describe(trip: Trip, fix: Fixes = _no_fix) -> str:
    """The one line a trip is reported with: what, where, the server's words, the fix."""
    said = server_words(trip.body or trip.message)[:EXCERPT_CHARS]
    advice = fix(trip.signature, f"{trip.message} {trip.body}")
    return (
        f'{trip.reason}; the server said: "{said}". '
        f"{'Likely fix: ' + advice + '. ' if advice else ''}"
        "Fix that and run the same command again: the lost items are run again"
    )


class Breaker:
    """Trips when one stage keeps losing items the same way (see the module docstring)."""

    def __init__(
        self,
        *,
        documents: int,
        window: int,
        share: float,
        reject_share: float = 1.0,
        fixes: Fixes = _no_fix,
    ) -> None:
        """``fixes`` suggests what to change for a trip (``engine.pipeline.causes.likely_fix``)."""
        if documents < 0 or window < 1 or not 0 < share <= 1 or not 0 < reject_share <= 1:
            raise ValueError(
                "need documents >= 0, window >= 1, 0 < share <= 1 and 0 < reject_share <= 1"
            )
        self.fixes = fixes
        self.documents = documents
        self.window = window
        self.share = share
        self.reject_share = reject_share
        self.tripped: Trip | None = None
        self._won: set[str] = set()  # stages with at least one item won
        # Before a stage's first win: documents that lost items, by signature.
        self._early: dict[Signature, set[str]] = {}
        # Per stage, the last ``window`` items: None for a win, else (signature, document).
        self._recent: dict[str, deque[tuple[Signature, str] | None]] = {}
        # Per stage, the last ``window`` reply choices: (document, check), check "" if accepted.
        self._replies: dict[str, deque[tuple[str, str]]] = {}

    @property
    def enabled(self) -> bool:
        """False when ``documents`` is 0: the breaker never trips."""
        return self.documents > 0

    def describe(self, trip: Trip) -> str:
        """The one line ``trip`` is reported with (see ``describe``)."""
        return describe(trip, self.fixes)

    def won(self, stage: str) -> None:
        """An item (a valid reply) of ``stage`` was won."""
        if stage not in self._won:
            self._won.add(stage)
            for signature in [s for s in self._early if s.stage == stage]:
                del self._early[signature]
        self._items(stage).append(None)

    def lost(self, stage: str, document: str, err: ItemError) -> Trip | None:
        """An item of ``stage`` from ``document`` was lost to ``err``. Returns the ``Trip``
        when this loss trips the breaker (once; later losses return None)."""
        if not self.enabled or self.tripped is not None:
            return None
        signature = Signature.of(stage, err)
        recent = self._items(stage)
        recent.append((signature, document))
        trip = self._before_any_win(signature, document, err) or self._by_share(
            signature, recent, err
        )
        self.tripped = trip
        return trip

    def replied(self, stage: str, document: str, check: str, body: str = "") -> Trip | None:
        """A reply choice of ``stage`` for ``document`` was accepted (``check`` "") or rejected
        by the check ``check``, with ``body`` an excerpt of it. Returns the ``Trip`` when the
        stage's rejections reach ``reject_share`` of its last ``window`` replies (once)."""
        if not self.enabled or self.tripped is not None:
            return None
        replies = self._replies.get(stage)
        if replies is None:
            replies = self._replies[stage] = deque(maxlen=self.window)
        replies.append((document, check))
        if not check or len(replies) < self.window:
            return None
        rejected = [(doc, code) for doc, code in replies if code]
        documents = len({doc for doc, _ in rejected})
        if len(rejected) < self.reject_share * self.window or documents < self.documents:
            return None
        by_check = Counter(code for _, code in rejected).most_common()
        signature = Signature(stage, "invalid_reply", check=by_check[0][0])
        message = f"the last rejected reply failed the {check!r} check"
        trip = Trip(
            signature, documents, len(rejected), self.window, message, body, tuple(by_check)
        )
        self.tripped = trip
        return trip

    def _before_any_win(self, signature: Signature, document: str, err: ItemError) -> Trip | None:
        if signature.stage in self._won:
            return None
        documents = self._early.setdefault(signature, set())
        documents.add(document)
        if len(documents) < self.documents:
            return None
        return Trip(signature, len(documents), len(documents), 0, str(err), err.body)

    def _by_share(
        self,
        signature: Signature,
        recent: deque[tuple[Signature, str] | None],
        err: ItemError,
    ) -> Trip | None:
        if len(recent) < self.window:
            return None
        same = [item[1] for item in recent if item is not None and item[0] == signature]
        if len(same) < self.share * self.window or len(set(same)) < self.documents:
            return None
        return Trip(signature, len(set(same)), len(same), self.window, str(err), err.body)

    def _items(self, stage: str) -> deque[tuple[Signature, str] | None]:
        items = self._recent.get(stage)
        if items is None:
            items = self._recent[stage] = deque(maxlen=self.window)
        return items

    def __repr__(self) -> str:
        state = "tripped" if self.tripped else "closed"
        return (
            f"<Breaker {state} documents={self.documents} window={self.window} "
            f"share={self.share} stages_won={len(self._won)}>"
        )
