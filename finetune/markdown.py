"""Markdown written from data (class names, sources): literal text, so a name cannot break a table or inject markup.
Used by report (report.md) and export (the model card)."""

from __future__ import annotations

import re


def markdown_table(rows: list[dict], columns: dict[str, str]) -> str:
    """columns: row key -> header."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row[key]) for key in columns) + " |" for row in rows]
    return "\n".join(lines)


def format_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.1%}"
    return markdown_text(str(value))


def markdown_code(text: str) -> str:
    """Text from data (a path, a hub id) as an inline code span: shown as it is, where a backslash escape would
    show as a backslash. A backtick inside it gets a longer fence."""
    text = " ".join(text.split())
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def markdown_text(text: str) -> str:
    """A class name (any text from the data) as literal Markdown: one line, no markup, no HTML."""
    text = " ".join(text.split())
    return re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", text)
