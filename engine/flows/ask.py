"""Ask the teacher for structured replies; ask again for what did not validate.

A reply whose choices do not parse is asked again, up to ``retry.invalid_reply_attempts``
rounds in all. With several choices (``n``), the valid ones are kept and only the missing
number is asked for again; the same happens when a server returns fewer choices than
asked. With ``supports_n = false`` the samples are separate ``n=1`` requests, sent at once.
Each valid sample is handed on (``on_item``) as soon as it arrives, so its branch of the
unit can go on while the others are still outstanding. Separate samples and re-asks carry a
short note, so that a server deterministic in the prompt does not repeat itself.

"Valid" is the schema and then the content checks (``engine.flows.quality``) of an ``Ask`` that
says what it is grounded in: a choice that fails a check is invalid like one that does not
parse, with the check's code, and is asked again the same way. Every choice is counted, as
accepted or by the check that rejected it (``tally``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from engine.budget import PassBudget
from engine.config import QualityConfig
from engine.errors import InvalidReply, ItemError, SystematicFailure
from engine.flows import quality, structured
from engine.flows.reasoning import Answered, answer_of
from engine.flows.structured import Mode
from engine.pipeline.breaker import Breaker
from engine.teacher.protocol import ChatReply, ChatRequest, Choice, Message, Teacher

log = logging.getLogger(__name__)
T = TypeVar("T", bound=BaseModel)
NOTE_REASON_CHARS = 200


@dataclass(frozen=True, slots=True)
class Ask(Generic[T]):
    """What a stage asks for: the prompt, the reply model and the sampling knobs."""

    stage: str
    messages: tuple[Message, ...]
    reply: type[T]
    temperature: float
    max_tokens: int
    # What the reply is judged against; None: the schema alone (the judge's verdict).
    grounding: quality.Grounding | None = None
    # The unit's accepted texts, that this reply's questions, facts or summaries must not repeat.
    seen: quality.Seen | None = None


@dataclass(frozen=True, slots=True)
class Parsed(Generic[T]):
    """One validated choice: its value, the reasoning behind it ("" when none), the choice
    as received and the model name."""

    value: T
    choice: Choice
    model: str
    reasoning: str = ""
    # Items of a list reply that the content checks rejected on every try and that were left
    # out of ``value``: for the failure log (``Unit.ask``). None: nothing left out.
    dropped: InvalidReply | None = None


@dataclass(frozen=True, slots=True)
class Lost:
    """Samples (by slot) that could not be obtained, and why."""

    slots: tuple[int, ...]
    error: ItemError


OnItem = Callable[[int, Parsed[T]], object]
# Returns why a parsed value is unacceptable, or None when it is fine.
Check = Callable[[BaseModel], quality.Rejection | None]
# Counts one choice of a stage: "" accepted, else the check that rejected it.
Tally = Callable[[str, str], None]


def _accept_all(value: BaseModel) -> quality.Rejection | None:
    return None


class _Rejected(InvalidReply):
    """A choice the content checks rejected; for a list reply, with its items that passed."""

    def __init__(self, rejection: quality.Rejection, body: str, salvage: Parsed[Any] | None):
        super().__init__(str(rejection), check=rejection.check, body=body)
        self.salvage = salvage
        self.dropped = rejection.dropped


@dataclass(frozen=True, slots=True)
class Asker:
    """Sends a stage's requests for the flows and turns replies into validated values."""

    teacher: Teacher
    mode: Mode
    attempts: int
    supports_n: bool
    # None or disabled: the schema alone.
    quality: QualityConfig | None = None
    tally: Tally | None = None
    # Told of every reply choice, accepted or rejected, and of every reply that yields a
    # valid sample (the units tell it of losses).
    breaker: Breaker | None = None
    # The document (id) of the unit asking, for the breaker: ``FlowContext.unit`` sets it.
    document: str = ""
    # The event loop's time per pass for the steps of all units: each choice of a reply is
    # parsed and checked within it (``engine.budget``). A branch's first step (its request
    # built and looked up) is bounded by the admission control's starts a pass instead: a
    # turn there deferred 5 branches a request, each woken again every pass, for 7 % of the
    # engine's time in ``benchmarks.overhead``.
    budget: PassBudget = field(default_factory=PassBudget)

    def request(self, ask: Ask[T], n: int = 1, note: str = "") -> ChatRequest:
        """The request for ``ask``: ``note`` and the schema instructions appended to the last
        message, ``response_format`` set."""
        *head, last = ask.messages
        instructions = structured.schema_instructions(ask.reply, self.mode)
        content = "\n\n".join(part for part in (last.content, note, instructions) if part)
        return ChatRequest(
            messages=(*head, Message(last.role, content)),
            temperature=ask.temperature,
            max_tokens=ask.max_tokens,
            n=n,
            response_format=structured.response_format(ask.reply, self.mode),
            stage=ask.stage,
        )

    def first_round(self, ask: Ask[T], count: int = 1) -> list[ChatRequest]:
        """The requests ``many(ask, count)`` (``one(ask)`` for 1) sends before any re-ask."""
        if self.supports_n:
            return [self.request(ask, count, _note(0, count, None, 0))]
        return [self.request(ask, 1, _note(slot, count, None, 0)) for slot in range(count)]

    async def one(self, ask: Ask[T]) -> Parsed[T]:
        """One validated reply; raises the ``ItemError`` that lost it."""
        got: list[Parsed[T]] = []
        lost = await self._fill(ask, [0], lambda _slot, item: got.append(item), self.gate(ask))
        if lost is not None:
            raise lost.error
        return got[0]

    async def many(self, ask: Ask[T], count: int, on_item: OnItem[T]) -> list[Lost]:
        """Collect ``count`` samples, calling ``on_item(slot, parsed)`` as each arrives.

        Returns what was lost. A sample that repeats an earlier one (its ``Ask.seen``) is
        invalid like any other that fails a check, and is asked again.
        """
        check = self.gate(ask)
        if self.supports_n:
            lost = await self._fill(ask, list(range(count)), on_item, check, count)
            return [] if lost is None else [lost]
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self._fill(ask, [slot], on_item, check, count))
                for slot in range(count)
            ]
        return [lost for task in tasks if (lost := task.result()) is not None]

    def gate(self, ask: Ask[T]) -> Check:
        """The content checks for ``ask``'s replies: none without a grounding or with the
        checks turned off."""
        config = self.quality
        if ask.grounding is None or config is None or not config.enabled:
            return _accept_all
        prompt = [m.content for m in self.request(ask).messages]
        return quality.Gate.of(config, ask.grounding, prompt, ask.reply, ask.seen)

    async def _fill(
        self, ask: Ask[T], slots: list[int], on_item: OnItem[T], check: Check, total: int = 1
    ) -> Lost | None:
        """Fill ``slots`` with valid samples, one request per round for all still missing."""
        missing = list(slots)
        problem: InvalidReply | None = None
        best: _Rejected | None = None  # the list reply whose passing items are the most
        bad_rounds = 0
        while True:
            note = _note(missing[0], total, problem, bad_rounds)
            request = self.request(ask, len(missing), note)
            if self.breaker is not None and self.breaker.tripped is not None:
                # The run is stopping (the unit that tripped it raises): send nothing more,
                # record nothing, wait for the cancellation that is on its way.
                await asyncio.Event().wait()
            try:
                reply = await self.teacher.complete(request)
            except ItemError as err:
                return Lost(tuple(missing), err)
            round_problem = await self._take(ask, reply, missing, on_item, check)
            if round_problem is not None:
                # Not to be replayed by a response cache: a rerun must ask afresh.
                self.teacher.forget(request)
            if not missing:
                return None
            if round_problem is None:
                continue  # fewer choices than asked, all valid: top up, no attempt spent
            problem = round_problem
            if isinstance(problem, _Rejected) and _items(problem) > _items(best):
                best = problem
            bad_rounds += 1
            if bad_rounds >= self.attempts:
                error = InvalidReply(
                    str(problem), check=problem.check, body=problem.body, attempts=bad_rounds
                )
                if len(missing) == 1 and self._salvage(best, check, missing, on_item):
                    return None
                return Lost(tuple(missing), error)

    def _salvage(
        self, best: _Rejected | None, check: Check, missing: list[int], on_item: OnItem[T]
    ) -> bool:
        """Keep the items of ``best`` that passed, when no try brought a clean reply: asking
        again cost nothing, and throwing them away would cost good data. The items left out
        are reported with the value (``Parsed.dropped``)."""
        if best is None or best.salvage is None or check(best.salvage.value) is not None:
            return False  # re-judged: the unit may have taken the same texts meanwhile
        kept = _items(best)
        note = f"kept {kept} of {kept + best.dropped} items; left out: {best}"
        dropped = InvalidReply(note, check=best.check, body=best.body, attempts=self.attempts)
        on_item(missing.pop(0), replace(best.salvage, dropped=dropped))
        return True

    async def _take(
        self,
        ask: Ask[T],
        reply: ChatReply,
        missing: list[int],
        on_item: OnItem[T],
        check: Check,
    ) -> InvalidReply | None:
        """Hand each valid choice to the next missing slot; return the last problem seen."""
        problem = None
        if not reply.choices:
            problem = InvalidReply("the reply had no choices", check="no_choices")
            self._count(ask.stage, problem)
        model = reply.model or self.teacher.model
        won = False
        for choice in reply.choices[: len(missing)]:
            # A choice takes about 0.1 ms to parse and check, a reply of n = 50 several, and
            # many replies can arrive in one pass of the loop.
            await self.budget.turn()
            try:
                got = _parse(ask, choice, check, model)
            except InvalidReply as err:
                log.debug("%s: invalid reply: %s", ask.stage, err)
                self._count(ask.stage, err)
                problem = err
                continue
            self._count(ask.stage, None)
            if not won and self.breaker is not None:
                self.breaker.won(ask.stage)
            won = True
            on_item(missing.pop(0), Parsed(got.value, choice, model, got.reasoning))
        return problem

    def _count(self, stage: str, rejected: InvalidReply | None) -> None:
        """Count one reply choice of ``stage``, accepted (None) or ``rejected``. Raises
        ``SystematicFailure`` when the stage's rejections trip the breaker."""
        check = "" if rejected is None else rejected.check
        if self.tally is not None:
            self.tally(stage, check)
        if self.breaker is not None:
            body = "" if rejected is None else rejected.body
            if trip := self.breaker.replied(stage, self.document, check, body):
                raise SystematicFailure(self.breaker.describe(trip))


