"""Preference data: pairs of a better (chosen) and a worse (rejected) answer to the same prompt.

Record forms, one per source (TRL's preference formats, so existing files load):
  standard        {"prompt": str, "chosen": str, "rejected": str}, optional "system": str
  conversational  {"prompt": [messages ending with a user turn], "chosen": [one assistant message],
                   "rejected": [one assistant message]}
  implicit prompt {"chosen": [conversation], "rejected": [conversation]}: the prompt is the turns the two
                   conversations share, and each must end in one assistant turn after it
CSV and Parquet cells holding a JSON list of {"role", "content"} read as conversational.

Every pair becomes {"prompt": [messages], "chosen": str, "rejected": str} (read_pairs), then two examples
that share the prompt's token ids (encode_pairs): each answer is rendered by the same Template as supervised
training, labels on the answer only, its end-of-turn token trained. collate_pairs puts a batch of pairs into
one tensor batch whose rows are [chosen_0 .. chosen_B-1, rejected_0 .. rejected_B-1], the layout
training.preference reads.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from phitune.data import sources
from phitune.data.records import ROLES, EncodeStats, _where
from phitune.data.templates import IGNORE
from phitune.errors import DataError, PhituneError

if TYPE_CHECKING:
    from phitune.data.templates import Template

PAIR_FORMAT_HELP = ('{"prompt","chosen","rejected"} with string answers, or TRL\'s conversational form: '
                    '"prompt" a list of {"role","content"} messages, "chosen"/"rejected" lists holding one '
                    'assistant message')


# ---------------------------------------------------------------- reading

def is_pair_record(obj: Any) -> bool:
    """True for a raw record that looks like preference data (has 'chosen' or 'rejected')."""
    return isinstance(obj, dict) and ("chosen" in obj or "rejected" in obj)


def read_pairs(path: str | Path, split: str = "train", columns: dict[str, str] | str | None = None
               ) -> tuple[list[dict[str, Any]], str]:
    """Read preference records from any source read_records accepts; returns (pairs, format).

    Each pair is {"prompt": [messages ending with a user turn], "chosen": str, "rejected": str}; format is
    "preference" (string prompts) or "preference_conversational". `columns` maps phitune's names to the
    source's ({"chosen": "good"} or "chosen=good,rejected=bad"). Raises DataError naming the file, the line
    or row, the field and the fix.
    """
    if isinstance(columns, str) or columns is None:
        columns = sources.parse_columns(columns)
    kind = sources.detect_kind(path)
    items = sources.mapped(sources.rows(path, kind, split), path, columns)
    pairs, fmt = validate_pairs(items, path, columns)
    if not pairs:
        raise DataError(path, None, f"no records (the file is empty or blank); expected {PAIR_FORMAT_HELP}")
    return pairs, fmt


def validate_pairs(items: Iterable[tuple[int | str, Any]], path: str | Path,
                   columns: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Check and normalise (location, raw dict) pairs: one form per source, both answers present and different."""
    pairs, fmt, fmt_loc = [], None, None
    for loc, obj in items:
        try:
            pair, form = normalise_pair(obj, path, loc)
            if fmt is None:
                fmt, fmt_loc = form, loc
            elif form != fmt:
                raise DataError(path, loc, f"record is in {form} form but {_where(fmt_loc)} is {fmt}; one file "
                                           f"holds one form")
            pairs.append(pair)
        except DataError as e:
            if not columns:
                raise
            problem = e.problem
            for target, source in columns.items():
                problem = problem.replace(f"'{target}'", f"'{source}' (--columns {target}={source})")
            raise DataError(path, loc, problem) from None
    return pairs, fmt


