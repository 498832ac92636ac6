"""`phitune data inspect FILE`: look at a dataset the way training will, before a long run.

Prints the source kind and record format, the record count, a histogram of token lengths under the
model's tokenizer and template, how many examples --max_length would truncate or drop, and three rendered
examples (first, median length, longest) with the trained tokens marked between ⟦ and ⟧.
"""
from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from phitune.config import GROUPS as TRAIN_GROUPS
from phitune.config import add_arguments, settings
from phitune.config_commands import InspectArgs
from phitune.data import records as data
from phitune.data import sources
from phitune.errors import PhituneError
from phitune.training.report import summary

if TYPE_CHECKING:
    import argparse

    from transformers import PreTrainedTokenizerBase

TRAIN_KEYS = {f for cls in TRAIN_GROUPS.values() for f in cls.__dataclass_fields__}
OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ trained tokens ⟧


GROUPS = {"inspect": InspectArgs}


def add_parser(p: argparse.ArgumentParser) -> None:
    """Add the `data inspect` action and its options to the subcommand parser p."""
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = sub.add_parser("inspect", help="format, record count, token lengths, truncation and rendered examples",
                       description="Read a dataset as `phitune train` would and show what training will see. "
                                   "--config takes a training YAML file (keys inspect has no use for are skipped).")
    q.set_defaults(_parser=q)
    q.add_argument("path", metavar="FILE", nargs="?",
                   help="JSONL/JSON/CSV/Parquet file, datasets directory or Hub dataset id (default: --dataset_path)")
    add_arguments(q, GROUPS)


def main(args: argparse.Namespace) -> int:
    """Run `phitune data inspect` with parsed args; returns the exit code."""
    path = args.path
    args = settings(args, GROUPS, also_known=TRAIN_KEYS)
    path = path or args.dataset_path
    if not path:
        raise PhituneError("give the data: FILE, --dataset_path, or dataset_path: in the --config file")
    kind = sources.detect_kind(path)
    from phitune.data.pair_source import is_pair_source
    if is_pair_source(path, args.dataset_split, args.columns):
        return inspect_pairs(args, path, kind)
    records, fmt = data.read_records(path, args.dataset_split, args.columns)
    print(f"{path}\n" + summary([("source", kind), ("record format", fmt), ("records", f"{len(records):,}")]))
    if not args.model:
        chars = [sum(len(m["content"]) for m in r["messages"]) if "messages" in r else len(r["text"])
                 for r in records]
        print("\ncharacters per record (give --model for token lengths under its template)")
        print(histogram(chars))
        return 0
    from phitune.data.templates import Template
    from phitune.models import loading as models
    tokenizer = models.load_tokenizer(args.model, args.trust_remote_code)
    template = Template(tokenizer, args.template, args.system_prompt)
    encoded = []
    for r in records:
        ids, labels = template.encode(r)
        encoded.append((ids, list(ids) if args.train_on_prompt else labels))
    lengths = [len(ids) for ids, _ in encoded]
    limit, drop = args.max_length, args.long_examples == "drop"
    print(f"\ntokens per example under {args.model} (template {template.kind}, stops at "
          f"{', '.join(template.stop_tokens)})")
    print(histogram(lengths, marker=limit))
    # the totals of what training keeps: long examples cut or dropped as --long_examples says
    _, stats = data.encode_records(records, template, limit, args.train_on_prompt, args.long_examples)
    over = sum(n > limit for n in lengths)
    fate = f"{stats.dropped} would be dropped (--long_examples drop)" if drop else \
        f"{stats.truncated} would be truncated (no EOS learned), {stats.dropped} dropped (no answer left)"
    print("\n" + summary([
        ("tokens", f"{stats.tokens:,} ({stats.answer_tokens:,} trained) in the {stats.kept:,} examples training "
                   f"keeps; {sum(lengths):,} before --max_length"),
        (f"longer than {limit}", f"{over} ({100 * over / len(lengths):.1f}%): {fate}"),
    ]))
    for title, i in pick_examples(lengths, args.examples):
        ids, labels = encoded[i]
        if drop and len(ids) > limit:
            print(f"\n--- {title}: record {i + 1}, {len(ids)} tokens; dropped by --long_examples drop: nothing of it "
                  f"is trained")
            print(render_marked(tokenizer, ids, [data.IGNORE] * len(ids)))
            continue
        print(f"\n--- {title}: record {i + 1}, {len(ids)} tokens; trained part between {OPEN} {CLOSE}")
        print(render_marked(tokenizer, ids, labels, limit))
    return 0


