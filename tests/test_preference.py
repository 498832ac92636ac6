"""Preference tuning (--method dpo | orpo): data, losses equal to TRL's, training, resume, bad input."""
import csv
import json

import pytest

from conftest import write_jsonl
from phitune.data import pairs
from phitune.data.templates import IGNORE, Template
from phitune.errors import DataError
from tiny import build_tokenizer

PAIRS = [{"prompt": f"Say the code for {name}", "chosen": f"The code for {name} is {code}.",
          "rejected": f"The code for {name} is {wrong}."}
         for name, code, wrong in [("red", "one", "two"), ("blue", "two", "three"), ("green", "three", "four"),
                                   ("gold", "four", "one")]]


# ---------------------------------------------------------------- data

def _conversation(row):
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def test_standard_conversational_and_implicit_forms_read_the_same(tmp_path):
    standard, fmt = pairs.read_pairs(write_jsonl(tmp_path / "s.jsonl", PAIRS))
    assert fmt == "preference" and len(standard) == 4
    assert standard[0] == {"prompt": [{"role": "user", "content": "Say the code for red"}],
                           "chosen": "The code for red is one.", "rejected": "The code for red is two."}
    conversational, fmt = pairs.read_pairs(write_jsonl(tmp_path / "c.jsonl", [_conversation(r) for r in PAIRS]))
    assert fmt == "preference_conversational" and conversational == standard
    implicit = [{"chosen": c["prompt"] + c["chosen"], "rejected": c["prompt"] + c["rejected"]}
                for c in map(_conversation, PAIRS)]
    assert pairs.read_pairs(write_jsonl(tmp_path / "i.jsonl", implicit))[0] == standard


def test_columns_map_csv_and_parquet_sources(tmp_path):
    with open(tmp_path / "p.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "good", "bad"])
        w.writerows([r["prompt"], r["chosen"], r["rejected"]] for r in PAIRS)
    got, _ = pairs.read_pairs(tmp_path / "p.csv", columns="prompt=question,chosen=good,rejected=bad")
    want, _ = pairs.read_pairs(write_jsonl(tmp_path / "s.jsonl", PAIRS))
    assert got == want
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    conv = [_conversation(r) for r in PAIRS]
    pq.write_table(pa.Table.from_pylist(conv), tmp_path / "c.parquet")
    assert pairs.read_pairs(tmp_path / "c.parquet")[0] == want


@pytest.mark.parametrize("bad,problem", [
    ({"prompt": "p", "chosen": "a"}, "'rejected' is missing"),
    ({"prompt": "p", "rejected": "a"}, "'chosen' is missing"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "are the same answer"),
    ({"prompt": "p", "chosen": 3, "rejected": "a"}, "'chosen' must be a string"),
    ({"prompt": ["p"], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "prompt[0] must be an object"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "'chosen' must hold one assistant message"),
    ({"prompt": "p", "response": "r"}, "--method sft"),
])
def test_bad_pair_names_file_line_and_field(tmp_path, bad, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], bad])
    with pytest.raises(DataError) as err:
        pairs.read_pairs(path)
    assert f"{path}:2: " in str(err.value) and problem in str(err.value), str(err.value)


def test_sft_reader_points_preference_data_to_dpo(tmp_path):
    from phitune.data import records
    with pytest.raises(DataError, match="--method dpo or --method orpo"):
        records.read_records(write_jsonl(tmp_path / "p.jsonl", PAIRS))


