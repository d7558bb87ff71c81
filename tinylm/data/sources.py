"""Where instruction records come from: the Hugging Face Hub, a local file, or the built-in synthetic tasks.

Every source yields records in Dolly's schema (instruction, context, response, category); Alpaca's
(instruction, input, output) is mapped onto it. Conversations, OpenAI's `messages` (role, content) or
ShareGPT's `conversations` (from, value), become records whose last turn is the instruction and response
and whose earlier turns are its `history`, through the same mapping the HTTP API renders messages with.
Problems are reported in one line naming the file and line or record (and the field), so a user can fix
their data without reading a traceback.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm.data.synthetic import synthetic_records
from tinylm.prompts import ROLES, ConversationError, Turn, conversation_turns

DOLLY = "databricks/databricks-dolly-15k"
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HUB_PROBE_SECONDS = 8
HUB_HELP = (
    "use a local file (--data path/to/dolly.jsonl, with instruction/context/response fields, or a .txt "
    "file of plain text) or the offline demo data (--data synthetic)"
)


class DataError(ValueError):
    """A data problem a user must fix; the message names the file, line or record."""


# ShareGPT's speakers in the roles `conversation_turns` reads.
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}
# Each conversation format: its list field, and each message's role and content fields.
CONVERSATION_FIELDS = {"messages": ("role", "content"), "conversations": ("from", "value")}


@dataclass(frozen=True)
class Record:
    """One instruction and its response; in a conversation, the last turn, after the earlier `history`."""

    instruction: str
    context: str
    response: str
    category: str = ""
    history: tuple[Turn, ...] = ()

    @property
    def turns(self) -> tuple[Turn, ...]:
        return (*self.history, Turn(self.instruction, self.response, self.context))

    @property
    def prompt(self) -> tuple[tuple[str, ...], ...]:
        """Everything the model is shown before the last answer: two records with the same prompt ask the
        same question."""
        return (
            *((t.instruction, t.context, t.response) for t in self.history),
            (self.instruction, self.context),
        )

    def questions(self) -> list[Record]:
        """One record per answer, each after the turns before it: how every answer of a conversation is
        asked when it is evaluated (a single-turn record is its own one question)."""
        turns = self.turns
        return [
            Record(t.instruction, t.context, t.response, self.category, history=turns[:number])
            for number, t in enumerate(turns)
        ]


def _conversation_record(raw: dict[str, Any], where: str, field: str) -> Record:
    """A `messages` or `conversations` record as the template's turns, or fail naming the field."""
    role_key, content_key = CONVERSATION_FIELDS[field]
    roles = {r: r for r in ROLES} if field == "messages" else SHAREGPT_ROLES
    items = raw[field]
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: field {field} must be a non-empty list of messages")
    messages = []
    for index, item in enumerate(items):
        name = f"{field}[{index}]"
        if not isinstance(item, dict):
            raise DataError(f"{where}: field {name} must be an object with {role_key} and {content_key}")
        role, content = item.get(role_key), item.get(content_key)
        if role not in roles:
            raise DataError(
                f"{where}: field {name}.{role_key} must be one of {', '.join(roles)}, got {_shown(role)}"
            )
        if content is not None and not isinstance(content, str):
            raise DataError(f"{where}: field {name}.{content_key} must be text, got {type(content).__name__}")
        messages.append((roles[role], content or ""))
    try:
        turns = conversation_turns(messages, answered=True)
    except ConversationError as exc:
        raise DataError(f"{where}: field {field}: {exc}") from None
    last = turns[-1]
    category = str(raw.get("category") or "")
    return Record(last.instruction, last.context, last.response, category, history=tuple(turns[:-1]))


