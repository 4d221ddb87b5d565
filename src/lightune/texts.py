"""Texts in: bytes decoded as UTF-8 (naming the place of a bad byte), the check that every text is a non-blank
string, and the cleaning every text gets before tokenisation (training, evaluation, predict and serve alike)."""

from __future__ import annotations

import codecs
import itertools
import re
from pathlib import Path

from .errors import DataError

_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Turn HTML line breaks into spaces and collapse whitespace."""
    return _SPACES.sub(" ", _HTML_BREAK.sub(" ", text)).strip()


def check_texts(texts, where: str | None = None) -> list[str]:
    """The texts as a list; DataError naming the first one that is missing, not a string or blank (with `where`, a
    data source's rows: "WHERE: row N ..."; without, a caller's list: "text N ...")."""
    if isinstance(texts, str):
        raise DataError("predict() takes a list of texts, not a single string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if isinstance(text, str) and text.strip():
            continue
        if where is None:
            raise DataError(f"text {i + 1} is " + ("empty" if isinstance(text, str) else
                                                   f"not a string ({type(text).__name__})"))
        if text is None or isinstance(text, str):
            raise DataError(f"{where}: row {i + 1} has an empty text")
        raise DataError(f"{where}: row {i + 1} has a non-string text ({type(text).__name__}: {text!r})")
    if where is not None and not texts:
        raise DataError(f"{where}: no rows")
    return texts


def check_text_file(path: Path, chunk_bytes: int = 1 << 20) -> None:
    """DataError naming the line and byte offset of the first byte that is not UTF-8 text (or is NUL)."""
    with path.open("rb") as fh:
        _check_text_chunks(iter(lambda: fh.read(chunk_bytes), b""), str(path))


def decode_text(raw: bytes, where: str) -> str:
    """raw decoded as UTF-8 (a leading byte-order mark dropped); DataError naming the place of a bad byte or NUL."""
    _check_text_chunks([raw], where)
    return raw.decode("utf-8").removeprefix("\ufeff")


def _check_text_chunks(chunks, where: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = newlines = 0  # bytes and line breaks before this chunk
    for chunk in itertools.chain(chunks, [b""]):  # the empty chunk ends the input: a cut-off character fails
        pending = len(decoder.getstate()[0])  # bytes of an unfinished character from the previous chunk
        problem = None
        try:
            decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            problem = (offset - pending + exc.start, f"byte 0x{exc.object[exc.start]:02x}")
        nul = chunk.find(b"\0")
        if nul >= 0 and (problem is None or offset + nul < problem[0]):
            problem = (offset + nul, "a NUL byte")
        if problem:
            at, what = problem
            line = newlines + chunk[:max(0, at - offset)].count(b"\n") + 1
            raise DataError(f"{where} is not UTF-8 text: {what} at line {line} (byte offset {at})")
        offset, newlines = offset + len(chunk), newlines + chunk.count(b"\n")