@pytest.mark.parametrize("arch", ["phi", "phi3", "llama"])
def test_pair_shares_prompt_ids_and_trains_each_answer_as_sft_does(arch):
    tok = build_tokenizer(arch)
    template = Template(tok)
    pair = {"prompt": [{"role": "user", "content": "Say hello"}], "chosen": "Hello there!", "rejected": "Bye."}
    ex = pairs.encode_pair(pair, template)
    n = ex["prompt_len"]
    assert n == len(template.encode_prompt(pair["prompt"]))
    assert ex["chosen"]["input_ids"][:n] == ex["rejected"]["input_ids"][:n]
    for key in ("chosen", "rejected"):  # the same ids and answer labels as a supervised example of that answer
        ids, labels = template.encode({"messages": pair["prompt"] + [{"role": "assistant", "content": pair[key]}]})
        assert ex[key]["input_ids"] == ids and ex[key]["labels"] == labels
        assert ex[key]["labels"][:n] == [IGNORE] * n
        assert ex[key]["labels"][-1] == tok.convert_tokens_to_ids(template.end_of_turn) or \
            ex[key]["labels"][-1] == tok.eos_token_id  # the end-of-turn token is trained
    batch = pairs.collate_pairs([ex, ex], tok.pad_token_id or 0)
    assert batch["input_ids"].shape[0] == 4  # rows: chosen, chosen, rejected, rejected
    assert batch["input_ids"][0].tolist()[:n] == batch["input_ids"][2].tolist()[:n]


def test_multi_turn_prompt_trains_only_the_final_answer():
    tok = build_tokenizer("llama")
    template = Template(tok)
    prompt = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
              {"role": "user", "content": "three"}]
    ex = pairs.encode_pair({"prompt": prompt, "chosen": "four", "rejected": "five"}, template)
    trained = [i for i, label in zip(ex["chosen"]["input_ids"], ex["chosen"]["labels"]) if label != IGNORE]
    assert tok.decode(trained) == "four" + template.end_of_turn


def test_long_pairs_follow_max_length():
    template = Template(build_tokenizer("phi"))
    long = {"prompt": [{"role": "user", "content": "Say hello"}], "chosen": "Hello there! " * 20, "rejected": "Bye."}
    short = {"prompt": [{"role": "user", "content": "Say hello"}], "chosen": "Hi.", "rejected": "Bye."}
    kept, stats = pairs.encode_pairs([long, short], template, 24)
    assert stats.kept == 2 and stats.truncated == 1 and all(
        len(s["input_ids"]) <= 24 for e in kept for s in (e["chosen"], e["rejected"]))
    kept, stats = pairs.encode_pairs([long, short], template, 24, long_examples="drop")
    assert stats.kept == 1 and stats.dropped == 1
    assert "1 preference pairs" in stats.report("train")


