"""One (document, type) unit in progress: its branches, its records, its failures, the judge.

There are no stage barriers: each step of a branch runs as its own task in the unit's task
group and spawns the next steps as soon as its reply arrives. An ``ItemError`` ends only
the branch it happened in and becomes one ``Failure``; ``FatalRunError`` and cancellation
end the whole unit.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, TypeVar

from pydantic import BaseModel

from engine.errors import FatalRunError, ItemError, SystematicFailure
from engine.flows import prompts, quality
from engine.flows.admission import Admission, Branch
from engine.flows.ask import Ask, Asker, Parsed
from engine.flows.planning import StagePlan
from engine.flows.structured import Verdict
from engine.output.records import Failure, UnitResult, make_record
from engine.seeds import SeedRow

log = logging.getLogger(__name__)
REASON_EXCERPT_CHARS = 200
# Numbers the units in the order they are made: the older a unit, the sooner its branches
# get a slot (``engine.flows.admission``).
_UNIT_ORDER = itertools.count()
# A kept pair: its path, document, question, response, model, reasoning and key fact.
_Kept = tuple[tuple[str, ...], str, str, str, str, str, str | None]
T = TypeVar("T", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Judge:
    """The judge's request settings (``generation.judge_*``): it is on when there is one."""

    temperature: float
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Pair:
    """A produced question/answer pair, before the (optional) judge and the record."""

    path: tuple[str, ...]
    document: str
    question: str
    response: str
    model: str
    reasoning: str = ""
    key_fact: str | None = None


@dataclass(frozen=True, slots=True)
class FlowContext:
    """What every flow needs besides its own settings."""

    asker: Asker
    judge: Judge | None = None
    # The run's cap on branches running at once, over all units; None: no cap.
    admission: Admission | None = None

    def unit(self, seed: SeedRow, gen_type: str) -> Unit:
        """A unit of ``gen_type`` for ``seed``, asking through an asker that names it."""
        asker = replace(self.asker, document=seed.doc_id)
        return Unit(seed, gen_type, asker, self.judge, self.admission)

    def judge_plan(
        self, gen_type: str, pairs: int, pair: tuple[str, str, str], assumes: str
    ) -> list[StagePlan]:
        """The judge's requests for ``pairs`` pairs like ``pair`` (document, question,
        response); none when the judge is off."""
        if self.judge is None or pairs == 0:
            return []
        ask = judge_ask(stage_name(gen_type, "judge"), self.judge, *pair)
        return [StagePlan.of(self.asker.first_round(ask), pairs, assumes)]


def grounding(seed: SeedRow, source: str, question: str = "") -> quality.Grounding:
    """What a stage's reply about ``source`` (and, for an answer, ``question``) is judged
    against, with the seed's in-context example that it must not copy."""
    return quality.Grounding(
        source=source,
        chunk=seed.document,
        question=question,
        examples=tuple(q for q in seed.icl_queries if q.strip()),
        example_document=seed.icl_document,
        quoted=(seed.document_outline, seed.domain),
    )


def label(path: tuple[str, ...]) -> str:
    """The ``Failure.item`` for a branch, e.g. ``"s003/q01"``."""
    return "/".join(path)


def stage_name(gen_type: str, name: str) -> str:
    """The full stage name, e.g. ``"extractive_summary/questions"``."""
    return f"{gen_type}/{name}"


def judge_ask(
    stage: str, judge: Judge, document: str, question: str, response: str
) -> Ask[Verdict]:
    """Is ``response`` to ``question`` faithful to ``document``?"""
    return Ask(
        stage,
        prompts.judge_messages(document, question, response),
        Verdict,
        judge.temperature,
        judge.max_tokens,
    )