def _shown(value: Any, limit: int = 40) -> str:
    """repr(value) cut short, so an error stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _to_record(raw: Any, where: str) -> Record:
    """Map a Dolly-, Alpaca-, OpenAI messages- or ShareGPT-shaped mapping to a Record, or fail naming `where`."""
    if not isinstance(raw, dict):
        raise DataError(
            f"{where}: expected an object with instruction/context/response fields (or messages, or "
            "conversations)"
        )
    conversation = next((f for f in CONVERSATION_FIELDS if f in raw), None)
    if conversation is not None:
        return _conversation_record(raw, where, conversation)
    if "response" in raw:
        missing = [k for k in ("instruction", "response") if k not in raw]
        context, response = raw.get("context", ""), raw.get("response")
    elif "output" in raw:
        missing = [k for k in ("instruction", "output") if k not in raw]
        context, response = raw.get("input", ""), raw.get("output")
    else:
        missing = [k for k in ("instruction", "response") if k not in raw]
        context, response = "", None
    if missing:
        raise DataError(f"{where}: record is missing field(s) {', '.join(missing)}")
    values = {"instruction": raw["instruction"], "context": context, "response": response}
    for name, value in values.items():
        if value is None:
            values[name] = ""
        elif not isinstance(value, str):
            raise DataError(f"{where}: field {name} must be text, got {type(value).__name__}")
    return Record(
        values["instruction"], values["context"], values["response"], str(raw.get("category") or "")
    )


def _read_jsonl(path: Path) -> Iterable[Record]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
            yield _to_record(raw, f"{path}:{number}")


def _read_json(path: Path) -> Iterable[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return (_to_record(raw, f"{path}: record {i}") for i, raw in enumerate(data, start=1))


# Python's csv module refuses fields over 131,072 characters by default; a long context passage is data,
# not an error, so allow fields as long as the reader can hold.
CSV_FIELD_LIMIT = 2**31 - 1


def _read_csv(path: Path) -> Iterable[Record]:
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, strict=True)
        try:
            # Line numbers count the header as line 1, as an editor shows them.
            yield from (_to_record(row, f"{path}:{i}") for i, row in enumerate(reader, start=2))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def _read_parquet(path: Path) -> Iterable[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    return (_to_record(raw, f"{path}: row {i}") for i, raw in enumerate(rows, start=1))


def read_local(path: Path) -> list[Record]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise DataError(f"{path}: unsupported data file type (use {', '.join(LOCAL_SUFFIXES)})")
    try:
        return list(readers[path.suffix](path))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from None


def _hub_reachable(name: str) -> bool:
    """A quick look at the Hub (a few seconds at most), so an offline machine fails fast.

    Without it, `datasets` retries for about 25 s before giving up. Any answer from the server, even
    "not found", counts as reachable: `load_dataset` then reports it properly.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().dataset_info(name, timeout=HUB_PROBE_SECONDS)
    except HfHubHTTPError:
        return True
    except Exception:
        return False
    return True


@contextlib.contextmanager
def _hub_offline():
    """Offline mode for this call only, so `datasets` uses its cache instead of retrying the network."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


@functools.cache
def hub_dataset(name: str, config: str | None = None, split: str = "train") -> Any:
    """Download (or reuse the cached copy of) one split of a Hub data set, once per process."""
    import datasets
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    offline = datasets.config.HF_HUB_OFFLINE or not _hub_reachable(name)
    try:
        with _hub_offline() if offline else contextlib.nullcontext():
            return datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "the Hub cannot be reached and no copy is cached here" if offline else first[:200]
        raise DataError(f"could not load {name!r} from the Hugging Face Hub ({where}); {HUB_HELP}") from None


def read_hub(name: str) -> list[Record]:
    return [_to_record(raw, f"{name}: row {i}") for i, raw in enumerate(hub_dataset(name), start=1)]


def file_stamp(path: Path) -> list[Any]:
    """Path, size and modification time: enough to notice an edited file without reading it."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _is_local(source: str) -> bool:
    return Path(source).suffix in LOCAL_SUFFIXES or Path(source).exists()


def _check_local_file(path: Path) -> None:
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"data file {path} {problem}")


def records_fingerprint(source: str, *, synthetic_size: int, seed: int) -> dict[str, Any]:
    """What identifies the records of a source, for the tokenized-data cache's key."""
    if source == "synthetic":
        # Hashing the generated records (a tenth of a second for Dolly's size) notices a changed generator.
        records = json.dumps(synthetic_records(synthetic_size, seed=seed)).encode()
        return {"synthetic": synthetic_size, "seed": seed, "sha256": hashlib.sha256(records).hexdigest()}
    if _is_local(source):
        _check_local_file(Path(source))
        return {"file": file_stamp(Path(source))}
    return {"hub": source, "fingerprint": getattr(hub_dataset(source), "_fingerprint", None)}


def load_records(source: str, *, synthetic_size: int, seed: int) -> list[Record]:
    """All usable records of a source; records with an empty instruction or response are dropped."""
    if source == "synthetic":
        records = [
            _to_record(r, f"synthetic record {i}")
            for i, r in enumerate(synthetic_records(synthetic_size, seed=seed))
        ]
    elif _is_local(source):
        _check_local_file(Path(source))
        records = read_local(Path(source))
    else:
        records = read_hub(source)
    usable = [r for r in records if r.instruction.strip() and r.response.strip()]
    if not usable:
        raise DataError(f"{source}: no usable records (each needs a non-empty instruction and response)")
    return usable
