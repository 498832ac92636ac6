"""`phitune eval`: score the base model and adapters on the same held-out data, with the same template.

Answer-token loss and perplexity always; when records carry reference answers, batched greedy generation
scored with BLEU and chrF (sacrebleu), ROUGE-L and exact match. Records with the same prompt are one
question with several references (as in E2E).

Preference data ({"prompt","chosen","rejected"}, data/pairs.py) adds, per model, the preference accuracy
(share of pairs whose chosen answer has the higher summed log-likelihood) and the mean margin (chosen minus
rejected log-likelihood, in nats); the usual metrics are computed on the chosen answers, which are also the
references of generation.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phitune.config import add_arguments, settings
from phitune.config_commands import EvalArgs, Models
from phitune.data import pair_source
from phitune.data import records as data
from phitune.errors import PhituneError
from phitune.generation import load as gen
from phitune.training.loss import AnswerLoss, summed_loss
from phitune.training.report import ppl

if TYPE_CHECKING:
    import argparse

GROUPS = {"model": Models, "eval": EvalArgs}


def add_parser(p: argparse.ArgumentParser) -> None:
    """Add the eval options (model and eval groups) to the subcommand parser p."""
    add_arguments(p, GROUPS)


def main(args: argparse.Namespace) -> int:
    """Run `phitune eval` with parsed args; returns the exit code."""
    args = settings(args, GROUPS)
    pairs = None
    if pair_source.is_pair_source(args.data):
        from phitune.data import pairs as pair_data
        pairs, fmt = pair_data.read_pairs(args.data)
        records = chosen_records(pairs)
        print(f"{len(pairs)} preference pairs: preference accuracy and margin on the pairs; loss, perplexity and "
              f"generation on the chosen answers", file=sys.stderr)
    else:
        records, fmt = data.read_records(args.data)
    loaded = gen.load(args.adapter_path, args.model, args.system_prompt, args.trust_remote_code, args.precision)
    questions = group_questions(records)
    if args.limit:
        questions = questions[:args.limit]
        keep = {q["key"] for q in questions}
        records = [r for r in records if _key(r) in keep]
        if pairs is not None:
            pairs = [p for p in pairs if json.dumps(p["prompt"]) in keep]
    columns = [None] + list(loaded.adapters)
    generating = not args.no_generate and fmt != "text"
    jobs = answer_jobs(loaded, questions, columns, args.max_new_tokens) if generating else []  # checked first
    results = {}
    for col in columns:
        label = "base" if col is None else col
        print(f"scoring {label} ...", file=sys.stderr)
        results[label] = loss_scores(loaded, records, col, args.max_length, args.batch_size)
        if pairs is not None:
            results[label].update(preference_scores(loaded, pairs, col, args.max_length, args.batch_size))
    if generating:
        # every model answers every question, all in the same batches
        answers = gen.generate_jobs(loaded, jobs, batch_size=args.batch_size)
        for k, col in enumerate(columns):
            mine = answers[k * len(questions):(k + 1) * len(questions)]
            scores = results["base" if col is None else col]
            scores.update(reference_scores([a.text for a in mine], [q["references"] for q in questions]))
            scores["samples"] = [{"prompt": q["messages"][-1]["content"], "answer": a.text,
                                  "reference": q["references"][0]} for q, a in list(zip(questions, mine))[:5]]
    print_table(results)
    if args.output:
        Path(args.output).write_text(json.dumps({"data": str(args.data), "base_model": loaded.base_name,
                                                 "adapters": loaded.adapters, "questions": len(questions),
                                                 "results": results, "deltas": deltas(results)}, indent=2))
        print(f"scores written to {args.output}", file=sys.stderr)
    return 0


def chosen_records(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chosen answers of preference pairs as chat records, each (prompt, answer) once."""
    seen, out = set(), []
    for p in pairs:
        record = {"messages": p["prompt"] + [{"role": "assistant", "content": p["chosen"]}]}
        key = json.dumps(record["messages"])
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out


def preference_scores(loaded: gen.Loaded, pairs: list[dict[str, Any]], adapter: str | None, max_length: int,
                      batch_size: int) -> dict[str, float | int]:
    """Preference accuracy (share of pairs whose chosen answer has the strictly higher summed log-likelihood)
    and mean margin (chosen minus rejected, nats) of `pairs` under `adapter` (None: the base model)."""
    from phitune.data import pairs as pair_data
    from phitune.training.preference import PairLogps, reference_logps
    examples, stats = pair_data.encode_pairs(pairs, loaded.template_for(adapter), max_length)
    if not examples:
        raise PhituneError("no preference pair has answer tokens within --max_length")
    module = PairLogps(loaded.model).eval()
    with loaded.use(adapter):
        logps = reference_logps(module, examples, batch_size, loaded.tokenizer.pad_token_id, loaded.device)
    margin = (logps[:, 0] - logps[:, 1]).double()
    return {"preference_accuracy": float((margin > 0).double().mean()), "margin": float(margin.mean()),
            "pairs": len(examples), "pairs_truncated": stats.truncated}


