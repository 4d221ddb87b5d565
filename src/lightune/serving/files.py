"""What serving reads of an adapter run besides its weights: the tokenizer files, each checked against a size limit
from the file system before anything reads it, and how runs and base models are named to clients (never by a
path of the server)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import ModelError
from ..runs import check_file_size

# The files transformers' tokenizers read from a folder (tokenization_utils_base: the files every tokenizer may
# have, then the vocabularies of the BERT, RoBERTa/GPT-2, SentencePiece, tiktoken and Mistral tokenizers), and
# config.json, which AutoTokenizer reads when tokenizer_config.json names no tokenizer class.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "config.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "sentencepiece.model", "tokenizer.model",
                   "spm.model", "tiktoken.model", "tekken.json")
# The largest tokenizer file served: tokenizer.json of a 256k-token vocabulary (Gemma) is about 33 MB.
MAX_TOKENIZER_FILE_BYTES = 128 * 2**20


def tokenizer_files(saved: Path) -> list[Path]:
    """The tokenizer files in an adapter folder, each a regular file within MAX_TOKENIZER_FILE_BYTES (ModelError:
    a pipe or a device would never end, whatever its size says)."""
    files = [saved / name for name in TOKENIZER_FILES if (saved / name).exists()]
    for file in files:
        if not file.is_file():
            raise ModelError(f"{file} is not a regular file")
        check_file_size(file, MAX_TOKENIZER_FILE_BYTES, "a tokenizer file")
    return files


def check_adapter_files(saved: Path) -> list[Path]:
    """What loading an adapter reads besides its weights, within size limits (adapter_config.json: runs.read_run
    checked it); its tokenizer files."""
    return tokenizer_files(saved)


def tokenizer_key(saved: Path, files: list[Path]) -> str:
    """A digest of an adapter folder's tokenizer files (tokenizer_files): runs with equal keys share one tokenizer.

    Other files are never read: those that are not the adapter's own or its README count by name, size and time
    (a tokenizer file of a name not listed above then never makes two runs share a tokenizer they should not)."""
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    for file in sorted(set(saved.iterdir()) - set(files)):
        if not file.name.startswith("adapter_") and file.name != "README.md":
            stat = file.stat()
            digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def shown_model(name: str) -> str:
    """A base model as clients see it: a hub id or packaged name as given, a local directory by its name only (as
    models.resolve_model_path tells them apart)."""
    return Path(name).name if name.startswith(("/", ".", "~")) or name.count("/") > 1 else name
