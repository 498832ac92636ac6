"""Datasets: read (through sources.py) and validate, render with the template, tokenise with loss masks,
batch by length.

Every record becomes a conversation (a list of {"role", "content"} ending with an assistant turn) or,
for plain {"text"} records, one text trained on in full.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from phitune.data import sources
from phitune.data.templates import IGNORE
from phitune.errors import DataError

if TYPE_CHECKING:
    from phitune.data.templates import Template

ROLES = ("system", "user", "assistant")

# format name -> keys that identify it (first match wins, so more specific formats come first)
FORMATS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_response": ("prompt", "response"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
FORMAT_HELP = ('{"prompt","response"}, {"prompt","completion"}, {"instruction","input","output"}, '
               '{"messages":[{"role","content"},...]} or {"text"}')


# ---------------------------------------------------------------- reading

def read_records(path: str | Path, split: str = "train", columns: dict[str, str] | str | None = None,
                 notice: Callable[[str], None] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Read a dataset into (records, format): the one entry point for training and evaluation data.

    `path` is a JSONL, JSON-array, CSV/TSV or Parquet file, a `datasets` save_to_disk directory, a directory
    of data files, or a Hub dataset id (read through `datasets`, `split` chosen); `columns` maps phitune's
    field names to the source's ({"prompt": "question"} or the --columns text "prompt=question"). Each record
    becomes {"messages": [...]} or {"text": str}. Raises DataError naming the file, the line or row, and the
    problem. What is read but worth knowing (repeated records, unanswered user turns left out) goes to
    `notice` (default: printed on stderr).
    """
    if isinstance(columns, str) or columns is None:
        columns = sources.parse_columns(columns)
    kind = sources.detect_kind(path)
    items = sources.mapped(sources.rows(path, kind, split), path, columns)
    records, fmt = validate_records(items, path, columns, notice)
    if not records:
        expected = "JSONL lines like" if kind == "jsonl" else "records like"
        raise DataError(path, None, f"no records (the file is empty or blank); expected {expected} {FORMAT_HELP}")
    return records, fmt


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], str]:
    """Read a JSONL file into (records, format); see read_records for every other source."""
    if Path(path).is_dir():
        raise DataError(path, None, "is a directory; give a .jsonl file")
    return read_records(path)


def validate_records(items: Iterable[tuple[int | str, Any]], path: str | Path,
                     columns: dict[str, str] | None = None, notice: Callable[[str], None] | None = None
                     ) -> tuple[list[dict[str, Any]], str]:
    """Check and normalise (location, raw dict) pairs: one format per source, every record usable.

    Returns (records, format). Errors name the location; with a --columns mapping they name the source's
    column too, so the fix is clear. Repeated records and conversations whose trailing user turns were left
    out pass, and are reported once through `notice` (default: printed on stderr).
    """
    records, fmt, fmt_loc = [], None, None
    seen, repeated, trimmed = set(), [], []
    for loc, obj in items:
        if not isinstance(obj, dict):
            raise DataError(path, loc, f"expected a JSON object, got {type(obj).__name__}; "
                                       f"records look like {FORMAT_HELP}")
        try:
            obj = sources.sharegpt(obj, path, loc)
            rec_fmt = detect_format(obj, path, loc)
            if fmt is None:
                fmt, fmt_loc = rec_fmt, loc
            elif rec_fmt != fmt:
                raise DataError(path, loc, f"record is in {rec_fmt} format but {_where(fmt_loc)} is {fmt}; "
                                           f"one file holds one format")
            record = normalise(obj, fmt, path, loc)
            if fmt == "messages" and obj["messages"][-1]["role"] != "assistant":
                trimmed.append(loc)
            text = json.dumps(record, sort_keys=True).encode()
            key = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")  # small per record
            if key in seen:
                repeated.append(loc)
            seen.add(key)
            records.append(record)
        except DataError as e:
            if not columns:
                raise
            problem = e.problem
            for target, source in columns.items():
                problem = problem.replace(f"'{target}'", f"'{source}' (--columns {target}={source})")
            raise DataError(path, loc, problem) from None
    say = notice or _print_notice
    if repeated:
        say(f"{path}: notice: {_count(repeated, 'record repeats', 'records repeat')} an earlier one "
            f"({_places(repeated)}); each copy is trained on")
    if trimmed:
        say(f"{path}: notice: {_count(trimmed, 'conversation ends', 'conversations end')} with user turns that have "
            f"no answer; they were left out ({_places(trimmed)})")
    return records, fmt