class Unit:
    """Use as ``async with``: leaving waits for every branch spawned inside."""

    def __init__(
        self,
        seed: SeedRow,
        gen_type: str,
        asker: Asker,
        judge: Judge | None,
        admission: Admission | None = None,
    ) -> None:
        self.seed = seed
        self.gen_type = gen_type
        self.asker = asker
        self.order = next(_UNIT_ORDER)
        self._judge = judge
        self._tg = asyncio.TaskGroup()
        # Kept pairs as plain tuples of strings, made records at the end (``result``): the
        # garbage collector stops tracking such tuples, where a unit's hundreds of records
        # were as many objects for every collection to walk until the unit was written.
        self._kept: list[_Kept] = []
        self._failures: list[Failure] = []
        self._judged_out = 0
        self._admission = admission
        # Branches spawned and not finished (queued for admission or running), and whether
        # there are none: leaving the unit waits for it before closing the task group.
        self._outstanding = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # The questions, facts and summaries accepted so far: new ones must differ.
        self.seen = quality.Seen()

    def stage(self, name: str) -> str:
        """The full stage name, e.g. ``"extractive_summary/questions"``."""
        return stage_name(self.gen_type, name)

    async def __aenter__(self) -> Unit:
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None and self._admission is not None:
                try:
                    # Queued branches are not in the task group yet: it would close early.
                    await self._idle.wait()
                except asyncio.CancelledError as err:  # a branch failed, or the run stops
                    exc_type, exc, tb = type(err), err, err.__traceback__
            if exc_type is not None and self._admission is not None:
                self._admission.drop(self)  # left early: its queued branches never start
            await self._tg.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # The scheduler stops the run on FatalRunError itself, not on a group holding one.
            fatal = group.subgroup(FatalRunError)
            if fatal is None:
                raise
            raise _first_leaf(fatal) from None

    def spawn(self, stage: str, item: str, step: Coroutine[Any, Any, None]) -> None:
        """Run ``step`` (one request of ``stage`` for ``item``) as a branch of the unit: now,
        or once the run's admission control has a slot for it."""
        self._outstanding += 1
        self._idle.clear()
        if self._admission is None:
            self.launch((stage, item, step))
        else:
            self._admission.submit(self, (stage, item, step))

    def launch(self, branch: Branch) -> asyncio.Task[None]:
        """``Owner.launch``: start ``branch`` in the unit's task group."""
        stage, item, step = branch
        guarded = self._guard(stage, item, step)
        try:
            task = self._tg.create_task(guarded)
        except RuntimeError:  # the unit is shutting down after a fatal error
            guarded.close()
            self.discard(branch)
            raise
        # A branch cancelled before its first step (a fatal error elsewhere) never awaits
        # ``step``: close it, or it is reported as a coroutine never awaited. A no-op else.
        task.add_done_callback(lambda _: self.discard(branch))
        return task

    def discard(self, branch: Branch) -> None:
        """``Owner.discard``: ``branch`` is over or will never start."""
        branch[2].close()
        self._outstanding -= 1
        if self._outstanding == 0:
            self._idle.set()

    async def _guard(self, stage: str, item: str, step: Coroutine[Any, Any, None]) -> None:
        try:
            await step
        except ItemError as err:
            self.fail(stage, item, err)

    async def ask(self, ask: Ask[T], item: str) -> Parsed[T]:
        """``asker.one(ask)`` for ``item``; the items of a list reply that were left out
        because they failed the content checks on every try become its failure."""
        got = await self.asker.one(ask)
        if got.dropped is not None:
            self.fail(ask.stage, item, got.dropped)
        return got

    def fail(self, stage: str, item: str, err: ItemError) -> None:
        """Record ``item`` of ``stage`` as lost. Raises ``SystematicFailure`` when this loss
        trips the breaker: the unit is abandoned, and so is the run."""
        log.info("%s %s %s lost: %s", self.seed.doc_id, stage, item, err)
        breaker = self.asker.breaker
        if breaker is not None and (trip := breaker.lost(stage, self.seed.doc_id, err)):
            raise SystematicFailure(breaker.describe(trip))
        self._failures.append(Failure.from_error(stage, item, err))

    def add(self, pair: Pair) -> None:
        """Keep ``pair`` as a record, after the judge's verdict when the judge is on."""
        if self._judge is None:
            self._keep(pair)
        else:
            self.spawn(self.stage("judge"), label(pair.path), self._judged(pair, self._judge))

    async def _judged(self, pair: Pair, judge: Judge) -> None:
        ask = judge_ask(self.stage("judge"), judge, pair.document, pair.question, pair.response)
        verdict = (await self.asker.one(ask)).value
        if verdict.faithful:
            self._keep(pair)
            return
        self._judged_out += 1
        log.info(
            "%s %s %s judged unfaithful: %s",
            self.seed.doc_id,
            self.gen_type,
            label(pair.path),
            verdict.reason[:REASON_EXCERPT_CHARS],
        )

    def _keep(self, pair: Pair) -> None:
        self._kept.append(
            (
                pair.path,
                pair.document,
                pair.question,
                pair.response,
                pair.model,
                pair.reasoning,
                pair.key_fact,
            )
        )

    def result(self) -> UnitResult:
        """Records in path order (not arrival order), failures by item then stage. Raises
        ``ValueError`` for a record its type cannot have (``make_record``)."""
        records = [
            make_record(
                self.seed,
                self.gen_type,
                path,
                document=document,
                question=question,
                response=response,
                model=model,
                reasoning=reasoning,
                key_fact=key_fact,
            )
            for path, document, question, response, model, reasoning, key_fact in sorted(
                self._kept, key=lambda kept: kept[0]
            )
        ]
        return UnitResult(
            records=records,
            failures=sorted(self._failures, key=lambda f: (f.item, f.stage)),
            judged_out=self._judged_out,
        )

    def __repr__(self) -> str:
        return (
            f"<Unit {self.seed.doc_id} {self.gen_type} records={len(self._kept)} "
            f"failures={len(self._failures)} judged_out={self._judged_out}>"
        )


def _first_leaf(group: BaseExceptionGroup[FatalRunError]) -> FatalRunError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
