"""Training throughput: phitune vs the seed's way (Trainer, padded, fp32) vs TRL's SFTTrainer, same work.

    make bench            # or: .venv/bin/python bench/train_throughput.py [--steps 6] [--only phitune]
                          #         [--precision auto|bf16|fp32]

Demo model (SmolLM2-135M-Instruct), LoRA r=16 on all linear layers (dropout 0.05, alpha 32), the first
512 pairs of the E2E dev set (prompt = mr, answer = ref, the model's chat template), loss on the answer,
max_length 512, effective batch 16, no gradient checkpointing, a fixed number of optimizer steps. Each
system runs in its own process (so peak memory is its own); the first step is excluded from the speed.
Compute precision (--precision auto): bf16 on CPUs with native bf16 (AVX512-BF16/AMX), fp32 on the others
(AVX2 only, where bf16 is emulated), for TRL and phitune alike; the seed's way is fp32. The report names
the CPU kind and, for each system, the paths its training step took (compute dtype, attention kernel,
LoRA layers on phitune's fused path, gradient checkpointing), observed on the model as it ran.
Needs requirements-bench.txt (TRL) installed.
"""
import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
# The E2E dev set sits in shared/ beside the checkout (or beside the folder of worktrees); E2E_CSV overrides.
DATA = Path(os.environ.get("E2E_CSV") or next(
    (p / "shared" / "data" / "e2e" / "devset.csv" for p in Path(__file__).resolve().parents[1:]
     if (p / "shared" / "data" / "e2e" / "devset.csv").is_file()), "../shared/data/e2e/devset.csv"))
MODEL = "smollm2-135m-instruct"
LORA = dict(r=16, alpha=32, dropout=0.05)
EFFECTIVE_BATCH, MAX_LENGTH, LR = 16, 512, 2e-4


def pairs(n=512):
    with open(DATA, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:n]
    return [(r["mr"], r["ref"]) for r in rows]


def rss_peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ baselines on transformers.Trainer

def cpu_kind():
    """The CPU's name, its bf16-related flags, and the kind phitune's precision policy sees."""
    from phitune.models.loading import cpu_has_fast_bf16
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        info = ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                platform.processor() or platform.machine())
    words = set(info.split())
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in words]
    kind = "AVX512-BF16/AMX: bf16 compute" if cpu_has_fast_bf16() else "no native bf16 (AVX2): fp32 compute"
    return {"name": name, "flags": flags, "kind": kind, "cpus": os.cpu_count()}


def compute_bf16(precision):
    from phitune.models.loading import cpu_has_fast_bf16
    return precision == "bf16" or (precision == "auto" and cpu_has_fast_bf16())