def answer_jobs(loaded: gen.Loaded, questions: list[dict[str, Any]], columns: list, max_new_tokens: int) -> list:
    """(conversation, model, sampling) for every model and question, column by column. A question whose
    prompt + max_new_tokens passes the model's context is answered in the room left, with a note; one
    that leaves no room at all is refused, by number, before anything runs."""
    jobs = []
    for col in columns:
        label = "base" if col is None else col
        for n, q in enumerate(questions, 1):
            prompt = len(loaded.template_for(col).encode_prompt(q["messages"]))
            room = loaded.room(prompt, max_new_tokens)
            where = f"question {n} ({_short(q['messages'][-1]['content'])}) for {label}"
            if room < 1:
                raise PhituneError(f"{where}: the prompt is {prompt} tokens and the model's context {loaded.context}: "
                                   f"no room is left for an answer; drop it from the data (or --limit before it)")
            if room < max_new_tokens:
                print(f"note: {where}: the prompt is {prompt} tokens; with max_new_tokens {max_new_tokens} that "
                      f"passes the model's context of {loaded.context}, so its answer is cut at {room} tokens",
                      file=sys.stderr)
            jobs.append((q["messages"], col, gen.Sampling(max_new_tokens=room)))
    return jobs


def _short(text: str, n: int = 40) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[:n - 3] + "...")


def _key(record: dict[str, Any]) -> str:
    return json.dumps(record["messages"][:-1]) if "messages" in record else record["text"]


def group_questions(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One question per distinct prompt, with every reference answer given for it."""
    by_prompt = {}
    for r in records:
        if "messages" not in r:
            continue
        q = by_prompt.setdefault(_key(r), {"key": _key(r), "messages": r["messages"][:-1], "references": []})
        q["references"].append(r["messages"][-1]["content"])
    return list(by_prompt.values())


def loss_scores(loaded: gen.Loaded, records: list[dict[str, Any]], adapter: str | None, max_length: int,
                batch_size: int) -> dict[str, float | int]:
    """Answer-token loss, perplexity and token count of `records` under `adapter` (None: the base model)."""
    examples, _ = data.encode_records(records, loaded.template_for(adapter), max_length)
    if not examples:
        raise PhituneError("no example has an answer token within --max_length")
    loss_model = AnswerLoss(loaded.model).eval()
    with loaded.use(adapter):  # weights are already in the inference dtype: no autocast
        total, count = summed_loss(loss_model, examples, batch_size, loaded.tokenizer.pad_token_id, loaded.device)
    total, count = float(total), int(count)
    loss = total / count
    return {"loss": loss, "perplexity": ppl(loss), "answer_tokens": count}


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure on lower-cased whitespace tokens."""
    c, r = candidate.lower().split(), reference.lower().split()
    if not c or not r:
        return 0.0
    lcs = _lcs(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def reference_scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU/chrF over all references per question; ROUGE-L and exact match take the best reference."""
    import sacrebleu
    width = max(len(r) for r in references)
    # sacrebleu wants one stream per reference slot; questions with fewer references pad with None
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams).score
    chrf = sacrebleu.corpus_chrf(hypotheses, streams).score
    rouge = sum(max(rouge_l(h, r) for r in refs) for h, refs in zip(hypotheses, references)) / len(hypotheses)
    exact = sum(any(_norm(h) == _norm(r) for r in refs) for h, refs in zip(hypotheses, references)) / len(hypotheses)
    return {"bleu": bleu, "chrf": chrf, "rouge_l": 100 * rouge, "exact_match": 100 * exact}


METRICS = [("preference_accuracy", "preference accuracy", "{:.3f}"), ("margin", "margin (nats)", "{:.3f}"),
           ("loss", "answer loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"), ("bleu", "BLEU", "{:.2f}"),
           ("chrf", "chrF", "{:.2f}"), ("rouge_l", "ROUGE-L", "{:.2f}"), ("exact_match", "exact match %", "{:.1f}")]


def deltas(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each adapter's metrics minus the base model's, per metric both have."""
    base = results.get("base", {})
    return {name: {k: scores[k] - base[k] for k, _, _ in METRICS if k in scores and k in base}
            for name, scores in results.items() if name != "base"}


def print_table(results: dict[str, dict[str, Any]]) -> None:
    """Print one row per metric, one column per model, then one per adapter-minus-base delta."""
    names = list(results)
    d = deltas(results)
    header = ["metric"] + names + [f"{n} - base" for n in d]
    rows = [header]
    for key, label, fmt in METRICS:
        if not any(key in results[n] for n in names):
            continue
        row = [label] + [fmt.format(results[n][key]) if key in results[n] else "-" for n in names]
        row += [("+" if d[n].get(key, 0) >= 0 else "") + fmt.format(d[n][key]) if key in d[n] else "-" for n in d]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(cell.rjust(w) if j else cell.ljust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
