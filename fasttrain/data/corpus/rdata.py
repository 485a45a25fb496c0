"""R data files (lazy-load databases, XDR serialization) read without R: Jane Austen's novels from the
Debian package r-cran-janeaustenr."""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Iterable, Iterator

from .cleaning import make_documents, normalize_whitespace


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
        yield from make_documents(iter_novel_chapters(lines))

