"""Users' own text for `fasttrain prepare --input`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


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

