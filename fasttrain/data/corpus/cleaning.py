"""Cleaning shared by every source of the default corpus: whitespace, legacy encodings, and cutting
cleaned units (chapters, entries) into documents of a bounded size."""
from __future__ import annotations

import re
from typing import Iterable, Iterator

# Documents are cut to at most this many characters (at paragraph breaks), and short pieces
# (dictionary entries, fortunes, tiny chapters) are joined up to about GROUP_CHARS.
MAX_DOC_CHARS = 32_000
GROUP_CHARS = 4_000
MIN_DOC_CHARS = 500
# Text mixing wrapped prose and verse: a line this long was wrapped, a shorter one is a verse line.
WRAPPED_PROSE_CHARS = 62


# Markup braces: GCIDE, FOLDOC and Jargon cross-references, stray braces in OSIS texts.
BRACES = re.compile(r"[{}]")
_OVERSTRIKE = re.compile(r".\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\xad\u200b\ufeff]")


def normalize_whitespace(text: str, unwrap_from: int | None = None) -> str:
    """Collapse runs of spaces, strip lines, keep single blank lines between paragraphs.

    unwrap_from joins hard-wrapped lines back into paragraphs: a line is appended to the previous
    one when that line was at least `unwrap_from` characters long (so it was wrapped) and the new
    line is not indented less. 0 joins every line of a paragraph; None keeps lines (verse)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\x08" in text:
        text = _OVERSTRIKE.sub("", text)
    text = _CONTROL.sub("", text)
    paragraphs: list[list[str]] = []
    current: list[str] = []
    previous_len = previous_indent = 0
    for raw in text.split("\n"):
        line = " ".join(raw.split())  # str.split() splits on every Unicode space
        if not line:
            if current:
                paragraphs.append(current)
                current = []
            continue
        indent = len(raw) - len(raw.lstrip(" \t"))
        if (current and unwrap_from is not None and previous_len >= unwrap_from and indent >= previous_indent
                and not line.startswith("-- ")):  # an attribution stays on its own line
            current[-1] += " " + line
        else:
            current.append(line)
        previous_len, previous_indent = len(raw.rstrip()), indent
    if current:
        paragraphs.append(current)
    return "\n\n".join("\n".join(p) for p in paragraphs)


def split_long(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut text into pieces of at most max_chars, at paragraph breaks, else line breaks, else spaces."""
    if len(text) <= max_chars:
        return [text] if text else []
    for sep in ("\n\n", "\n", " "):
        parts = text.split(sep)
        if len(parts) > 1:
            break
    else:
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    target = len(text) / -(-len(text) // max_chars)  # pieces of about equal size, no tiny last one
    pieces, current = [], ""
    for part in parts:
        for sub in split_long(part, max_chars):
            if current and len(current) + len(sep) + len(sub) > max_chars:
                pieces.append(current)
                current = sub
            else:
                current = current + sep + sub if current else sub
            if len(current) >= target:
                pieces.append(current)
                current = ""
    if current and pieces and len(pieces[-1]) + len(sep) + len(current) <= max_chars:
        pieces[-1] += sep + current
    elif current:
        pieces.append(current)
    return pieces


def group_short(texts: Iterable[str], min_chars: int, sep: str = "\n\n") -> Iterator[str]:
    """Join consecutive texts until each group holds at least min_chars; a short remainder at the
    end joins the last group."""
    buffer: list[str] = []
    size = 0
    previous = None
    for text in texts:
        if not text:
            continue
        buffer.append(text)
        size += len(text) + len(sep)
        if size >= min_chars:
            if previous is not None:
                yield previous
            previous, buffer, size = sep.join(buffer), [], 0
    if buffer and previous is not None:
        yield previous + sep + sep.join(buffer)
    elif buffer or previous is not None:
        yield sep.join(buffer) if buffer else previous


def make_documents(units: Iterable[str], min_chars: int = MIN_DOC_CHARS) -> Iterator[str]:
    """Cleaned units (chapters, entries) -> documents: short ones joined, long ones cut."""
    for doc in group_short(units, min_chars):
        yield from split_long(doc)


def decode_legacy(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # a few GCIDE entries hold stray Windows-1252 bytes
        return raw.decode("cp1252", errors="replace")

