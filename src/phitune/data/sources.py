"""Where training records come from: files and datasets as they are, turned into raw dicts with a location.

Readers yield (location, dict); data.validate_records() is the one place that checks and normalises them,
so every source gets the same per-record messages. Locations, as the messages print them:
  JSONL, CSV/TSV       the line number in the file (CSV: the line where the row starts; the header is line 1)
  JSON array           "item N", the index in the array (from 0, as in data[N])
  Parquet, `datasets`  "row N", from 0 (as in dataset[N])

Kinds (detect_kind): jsonl, json (an array of objects; a .json file that holds JSON lines reads as JSONL),
csv, tsv, parquet, saved (a `datasets` save_to_disk directory), datasets (a directory of data files read
through datasets.load_dataset), hub (a Hub dataset id such as org/name, read through datasets).

Column mapping (--columns prompt=question,response=answer) renames the source's fields to phitune's before
validation; messages=conversations also maps ShareGPT turns ({"from": "human"|"gpt"|..., "value"}) to
{"role", "content"}.
"""
from __future__ import annotations

import csv
import difflib
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from phitune.errors import ConfigError, DataError, PhituneError

FIELDS = ("prompt", "response", "completion", "instruction", "input", "output", "messages", "text", "system")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "system": "system"}
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet", ".pq": "parquet"}
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt")


def parse_columns(spec: str | None) -> dict[str, str]:
    """'prompt=question,response=answer' -> {"prompt": "question", "response": "answer"} (phitune field -> source)."""
    if not spec:
        return {}
    mapping = {}
    for part in str(spec).replace(" ", ",").split(","):
        if not part:
            continue
        target, sep, source = part.partition("=")
        if not sep or not target or not source:
            raise ConfigError("columns", f"'{part}' is not FIELD=COLUMN; write e.g. prompt=question,response=answer")
        if target not in FIELDS:
            close = difflib.get_close_matches(target, FIELDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError("columns", f"'{target}' is not a phitune field{hint}; fields: {', '.join(FIELDS)}")
        if target in mapping:
            raise ConfigError("columns", f"'{target}' is mapped twice")
        mapping[target] = source
    return mapping


def detect_kind(path: str | Path) -> str:
    """The kind of source `path` names (see the module docstring); raises DataError when there is none."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
            return "saved"
        if any(f.suffix in DATA_SUFFIXES for f in p.rglob("*") if f.is_file()):
            return "datasets"
        raise DataError(path, None, "is a directory with no data files and no saved dataset; give a .jsonl, .json, "
                                    ".csv or .parquet file, or a directory written by datasets' save_to_disk")
    if p.is_file():
        kind = SUFFIXES.get(p.suffix.lower(), "jsonl")
        if kind == "json" and _first_char(p) != "[":
            return "jsonl"
        return kind
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).suffix:
        return "hub"
    raise DataError(path, None, "file not found")


def rows(path: str | Path, kind: str | None = None, split: str = "train") -> Iterator[tuple[int | str, Any]]:
    """Yield (location, raw record) from any source kind."""
    kind = kind or detect_kind(path)
    if kind == "jsonl":
        yield from _jsonl(Path(path))
    elif kind == "json":
        yield from _json_array(Path(path))
    elif kind in ("csv", "tsv"):
        yield from _csv(Path(path), "\t" if kind == "tsv" else ",")
    elif kind == "parquet":
        yield from _parquet(Path(path))
    else:
        yield from _datasets(path, kind, split)


def mapped(items: Iterable[tuple[int | str, Any]], path: str | Path, columns: dict[str, str]
           ) -> Iterator[tuple[int | str, Any]]:
    """Apply a --columns mapping (phitune field -> source column) to (location, record) pairs."""
    if not columns:
        yield from items
        return
    for loc, obj in items:
        if not isinstance(obj, dict):
            yield loc, obj
            continue
        missing = [src for src in columns.values() if src not in obj]
        if missing:
            close = difflib.get_close_matches(missing[0], [str(k) for k in obj], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DataError(path, loc, f"column '{missing[0]}' named in --columns is missing{hint}; this record has "
                                       f"columns {sorted(map(str, obj))}")
        renamed = {k: v for k, v in obj.items() if k not in columns.values() and k not in columns}
        renamed.update({target: obj[src] for target, src in columns.items()})
        yield loc, renamed


def sharegpt(obj: Any, path: str | Path, loc: int | str) -> Any:
    """Map ShareGPT turns ({"from", "value"}) in obj["messages"] to {"role", "content"}; other records pass."""
    messages = obj.get("messages")
    if isinstance(messages, str) and messages.lstrip().startswith("["):  # CSV/Parquet cells holding JSON
        try:
            messages = obj["messages"] = json.loads(messages)
        except json.JSONDecodeError as e:
            raise DataError(path, loc, f"'messages' holds invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(messages, list) or not any(isinstance(m, dict) and "from" in m for m in messages):
        return obj
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            raise DataError(path, loc, f"messages[{i}] must be a ShareGPT turn with 'from' and 'value' (or 'role' "
                                       f"and 'content' in every turn)")
        role = SHAREGPT_ROLES.get(str(m["from"]).lower())
        if role is None:
            raise DataError(path, loc, f"messages[{i}].from is '{m['from']}'; ShareGPT roles phitune knows: "
                                       f"{', '.join(SHAREGPT_ROLES)}")
        turns.append({"role": role, "content": m["value"]})
    return {**obj, "messages": turns}


# ---------------------------------------------------------------- readers

def _first_char(p: Path) -> str:
    with open(p, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1].decode("latin-1")


def _not_utf8(path: Path) -> DataError:
    """The error for a file that is not UTF-8, naming the first line that is not (UTF-8 never splits a line)."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                return DataError(path, lineno, f"not valid UTF-8 at byte {e.start + 1} of the line; save the file "
                                               f"as UTF-8")
    return DataError(path, None, "not valid UTF-8; save the file as UTF-8")


