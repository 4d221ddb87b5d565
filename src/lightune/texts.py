"""Texts in: bytes decoded as UTF-8 (naming the place of a bad byte), the check that every text is a non-blank
string, and the cleaning every text gets before tokenisation (training, evaluation, predict and serve alike)."""

from __future__ import annotations

import codecs
import itertools
import re
import unicodedata
from pathlib import Path

from .errors import DataError

_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
# zero-width space, word joiner, zero-width no-break space (a byte-order mark): they only ever separate or join
# words invisibly (BERT's tokenizer drops them too); joiners that shape scripts (ZWJ, ZWNJ) stay
_ZERO_WIDTH = re.compile("[\u200b\u2060\ufeff]")
_INVISIBLE = ("Cc", "Cf")  # control and format characters (bidi marks, soft hyphens, ...)
# what a blank text may start with: whitespace, HTML line breaks, the usual control and format characters (the
# others are found by their category)
_LEADING_INVISIBLE = re.compile(r"(?:\s|<br\s*/?>|[\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e"
                                r"\u2060-\u2064\u2066-\u206f\ufeff])*", re.IGNORECASE)


def clean_text(text: str) -> str:
    """Turn HTML line breaks into spaces, drop zero-width spaces and byte-order marks, and collapse whitespace.

    Control characters stay: real reviews hold C1 characters (IMDb's \x96 and \x97 dashes, from cp1252), and
    tokenizers treat them their own way."""
    return _SPACES.sub(" ", _HTML_BREAK.sub(" ", _ZERO_WIDTH.sub("", text))).strip()


def is_blank(text: str) -> bool:
    """True when nothing visible is left once the text is cleaned: whitespace, HTML line breaks, control and format
    characters (zero-width spaces, a byte-order mark, bidi marks) only. Such a text is empty, like "  "."""
    rest = text[_LEADING_INVISIBLE.match(text).end():]
    if rest and unicodedata.category(rest[0]) not in _INVISIBLE:  # visible, and cleaning keeps it: at once
        return False
    return all(char.isspace() or unicodedata.category(char) in _INVISIBLE for char in clean_text(rest))


def check_texts(texts, where: str | None = None) -> list[str]:
    """The texts as a list; DataError naming the first one that is missing, not a string or blank, also once
    cleaned (with `where`, a data source's rows: "WHERE: row N ..."; without, a caller's list: "text N ...")."""
    if isinstance(texts, str):
        raise DataError("predict() takes a list of texts, not a single string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if isinstance(text, str) and not is_blank(text):
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
