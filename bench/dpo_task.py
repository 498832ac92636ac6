"""A task with exact answers for preference tuning, from the E2E dev set: restaurant record -> one-line JSON.

    python bench/dpo_task.py build ../shared/data/e2e/devset.csv OUT [--train_mrs N --test_mrs N]
    python bench/dpo_task.py mine OUT runs/sft/final_adapter          # SFT's own answers -> preference pairs
    python bench/dpo_task.py report OUT answers.json --own own.json --synthetic synthetic.json [--doc F]

The task: a meaning representation with its fields in a random order, e.g.
    area[riverside], name[The Eagle], familyFriendly[yes], eatType[coffee shop]
becomes exactly one JSON object with renamed keys in a fixed order and a boolean for families:
    {"name": "The Eagle", "type": "coffee shop", "area": "riverside", "kids": true}
Right or wrong is a string comparison, and the near misses are the ones a small tuned model makes: a name
copied slightly wrong (an accent dropped, a letter lost), a field dropped or invented, the record's own key
names or "yes"/"no" kept, the fields left in the record's order, prose instead of JSON, rambling around it.

build (split by MR: no MR in both train and test) writes into OUT:
  sft.jsonl          prompt/response, the training MRs (--sft_orders prompts per MR, fields shuffled)
  mine.jsonl         prompt/response, the training MRs again in new field orders (the SFT model answers
                     these; its wrong answers become rejected answers)
  test.jsonl         prompt/response, the held-out MRs (one prompt each)
  test_pairs.jsonl   prompt/chosen/rejected on the held-out prompts: the right JSON against synthetic near
                     misses (--test_pairs_per_prompt kinds per prompt)
  task.json          the counts and the split
mine writes OUT/train_pairs.jsonl: for each mining prompt the right JSON as chosen against the SFT model's
own answer when it is wrong, plus synthetic near misses (mined first, then synthetic, up to --max_pairs);
and OUT/test_pairs_own.jsonl: the SFT model's wrong answers on the held-out prompts against the right JSON
(the held-out version of what DPO trains on: the model's own mistakes, on records it never saw).
report prints the figures of `phitune eval` on test.jsonl (exact match over every held-out prompt), on
test_pairs_own.jsonl and on test_pairs.jsonl (preference accuracy), and, with --doc, writes them between
the dpo-task markers of that file.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
import unicodedata
from pathlib import Path

# record key -> (JSON key, how the value is written)
FIELDS = {"name": "name", "eatType": "type", "food": "food", "priceRange": "price", "customer rating": "rating",
          "area": "area", "familyFriendly": "kids", "near": "near"}
ORDER = list(FIELDS.values())
PROMPT = ("Turn this restaurant record into one line of JSON. Keys, in this order and only when present: name, "
          "type, food, price, rating, area, kids (true or false), near. Copy the values exactly.\n\nRecord: {mr}")


# ---------------------------------------------------------------- the task

def parse_mr(mr: str) -> list[tuple[str, str]]:
    """'name[X], area[Y]' -> [('name', 'X'), ('area', 'Y')] in the record's order."""
    return [(k.strip(), v) for k, v in re.findall(r"\s*([^,\[]+)\[([^\]]*)\]", mr)]


def target(fields: list[tuple[str, str]]) -> dict:
    """The right answer as a dict, keys in ORDER."""
    got = {FIELDS[k]: (v == "yes" if k == "familyFriendly" else v) for k, v in fields}
    return {k: got[k] for k in ORDER if k in got}


def dump(obj: dict) -> str:
    """One line of JSON as the task wants it (non-ASCII kept: 'Café', '£20-25')."""
    return json.dumps(obj, ensure_ascii=False)


