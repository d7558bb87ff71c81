"""Plain text for language-model pretraining: a .txt file, a folder of them, or a Hub data set's text field.

Documents are joined with end-of-text between them. The validation split is the last `val_fraction` of the
characters, as nanoGPT splits tiny Shakespeare, so its published figures compare with ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from tinylm.config import DataConfig
from tinylm.data.sources import LOCAL_SUFFIXES, DataError, file_stamp, hub_dataset
from tinylm.data.tokens import token_dtype
from tinylm.tokenizer import Tokenizer

HF_PREFIX = "hf:"


def is_text_source(source: str) -> bool:
    """A .txt file, a folder (not one named like a records file), or hf:NAME."""
    path = Path(source)
    return (
        source.startswith(HF_PREFIX)
        or path.suffix == ".txt"
        or (path.is_dir() and path.suffix not in LOCAL_SUFFIXES)
    )


def _text_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"data folder {folder} holds no .txt files")
    return files


def text_fingerprint(data: DataConfig) -> dict[str, Any]:
    """What identifies the text without reading it: path, size and modification time of each file, or the
    Hub data set's own fingerprint."""
    source = data.source
    if source.startswith(HF_PREFIX):
        table = hub_dataset(source.removeprefix(HF_PREFIX), data.hf_config, data.hf_split)
        return {"hub": source, "config": data.hf_config, "split": data.hf_split, "field": data.text_field,
                "fingerprint": getattr(table, "_fingerprint", None)}  # fmt: skip
    path = Path(source)
    if path.is_dir():
        return {"files": [file_stamp(p) for p in _text_files(path)]}
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    return {"files": [file_stamp(path)]}


def read_documents(data: DataConfig) -> list[str]:
    """Every document of the source, in a fixed order (files sorted by path)."""
    source = data.source
    if source.startswith(HF_PREFIX):
        table = hub_dataset(source.removeprefix(HF_PREFIX), data.hf_config, data.hf_split)
        columns = list(getattr(table, "column_names", []))
        if data.text_field not in columns:
            raise DataError(
                f"{source}: no field {data.text_field!r} (it has {', '.join(columns)}); "
                "choose one with --set text_field=NAME"
            )
        documents = [str(t) for t in table[data.text_field] if t]
    else:
        path = Path(source)
        files = _text_files(path) if path.is_dir() else [path]
        documents = []
        for file in files:
            try:
                documents.append(file.read_text(encoding="utf-8"))
            except UnicodeDecodeError as exc:
                raise DataError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            except OSError as exc:
                raise DataError(f"cannot read data file {file}: {exc.strerror or exc}") from None
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise DataError(f"{source}: no text to train on")
    return documents


def split_documents(documents: list[str], *, val_fraction: float) -> tuple[list[str], list[str]]:
    """Train on the first (1 - val_fraction) of the characters, validate on the rest; the document that
    holds the cut is split in two there."""
    total = sum(len(d) for d in documents)
    cut = int(total * (1 - val_fraction))
    train: list[str] = []
    for index, document in enumerate(documents):
        if cut < len(document):
            val = [document[cut:], *documents[index + 1 :]]
            train.append(document[:cut])
            return [d for d in train if d], [d for d in val if d]
        train.append(document)
        cut -= len(document)
    return train, []


def _pieces(document: str, size: int) -> Iterable[str]:
    """Cut a long document into pieces of about `size` characters, each ending after a newline between two
    non-space characters: there GPT-2's split pattern (and so every tokenizer here) breaks anyway, so the
    pieces' tokens are exactly the whole document's."""
    start = 0
    while len(document) - start > size:
        cut = document.find("\n", start + size)
        while cut != -1 and (
            cut + 1 >= len(document) or document[cut + 1].isspace() or document[cut - 1].isspace()
        ):
            cut = document.find("\n", cut + 1)
        if cut == -1:
            break
        yield document[start : cut + 1]
        start = cut + 1
    yield document[start:]


def token_stream(
    tokenizer: Tokenizer,
    documents: Iterable[str],
    *,
    progress: Callable[[int], object] | None = None,
    piece_size: int = 1 << 20,
) -> np.ndarray:
    """The documents' tokens, each followed by end-of-text, as one array; `progress` gets the number of
    characters done after each piece."""
    ids: list[int] = []
    for document in documents:
        for piece in _pieces(document, piece_size):
            ids += tokenizer.encode(piece)
            if progress is not None:
                progress(len(piece))
        ids.append(tokenizer.eos_id)
    return np.array(ids, dtype=token_dtype(tokenizer.vocab_size))
