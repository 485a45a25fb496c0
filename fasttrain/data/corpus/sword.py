"""SWORD modules (zText / zCom, OSIS markup): the World English Bible and the Bible commentaries."""
from __future__ import annotations

import html
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Iterator

from .cleaning import BRACES, make_documents, normalize_whitespace


def read_sword_conf(conf_path: str | os.PathLike) -> dict[str, str]:
    conf: dict[str, str] = {}
    for line in Path(conf_path).read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", "[")) and key.strip() not in conf:
            conf[key.strip()] = value.strip()
    return conf


def _sword_files(data_dir: Path, testament: str) -> tuple[Path, Path, Path] | None:
    for letter in "bcv":  # block per book, chapter or verse
        files = tuple(data_dir / f"{testament}.{letter}z{kind}" for kind in "svz")
        if all(f.exists() for f in files):
            return files
    return None


def _sword_verse_index(raw: bytes, blocks: list[tuple[int, int, int]], preferred: int) -> list[tuple[int, int, int]]:
    """Verse entries (block, start, size): 10 bytes each in zText/zCom, 12 in zText4/zCom4. The conf
    file's driver name is only a hint (some modules disagree with it): take the entry size whose
    entries all fall inside their blocks."""
    for entry_size in (preferred, 22 - preferred):
        if len(raw) % entry_size:
            continue
        fmt = "<IIH" if entry_size == 10 else "<III"
        entries = list(struct.iter_unpack(fmt, raw))
        if all(size == 0 or (block < len(blocks) and start + size <= blocks[block][2])
               for block, start, size in entries):
            return entries
    raise ValueError("SWORD verse index matches neither 10- nor 12-byte entries")


def iter_sword_blocks(data_dir: str | os.PathLike, wide_index: bool = False) -> Iterator[list[str]]:
    """Raw OSIS texts of a zText/zCom module, grouped by compressed block (a book or a chapter),
    in canonical order (Old then New Testament). Entries that several verses share are kept once."""
    data_dir = Path(data_dir)
    found = False
    for testament in ("ot", "nt"):
        files = _sword_files(data_dir, testament)
        if files is None or files[0].stat().st_size == 0:
            continue
        found = True
        block_path, verse_path, text_path = files
        blocks = list(struct.iter_unpack("<III", block_path.read_bytes()))  # offset, compressed, size
        entries = _sword_verse_index(verse_path.read_bytes(), blocks, 12 if wide_index else 10)
        seen: set[tuple[int, int, int]] = set()
        current_block, texts, data = -1, [], b""
        with open(text_path, "rb") as f:
            for block, start, size in entries:
                if size == 0 or (block, start, size) in seen:
                    continue
                seen.add((block, start, size))
                if block != current_block:
                    if texts:
                        yield texts
                    offset, compressed, _ = blocks[block]
                    f.seek(offset)
                    data = zlib.decompress(f.read(compressed))
                    current_block, texts = block, []
                texts.append(data[start:start + size].decode("utf-8", errors="replace"))
        if texts:
            yield texts
    if not found:
        raise FileNotFoundError(f"no SWORD data files (ot/nt .bzs/.bzv/.bzz) in {str(data_dir)!r}")


_OSIS_NOTE = re.compile(r"<note\b[^>]*/>|<note\b[^>]*>.*?</note>", re.S)
_OSIS_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.S)
_OSIS_MILESTONE_DIV = re.compile(r"<div\b[^>]*x-milestone[^>]*>")
_OSIS_PARAGRAPH = re.compile(r"<(?:div|p|lg|list|chapter|br)\b[^>]*>|</(?:div|p|lg|list)>|<lb\b[^>]*x-p\b[^>]*>")
_OSIS_LINE = re.compile(r"<(?:lb|l|item|row)\b[^>]*>|</(?:l|item|row)>")
_TAG = re.compile(r"<[^<>]*>")
_ESCAPED_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_OSIS_FOOTNOTE_MARK = re.compile(r"\{\d+\}")
_BREAK_MARKS = re.compile(r"[\x01\x02](?:\s*[\x01\x02])*")
_OSIS_CHAPTER_START = re.compile(r"<chapter\b[^>]*\bsID=")


def clean_osis(raw: str) -> str:
    """OSIS (also ThML/GBF: any <tag>) -> plain text; footnotes are dropped, titles and paragraphs
    become paragraphs, poetry lines lines. Start and end tags of one line or paragraph (with only
    spaces between) make one break."""
    text = _OSIS_NOTE.sub(" ", _OSIS_MILESTONE_DIV.sub("", raw))
    text = _OSIS_TITLE.sub(lambda m: "\x02" + m.group(1) + "\x02", text)
    text = _OSIS_LINE.sub("\x01", _OSIS_PARAGRAPH.sub("\x02", text))
    text = _BREAK_MARKS.sub(lambda m: "\n\n" if "\x02" in m.group() else "\n", text)
    text = html.unescape(_TAG.sub("", text))
    text = _OSIS_FOOTNOTE_MARK.sub("", _ESCAPED_TAG.sub("", text))  # HTML left escaped in the source
    return normalize_whitespace(BRACES.sub("", text))


def iter_sword_chapters(data_dir: str | os.PathLike, commentary: bool, wide_index: bool = False) -> Iterator[str]:
    """Cleaned chapters of a SWORD module: blocks split at OSIS <chapter sID=...> milestones.
    Bible verses are joined by spaces, commentary entries by paragraph breaks."""
    joiner = "\n\n" if commentary else " "
    for texts in iter_sword_blocks(data_dir, wide_index):
        chapters: list[list[str]] = [[]]
        for text in texts:
            match = _OSIS_CHAPTER_START.search(text)
            if match:
                chapters[-1].append(text[:match.start()])
                chapters.append([text[match.start():]])
            else:
                chapters[-1].append(text)
        for chapter in chapters:
            cleaned = clean_osis(joiner.join(chapter))
            if cleaned:
                yield cleaned


def iter_sword_module(sword_dir: str | os.PathLike, module: str) -> Iterator[str]:
    """Documents of the installed SWORD module `module` (its mods.d/<module>.conf)."""
    sword_dir = Path(sword_dir)
    conf = read_sword_conf(sword_dir / "mods.d" / f"{module}.conf")
    driver = conf.get("ModDrv", "zText")
    data_dir = sword_dir / conf.get("DataPath", "").lstrip("./").rstrip("/")
    chapters = iter_sword_chapters(data_dir, commentary=driver.lower().startswith("zcom"),
                                   wide_index=driver.endswith("4"))
    return make_documents(chapters)