def prompt_for(fields: list[tuple[str, str]], rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """The prompt with the record's fields shuffled, and that order."""
    shown = fields[:]
    rng.shuffle(shown)
    return PROMPT.format(mr=", ".join(f"{k}[{v}]" for k, v in shown)), shown


# ---------------------------------------------------------------- near misses

def _typo(value: str, rng: random.Random) -> str | None:
    """A value copied slightly wrong; None when no change is possible."""
    options = []
    plain = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode()
    if plain != value:
        options.append(plain)  # 'Café Brazil' -> 'Cafe Brazil'
    if value.startswith("The "):
        options.append(value[4:])
    letters = [i for i in range(1, len(value) - 1) if value[i].isalpha() and value[i - 1].isalpha()]
    if letters:
        i = rng.choice(letters)
        options.append(value[:i] + value[i + 1:])  # a letter lost
        options.append(value[:i - 1] + value[i] + value[i - 1] + value[i + 1:])  # two letters swapped
    if any(w[:1].isupper() for w in value.split()[1:]):
        options.append(value[:1] + value[1:].lower())
    options = [o for o in options if o != value]
    return rng.choice(options) if options else None


def near_miss(kind: str, fields: list[tuple[str, str]], shown: list[tuple[str, str]], refs: list[str],
              vocab: dict[str, list[str]], rng: random.Random) -> str | None:
    """One wrong answer of the given kind for this record, or None when the kind does not apply."""
    right = target(fields)
    if kind == "typo":
        keys = [k for k in ("name", "near") if k in right and _typo(right[k], random.Random(0)) is not None]
        if not keys:
            return None
        key = rng.choice(keys)
        return dump({**right, key: _typo(right[key], rng)})
    if kind == "drop":
        keys = [k for k in right if k != "name"]
        if not keys:
            return None
        gone = rng.choice(keys)
        return dump({k: v for k, v in right.items() if k != gone})
    if kind == "extra":
        missing = [k for k in FIELDS if FIELDS[k] not in right]
        if not missing:
            return None
        key = rng.choice(missing)
        value = rng.choice(vocab[key])
        extra = {**right, FIELDS[key]: value == "yes" if key == "familyFriendly" else value}
        return dump({k: extra[k] for k in ORDER if k in extra})
    if kind == "record_keys":  # the record's own key names and yes/no kept
        return dump({k: v for k, v in sorted(fields, key=lambda kv: ORDER.index(FIELDS[kv[0]]))})
    if kind == "order":  # the fields in the prompt's order
        wrong = {FIELDS[k]: right[FIELDS[k]] for k, _ in shown}
        return dump(wrong) if list(wrong) != list(right) else None
    if kind == "prose":  # a human description of the same record (E2E's own references)
        return rng.choice(refs) if refs else None
    if kind == "ramble":
        if rng.random() < 0.5:
            return "Sure! Here is the restaurant record as one line of JSON:\n\n" + dump(right)
        return dump(right) + "\n\nThis JSON object lists the fields of the restaurant " + right["name"] + "."
    raise ValueError(kind)


KINDS = ("typo", "drop", "extra", "record_keys", "order", "prose", "ramble")


def near_misses(n: int, fields, shown, refs, vocab, rng) -> list[str]:
    """Up to n wrong answers of different kinds (random kinds first), each different from the right one."""
    right = dump(target(fields))
    out = []
    for kind in rng.sample(KINDS, len(KINDS)):
        wrong = near_miss(kind, fields, shown, refs, vocab, rng)
        if wrong and wrong.strip() != right and wrong not in out:
            out.append(wrong)
        if len(out) == n:
            break
    return out


# ---------------------------------------------------------------- build

def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_e2e(csv_path: str) -> dict[str, list[str]]:
    """MR -> its human references, in file order."""
    by_mr: dict[str, list[str]] = {}
    with open(csv_path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            by_mr.setdefault(row["mr"], []).append(row["ref"])
    return by_mr


def build(args: argparse.Namespace) -> None:
    by_mr = read_e2e(args.csv)
    vocab: dict[str, list[str]] = {}
    for mr in by_mr:
        for k, v in parse_mr(mr):
            vocab.setdefault(k, [])
            if v not in vocab[k]:
                vocab[k].append(v)
    mrs = sorted(by_mr)
    random.Random(args.seed).shuffle(mrs)
    n_test = args.test_mrs if args.test_mrs is not None else round(len(mrs) * 0.2)
    test_mrs = mrs[:n_test]
    train_mrs = mrs[n_test:] if args.train_mrs is None else mrs[n_test:n_test + args.train_mrs]
    assert not set(test_mrs) & set(train_mrs)
    rng = random.Random(args.seed + 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sft, mine, test, test_pairs = [], [], [], []
    for mr in train_mrs:
        fields = parse_mr(mr)
        answer = dump(target(fields))
        seen = set()
        for _ in range(args.sft_orders + 1):
            for _try in range(10):  # a new field order for each prompt when there is one
                prompt, _ = prompt_for(fields, rng)
                if prompt not in seen:
                    break
            seen.add(prompt)
            (sft if len(seen) <= args.sft_orders else mine).append({"prompt": prompt, "response": answer,
                                                                   "mr": mr})
    for mr in test_mrs:
        fields = parse_mr(mr)
        prompt, shown = prompt_for(fields, rng)
        answer = dump(target(fields))
        test.append({"prompt": prompt, "response": answer})
        for wrong in near_misses(args.test_pairs_per_prompt, fields, shown, by_mr[mr], vocab, rng):
            test_pairs.append({"prompt": prompt, "chosen": answer, "rejected": wrong})
    _write(out / "sft.jsonl", [{"prompt": r["prompt"], "response": r["response"]} for r in sft])
    _write(out / "mine.jsonl", mine)
    _write(out / "test.jsonl", test)
    _write(out / "test_pairs.jsonl", test_pairs)
    task = {"source": str(Path(args.csv).resolve()), "seed": args.seed, "train_mrs": len(train_mrs),
            "test_mrs": len(test_mrs),
            "sft_examples": len(sft), "mine_prompts": len(mine), "test_prompts": len(test),
            "test_pairs": len(test_pairs), "vocab": vocab}
    (out / "task.json").write_text(json.dumps(task, ensure_ascii=False, indent=1))
    print(f"{len(train_mrs)} training MRs -> {len(sft)} SFT examples, {len(mine)} mining prompts; "
          f"{len(test_mrs)} held-out MRs -> {len(test)} test prompts, {len(test_pairs)} held-out pairs")


# ---------------------------------------------------------------- mine

def mine(args: argparse.Namespace) -> None:
    from phitune.generation import load as gen
    out = Path(args.out)
    rows = _read(out / "mine.jsonl")
    held_out = _read(out / "test.jsonl")
    task = json.loads((out / "task.json").read_text())
    by_mr = read_e2e(task["source"])
    loaded = gen.load([f"sft={args.adapter}"], precision=args.precision)
    sampling = gen.Sampling(max_new_tokens=args.max_new_tokens)
    # the held-out prompts are answered in the same batches; their wrong answers are test pairs only
    jobs = [([{"role": "user", "content": r["prompt"]}], "sft", sampling) for r in rows + held_out]
    answers = gen.generate_jobs(loaded, jobs, batch_size=args.batch_size)
    answers, held_answers = answers[:len(rows)], answers[len(rows):]
    rng = random.Random(args.seed)
    mined, synthetic, wrong_answers = [], [], 0
    for r, a in zip(rows, answers):
        answer = a.text.strip()
        if answer != r["response"]:
            wrong_answers += 1
            mined.append({"prompt": r["prompt"], "chosen": r["response"], "rejected": answer})
        fields = parse_mr(r["mr"])
        shown = parse_mr(r["prompt"].split("Record: ", 1)[1])
        for wrong in near_misses(args.synthetic_per_prompt, fields, shown, by_mr[r["mr"]], task["vocab"], rng):
            if wrong != answer:
                synthetic.append({"prompt": r["prompt"], "chosen": r["response"], "rejected": wrong})
    rng.shuffle(synthetic)
    pairs = (mined + synthetic)[:args.max_pairs]
    rng.shuffle(pairs)
    own_test = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": a.text.strip()}
                for r, a in zip(held_out, held_answers) if a.text.strip() != r["response"]]
    _write(out / "train_pairs.jsonl", pairs)
    _write(out / "test_pairs_own.jsonl", own_test)
    _write(out / "mined_answers.jsonl", [{"prompt": r["prompt"], "right": r["response"], "answer": a.text}
                                         for r, a in zip(rows + held_out, answers + held_answers)])
    task.update(mined_prompts=len(rows), sft_wrong_on_mining=wrong_answers, train_pairs=len(pairs),
                train_pairs_mined=min(len(mined), len(pairs)), test_pairs_own=len(own_test))
    (out / "task.json").write_text(json.dumps(task, ensure_ascii=False, indent=1))
    print(f"SFT model wrong on {wrong_answers} of {len(rows)} mining prompts; {len(pairs)} training pairs "
          f"({min(len(mined), len(pairs))} of its own wrong answers, the rest synthetic near misses); wrong on "
          f"{len(own_test)} of {len(held_out)} held-out prompts -> test_pairs_own.jsonl")


# ---------------------------------------------------------------- report

def report(args: argparse.Namespace) -> str:
    out = Path(args.out)
    task = json.loads((out / "task.json").read_text())
    def results(paths):  # several eval outputs on the same data: their models side by side
        merged = {}
        for path in paths or []:
            merged.update(json.loads(Path(path).read_text())["results"])
        return merged
    answers = results(args.scores)  # eval on test.jsonl: generation
    own, synthetic = results(args.own), results(args.synthetic)
    names = [n for n in ("base", "sft", "dpo", "rpo") if n in answers]
    rows = [(answers, "exact_match", "held-out exact match % (every held-out prompt)", "{:.1f}"),
            (answers, "rouge_l", "held-out ROUGE-L", "{:.1f}"),
            (answers, "loss", "answer loss of the right JSON", "{:.4f}"),
            (own, "preference_accuracy", "preference accuracy, held-out pairs: SFT's own wrong answers", "{:.3f}"),
            (own, "margin", "mean margin on those (nats)", "{:.2f}"),
            (synthetic, "preference_accuracy", "preference accuracy, held-out pairs: synthetic near misses",
             "{:.3f}"),
            (synthetic, "margin", "mean margin on those (nats)", "{:.2f}")]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for res, key, label, fmt in rows:
        if res:
            lines.append(f"| {label} | " + " | ".join(fmt.format(res[n][key]) if key in res.get(n, {}) else "-"
                                                       for n in names) + " |")
    table = "\n".join(lines)
    text = (f"E2E records -> one-line JSON: {task['train_mrs']} training MRs ({task['sft_examples']} SFT examples; "
            f"{task.get('train_pairs', '?')} DPO pairs, {task.get('train_pairs_mined', '?')} of them the SFT "
            f"model's own wrong answers on {task.get('mined_prompts', '?')} new prompts), {task['test_mrs']} held-out "
            f"MRs ({task['test_prompts']} prompts; {task.get('test_pairs_own', '?')} held-out pairs from the SFT "
            f"model's wrong answers on them, {task['test_pairs']} with synthetic near misses)"
            + (f"; whole run {args.minutes} min" if args.minutes else "")
            + (f"; {args.machine}" if args.machine else "") + ".\n\n" + table)
    print(text)
    if args.doc:
        doc = Path(args.doc)
        body = doc.read_text()
        section = f"<!-- dpo-task:start -->\n{text}\n<!-- dpo-task:end -->"
        if "<!-- dpo-task:start -->" not in body:
            sys.exit(f"{doc}: no <!-- dpo-task:start --> marker")
        doc.write_text(re.sub(r"<!-- dpo-task:start -->.*<!-- dpo-task:end -->", lambda _: section, body, flags=re.S))
        print(f"{doc} updated")
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("csv")
    b.add_argument("out")
    b.add_argument("--train_mrs", type=int, help="training MRs (default: all but the held-out ones)")
    b.add_argument("--test_mrs", type=int, help="held-out MRs (default: 20%%)")
    b.add_argument("--sft_orders", type=int, default=1, help="SFT prompts per training MR (field orders)")
    b.add_argument("--test_pairs_per_prompt", type=int, default=2)
    b.add_argument("--seed", type=int, default=1234)
    m = sub.add_parser("mine")
    m.add_argument("out")
    m.add_argument("adapter")
    m.add_argument("--synthetic_per_prompt", type=int, default=1)
    m.add_argument("--max_pairs", type=int, default=320)
    m.add_argument("--max_new_tokens", type=int, default=96)
    m.add_argument("--batch_size", type=int, default=32)
    m.add_argument("--precision", default="auto")
    m.add_argument("--seed", type=int, default=7)
    r = sub.add_parser("report")
    r.add_argument("out")
    r.add_argument("scores", nargs="+", help="phitune eval --output on test.jsonl (generation: exact match)")
    r.add_argument("--own", nargs="+", help="phitune eval --output on test_pairs_own.jsonl")
    r.add_argument("--synthetic", nargs="+", help="phitune eval --output on test_pairs.jsonl")
    r.add_argument("--machine", help="the CPU the figures come from")
    r.add_argument("--doc")
    r.add_argument("--minutes", type=int)
    args = ap.parse_args(argv)
    {"build": build, "mine": mine, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