def _print_notice(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # once, not once per data-parallel process
        print(text, file=sys.stderr, flush=True)


def _count(locs: list, one: str, many: str) -> str:
    return f"1 {one}" if len(locs) == 1 else f"{len(locs)} {many}"


def _places(locs: list[int | str], most: int = 10) -> str:
    """'lines 3, 4' (JSONL/CSV) or 'item 2, item 5' (arrays, tables), the first `most` of them."""
    shown = ", ".join(map(str, locs[:most]))
    if all(isinstance(x, int) for x in locs):
        shown = ("line " if len(locs) == 1 else "lines ") + shown
    return shown + (f" and {len(locs) - most} more" if len(locs) > most else "")


def _where(loc: int | str) -> str:
    return f"line {loc}" if isinstance(loc, int) else str(loc)


def detect_format(obj: dict[str, Any], path: str | Path, lineno: int | str | None) -> str:
    """The name of the FORMATS entry whose keys obj has; DataError naming path:lineno when none fits."""
    keys = set(obj)
    for name, required in FORMATS.items():
        if set(required) <= keys:
            return name
    turns = [k for k in sorted(keys, key=str) if _holds_turns(obj[k])]
    if turns:
        raise DataError(path, lineno, f"no known record format in keys {sorted(keys)}; '{turns[0]}' holds chat "
                                      f"turns: read it with --columns messages={turns[0]}")
    import difflib
    known = sorted({k for req in FORMATS.values() for k in req} | {"input", "system"})
    hints = [f"'{k}' (did you mean '{m[0]}'?)" for k in sorted(keys)
             if k not in known and (m := difflib.get_close_matches(k, known, n=1))]
    hint = f"; unknown key {', '.join(hints)}" if hints else ""
    raise DataError(path, lineno, f"no known record format in keys {sorted(keys)}{hint}; expected {FORMAT_HELP}")


def _holds_turns(value: Any) -> bool:
    """Whether value is a conversation under another name: ShareGPT {"from", "value"} or {"role", "content"} turns."""
    if isinstance(value, str) and value.lstrip().startswith("["):  # a CSV/Parquet cell holding JSON
        try:
            value = json.loads(value)
        except ValueError:
            return False
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, dict) and ({"from", "value"} <= set(t) or {"role", "content"} <= set(t)) for t in value)