def _items(rejected: _Rejected | None) -> int:
    """How many items of a rejected list reply passed."""
    if rejected is None or rejected.salvage is None:
        return 0
    return sum(len(getattr(rejected.salvage.value, f, ())) for f in quality.LIST_FIELDS)


def _parse(ask: Ask[T], choice: Choice, check: Check, model: str) -> Answered[T]:
    try:
        got = answer_of(choice, ask.reply)
    except InvalidReply as err:
        if choice.finish_reason == "length":
            raise InvalidReply(
                f"cut off at max_tokens={ask.max_tokens}: {err}", check="cut_off", body=err.body
            ) from err
        raise
    rejected = check(got.value)
    if rejected is not None:
        salvage = None
        if rejected.partial is not None:
            partial: Any = rejected.partial
            salvage = Parsed(partial, choice, model, got.reasoning)
        raise _Rejected(rejected, choice.content[: structured.EXCERPT_CHARS], salvage)
    return got


def _note(slot: int, total: int, problem: InvalidReply | None, bad_rounds: int) -> str:
    """Set apart the requests of one stage that would otherwise be identical.

    A server that is deterministic for a given prompt (greedy decoding, a seeded or simulated
    server) would answer a separate sample or a re-ask exactly as before.
    """
    parts = []
    if slot > 0:
        parts.append(f"(Variant {slot + 1} of {total}.)")
    if problem is not None:
        reason = str(problem)[:NOTE_REASON_CHARS]
        parts.append(f"(Try {bad_rounds + 1}: an earlier answer was rejected: {reason}.)")
    return " ".join(parts)
