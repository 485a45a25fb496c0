"""dictd databases (.index + .dict.dz): Webster 1913 (GCIDE), FOLDOC, the Jargon File, The Devil's
Dictionary; the reader and each dictionary's markup cleaning."""
from __future__ import annotations

import gzip
import os
import re
import unicodedata
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .cleaning import BRACES, GROUP_CHARS, WRAPPED_PROSE_CHARS, decode_legacy, make_documents, normalize_whitespace

GCIDE_MIN_ENTRY_CHARS = 40


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
                yield decode_legacy(raw)


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
    text = normalize_whitespace(BRACES.sub("", text), unwrap_from=40)
    # Thousands of entries are bare cross-references ("Unjoyful / See joyful."): no language to learn.
    return text if len(text) >= GCIDE_MIN_ENTRY_CHARS else ""


_FOLDOC_EMAIL = re.compile(r"<([^<>\s@]+@[^<>\s]+)>")
_FOLDOC_DOMAIN = re.compile(r"<([A-Za-z][A-Za-z0-9 ,./()'&+-]*)>")
_FOLDOC_DATE = re.compile(r"^[ \t]*\(\d{4}-\d{2}-\d{2}\)[ \t]*$", re.M)
_BOX_DRAWING_LINE = re.compile(r"^.*[\u2500-\u257f].*\n?", re.M)


def clean_foldoc_entry(raw: str) -> str:
    """FOLDOC marks subject areas as <hardware, networking> and cross-references as {term}."""
    text = _FOLDOC_DOMAIN.sub(r"(\1)", _FOLDOC_EMAIL.sub(r"\1", _FOLDOC_DATE.sub("", raw)))
    return normalize_whitespace(BRACES.sub("", text), unwrap_from=40)


def clean_jargon_entry(raw: str) -> str:
    """Jargon File cross-references are {term}; its tables are drawn with box characters: dropped."""
    return normalize_whitespace(BRACES.sub("", _BOX_DRAWING_LINE.sub("", raw)), unwrap_from=40)


def clean_devil_entry(raw: str) -> str:
    # Prose wraps at about 70 columns; the verse has shorter lines, which stay lines.
    return normalize_whitespace(BRACES.sub("", raw), unwrap_from=WRAPPED_PROSE_CHARS)


def iter_dictd_documents(dictd_dir: str | os.PathLike, name: str, clean: Callable[[str], str],
                         keep_one_in: int = 1) -> Iterator[str]:
    """Documents of the dictd database `name` in dictd_dir: consecutive entries grouped to about
    GROUP_CHARS; with keep_one_in=k only groups 0, k, 2k, ... are kept (and only those are cleaned:
    groups are formed on the raw entries)."""
    dictd_dir = Path(dictd_dir)
    raw_entries = iter_dictd_entries(dictd_dir / f"{name}.index", dictd_dir / f"{name}.dict.dz")
    kept = (group for i, group in enumerate(_group_raw(raw_entries, GROUP_CHARS)) if i % keep_one_in == 0)
    return make_documents("\n\n".join(text for text in map(clean, group) if text) for group in kept)


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

