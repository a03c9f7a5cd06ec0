"""MedMCQA-style multiple choice: question + options A-D -> letter."""

from __future__ import annotations

from typing import Any

LETTERS = ["A", "B", "C", "D"]
OPTION_COLUMNS = ["opa", "opb", "opc", "opd"]


def format_question(record: dict[str, Any]) -> str:
    """The text the model sees: the question, then the four lettered options."""
    lines = [str(record["question"]).strip()]
    for letter, col in zip(LETTERS, OPTION_COLUMNS, strict=True):
        lines.append(f"{letter}. {str(record[col]).strip()}")
    return "\n".join(lines)


def answer_letter(cop: int) -> str:
    return LETTERS[int(cop)]
