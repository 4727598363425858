"""The prompts sent to the teacher, one builder per stage.

Written in the spirit of InstructLab's knowledge SDG: every generated text is grounded in
the document (or a summary or key fact of it), and questions imitate the seed's in-context
example (``icl_document`` with ``icl_query_1..3``). The JSON shape of each reply is not
described here: ``engine.flows.ask`` appends the schema instructions to the last message.
"""

from __future__ import annotations

from typing import Literal

from engine.seeds import SeedRow
from engine.teacher.protocol import Message

SummaryStyle = Literal["extractive", "detailed"]

SYSTEM_PROMPT = (
    "You are a careful subject-matter expert who writes training material for a student "
    "language model. You work only from the material you are given: every statement you write "
    "must be supported by it, and you never add outside knowledge, guesses or opinions. You "
    "write clear, precise, self-contained text and follow the requested output format exactly."
)

JUDGE_SYSTEM_PROMPT = (
    "You are a strict reviewer of training data. You check whether an answer is fully supported "
    "by a source document, judging only by what the document says, not by what you know."
)

_SUMMARY_TASKS: dict[SummaryStyle, str] = {
    "extractive": (
        "Write an extractive summary of the document below.\n"
        "- Select the sentences and phrases that carry its key information: main claims, "
        "definitions, names, dates, figures, results and conclusions.\n"
        "- Keep the document's own wording as far as possible; only shorten or join sentences "
        "so that the summary reads smoothly.\n"
        "- Keep the order in which the information appears in the document.\n"
        "- Add no interpretation, commentary or information that the document does not state.\n"
        "- Write plain prose without headings or lists, about a quarter to a third as long as "
        "the document."
    ),
    "detailed": (
        "Write a detailed summary of the document below.\n"
        "- Cover every main idea together with the details that matter: definitions, names, "
        "dates, figures, causes and effects, conditions, the steps of any process.\n"
        "- Explain in your own words, in clear and well-organised prose, grouping related "
        "points together.\n"
        "- Make it self-contained: a reader who has never seen the document must be able to "
        "understand the summary fully.\n"
        "- Add no interpretation or information that the document does not state."
    ),
}

_QUESTION_RULES = (
    "- Match the style, tone, length and level of difficulty of the example questions, but ask "
    "about the document below, not about the example.\n"
    "- Every question must be answerable from the document alone.\n"
    "- Make each question self-contained: name its subject explicitly instead of referring to "
    '"the document", "the text" or "the passage".\n'
    "- Cover different parts of the document; no two questions may ask for the same "
    "information.\n"
    "- Vary the kind of question: facts, definitions, explanations, reasons, consequences, "
    "comparisons, and questions that combine several pieces of information."
)

_ANSWER_RULES = (
    "- Use only information from the document; add nothing that it does not support.\n"
    "- Give a complete and accurate answer in well-formed prose, with the relevant details "
    "(names, figures, conditions) from the document.\n"
    '- Answer directly, as an expert would; do not mention "the document" or "the text".\n'
    "- If the document answers the question only in part, answer that part and say plainly "
    "what the document does not cover."
)


def _context(seed: SeedRow) -> str:
    lines = [f"Domain: {seed.domain}"] if seed.domain.strip() else []
    lines.append(f"Document outline: {seed.document_outline}")
    return "\n".join(lines)


def _example_questions(seed: SeedRow) -> str:
    queries = [q for q in seed.icl_queries if q.strip()]
    return "\n".join(f"{i}. {q}" for i, q in enumerate(queries, start=1))


def _icl_block(seed: SeedRow, with_document: bool) -> str:
    """The seed's in-context example: questions in the style we want (and their document)."""
    questions = _example_questions(seed)
    if not questions:
        return ""
    parts = ["Here are example questions written in the style we want"]
    if with_document and seed.icl_document.strip():
        parts[0] += ", with the example document they were asked about"
        parts.append(f"<example_document>\n{seed.icl_document}\n</example_document>")
    parts[0] += ":"
    parts.append(f"<example_questions>\n{questions}\n</example_questions>")
    return "\n".join(parts)


