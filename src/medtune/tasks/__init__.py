"""Tasks: what a record is, how it becomes a prompt, and how an answer is encoded.

The prompt and the answer are tokenized separately and concatenated, so training, constrained
scoring and generation all see exactly the same token sequence for the same (record, answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medtune.errors import ConfigError
from medtune.fsutil import read_json, write_json

PROTOCOL_INSTRUCTION = "Assign the imaging protocol for this clinical note."
_NOTE_SLOT = "\u2063medtune-note-slot\u2063"  # stands in for the note while the template renders


# chat templates that print "today's" date (Llama 3.x) get this one instead, so a prompt is the
# same in training, in prediction months later and in a resumed run (it is Llama 3.1's default)
CHAT_DATE = "26 Jul 2024"


def special_strings(tokenizer: Any) -> list[str]:
    """Every special token's string: the named ones (bos, eos, pad, ...) and the added tokens
    marked special, such as chat role markers ("<|assistant|>", "<|start_header_id|>") that
    ``all_special_tokens`` may leave out. A note holding one gets it as plain text."""
    found = dict.fromkeys(t for t in getattr(tokenizer, "all_special_tokens", []) if t)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found.update(dict.fromkeys(str(t) for t in added.values() if getattr(t, "special", False)))
    return [t for t in found if t]


def _tok(tokenizer: Any, text: str, split: bool = False) -> list[int]:
    """Token ids of ``text``; ``split``: special tokens' strings as plain text."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"])
MCQA_INSTRUCTION = "Answer the multiple-choice medical question with the letter of the correct option."


@dataclass
class Template:
    """How a record's text becomes prompt tokens; saved as template.json in every run directory.

    kind: 'chat' uses the tokenizer's own chat template (user turn, generation prompt);
    'plain' uses ``plain_format`` with ``{instruction}`` and ``{input}`` fields.
    """

    task: str = "protocol"
    kind: str = "plain"
    instruction: str = PROTOCOL_INSTRUCTION
    plain_format: str = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    answer_prefix: str = ""
    labels_in_prompt: bool = False
    labels: list[str] = field(default_factory=list)

    def user_message(self, text: str) -> str:
        """Instruction, the options (zero-shot), then the note: a note cut to fit the context
        loses its middle, never the options (as in the plain template's instruction)."""
        instruction = self.instruction
        if self.labels_in_prompt and self.labels:
            instruction += "\n\nOptions: " + "; ".join(self.labels)
        return f"{instruction}\n\n{text}"

    def prompt_text(self, tokenizer: Any, text: str) -> str:
        if self.kind == "chat":
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": self.user_message(text)}],
                tokenize=False,
                add_generation_prompt=True,
                date_string=CHAT_DATE,  # templates that print today's date: the same every day
            )
            return str(rendered) + self.answer_prefix
        instruction = self.instruction
        if self.labels_in_prompt and self.labels:
            instruction += " Options: " + "; ".join(self.labels)
        return self.plain_format.format(instruction=instruction, input=text) + self.answer_prefix

    def prompt_ids(self, tokenizer: Any, text: str) -> list[int]:
        """Token ids of the prompt, with the tokenizer's BOS when it uses one (not the chat
        template's, which already contains it).

        A note that contains a special token's string ("</s>", "<|im_start|>", ...) gets it as
        plain text, never as the control token: the template's own markup is tokenized as
        usual, the note with ``split_special_tokens``. Notes without such strings are tokenized
        as one string, exactly as before."""
        head, tail = self.escaped_head(tokenizer, text)
        return self._with_bos(tokenizer, head + _tok(tokenizer, tail))

    def escaped_head(self, tokenizer: Any, text: str) -> tuple[list[int], str]:
        """(ids, rest): for a note holding a special token's string, the ids of the template up
        to and including the note (the note as plain text) and the template's text after it;
        for any other note ([], the whole prompt text), to be tokenized as one string."""
        if any(t in text for t in special_strings(tokenizer)):
            rendered = self.prompt_text(tokenizer, _NOTE_SLOT)
            if rendered.count(_NOTE_SLOT) == 1:
                before, after = rendered.split(_NOTE_SLOT)
                return _tok(tokenizer, before) + _tok(tokenizer, text, split=True), after
        return [], self.prompt_text(tokenizer, text)

    def _with_bos(self, tokenizer: Any, ids: Sequence[int]) -> list[int]:
        """The plain template starts with the tokenizer's BOS (a chat template has its own)."""
        bos = getattr(tokenizer, "bos_token_id", None)
        if self.kind == "plain" and bos is not None and (not ids or ids[0] != bos):
            return [bos, *ids]
        return list(ids)

    def prompts_ids(self, tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
        """``prompt_ids`` of many texts, equal to one call per text, with one tokenizer call for
        all the notes that hold no special token's string (the fast tokenizer's batch path)."""
        specials = special_strings(tokenizer)
        out: list[Any] = [self.prompt_ids(tokenizer, t) if any(s in t for s in specials)
                          else None for t in texts]
        plain = [i for i, ids in enumerate(out) if ids is None]
        if plain:
            rendered = [self.prompt_text(tokenizer, texts[i]) for i in plain]
            for i, ids in zip(plain, tokenizer(rendered, add_special_tokens=False)["input_ids"],
                              strict=True):
                out[i] = self._with_bos(tokenizer, ids)
        return out

    def answer_ids(self, tokenizer: Any, answer: str) -> list[int]:
        """Token ids of the answer followed by EOS: the model learns to stop after the label."""
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        return [*ids, tokenizer.eos_token_id]

    def save(self, directory: str | Path) -> None:
        write_json(Path(directory) / "template.json", asdict(self))

    @classmethod
    def load(cls, directory: str | Path) -> Template:
        return cls(**read_json(Path(directory) / "template.json"))


def default_template(task: str, tokenizer: Any, labels: list[str], kind: str = "auto") -> Template:
    """The base's own chat template when it has one (kind='auto'), else the plain template."""
    if kind == "auto":
        kind = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if kind not in ("chat", "plain"):
        raise ConfigError(f"model.template: unknown '{kind}' (auto, chat, plain)")
    if kind == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("model.template=chat: the base's tokenizer has no chat template "
                          "(use plain, or auto)")
    instruction = MCQA_INSTRUCTION if task == "mcqa" else PROTOCOL_INSTRUCTION
    answer_prefix = "Answer: " if task == "mcqa" else ""
    return Template(task=task, kind=kind, instruction=instruction, answer_prefix=answer_prefix,
                    labels=list(labels))
