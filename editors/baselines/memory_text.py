"""The memory text of T-Patcher's memory loss: paragraphs of ordinary text the patch must stay off on.

The paper samples WikiText-103 paragraphs. Here the text is a local plain-text file, one paragraph
per line (e.g. the train split of the public `wikitext-103-raw-v1` data set, written one paragraph a
line); offline the default is the toy world's invented text facts, one paragraph per invented
country. Either way a paragraph shorter than `min_words` words, and a WikiText heading
(" = Title = ", " = = Section = = "), is skipped.
"""
from __future__ import annotations

import os

from utils.errors import UserError

ENV_VAR = "LIVEEDIT_TP_MEMORY_CORPUS"
"""Environment variable that overrides the config's `memory_corpus` (a path)."""


def is_heading(line: str) -> bool:
    """A WikiText heading: ' = Title = ', ' = = Section = = ' (text between runs of '=')."""
    text = line.strip()
    return len(text) >= 2 and text.startswith("=") and text.endswith("=")


def keep(paragraphs, min_words: int) -> list[str]:
    """The paragraphs that are no heading and have at least `min_words` words (whitespace-split)."""
    return [p.strip() for p in paragraphs if not is_heading(p) and len(p.split()) >= min_words]


def toy_paragraphs() -> list[str]:
    """The toy world's text facts, the four facts of one invented country per paragraph."""
    from toyworld.world import text_facts, text_prompt

    facts = text_facts()
    lines = [text_prompt(f.loc) + " " + f.answer for f in facts]
    return [" ".join(lines[i:i + 4]) for i in range(0, len(lines), 4)]


def resolve_path(configured: str | None) -> str | None:
    """The memory text file to read: $LIVEEDIT_TP_MEMORY_CORPUS, else the config's value (None: toy facts)."""
    return os.environ.get(ENV_VAR) or configured


def load_paragraphs(path: str | None, min_words: int) -> list[str]:
    """Paragraphs of the file at `path` (one per line), or of the toy world when `path` is None."""
    if path is None:
        paragraphs = keep(toy_paragraphs(), min_words)
        where = "the toy world's text facts"
    else:
        if not os.path.isfile(path):
            raise UserError(f"T-Patcher memory text {path} does not exist (config key memory_corpus or "
                            f"${ENV_VAR}; a plain-text file, one paragraph per line)")
        with open(path, encoding="utf-8", errors="replace") as f:
            paragraphs = keep(f, min_words)
        where = path
    if not paragraphs:
        raise UserError(f"T-Patcher memory text {where} has no paragraph of at least {min_words} words "
                        f"(config key memory_min_words; headings are skipped)")
    return paragraphs