def normalise_pair(obj: Any, path: str | Path, loc: int | str | None) -> tuple[dict[str, Any], str]:
    """One raw preference record as ({"prompt": [messages], "chosen": str, "rejected": str}, form)."""
    if not isinstance(obj, dict):
        raise DataError(path, loc, f"expected a JSON object, got {type(obj).__name__}; records look like "
                                   f"{PAIR_FORMAT_HELP}")
    missing = [k for k in ("chosen", "rejected") if obj.get(k) is None]
    if missing:
        other = "the better answer" if missing[0] == "chosen" else "the worse answer"
        sft = " (this looks like supervised data: train it with --method sft)" \
            if {"response", "completion", "output", "messages"} & set(obj) else ""
        raise DataError(path, loc, f"'{missing[0]}' is missing: a preference record needs 'prompt', 'chosen' "
                                   f"and 'rejected' ({other}){sft}")
    chosen, rejected = _cell(obj["chosen"]), _cell(obj["rejected"])
    prompt = _cell(obj["prompt"]) if obj.get("prompt") is not None else None
    if isinstance(chosen, list) or isinstance(rejected, list) or isinstance(prompt, list):
        pair, form = _conversational(prompt, chosen, rejected, path, loc, obj.get("system")), \
            "preference_conversational"
    else:
        for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if value is None:
                raise DataError(path, loc, f"'{key}' is missing: a preference record needs 'prompt', 'chosen' "
                                           f"and 'rejected'")
            _check_text(value, key, path, loc)
        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            raise DataError(path, loc, f"'system' must be a string, got {type(system).__name__}")
        head = [{"role": "system", "content": system}] if system and system.strip() else []
        pair, form = {"prompt": head + [{"role": "user", "content": prompt}], "chosen": chosen,
                      "rejected": rejected}, "preference"
    if pair["chosen"].strip() == pair["rejected"].strip():
        raise DataError(path, loc, "'chosen' and 'rejected' are the same answer, so there is nothing to prefer; "
                                   "give a worse answer as 'rejected' or remove the record")
    return pair, form


