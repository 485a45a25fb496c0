"""Users' own text for `fasttrain prepare --input`: plain text, JSON Lines (also gzip or zstd
compressed), Parquet, or a folder holding any mix of these.

Every format is streamed: a file is read a line, a Parquet row group or a compressed block at a time,
so memory does not grow with the input (a folder of .txt files reads one file at a time). Parquet needs
pyarrow and .zst needs zstandard (`pip install 'fasttrain-repeat[formats]'`); they are imported only
when such a file is read.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from pathlib import Path
from typing import Iterator

FORMATS_EXTRA = "pip install 'fasttrain-repeat[formats]'"
PARQUET_BATCH_ROWS = 256  # rows turned into Python strings at a time
_READ_CHUNK = 1 << 20


def iter_text_documents(path: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """Documents from a user's text, by the file's name:

    - `*.jsonl`, `*.jsonl.gz`, `*.jsonl.zst`: one JSON object per line, the document in `text_field`;
    - `*.parquet`: one row per document, the document in the string column `text_field`;
    - a folder: every .txt (one document per file), .jsonl, .jsonl.gz, .jsonl.zst and .parquet file
      under it, in the order of their relative paths; other files are ignored;
    - any other file: plain text, one document per line.

    Empty documents are skipped; input with no documents at all is an error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text path {str(path)!r} does not exist: give a folder of .txt files, "
                                f"a .jsonl file or a text file")
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and _folder_format(p)),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no input files: no .txt files (one document each) and no "
                             ".jsonl, .jsonl.gz, .jsonl.zst or .parquet files")
        return _nonempty(_iter_folder(files, text_field), path)
    return _nonempty(_iter_file(path, _file_format(path), text_field), path)


def _file_format(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"):
        if name.endswith(suffix):
            return suffix
    return "lines"


def _folder_format(path: Path) -> str | None:
    if path.name.startswith("."):
        return None
    if path.name.lower().endswith(".txt"):
        return ".txt"
    found = _file_format(path)
    return None if found == "lines" else found


def _iter_folder(files: list[Path], text_field: str) -> Iterator[str]:
    for file in files:
        kind = _folder_format(file)
        if kind == ".txt":
            text = _read_utf8(file)
            if text.strip():
                yield text
        else:
            yield from _iter_file(file, kind, text_field)


def _iter_file(path: Path, kind: str, text_field: str) -> Iterator[str]:
    if kind == ".parquet":
        return _iter_parquet(path, text_field)
    if kind == "lines":
        return _iter_lines(path)
    if kind == ".jsonl.zst":
        _zstandard(path)  # missing now, before any work
    return _iter_jsonl(path, text_field, kind)


def _zstandard(path: Path):
    try:
        import zstandard
    except ImportError:
        raise ValueError(f"{str(path)!r}: reading .zst needs the zstandard package: {FORMATS_EXTRA}") from None
    return zstandard


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


# ---- line-oriented files, plain or compressed -----------------------------------------------------

class _ZstdReader(io.RawIOBase):
    """A .zst file as a byte stream, decompressed a block at a time. Unlike zstandard's own stream
    reader, it refuses a file that ends inside a frame (a truncated download or copy), and it reads
    files of several concatenated frames (pzstd, `cat a.zst b.zst`)."""

    def __init__(self, path: Path):
        zstandard = _zstandard(path)
        self._error = zstandard.ZstdError
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._file = open(path, "rb")
        self._path = path
        self._pending = b""
        self._compressed_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._file.read(_READ_CHUNK)
            if not chunk:
                if self._compressed_bytes == 0:
                    raise ValueError(f"{str(self._path)!r} is empty, not a zstd file")
                if not self._frame.eof:
                    raise ValueError(f"{str(self._path)!r} is truncated: it ends inside a zstd frame "
                                     f"(after {self._compressed_bytes:,} bytes); copy or download it again")
                return 0
            self._compressed_bytes += len(chunk)
            self._pending = self._decompress(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        try:
            while chunk:
                if self._frame.eof:  # the previous frame ended: the next one starts here
                    self._frame = self._decompressor.decompressobj()
                out.append(self._frame.decompress(chunk))
                chunk = self._frame.unused_data if self._frame.eof else b""
        except self._error as e:
            raise ValueError(f"{str(self._path)!r} is not valid zstd data ({e})") from None
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_binary(path: Path, kind: str):
    if kind == ".jsonl.gz":
        return gzip.open(path, "rb")
    if kind == ".jsonl.zst":
        return io.BufferedReader(_ZstdReader(path), buffer_size=_READ_CHUNK)
    return open(path, "rb")


def _iter_file_lines(path: Path, kind: str = "lines") -> Iterator[tuple[int, str]]:
    with _open_binary(path, kind) as f:
        number = 0
        try:
            for number, raw in enumerate(f, start=1):
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{str(path)!r} line {number} is not UTF-8: convert the file to UTF-8") from None
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # gzip: truncated, not gzip, or corrupt
            what = "is truncated" if isinstance(e, EOFError) else "is not valid gzip data"
            raise ValueError(f"{str(path)!r} {what} (after line {number}: {e}); copy or download it again") from None


def _iter_jsonl(path: Path, text_field: str = "text", kind: str = ".jsonl") -> Iterator[str]:
    for number, line in _iter_file_lines(path, kind):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"{str(path)!r} line {number} needs a JSON object with a string field \"{text_field}\""
                             + ("" if text_field != "text" else " (or name the field with --text-field)"))
        if record[text_field].strip():
            yield record[text_field]


def _iter_lines(path: Path) -> Iterator[str]:
    for _, line in _iter_file_lines(path):
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


# ---- Parquet ----------------------------------------------------------------------------------------

def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    """Opens the file and checks its column now (a bad file fails before any work), then streams rows."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{str(path)!r}: reading Parquet needs the pyarrow package: {FORMATS_EXTRA}") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise ValueError(f"{str(path)!r} is not a readable Parquet file ({_first_line(e)})") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise ValueError(f"{str(path)!r} has no column \"{text_field}\" (its columns: {', '.join(schema.names)}); "
                         "name the text column with --text-field")
    column_type = schema.field(text_field).type
    if not (pyarrow.types.is_string(column_type) or pyarrow.types.is_large_string(column_type)):
        raise ValueError(f"{str(path)!r} column \"{text_field}\" holds {column_type}, not strings; "
                         "name the text column with --text-field")
    return _parquet_rows(pyarrow, parquet, path, text_field)


def _parquet_rows(pyarrow, parquet, path: Path, text_field: str) -> Iterator[str]:
    # One row group at a time: ParquetFile.iter_batches kept every batch it had decoded allocated
    # (pyarrow 26: 450 MB after 200k documents of a 2.4 GB file), a row group is freed once read.
    with parquet:
        try:
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=[text_field], use_threads=False)
                for batch in table.to_batches(max_chunksize=PARQUET_BATCH_ROWS):
                    for text in batch.column(0).to_pylist():
                        if text is not None and text.strip():
                            yield text
                del table
        except (pyarrow.ArrowException, OSError) as e:
            raise ValueError(f"{str(path)!r} is a damaged Parquet file ({_first_line(e)})") from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