def test_json_in_csv_cells_reads_as_conversational(tmp_path):
    with open(tmp_path / "c.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "chosen", "rejected"])
        for c in map(_conversation, PAIRS):
            w.writerow([json.dumps(c["prompt"]), json.dumps(c["chosen"]), json.dumps(c["rejected"])])
    got, fmt = pairs.read_pairs(tmp_path / "c.csv")
    assert fmt == "preference_conversational" and got[0]["chosen"] == PAIRS[0]["chosen"]


# ---------------------------------------------------------------- losses and gradients equal TRL's

BETA = 0.3  # not TRL's default, so that a beta that is not passed through would show


def _phitune_policy(model_dir, seed=0):
    """The tiny model with LoRA attached and the CPU path applied exactly as `phitune train` does (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from phitune.config import LoraArgs
    from phitune.hardware import backends
    from phitune.models import adapters
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    peft_model, _ = adapters.attach_lora(model, LoraArgs(lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                                        target_modules=["q_proj", "v_proj", "fc1"]), seed=seed)
    plan = backends.make_plan(torch.device("cpu"), torch.float32, None, False, 64)
    assert backends.apply(peft_model, plan) > 0  # phitune's fused CPU LoRA layers are in the path
    return peft_model


def _perturb(peft_model):
    """LoRA B starts at 0 (the adapter is a no-op); give it values so that policy and reference differ."""
    import torch
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


RPO_ALPHA = 0.5


def _trl_trainer(kind, model_dir, tok, template, tmp_path):
    """TRL's trainer on the same base weights, LoRA shape and prompts (rendered by phitune's template)."""
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    data = Dataset.from_dict({
        "prompt": [template.render_prompt([{"role": "user", "content": r["prompt"]}]) for r in PAIRS],
        "chosen": [" " + r["chosen"] for r in PAIRS], "rejected": [" " + r["rejected"] for r in PAIRS]})
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "fc1"],
                      task_type="CAUSAL_LM")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    common = dict(output_dir=str(tmp_path / f"trl_{kind}"), report_to=[], beta=BETA, max_length=64, bf16=False,
                  gradient_checkpointing=False, use_cpu=True, seed=0, per_device_train_batch_size=len(PAIRS))
    if kind in ("dpo", "rpo"):
        from trl import DPOConfig, DPOTrainer
        if kind == "rpo":  # DPO + the chosen answers' NLL: TRL's "sft" loss term beside "sigmoid"
            common.update(loss_type=["sigmoid", "sft"], loss_weights=[1.0, RPO_ALPHA])
        return DPOTrainer(model=base, args=DPOConfig(**common), processing_class=tok, train_dataset=data,
                          peft_config=lora)
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOTrainer(model=base, args=ORPOConfig(**common), processing_class=tok, train_dataset=data,
                       peft_config=lora)


def _lora_grads(model):
    return {n.replace(".default", ""): p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None and "lora_" in n}


def _copy_lora(src, dst):
    import torch
    theirs = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "lora_" in name:
                theirs[name].copy_(p)


@pytest.mark.parametrize("method", ["dpo", "orpo", "rpo"])
def test_loss_and_gradients_equal_trl(method, tiny_models, tmp_path):
    """phitune's encoding + PairLogps + Objective on the LoRA model as training builds it, against TRL 1.16's
    DPOTrainer / ORPOTrainer compute_loss on the same weights: same token ids, loss and LoRA gradients to 1e-4.
    The tiny Phi tokenizer adds no BOS, so TRL's DPO and ORPO tokenisation give the ids phitune's phi2 template
    gives. ORPO's NLL: TRL's covers prompt and answer, phitune's the answer unless --train_on_prompt; the
    comparison runs with the prompt in the NLL (nll_on_prompt), and the answer-only NLL is checked to be the
    supervised answer loss."""
    pytest.importorskip("trl")
    import torch

    from phitune.models.loading import load_tokenizer
    from phitune.training import preference
    from phitune.training.loss import AnswerLoss
    model_dir = tiny_models["phi"]
    tok = load_tokenizer(str(model_dir))
    template = Template(tok)
    assert template.kind == "phi2" and tok.bos_token_id is None
    examples, _ = pairs.encode_pairs(pairs.read_pairs(write_jsonl(tmp_path / "p.jsonl", PAIRS))[0], template, 64)

    # ---- phitune: the reference is the starting point, computed once in eval mode, then the policy moves
    policy = _phitune_policy(model_dir)
    module = preference.PairLogps(policy)
    module.eval()
    ref = preference.reference_logps(module, examples, 2, tok.pad_token_id, torch.device("cpu"))
    module.train()
    _perturb(policy)
    objective = preference.Objective("dpo", BETA, RPO_ALPHA) if method == "rpo" else preference.Objective(method, BETA)
    batch = pairs.collate_pairs(examples, tok.pad_token_id, ref_logps=ref, nll_on_prompt=method == "orpo")
    pair_loss, nll_sum, stats = objective.terms(module(**preference.model_inputs(batch)), batch["ref_logps"])
    pairs_n, tokens = objective.norms(batch)
    ours = objective.loss(pair_loss, nll_sum, pairs_n, tokens)
    ours.backward()
    our_grads, our_metrics = _lora_grads(policy), objective.metrics(stats)

    # ---- TRL on the same weights
    trainer = _trl_trainer(method, model_dir, tok, template, tmp_path)
    model = trainer.model
    _copy_lora(policy, model)
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    trl_batch = trainer.data_collator(rows)
    if method != "orpo":  # same token ids, same answer positions
        width = batch["input_ids"].shape[1]
        assert torch.equal(trl_batch["attention_mask"], batch["attention_mask"][:, :trl_batch["input_ids"].shape[1]])
        assert width == trl_batch["input_ids"].shape[1]
        assert torch.equal(trl_batch["input_ids"] * trl_batch["attention_mask"],
                           batch["input_ids"] * batch["attention_mask"])
        assert torch.equal(trl_batch["completion_mask"].bool(), batch["labels"] != IGNORE)
    else:
        for i, e in enumerate(examples):
            assert rows[i]["chosen_input_ids"] == e["chosen"]["input_ids"]
            assert rows[i]["rejected_input_ids"] == e["rejected"]["input_ids"]
            assert rows[i]["chosen_labels"] == e["chosen"]["labels"]
    model.train()
    model.zero_grad()
    theirs = trainer.compute_loss(model, trl_batch)
    theirs.backward()
    trl_grads = _lora_grads(model)

    assert abs(ours.item() - theirs.item()) < 1e-4, (ours.item(), theirs.item())
    assert ours.item() > 0.1 and set(our_grads) == set(trl_grads) and len(our_grads) == 12
    for name, g in trl_grads.items():
        torch.testing.assert_close(our_grads[name], g, rtol=0, atol=1e-4, msg=name)
    assert max(g.abs().max().item() for g in trl_grads.values()) > 1e-3  # the gradients are not all ~0
    if method != "orpo":
        logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        pairs_map = {"rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
                     "margin": "rewards/margins", "accuracy": "rewards/accuracies"}
    else:
        logged = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
        pairs_map = {"rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
                     "margin": "rewards/margins", "accuracy": "rewards/accuracies", "nll": "nll_loss",
                     "log_odds_ratio": "log_odds_ratio", "log_odds": "log_odds_chosen"}
    for ours_key, trl_key in pairs_map.items():
        assert our_metrics[ours_key] == pytest.approx(float(logged[trl_key]), abs=1e-4), ours_key
    if method == "orpo":  # the default NLL (answer only) is the supervised answer loss of the chosen answers
        plain = pairs.collate_pairs(examples, tok.pad_token_id)
        _, nll_answer, st = objective.terms(module(**preference.model_inputs(plain)), None)
        chosen = {k: v[:len(examples)] for k, v in plain.items()}
        with torch.no_grad():
            sft_sum, sft_count = AnswerLoss(policy)(**chosen)
        assert objective.metrics(st)["nll"] == pytest.approx((sft_sum / sft_count).item(), abs=1e-5)


# ---------------------------------------------------------------- training

TRAIN = ["--max_length", 64, "--lora_r", 4, "--learning_rate", 1e-2, "--warmup_ratio", 0,
         "--gradient_checkpointing", "false"]


def _adapter(run_dir, name="final_adapter"):
    from safetensors.torch import load_file
    return load_file(run_dir / name / "adapter_model.safetensors")


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_run_logs_its_metrics_and_records_the_method(method, tiny_models, tmp_path, capsys):
    from conftest import run_cli
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS * 3)
    out = tmp_path / method
    assert run_cli("train", "--method", method, "--beta", 0.2, "--model", tiny_models["llama"], "--dataset_path",
                   data, "--output_dir", out, "--max_steps", 4, "--batch_size", 2, "--gradient_accumulation_steps",
                   2, "--val_split", 0.25, "--eval_steps", 2, *TRAIN) == 0
    err = capsys.readouterr().err
    rows = _metrics(out)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    keys = {"loss", "rewards/chosen", "rewards/rejected", "margin", "accuracy"}
    assert len(train) == 4 and all(keys <= set(r) for r in train)
    assert len(val) == 3 and all({f"val_{k}" for k in keys} <= set(r) for r in val)  # steps 2, 3 (epoch end), 4
    for r in train:
        assert r["margin"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
    meta = json.loads((out / "final_adapter" / "phitune.json").read_text())
    assert meta["method"] == method and meta["beta"] == 0.2 and meta["data"]["format"] == "preference"
    assert "9 preference pairs" in err and "margin=" in err and "acc=" in err  # header and progress bar
    if method == "dpo":
        assert train[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step
        assert train[0]["rewards/chosen"] == 0 and train[0]["rewards/rejected"] == 0
        assert "reference: the base model (new adapter)" in err and (out / "reference_logps.pt").is_file()
    else:
        assert all({"nll", "log_odds", "log_odds_ratio"} <= set(r) for r in train)
        assert not (out / "reference_logps.pt").exists()


def test_dpo_interrupted_then_resumed_equals_the_uninterrupted_run(tiny_models, tmp_path, monkeypatch):
    """Ctrl-C inside a step, then --resume: the same adapter as a run that was never stopped, and the
    reference log-probs are read back, not recomputed from the adapter trained so far."""
    from conftest import run_cli
    from phitune.training import preference
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS * 3)
    args = ["train", "--method", "dpo", "--model", tiny_models["phi"], "--dataset_path", data, "--epochs", 2,
            "--batch_size", 2, "--gradient_accumulation_steps", 2, "--lora_dropout", 0.3, "--val_split", 0.25,
            "--save_steps", 100, *TRAIN]
    assert run_cli(*args, "--output_dir", tmp_path / "reference") == 0
    real, calls = preference.PairLogps.forward, []

    def interrupted(self, *a, **kw):
        result = real(self, *a, **kw)  # the step's dropout has drawn its random numbers by now
        if self.training:
            calls.append(1)
            if len(calls) == 5:  # first micro-batch of step 3
                raise KeyboardInterrupt
        return result
    monkeypatch.setattr(preference.PairLogps, "forward", interrupted)
    out = tmp_path / "interrupted"
    assert run_cli(*args, "--output_dir", out) == 130
    assert (out / "checkpoint-2").is_dir() and not (out / "final_adapter").exists()
    monkeypatch.setattr(preference.PairLogps, "forward", real)
    stored = (out / "reference_logps.pt").stat().st_mtime_ns

    def recomputed(*a, **kw):
        raise AssertionError("reference log-probs recomputed on --resume")
    monkeypatch.setattr(preference, "reference_logps", recomputed)
    assert run_cli(*args, "--output_dir", out, "--resume") == 0
    assert (out / "reference_logps.pt").stat().st_mtime_ns == stored
    import torch
    for name in ("final_adapter", "best_adapter"):
        want, got = _adapter(tmp_path / "reference", name), _adapter(out, name)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    assert [r for r in _metrics(out) if "val_loss" in r] == [r for r in _metrics(tmp_path / "reference")
                                                            if "val_loss" in r]


def test_dpo_on_two_processes_equals_one_process(tiny_models, tmp_path):
    """--num_processes 2: each process computes the reference of its share of the pairs and trains on its
    pairs of each step; the adapter equals one process with the same effective batch."""
    import subprocess
    import sys

    import torch
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS * 3)
    common = ["train", "--method", "dpo", "--model", str(tiny_models["llama"]), "--dataset_path", str(data),
              "--batch_size", "2", "--epochs", "1", "--val_split", "0.25", "--lora_dropout", "0.0",
              *map(str, TRAIN)]
    from conftest import run_cli
    assert run_cli(*common, "--output_dir", tmp_path / "one", "--gradient_accumulation_steps", 2) == 0
    done = subprocess.run([sys.executable, "-m", "phitune", *common, "--output_dir", str(tmp_path / "two"),
                           "--gradient_accumulation_steps", "1", "--num_processes", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = torch.load(tmp_path / "one" / "reference_logps.pt"), torch.load(tmp_path / "two" / "reference_logps.pt")
    torch.testing.assert_close(two["train"], one["train"], rtol=0, atol=1e-5)
    torch.testing.assert_close(two["val"], one["val"], rtol=0, atol=1e-5)
    want, got = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-4)


def _bad(tmp_path, rows):
    return write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], *rows])


@pytest.mark.parametrize("row,problem", [
    ({"prompt": "p", "chosen": "a"}, "bad.jsonl:2: 'rejected' is missing"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "bad.jsonl:2: 'chosen' and 'rejected' are the same"),
    ({"prompt": "p", "chosen": "a", "rejected": ["b"]}, "bad.jsonl:2: 'chosen' must be a list of messages"),
    ({"prompt": "p", "chosen": "a", "rejected": 7}, "bad.jsonl:2: 'rejected' must be a string"),
    ({"prompt": "p", "response": "r"}, "bad.jsonl:2: 'chosen' is missing"),
])
def test_bad_preference_data_exits_2_naming_line_and_field(tiny_models, tmp_path, capsys, row, problem):
    from conftest import run_cli
    code = run_cli("train", "--method", "dpo", "--model", tiny_models["llama"], "--dataset_path",
                   _bad(tmp_path, [row]), "--output_dir", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2 and problem in err and "Traceback" not in err, err


@pytest.mark.parametrize("extra,problem", [
    (["--method", "dpo", "--beta", 0], "beta: must be a number > 0"),
    (["--method", "dpo", "--beta", -1], "beta: must be a number > 0"),
    (["--method", "dpo", "--train_on_prompt"], "train_on_prompt: does not apply to --method dpo"),
    (["--method", "kto"], "invalid choice: 'kto'"),
    (["--method", "orpo", "--rpo_alpha", 0.5], "rpo_alpha: applies to --method dpo only"),
    (["--method", "dpo", "--rpo_alpha", -1], "rpo_alpha: must be a number >= 0"),
    (["--method", "dpo", "--adapter_path", "missing_dir"], "missing_dir: adapter directory not found"),
])
def test_bad_preference_settings_exit_2(tiny_models, tmp_path, capsys, extra, problem):
    from conftest import run_cli
    code = run_cli("train", "--model", tiny_models["llama"], "--dataset_path",
                   write_jsonl(tmp_path / "p.jsonl", PAIRS), "--output_dir", tmp_path / "out", *extra)
    err = capsys.readouterr().err
    assert code == 2 and problem in err and "Traceback" not in err, err


def test_sft_data_given_to_dpo_says_what_to_do(tiny_models, tmp_path, capsys):
    from conftest import MEMORISE, run_cli
    code = run_cli("train", "--method", "dpo", "--model", tiny_models["llama"], "--dataset_path",
                   write_jsonl(tmp_path / "sft.jsonl", MEMORISE), "--output_dir", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2 and "sft.jsonl:1: 'chosen' is missing" in err and "--method sft" in err


def test_memory_plan_counts_two_rows_per_pair(tiny_models):
    from transformers import AutoConfig

    from phitune.config import LoraArgs
    from phitune.hardware import memory
    shape = memory.model_shape(AutoConfig.from_pretrained(tiny_models["llama"]))
    lora = LoraArgs(lora_r=4)
    pairs_est = memory.estimate_memory(shape, lora, 3, 64, False, rows_per_example=memory.rows_per_example("dpo"))
    rows_est = memory.estimate_memory(shape, lora, 6, 64, False)
    assert pairs_est.parts == rows_est.parts and memory.rows_per_example("sft") == 1
    one = memory.estimate_memory(shape, lora, 3, 64, False)
    assert pairs_est.parts["activations"] == 2 * one.parts["activations"]


def test_auto_checkpointing_turns_on_for_pairs_and_trains_the_same(tiny_models, tmp_path, capsys, monkeypatch):
    from conftest import run_cli
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    common = ["train", "--method", "dpo", "--model", tiny_models["llama"], "--dataset_path", data, "--max_steps",
              2, "--batch_size", 2, "--gradient_accumulation_steps", 1, "--val_split", 0, "--lora_dropout", 0.0,
              "--max_length", 64, "--lora_r", 4, "--learning_rate", 1e-2]
    assert run_cli(*common, "--output_dir", tmp_path / "roomy") == 0
    assert "gradient checkpointing off: needs ~" in capsys.readouterr().err
    monkeypatch.setenv("PHITUNE_AVAILABLE_MEMORY", "1MiB")
    assert run_cli(*common, "--output_dir", tmp_path / "tight") == 0
    assert "gradient checkpointing on: needs ~" in capsys.readouterr().err
    meta = json.loads((tmp_path / "tight" / "final_adapter" / "phitune.json").read_text())
    assert meta["hardware"]["gradient_checkpointing"] is True
    import torch
    roomy, tight = _adapter(tmp_path / "roomy"), _adapter(tmp_path / "tight")
    for key in roomy:
        torch.testing.assert_close(tight[key], roomy[key], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- --adapter_path

def _margins(adapter_dir, rows):
    """Mean (chosen - rejected) summed log-prob over `rows` under an adapter, through phitune's own path."""
    import torch

    from phitune.models import adapters
    from phitune.models import loading as models
    from phitune.training import preference
    meta = adapters.read_adapter_meta(adapter_dir)
    tok = models.load_tokenizer(meta["base"]["model"])
    template = Template.from_meta(tok, meta["template"])
    model = adapters.load_adapter(models.load_model(meta["base"]["model"], torch.float32), adapter_dir, meta).eval()
    examples, _ = pairs.encode_pairs(pairs.validate_pairs(enumerate(rows, 1), "rows")[0], template, 64)
    with torch.no_grad():
        chosen, rejected = preference.pair_logps(model, pairs.collate_pairs(examples, tok.pad_token_id))
    return (chosen - rejected).mean().item(), template