class PathsTaken:
    """Records, at the first forward of a transformers model during training, which paths it runs on."""

    def __init__(self):
        self.paths = None

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_pre_hook
        self.handle = register_module_forward_pre_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def hook(self, module, args):
        import torch
        from transformers import PreTrainedModel
        if self.paths is not None or not isinstance(module, PreTrainedModel) or not module.training:
            return
        lora = [m for m in module.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
        autocast = torch.is_autocast_enabled("cpu")
        self.paths = {
            "compute": str(torch.get_autocast_dtype("cpu") if autocast else module.dtype)[6:],
            "attention": module.config._attn_implementation,
            "lora_layers": len(lora),
            "fused_lora_layers": sum(hasattr(m, "_phitune_fused") for m in lora),
            "gradient_checkpointing": any(getattr(m, "gradient_checkpointing", False) for m in module.modules()),
        }
        self.handle.remove()


def trainer_run(kind, steps, bf16=True):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import TrainerCallback

    from phitune.models import loading as models

    path = models.provision_demo()
    tok = models.load_tokenizer(MODEL)
    counts = []  # (all tokens, answer tokens) per micro-batch, in order

    def encode(mr, ref):
        prompt = tok.apply_chat_template([{"role": "user", "content": mr}], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template([{"role": "user", "content": mr}, {"role": "assistant", "content": ref}],
                                       tokenize=False)
        end = full.index("<|im_end|>", len(prompt)) + len("<|im_end|>")
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(full[len(prompt):end], add_special_tokens=False)["input_ids"]
        return p_ids, a_ids

    clock = SimpleNamespace(times=[], losses=[])  # step-end wall times and logged losses

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                clock.losses.append(logs["loss"])

    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    out = tempfile.mkdtemp(prefix=f"bench-{kind}-")
    data = pairs()
    if kind == "seed":
        from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), lora)
        rows = []
        for mr, ref in data:
            p, a = encode(mr, ref)
            ids = (p + a)[:MAX_LENGTH]
            labels = ([-100] * len(p) + a)[:MAX_LENGTH]
            pad = MAX_LENGTH - len(ids)  # the seed padded every example to max_length
            rows.append({"input_ids": ids + [tok.pad_token_id] * pad, "attention_mask": [1] * len(ids) + [0] * pad,
                         "labels": labels + [-100] * pad})

        def collate(batch):
            counts.append((sum(sum(r["attention_mask"]) for r in batch),
                           sum(sum(1 for x in r["labels"][1:] if x != -100) for r in batch)))
            return {k: torch.tensor([r[k] for r in batch]) for k in batch[0]}

        args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=4,
                                 max_steps=steps, learning_rate=LR, logging_steps=1, save_strategy="no",
                                 report_to=[], use_cpu=True, seed=0, lr_scheduler_type="cosine", warmup_steps=0,
                                 dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[Clock()])
    else:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": mr}],
                                 "completion": [{"role": "assistant", "content": ref}]} for mr, ref in data])
        packing = kind in ("trl-packed", "trl-packed-nockpt")
        args = SFTConfig(output_dir=out, per_device_train_batch_size=16 if not packing else 4,
                         gradient_accumulation_steps=1 if not packing else 1, max_steps=steps, learning_rate=LR,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=bf16, seed=0,
                         lr_scheduler_type="cosine", warmup_steps=0, max_length=MAX_LENGTH, packing=packing,
                         completion_only_loss=True, dataloader_num_workers=0, disable_tqdm=True,
                         gradient_checkpointing=not kind.endswith("nockpt"),  # TRL's default is on
                         model_init_kwargs={"dtype": torch.float32})
        trainer = SFTTrainer(model=str(path), args=args, train_dataset=ds, peft_config=lora, processing_class=tok,
                             callbacks=[Clock()])
        inner = trainer.data_collator

        def collate(batch):
            out_batch = inner(batch)
            mask = out_batch.get("attention_mask")
            labels = out_batch["labels"]
            n_all = int(mask.sum()) if mask is not None else int(labels.numel())
            counts.append((n_all, int((labels[:, 1:] != -100).sum())))
            return out_batch
        trainer.data_collator = collate
    start = time.perf_counter()
    trainer.train()
    per_step = len(counts) // steps if counts else 1
    timed = counts[per_step:per_step * steps]
    seconds = clock.times[-1] - clock.times[0]
    return {"tokens_per_s": sum(c[0] for c in timed) / seconds,
            "answer_tokens_per_s": sum(c[1] for c in timed) / seconds,
            "final_loss": clock.losses[-1] if clock.losses else None, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------ phitune, through its CLI

def phitune_run(steps, checkpointing=False, precision="auto"):
    from phitune.cli import main
    tmp = Path(tempfile.mkdtemp(prefix="bench-phitune-"))
    data = tmp / "e2e512.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for mr, ref in pairs():
            fh.write(json.dumps({"prompt": mr, "response": ref}) + "\n")
    argv = ["train", "--model", MODEL, "--dataset_path", str(data), "--output_dir", str(tmp / "run"),
            "--max_steps", str(steps), "--batch_size", "16", "--gradient_accumulation_steps", "1",
            "--max_length", str(MAX_LENGTH), "--lora_r", str(LORA["r"]), "--lora_alpha", str(LORA["alpha"]),
            "--lora_dropout", str(LORA["dropout"]), "--learning_rate", str(LR), "--warmup_ratio", "0",
            "--val_split", "0", "--gradient_checkpointing" if checkpointing else "--no-gradient_checkpointing",
            "--save_steps", "100000", "--seed", "0", "--precision", precision]
    start = time.perf_counter()
    try:
        main(argv)
    except SystemExit as e:
        if e.code:
            raise
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    first, last = rows[0], rows[-1]
    seconds = last["seconds"] - first["seconds"]
    return {"tokens_per_s": (last["tokens"] - first["tokens"]) / seconds,
            "answer_tokens_per_s": (last["answer_tokens"] - first["answer_tokens"]) / seconds,
            "final_loss": last["loss"], "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------ the table

def matmul_peak(dtype_name, n=2048, reps=5):
    import torch
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / sorted(times)[len(times) // 2]


def flops_per_token(mean_len):
    """4N + 6 L T d (the issue's LoRA estimate): N = matmul parameters including the LM head."""
    from transformers import AutoConfig

    from phitune.models import loading as models
    cfg = AutoConfig.from_pretrained(models.provision_demo())
    d, L, f, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    n = L * (2 * d * d + 2 * d * kv + 3 * d * f) + v * d
    return 4 * n + 6 * L * mean_len * d, n


def child(system, steps, precision):
    bf16 = compute_bf16(precision)
    with PathsTaken() as seen:
        if system.startswith("phitune"):
            result = phitune_run(steps, checkpointing=system == "phitune-ckpt", precision=precision)
        else:
            result = trainer_run(system, steps, bf16=bf16)
    result["peak_rss_mib"] = rss_peak_mib()
    result["paths"] = seen.paths
    # The matmul peak of this machine drifts by +-30% from minute to minute: measure it in the same
    # process, right after the timed steps, so each MFU compares against the speed of its own minute.
    result["matmul_peak_flops"] = matmul_peak("bfloat16" if bf16 else "float32", reps=9)
    print("RESULT " + json.dumps(result))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per system (the first is not timed)")
    ap.add_argument("--only", nargs="+", default=["seed", "trl", "trl-packed", "trl-packed-nockpt", "phitune",
                                                  "phitune-ckpt"])
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                    help="compute precision of TRL and phitune (auto: bf16 where the CPU has native bf16)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--output", default=str(ROOT / "bench" / "train_throughput.json"))
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.steps, args.precision)
    cpu = cpu_kind()
    print(f"CPU: {cpu['name']} ({', '.join(cpu['flags']) or 'no AVX2'}), {cpu['kind']}; "
          f"this run computes in {'bf16' if compute_bf16(args.precision) else 'fp32'}", file=sys.stderr, flush=True)
    results = {}
    for system in args.only:
        print(f"--- {system}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", system, "--steps", str(args.steps),
                               "--precision", args.precision], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            results[system] = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
            continue
        results[system] = json.loads(line[len("RESULT "):])
        print(json.dumps(results[system]), file=sys.stderr, flush=True)
    bf16 = compute_bf16(args.precision)
    peak = matmul_peak("bfloat16" if bf16 else "float32")
    from phitune.models import loading as models
    tok = models.load_tokenizer(MODEL)
    chats = [tok.apply_chat_template([{"role": "user", "content": mr}, {"role": "assistant", "content": ref}],
                                     tokenize=False) for mr, ref in pairs()]
    ids = [len(tok(text, add_special_tokens=False)["input_ids"]) for text in chats]
    mean_len = sum(ids) / len(ids)
    fpt, n_matmul = flops_per_token(mean_len)
    print(f"\nCPU: {cpu['name']}, {cpu['cpus']} CPUs, flags {' '.join(cpu['flags']) or '-'}: {cpu['kind']}")
    print(f"machine: {platform.machine()}; matmul peak 2048^3 "
          f"{'bf16' if bf16 else 'fp32'} at the end: {peak / 1e9:.0f} GFLOP/s; FLOPs/token {fpt / 1e6:.0f}M "
          f"(N={n_matmul / 1e6:.1f}M, mean length {mean_len:.0f})")
    print("MFU: against the matmul peak measured in each system's own process right after its steps")
    print(f"{'system':18} {'answer tok/s':>12} {'all tok/s':>10} {'MFU':>6} {'(peak GFLOP/s)':>14} {'peak RSS':>9} "
          f"{'final loss':>10}")
    for system, r in results.items():
        if "error" in r:
            print(f"{system:18} error: {r['error']}")
            continue
        r["mfu"] = r["tokens_per_s"] * fpt / r["matmul_peak_flops"]
        print(f"{system:18} {r['answer_tokens_per_s']:12.0f} {r['tokens_per_s']:10.0f} {100 * r['mfu']:5.1f}% "
              f"{r['matmul_peak_flops'] / 1e9:14.0f} {r['peak_rss_mib']:7.0f}Mi {r['final_loss']:10.4f}")
    print("\npaths taken (observed at each system's first training forward):")
    for system, r in results.items():
        paths = r.get("paths")
        if paths:
            print(f"{system:18} compute {paths['compute']}, attention {paths['attention']}, "
                  f"{paths['fused_lora_layers']} of {paths['lora_layers']} LoRA layers fused, "
                  f"gradient checkpointing {'on' if paths['gradient_checkpointing'] else 'off'}")
    ok = {k: v for k, v in results.items() if "error" not in v}
    if "phitune" in ok:
        for base in ("seed", "trl", "trl-packed", "trl-packed-nockpt"):
            if base in ok:
                print(f"phitune / {base}: {ok['phitune']['tokens_per_s'] / ok[base]['tokens_per_s']:.2f}x all tokens, "
                      f"{ok['phitune']['answer_tokens_per_s'] / ok[base]['answer_tokens_per_s']:.2f}x answer tokens")
    Path(args.output).write_text(json.dumps({"cpu": cpu, "precision": args.precision, "results": results,
                                             "matmul_peak_flops": peak, "flops_per_token": fpt, "steps": args.steps},
                                            indent=2))


if __name__ == "__main__":
    main()