def histogram(values: list[int], bins: int = 10, width: int = 40, marker: int | None = None) -> str:
    """A text histogram of non-negative integers, with min/median/p95/max and an optional limit line."""
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, (v - lo) // step)] += 1
    top = max(counts)
    lines = []
    for b, c in enumerate(counts):
        start, end = lo + b * step, lo + (b + 1) * step - 1
        if start > hi:
            break
        flag = "  <- --max_length" if marker is not None and start <= marker <= end else ""
        lines.append(f"  {start:>7,}-{end:<7,} {'#' * round(width * c / top):<{width}} {c:,}{flag}")
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    lines.append(f"  min {lo:,}, median {statistics.median(ordered):,.0f}, p95 {p95:,}, max {hi:,}")
    return "\n".join(lines)


def pick_examples(lengths: list[int], n: int) -> list[tuple[str, int]]:
    """Indices of the first, the median-length and the longest examples (distinct, up to n)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    picks = [("first", 0), ("median length", order[len(order) // 2]), ("longest", order[-1])]
    seen, out = set(), []
    for title, i in picks + [("example", i) for i in range(len(lengths))]:
        if i not in seen and len(out) < n:
            seen.add(i)
            out.append((title, i))
    return out


def render_marked(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int],
                  max_length: int | None = None) -> str:
    """Decode ids with runs of trained tokens (labels != IGNORE) between ⟦ ⟧; the cut at max_length is shown."""
    out, run, trained = [], [], None
    for k, (tok, label) in enumerate(zip(ids, labels)):
        if max_length is not None and k == max_length:
            out.append(_piece(tokenizer, run, trained))
            run, trained = [], None
            out.append(f" [... cut at --max_length {max_length}: {len(ids) - max_length} tokens not trained ...] ")
        # the first token is never predicted; nothing past the cut is trained
        t = label != data.IGNORE and k > 0 and (max_length is None or k < max_length)
        if trained is not None and t != trained:
            out.append(_piece(tokenizer, run, trained))
            run = []
        run.append(tok)
        trained = t
    out.append(_piece(tokenizer, run, trained))
    return "".join(out)


def _piece(tokenizer: PreTrainedTokenizerBase, run: list[int], trained: bool) -> str:
    if not run:
        return ""
    text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return f"{OPEN}{text}{CLOSE}" if trained else text


def inspect_pairs(args: argparse.Namespace, path: str, kind: str) -> int:
    """`data inspect` on preference data (chosen/rejected): pair count, token lengths, truncation, and pairs shown
    as their prompt once, then the chosen and the rejected answer, each with its trained tokens marked."""
    from phitune.data import pairs as pair_data
    found, fmt = pair_data.read_pairs(path, args.dataset_split, args.columns)
    print(f"{path}\n" + summary([("source", kind), ("record format", fmt), ("records", f"{len(found):,} pairs")]))
    if not args.model:
        chars = [sum(len(m["content"]) for m in p["prompt"]) + max(len(p["chosen"]), len(p["rejected"]))
                 for p in found]
        print("\ncharacters per pair: prompt and the longer answer (give --model for token lengths under its "
              "template)")
        print(histogram(chars))
        return 0
    from phitune.data.templates import Template
    from phitune.models import loading as models
    tokenizer = models.load_tokenizer(args.model, args.trust_remote_code)
    template = Template(tokenizer, args.template, args.system_prompt)
    encoded = [pair_data.encode_pair(p, template) for p in found]
    lengths = [pair_data.pair_length(e) for e in encoded]
    print(f"\ntokens per pair, the longer of chosen and rejected, under {args.model} (template {template.kind}, "
          f"stops at {', '.join(template.stop_tokens)})")
    print(histogram(lengths, marker=args.max_length))
    _, stats = pair_data.encode_pairs(found, template, args.max_length, args.long_examples)
    print("\n" + stats.report(f"at --max_length {args.max_length}"))
    for title, i in pick_examples(lengths, args.examples):
        e = encoded[i]
        n = e["prompt_len"]
        print(f"\n--- {title}: pair {i + 1}, chosen {len(e['chosen']['input_ids'])} tokens, rejected "
              f"{len(e['rejected']['input_ids'])} tokens; trained part between {OPEN} {CLOSE}")
        prompt = _piece(tokenizer, e["chosen"]["input_ids"][:n], False)
        print(prompt, end="" if prompt.endswith("\n") else "\n")
        for key in ("chosen", "rejected"):
            full = render_marked(tokenizer, e[key]["input_ids"], e[key]["labels"], args.max_length)
            # the prompt is one untrained run, so the answer is what follows its text (unless the cut is in it)
            print(f"{key:<8} " + (full[len(prompt):] if full.startswith(prompt) else full))
    return 0