def _cell(value: Any) -> Any:
    """A CSV/Parquet cell holding a JSON list of messages as that list; any other value as it is."""
    if isinstance(value, str) and value.lstrip().startswith("[") and value.rstrip().endswith("]"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if parsed and isinstance(parsed, list) and all(isinstance(m, dict) and "role" in m for m in parsed):
            return parsed
    return value


def _check_text(value: Any, key: str, path: str | Path, loc: int | str | None) -> None:
    if not isinstance(value, str):
        raise DataError(path, loc, f"'{key}' must be a string (or, in the conversational form, a list of "
                                   f"messages), got {type(value).__name__}")
    if not value.strip():
        raise DataError(path, loc, f"'{key}' is empty")


def _messages(value: Any, key: str, path: str | Path, loc: int | str | None) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(path, loc, f"'{key}' must be a non-empty list of {{\"role\", \"content\"}} messages in the "
                                   f"conversational form, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise DataError(path, loc, f"{key}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(path, loc, f"{key}[{i}] has unknown role '{m['role']}'; use {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(path, loc, f"{key}[{i}].content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(turns: list[dict[str, str]], key: str, path: str | Path, loc: int | str | None) -> str:
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        roles = ", ".join(t["role"] for t in turns) or "nothing"
        raise DataError(path, loc, f"'{key}' must hold one assistant message after the prompt, got {roles}")
    if not turns[0]["content"].strip():
        raise DataError(path, loc, f"'{key}' is an empty assistant turn")
    return turns[0]["content"]


def _conversational(prompt, chosen, rejected, path, loc, system=None):
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list):
            raise DataError(path, loc, f"'{key}' must be a list of messages like the other fields of this record "
                                       f"(conversational form), got {type(value).__name__}")
    chosen, rejected = _messages(chosen, "chosen", path, loc), _messages(rejected, "rejected", path, loc)
    if prompt is None:  # implicit prompt: the turns both conversations share
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        messages, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if len(chosen) > 1 or len(rejected) > 1:
            raise DataError(path, loc, "'chosen' and 'rejected' must be the same conversation up to their final "
                                       "assistant answer (or give the shared turns as 'prompt')")
    else:
        messages = _messages(prompt, "prompt", path, loc)
    if not messages or messages[-1]["role"] != "user":
        raise DataError(path, loc, "the prompt must end with a user turn (the one both answers reply to)")
    if system is not None:  # a top-level system, as on the string form
        if not isinstance(system, str):
            raise DataError(path, loc, f"'system' must be a string, got {type(system).__name__}")
        if system.strip() and messages[0]["role"] == "system":
            raise DataError(path, loc, "'system' is given twice: as a field and as the prompt's first message; "
                                       "keep one of them")
        if system.strip():
            messages = [{"role": "system", "content": system}] + messages
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise DataError(path, loc, f"prompt[{i}]: a system message may only come first")
    return {"prompt": messages, "chosen": _answer(chosen, "chosen", path, loc),
            "rejected": _answer(rejected, "rejected", path, loc)}


# ---------------------------------------------------------------- tokenising

@dataclass
class PairStats(EncodeStats):
    """EncodeStats counted in pairs (tokens and trained tokens of both answers)."""

    def report(self, name: str) -> str:
        """Counts for the dataset called name, one line, then the template's notes."""
        line = f"{name}: {self.kept} preference pairs, {self.tokens:,} tokens ({self.answer_tokens:,} in answers)"
        if self.truncated or self.dropped:
            line += f"; {self.truncated} truncated, {self.dropped} dropped (longer than --max_length)"
        return "\n".join([line] + self.notes)


def encode_pair(pair: dict[str, Any], template: Template) -> dict[str, Any]:
    """One pair as {"chosen": {"input_ids", "labels"}, "rejected": {...}, "prompt_len": n}.

    Both sequences start with the same n prompt ids (the prompt as chat and serve render it); labels are
    IGNORE there and on every earlier turn, so only the final answer (with its end-of-turn token) counts.
    """
    prompt_ids = template.encode_prompt(pair["prompt"])
    out = {}
    for key in ("chosen", "rejected"):
        ids, labels = template.encode({"messages": pair["prompt"] + [{"role": "assistant", "content": pair[key]}]})
        out[key] = {"input_ids": ids, "labels": labels}
    a, b = out["chosen"]["input_ids"], out["rejected"]["input_ids"]
    n = len(prompt_ids)
    if a[:n] != prompt_ids or b[:n] != prompt_ids:  # not expected from Template; fall back to the shared part
        n = next((i for i, (x, y, z) in enumerate(zip(a, b, prompt_ids)) if not x == y == z), min(len(a), len(b), n))
    for key in ("chosen", "rejected"):
        labels = out[key]["labels"]
        out[key]["labels"] = [IGNORE] * n + labels[n:]
    out["prompt_len"] = n
    return out


def encode_pairs(pairs: list[dict[str, Any]], template: Template, max_length: int,
                 long_examples: str = "truncate") -> tuple[list[dict[str, Any]], PairStats]:
    """Tokenise pairs (encode_pair); the --max_length rule of encode_records applies to each answer.

    truncate: a sequence is cut at max_length (its answer's end and EOS are lost); a pair where either
    answer has no token left is dropped. drop: a pair with either sequence too long is dropped.
    """
    stats = PairStats(notes=template.take_notes() if hasattr(template, "take_notes") else [])
    examples = []
    for i, pair in enumerate(pairs):
        ex = encode_pair(pair, template)
        seqs = [ex["chosen"], ex["rejected"]]
        too_long = any(len(s["input_ids"]) > max_length for s in seqs)
        if too_long and long_examples == "drop":
            stats.dropped += 1
            stats.dropped_lines.append(i)
            continue
        for s in seqs:
            s["input_ids"], s["labels"] = s["input_ids"][:max_length], s["labels"][:max_length]
        if any(all(label == IGNORE for label in s["labels"][1:]) for s in seqs):
            stats.dropped += 1
            stats.dropped_lines.append(i)
            continue
        stats.truncated += too_long
        stats.kept += 1
        stats.tokens += sum(len(s["input_ids"]) for s in seqs)
        stats.answer_tokens += sum(1 for s in seqs for label in s["labels"][1:] if label != IGNORE)
        examples.append(ex)
    return examples, stats


def pair_length(example: dict[str, Any]) -> int:
    """Padded width a pair needs in a batch: its longer sequence."""
    return max(len(example["chosen"]["input_ids"]), len(example["rejected"]["input_ids"]))


def fingerprint(examples: list[dict[str, Any]]) -> str:
    """A short hash of the pairs' token ids: tells whether stored reference log-probs belong to this data."""
    h = hashlib.sha1()
    for e in examples:
        for key in ("chosen", "rejected"):
            h.update(json.dumps([e[key]["input_ids"], e[key]["labels"]]).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- batching

def collate_pairs(examples: list[dict[str, Any]], pad_id: int, ref_logps: torch.Tensor | None = None,
                  nll_on_prompt: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded batch of 2B rows [chosen_0..chosen_B-1, rejected_0..rejected_B-1].

    input_ids, attention_mask, labels (answer tokens only, both rows of each pair); ref_logps (B, 2): the
    reference log-probs of (chosen, rejected) when given; nll_labels when nll_on_prompt: the chosen rows
    labelled on every token (prompt too), the rejected rows not at all (ORPO's NLL term with
    --train_on_prompt, TRL's definition)."""
    if not examples:
        raise PhituneError("collate_pairs: no pairs")
    rows = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[row, :n] = torch.tensor(r["input_ids"])
        labels[row, :n] = torch.tensor(r["labels"])
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if nll_on_prompt:
        nll = torch.where(mask.bool(), ids, IGNORE)
        nll[len(examples):] = IGNORE
        batch["nll_labels"] = nll
    if ref_logps is not None:
        batch["ref_logps"] = ref_logps.to(torch.float32)
    return batch