def _messages(user: str, system: str = SYSTEM_PROMPT) -> tuple[Message, ...]:
    return (Message("system", system), Message("user", user))


def _join(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p)


def summary_messages(seed: SeedRow, style: SummaryStyle) -> tuple[Message, ...]:
    """Ask for one summary of the seed's chunk (the flow samples several)."""
    return _messages(
        _join(
            _SUMMARY_TASKS[style],
            _context(seed),
            f"<document>\n{seed.document}\n</document>",
            'Put the summary in the "summary" field.',
        )
    )


def question_messages(seed: SeedRow, document: str, count: int) -> tuple[Message, ...]:
    """Ask for ``count`` questions about ``document`` (the chunk or a summary of it)."""
    noun = "question" if count == 1 else "questions"
    return _messages(
        _join(
            f"Write exactly {count} {noun} that can be answered from the document below.",
            _icl_block(seed, with_document=True),
            f"Rules:\n{_QUESTION_RULES}",
            _context(seed),
            f"<document>\n{document}\n</document>",
            f'Put the {noun} in the "questions" list, one question per item.',
        )
    )


def answer_messages(seed: SeedRow, document: str, question: str) -> tuple[Message, ...]:
    """Ask for the answer to ``question``, grounded in ``document``."""
    return _messages(
        _join(
            "Answer the question below using the document.",
            f"Rules:\n{_ANSWER_RULES}",
            _context(seed),
            f"<document>\n{document}\n</document>",
            f"Question: {question}",
            'Put the answer in the "answer" field.',
        )
    )


def key_facts_messages(seed: SeedRow, max_facts: int) -> tuple[Message, ...]:
    """Ask for up to ``max_facts`` atomic key facts of the chunk, each with its context."""
    return _messages(
        _join(
            f"Extract the key facts of the document below: at most {max_facts}, in the order "
            "they appear.\n"
            "- Each fact is one atomic, self-contained statement of a single piece of "
            "information, with pronouns and abbreviations resolved and the names, dates and "
            "figures it needs.\n"
            "- For each fact give its context: the sentences of the document it comes from, "
            "quoted or closely paraphrased, including what is needed to understand the fact.\n"
            "- Cover the whole document; do not state the same fact twice in other words; "
            "add nothing that the document does not state.",
            _context(seed),
            f"<document>\n{seed.document}\n</document>",
            'Put the facts in the "facts" list, each with a "fact" and a "context".',
        )
    )


def fact_qa_messages(seed: SeedRow, fact: str, context: str, count: int) -> tuple[Message, ...]:
    """Ask for ``count`` question/answer pairs about one key fact."""
    return _messages(
        _join(
            f"Write exactly {count} question-answer pairs that teach the key fact below.\n"
            "- Every pair must be answerable from the key fact and its context alone; answers "
            "add no outside information.\n"
            "- Approach the fact from different angles: direct recall, the reason or condition "
            "behind it, its consequences, a definition, a reworded or reversed question.\n"
            '- Make each question self-contained (name its subject; do not refer to "the fact" '
            'or "the context") and answer in complete sentences.',
            _icl_block(seed, with_document=False),
            _context(seed),
            f"Key fact: {fact}",
            f"Context:\n{context}",
            'Put the pairs in the "pairs" list, each with a "question" and an "answer".',
        )
    )


def judge_messages(document: str, question: str, answer: str) -> tuple[Message, ...]:
    """Ask whether ``answer`` is faithful to ``document``."""
    return _messages(
        _join(
            "Decide whether the answer below is faithful to the document.\n"
            "- Faithful: every claim in the answer is stated in the document or follows "
            "directly from it, and the answer addresses the question.\n"
            "- Not faithful: the answer adds facts the document does not support, contradicts "
            "it, or does not answer the question.",
            f"<document>\n{document}\n</document>",
            f"Question: {question}",
            f"Answer: {answer}",
            'Set "faithful" to true or false and give a one-sentence "reason".',
        ),
        system=JUDGE_SYSTEM_PROMPT,
    )
