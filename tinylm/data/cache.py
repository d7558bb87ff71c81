"""The on-disk cache of prepared data: built once, then opened (memory-mapped) in a fraction of a second.

An entry is a folder named by the hash of everything its contents depend on, so a changed source, tokenizer,
template or window length simply misses. It is built in a temporary folder and renamed into place, and
`meta.json` is written last, so a killed build never leaves an entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("tinylm")

CACHE_ENV = "TINYLM_CACHE"
# Bump when the layout of an entry changes, so old entries are not misread.
VERSION = 1
META = "meta.json"


class CacheError(RuntimeError):
    """The cache folder cannot be written; the message names it and how to choose another."""


def cache_root() -> Path:
    """$TINYLM_CACHE, else $XDG_CACHE_HOME/tinylm, else ~/.cache/tinylm."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tinylm"


def digest(value: Any) -> str:
    """A stable hash of JSON-able data (dict key order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def load_or_build(
    kind: str, key: dict[str, Any], build: Callable[[Path], dict[str, Any]]
) -> tuple[Path, dict[str, Any]]:
    """The entry folder for `key` and its metadata; on a miss `build(folder)` writes the entry's files into
    a fresh folder and returns the metadata to keep beside them."""
    name = digest({"version": VERSION, **key})[:32]
    folder = cache_root() / kind / name
    if (folder / META).is_file():
        return folder, json.loads((folder / META).read_text())["meta"]
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    except OSError as exc:
        raise CacheError(
            f"the data cache {cache_root()} cannot be written ({exc.strerror}): set {CACHE_ENV} to a "
            "writable folder"
        ) from None
    try:
        meta = build(building)
        (building / META).write_text(json.dumps({"key": key, "meta": meta}, default=str))
        try:
            os.rename(building, folder)
        except OSError:  # the name is taken; a complete entry (one with meta.json) is never removed,
            if (folder / META).is_file():  # as another process may be reading it: theirs is as good
                shutil.rmtree(building, ignore_errors=True)
            else:  # the remains of a broken entry
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(building, folder)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    log.info("cached in %s", folder)
    return folder, meta
