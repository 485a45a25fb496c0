"""fortune files (texts separated by '%' lines)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

from .cleaning import GROUP_CHARS, WRAPPED_PROSE_CHARS, decode_legacy, make_documents, normalize_whitespace


# Pictures, not prose; and a file of phrases in other languages.
FORTUNE_FILES_SKIPPED = frozenset({"art", "ascii-art", "translate-me"})


def iter_fortunes(path: str | os.PathLike) -> Iterator[str]:
    """Raw fortunes of one fortune file: texts separated by lines holding a single '%'."""
    current: list[str] = []
    with open(path, "rb") as f:
        for raw in f:
            line = decode_legacy(raw).rstrip("\r\n")
            if line == "%":
                if current:
                    yield "\n".join(current)
                current = []
            else:
                current.append(line)
    if "".join(current).strip():
        yield "\n".join(current)


def iter_fortune_documents(fortunes_dir: str | os.PathLike) -> Iterator[str]:
    """Fortunes of every file in fortunes_dir (sorted; no pictures, no repeats), grouped to about
    GROUP_CHARS per document."""
    fortunes_dir = Path(fortunes_dir)
    files = sorted(p for p in fortunes_dir.iterdir()
                   if p.is_file() and not p.is_symlink() and not p.suffix and p.name not in FORTUNE_FILES_SKIPPED)
    seen: set[bytes] = set()  # the same fortune turns up in several files
    for file in files:
        unique = []
        for fortune in iter_fortunes(file):
            text = normalize_whitespace(fortune, unwrap_from=WRAPPED_PROSE_CHARS)
            key = hashlib.blake2b(text.encode(), digest_size=8).digest()
            if text and key not in seen:
                seen.add(key)
                unique.append(text)
        yield from make_documents(unique, GROUP_CHARS)

