"""How a question is put to a model: shared by the ``knowbias`` locate method and the tasks that read a model's
answer off its next token (lettered BBQ, the built-in probes), so that what is attributed and what is scored are
the same text: a chat-templated prompt where the tokenizer has a template, and the answers as they follow it.
The answers are scored with :meth:`bakeedit.evaluate.engine.Scorer.next_token_logprobs`, which keeps the prompt's
trailing whitespace (a chat template's ``"assistant\\n"``) in the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError

SYSTEM_PROMPT = "You are a useful assistant."
#: Appended to each yes/no bias-knowledge question, by the ``knowbias`` locate method and the ``knowbias_qa`` probe.
KNOWBIAS_INSTRUCTION = "Answer with Yes or No."


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template (instruction-tuned models do; base models usually not)."""
    return bool(getattr(tokenizer, "chat_template", None))


def question_prompt(tokenizer: Any, question: str, system: str = SYSTEM_PROMPT, chat: bool | None = None) -> str:
    """``question`` as the model expects to be asked: the chat template with a system prompt and the assistant turn
    opened, or ``"Question: ...\\nAnswer:"`` for a tokenizer without a template (``chat=False`` forces the latter).

    A template that refuses a system turn (Gemma's "System role not supported") is retried without it, as
    ``bakeedit.locate.knowbias.method.render`` does, so the probe and the locate method see the same text."""
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    if not use_chat:
        return f"Question: {question}\nAnswer:"
    user = [{"role": "user", "content": question}]
    system_turn = [{"role": "system", "content": system}] if system else []
    try:
        return tokenizer.apply_chat_template(system_turn + user, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        if not system_turn:
            raise
        return tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)


def answer_candidates(prompt: str, answers: Sequence[str]) -> list[str]:
    """The answers as they follow ``prompt``: with a leading space after ``"Answer:"``-style prompts, bare after a
    prompt that ends in whitespace (a chat template's ``"assistant\\n"``)."""
    if prompt and prompt[-1].isspace():
        return [a.strip() for a in answers]
    return [" " + a.strip() for a in answers]
