"""LoRA training speed and memory for full-size Phi-2 and Phi-3.5-mini built from configs (random weights).

    bash bench/gpu.sh          # needs one CUDA GPU; PyTorch, transformers, PEFT, Accelerate; no network

Random weights cost exactly the same compute per token as the real ones, so speed and memory are
measured without a download. Prints one JSON line per case and a table; MFU is against a bf16 matmul
measured in the same run.
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from phitune.config import LoraArgs  # noqa: E402
from phitune.models import adapters  # noqa: E402
from phitune.training.loss import AnswerLoss  # noqa: E402

CONFIGS = {
    "phi-2": ("PhiConfig", dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                                num_attention_heads=32, partial_rotary_factor=0.4, max_position_embeddings=2048)),
    "phi-3.5-mini": ("Phi3Config", dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                        max_position_embeddings=131072, original_max_position_embeddings=4096)),
}


def matmul_peak(n=8192, reps=10):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def flops_per_token(cfg, seq):
    d, L, f, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    n = L * (4 * d * d + (2 if cfg.model_type == "phi" else 3) * d * f) + v * d
    return 4 * n + 6 * L * seq * d


def run_case(name, batch, seq, steps=6, quantize=None):
    import transformers
    cls_name, kw = CONFIGS[name]
    cfg = getattr(transformers, cls_name)(**kw)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if quantize:
        model = quantized_model(cfg, quantize)
    else:
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.config.use_cache = False
    peft_model, targets = adapters.attach_lora(model, LoraArgs(lora_r=16, lora_alpha=32, lora_dropout=0.05), seed=0)
    peft_model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_model = AnswerLoss(peft_model).train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    batch_in = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum, n = loss_model(**batch_in)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    tps = batch * seq / step_s
    result = {"model": name, "batch": batch, "seq": seq, "quantize": quantize, "tokens_per_s": tps,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "step_s": step_s,
              "flops_per_token": flops_per_token(cfg, seq), "loss": float(loss_sum / n)}
    del model, peft_model, loss_model, opt
    return result


def checkpointing_choices(name, batch, seq):
    """What --gradient_checkpointing auto picks for this case on this GPU and on 16 / 24 GB ones."""
    import transformers

    from phitune.hardware import backends, memory
    cls_name, kw = CONFIGS[name]
    shape = memory.model_shape(getattr(transformers, cls_name)(**kw))
    need = memory.estimate_memory(shape, LoraArgs(lora_r=16), batch, seq, False, torch.bfloat16, torch.bfloat16,
                                  "cuda").total_bytes
    here = torch.cuda.mem_get_info()[1]
    return {f"{gb} GB" if gb else "this GPU": backends.decide_checkpointing("auto", need, gb * 2**30 if gb else here)[1]
            for gb in (0, 16, 24)}


def decode_case(name, new_tokens=64, rows=8):
    """Greedy decode with phitune's engine vs plain generate on PEFT, bf16, one stream and a mixed batch."""
    import types

    import transformers
    from peft import LoraConfig, get_peft_model

    from phitune.generation.engine import Engine, Request, Sampling
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import build_tokenizer
    cls_name, kw = CONFIGS[name]
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kw),
                                                              dtype=torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, lora, adapter_name="a").eval()
    peft_model.add_adapter("b", lora)
    tok = build_tokenizer("phi")  # ids only: the text of random weights is not read
    loaded = types.SimpleNamespace(model=peft_model, tokenizer=tok, device=torch.device("cuda"),
                                   adapters={"a": None, "b": None})
    prompt = torch.randint(0, 400, (64,)).tolist()
    x = torch.tensor([prompt], device="cuda")

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def plain():
        peft_model.set_adapter("a")
        peft_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False)

    def engine(adapters):
        reqs = [Request(prompt, adapter=a, sampling=Sampling(max_new_tokens=new_tokens)) for a in adapters]
        Engine(loaded).run(reqs, batch_size=len(reqs))
    with torch.no_grad():
        plain_s = timed(plain)
        one_s = timed(lambda: engine(["a"]))
        mixed_s = timed(lambda: engine([None, "a", "b", None, "a", "b", "a", "b"][:rows]))
    return {"model": name, "plain_generate_tokens_per_s": new_tokens / plain_s,
            "engine_single_tokens_per_s": new_tokens / one_s,
            "engine_mixed_batch_tokens_per_s": rows * new_tokens / mixed_s, "rows": rows}


def quantized_model(cfg, quantize):
    """bitsandbytes quantizes at load time, so save random bf16 weights once and load them quantized."""
    import tempfile

    import transformers
    from peft import prepare_model_for_kbit_training
    path = Path(tempfile.gettempdir()) / f"phitune-random-{cfg.model_type}"
    if not (path / "config.json").exists():
        with torch.device("cuda"):
            transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map={"": 0},
                                                              dtype=torch.bfloat16)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def main():
    peak = matmul_peak()
    print(f"GPU: {torch.cuda.get_device_name(0)}; bf16 matmul 8192^3: {peak / 1e12:.0f} TFLOP/s", flush=True)
    cases = [("phi-2", 4, 1024), ("phi-2", 4, 2048), ("phi-3.5-mini", 4, 1024), ("phi-3.5-mini", 4, 2048)]
    rows = []
    for name, b, s in cases:
        r = run_case(name, b, s)
        r["gradient_checkpointing_auto"] = checkpointing_choices(name, b, s)
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
        rows.append(r)
        print(json.dumps(r), flush=True)
    try:
        import bitsandbytes  # noqa: F401
        r = run_case("phi-3.5-mini", 4, 1024, quantize="4bit")
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
        rows.append(r)
        print(json.dumps(r), flush=True)
    except ImportError:
        print("bitsandbytes not installed: QLoRA case skipped", flush=True)
    for name in CONFIGS:
        print(json.dumps(decode_case(name)), flush=True)
    print("\n| model | batch x seq | quantize | tokens/s | MFU | peak GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} x {r['seq']} | {r['quantize'] or '-'} | {r['tokens_per_s']:.0f} | "
              f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