def _text(obj: dict[str, Any], key: str, path: str | Path, lineno: int | str | None, allow_empty: bool = False
          ) -> str:
    value = obj.get(key, "")
    if value is None:  # an empty cell in Parquet or a `datasets` table
        if allow_empty:
            return ""
        raise DataError(path, lineno, f"'{key}' is missing (null)")
    if not isinstance(value, str):
        raise DataError(path, lineno, f"'{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(path, lineno, f"'{key}' is empty")
    return value


def normalise(obj: dict[str, Any], fmt: str, path: str | Path, lineno: int | str | None) -> dict[str, Any]:
    """A raw record of format fmt as {"text"} or {"messages": [{"role", "content"}, ...]}."""
    if fmt == "text":
        return {"text": _text(obj, "text", path, lineno)}
    system = _text(obj, "system", path, lineno, allow_empty=True) if "system" in obj else ""
    head = [{"role": "system", "content": system}] if system.strip() else []
    if fmt == "alpaca":
        prompt = _text(obj, "instruction", path, lineno)
        extra = _text(obj, "input", path, lineno, allow_empty=True)
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        return {"messages": head + [{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": _text(obj, "output", path, lineno)}]}
    if fmt in ("prompt_response", "prompt_completion"):
        answer_key = "response" if fmt == "prompt_response" else "completion"
        return {"messages": head + [{"role": "user", "content": _text(obj, "prompt", path, lineno)},
                                    {"role": "assistant", "content": _text(obj, answer_key, path, lineno)}]}
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(path, lineno, "'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise DataError(path, lineno, f"messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(path, lineno, f"messages[{i}] has unknown role '{m['role']}'; use "
                                          f"{', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(path, lineno, f"messages[{i}].content must be a string")
        if m["role"] == "system" and i != 0:
            raise DataError(path, lineno, f"messages[{i}]: a system message may only come first")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(path, lineno, "the conversation has no assistant turn, so there is nothing to learn")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            # an empty answer trains the model to end its turn at once, without answering
            raise DataError(path, lineno, f"messages[{i}] is an empty assistant turn, which would teach the model "
                                          f"to end its turn without answering; write the answer or remove the turn")
    while messages[-1]["role"] != "assistant":  # trailing user turns have no answer to learn
        messages = messages[:-1]
    if head:  # a top-level "system", as prompt/response records have it
        if messages[0]["role"] == "system":
            raise DataError(path, lineno, "the record has a top-level 'system' and messages[0] is a system turn too; "
                                          "keep one of them")
        messages = head + messages
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


# ---------------------------------------------------------------- tokenising

@dataclass
class EncodeStats:
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    answer_tokens: int = 0
    dropped_lines: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # what the template does to the text, printed with the counts

    def report(self, name: str) -> str:
        """Counts for the dataset called name, one line, then the template's notes."""
        line = f"{name}: {self.kept} examples, {self.tokens:,} tokens ({self.answer_tokens:,} trained)"
        if self.truncated or self.dropped:
            line += f"; {self.truncated} truncated, {self.dropped} dropped (longer than --max_length)"
        return "\n".join([line] + self.notes)


def encode_records(records: list[dict[str, Any]], template: Template, max_length: int, train_on_prompt: bool = False,
                   long_examples: str = "truncate") -> tuple[list[dict[str, list[int]]], EncodeStats]:
    """Tokenise records into examples {"input_ids", "labels"}.

    Rule for examples longer than max_length tokens: with long_examples="truncate" the sequence is cut at
    max_length (the end of the answer and its EOS are lost, so a cut answer never teaches the model to
    stop mid-sentence); an example with no answer token left is dropped. With "drop", every long example
    is dropped. Both are counted in the returned stats.
    """
    stats, examples = EncodeStats(notes=template.take_notes() if hasattr(template, "take_notes") else []), []
    for i, record in enumerate(records):
        ids, labels = template.encode(record)
        if train_on_prompt:
            labels = list(ids)
        if len(ids) > max_length:
            if long_examples == "drop":
                stats.dropped += 1
                stats.dropped_lines.append(i)
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE for label in labels[1:]):
                stats.dropped += 1
                stats.dropped_lines.append(i)
                continue
            stats.truncated += 1
        trained = sum(1 for label in labels[1:] if label != IGNORE)
        if trained == 0:
            stats.dropped += 1
            stats.dropped_lines.append(i)
            continue
        examples.append({"input_ids": ids, "labels": labels})
        stats.kept += 1
        stats.tokens += len(ids)
        stats.answer_tokens += trained
    return examples, stats


# ---------------------------------------------------------------- batching

def split_validation(records: list[Any], val_split: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out a deterministic random fraction of the records for validation."""
    if val_split <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(len(records) - 1, max(1, round(len(records) * val_split)))
    held = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, shuffle: bool = True
                           ) -> list[list[int]]:
    """Batches of similar length so that little compute goes to padding.

    Shuffle, then sort within windows of 64 batches and shuffle the batches: random order, small padding.
    Deterministic for (seed, epoch), which is what lets --resume skip to the same position.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1000003 + epoch)
    if shuffle:
        rng.shuffle(order)
    window = batch_size * 64
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Padding is masked by position: labels -100, attention 0."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
