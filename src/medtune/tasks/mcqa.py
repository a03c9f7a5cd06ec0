"""MedMCQA-style multiple choice: question + options A-D -> letter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medtune.errors import MedtuneError

LETTERS = ["A", "B", "C", "D"]
OPTION_COLUMNS = ["opa", "opb", "opc", "opd"]


def format_question(record: dict[str, Any]) -> str:
    """The text the model sees: the question, then the four lettered options ("" for a blank
    question, which is answered but flagged abstained, as a blank note is)."""
    if not str(record["question"]).strip():
        return ""
    lines = [str(record["question"]).strip()]
    for letter, col in zip(LETTERS, OPTION_COLUMNS, strict=True):
        lines.append(f"{letter}. {str(record[col]).strip()}")
    return "\n".join(lines)


def answer_letter(cop: int) -> str:
    return LETTERS[int(cop)]


def choice_ids(tokenizer: Any, template: Any, text: str,
               choices: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """(context ids, one id list per choice) by lm-eval-harness's rule for causal models.

    context = the prompt without trailing whitespace; each choice = that whitespace + the
    choice; context + choice is encoded as ONE string and the choice's ids are what follows the
    context's token count (so "Answer: A" may end in one " A" token). The plain template's BOS
    is prepended as ``Template.prompt_ids`` does. Leading ids common to every choice join the
    context (the same constant for every choice: argmax and softmax are unchanged). A question
    holding a special token's string ("</s>") gets it as plain text, as in ``prompt_ids``: the
    rule then applies to the template's text after the question."""
    head, prompt = template.escaped_head(tokenizer, text)
    context = prompt.rstrip()
    moved = prompt[len(context):]
    tail = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    conts = [list(tokenizer(context + moved + c, add_special_tokens=False)["input_ids"])[len(tail):]
             for c in choices]
    ctx = head + tail
    shared = 0
    while (all(len(c) > shared + 1 for c in conts)
           and len({c[shared] for c in conts}) == 1):
        shared += 1
    ctx += conts[0][:shared]
    conts = [c[shared:] for c in conts]
    if not all(conts):
        raise MedtuneError("a choice encodes to no tokens after the prompt (tokenizer merges "
                           "it into the prompt); change the template's answer cue")
    bos = getattr(tokenizer, "bos_token_id", None)
    if template.kind == "plain" and bos is not None and (not ctx or ctx[0] != bos):
        ctx = [bos, *ctx]
    return ctx, conts