def _whole_file(path: Path) -> DataError | None:
    """When a file read as JSON lines is one JSON document spread over lines, the error that says so."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, OSError):
        return None
    if isinstance(doc, dict):
        return DataError(path, None, "holds one JSON object; expected an array of records ([{...}, {...}]) or JSON "
                                     "lines (one record per line)")
    if isinstance(doc, list) and path.suffix.lower() != ".json":
        return DataError(path, None, "holds a JSON array, not JSON lines; name it .json, or write one record per line")
    return None


def _jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    first = True
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise DataError(path, lineno, f"not valid UTF-8 at byte {e.start + 1} of the line; save the file as "
                                              f"UTF-8") from None
            if not line:
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                whole = _whole_file(path) if first else None
                raise (whole or DataError(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})")) from None
            first = False


def _json_array(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(items, list):
        raise DataError(path, None, f"holds a JSON {type(items).__name__}; expected an array of records")
    for i, obj in enumerate(items):
        yield f"item {i}", obj


def _csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, str]]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long answers are one cell
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            start = reader.line_num + 1
            for cells in reader:
                if any(c.strip() for c in cells):
                    if len(cells) != len(header):
                        raise DataError(path, start, f"{len(cells)} cells but the header has {len(header)} "
                                                     f"columns ({', '.join(header)}); quote cells that hold "
                                                     f"'{delimiter}' or line breaks")
                    yield start, dict(zip(header, cells))
                start = reader.line_num + 1
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except csv.Error as e:
        raise DataError(path, None, f"not readable as CSV: {e}") from None


def _need(package: str, what: str) -> Any:
    try:
        return __import__(package)
    except ImportError:
        raise PhituneError(f"{what} needs the {package} package, which is not installed; pip install {package} "
                           f"(or pip install 'phitune[data]')") from None


def _parquet(path: Path) -> Iterator[tuple[str, Any]]:
    _need("pyarrow", "reading Parquet")
    import pyarrow.parquet as pq
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError types
        raise DataError(path, None, f"not a readable Parquet file ({str(e).splitlines()[0]})") from None
    i = 0
    for batch in table.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            yield f"row {i}", obj
            i += 1


def _datasets(path: str | Path, kind: str, split: str) -> Iterator[tuple[str, Any]]:
    _need("datasets", f"reading {path}")
    import datasets
    datasets.disable_progress_bars()
    try:
        if kind == "saved":
            ds = datasets.load_from_disk(str(path))
        elif kind == "hub":
            ds = datasets.load_dataset(str(path), split=split)
        else:
            ds = datasets.load_dataset(str(path))
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        where = "is not a local file or directory, and cannot load the dataset from the Hub" if kind == "hub" \
            else "cannot load the dataset from this directory"
        raise DataError(path, None, f"{where} ({reason}); offline, give a local file or a directory saved with "
                                    f"save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(path, None, f"has no split '{split}'; splits: {', '.join(ds)}. Choose one with "
                                        f"--dataset_split")
        ds = ds[split]
    for i, obj in enumerate(ds):
        yield f"row {i}", obj