def test_adapter_path_continues_an_sft_adapter_with_dpo(tiny_models, tmp_path, capsys):
    """SFT with a phi2 template, a system prompt and rank 16; then DPO from that adapter with no --model and no
    --template: the base, template, system prompt and LoRA shape are the adapter's, and the chosen-minus-rejected
    margin on the training pairs grows."""
    from conftest import run_cli
    sft_rows = [{"prompt": r["prompt"], "response": r["chosen"]} for r in PAIRS]
    sft = tmp_path / "sft"
    assert run_cli("train", "--model", tiny_models["llama"], "--dataset_path", write_jsonl(tmp_path / "s.jsonl",
                   sft_rows), "--output_dir", sft, "--template", "phi2", "--system_prompt", "Give the code.",
                   "--epochs", 10, "--batch_size", 4, "--gradient_accumulation_steps", 1, "--val_split", 0,
                   "--max_length", 64, "--lora_r", 16, "--lora_dropout", 0.0, "--learning_rate", 1e-2) == 0
    capsys.readouterr()
    dpo = tmp_path / "dpo"
    assert run_cli("train", "--method", "dpo", "--beta", 0.1, "--adapter_path", sft / "final_adapter",
                   "--dataset_path", write_jsonl(tmp_path / "p.jsonl", PAIRS), "--output_dir", dpo, "--epochs", 10,
                   "--batch_size", 4, "--gradient_accumulation_steps", 1, "--val_split", 0, "--max_length", 64,
                   "--learning_rate", 1e-2, "--warmup_ratio", 0) == 0
    err = capsys.readouterr().err
    assert f"starting from adapter {sft / 'final_adapter'}" in err and f"reference: {sft / 'final_adapter'}" in err
    meta = json.loads((dpo / "final_adapter" / "phitune.json").read_text())
    assert meta["base"]["model"] == str(tiny_models["llama"]) and meta["start_adapter"] == str(sft / "final_adapter")
    assert meta["template"]["kind"] == "phi2" and meta["template"]["system_prompt"] == "Give the code."
    config = json.loads((dpo / "final_adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16
    before, template = _margins(sft / "final_adapter", PAIRS)
    after, _ = _margins(dpo / "final_adapter", PAIRS)
    assert template.kind == "phi2"
    assert after > before + 1.0, (before, after)
    rows = [r for r in _metrics(dpo) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # the reference is the SFT adapter itself
    assert rows[-1]["accuracy"] == 1.0 and rows[-1]["margin"] > rows[0]["margin"]


def test_adapter_path_continues_sft_from_the_adapter_weights(tiny_models, tmp_path):
    from conftest import MEMORISE, run_cli
    data = write_jsonl(tmp_path / "s.jsonl", MEMORISE)
    common = ["--dataset_path", data, "--batch_size", 4, "--gradient_accumulation_steps", 1, "--val_split", 0,
              "--max_length", 64, "--lora_dropout", 0.0]
    first = tmp_path / "first"
    assert run_cli("train", "--model", tiny_models["llama"], "--output_dir", first, "--max_steps", 3,
                   "--learning_rate", 1e-2, "--lora_r", 4, *common) == 0
    again = tmp_path / "again"
    assert run_cli("train", "--adapter_path", first / "final_adapter", "--output_dir", again, "--max_steps", 1,
                   "--learning_rate", 1e-7, *common) == 0
    import torch
    start, end = _adapter(first), _adapter(again)
    assert start.keys() == end.keys()
    assert any(v.abs().max() > 1e-3 for k, v in start.items() if "lora_B" in k)
    for key in start:
        torch.testing.assert_close(end[key], start[key], rtol=0, atol=1e-5)
    meta = json.loads((again / "final_adapter" / "phitune.json").read_text())
    assert meta["method"] == "sft" and meta["beta"] is None


def test_plan_counts_a_pair_as_two_rows(tiny_models, tmp_path, capsys, monkeypatch):
    from conftest import run_cli
    from phitune import plan
    from phitune.hardware import memory
    estimates = []

    def spy(*a, **kw):
        est = memory.estimate_memory(*a, **kw)
        estimates.append((a[2], kw.get("rows_per_example", 1), est.total_bytes))
        return est
    monkeypatch.setattr(plan, "estimate_memory", spy)
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    assert run_cli("plan", "--method", "dpo", "--model", tiny_models["llama"], "--dataset_path", data,
                   "--batch_size", 2, "--gradient_accumulation_steps", 1, "--max_length", 64) == 0
    assert "4 preference pairs (8 sequences" in capsys.readouterr().out
    pairs_, per, _ = estimates[0]  # this run, as `train` will run it: 2 pairs = 4 rows
    assert (pairs_, per) == (2, 2) and all(p == 2 for _, p, _ in estimates)


def test_split_pairs_keeps_each_pair_whole(tiny_models):
    """The out-of-memory retry cuts a batch into smaller ones: each piece keeps its pairs' chosen and rejected
    rows together, so the summed statistics are those of the whole batch."""
    import torch

    from phitune.models.loading import load_tokenizer
    from phitune.training import preference
    tok = load_tokenizer(str(tiny_models["phi"]))
    examples, _ = pairs.encode_pairs(pairs.validate_pairs(enumerate(PAIRS, 1), "rows")[0], Template(tok), 64)
    ref = torch.randn(len(examples), 2)
    batch = pairs.collate_pairs(examples, tok.pad_token_id, ref_logps=ref)
    module = preference.PairLogps(_phitune_policy(tiny_models["phi"]))
    objective = preference.Objective("dpo", BETA)
    with torch.no_grad():
        whole = objective.terms(module(**preference.model_inputs(batch)), batch["ref_logps"])[2]
        pieces = preference.split_pairs(batch, 3)
        parts = sum(objective.terms(module(**preference.model_inputs(p)), p["ref_logps"])[2] for p in pieces)
    assert [p["input_ids"].shape[0] for p in pieces] == [4, 4] and len(pieces[0]["ref_logps"]) == 2
    assert torch.equal(pieces[1]["input_ids"][2], batch["input_ids"][len(examples) + 2])  # rejected of pair 2
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-5)
