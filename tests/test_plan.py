"""`phitune plan`: estimates from configs alone, suggestions, the docs table, and estimate vs measured peak."""
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT, run_cli, write_jsonl
from phitune import plan
from phitune.config import LoraArgs
from phitune.hardware import memory
from tiny import build_config, build_tokenizer

BF16, FP32 = torch.bfloat16, torch.float32
TOLERANCE = 0.30  # estimated peak within 30% of the measured one


def _full(name):
    import transformers
    cls, kw = plan.KNOWN_CONFIGS[name]
    return memory.model_shape(getattr(transformers, cls)(**kw))


def test_full_size_shapes_come_from_configs_without_weights():
    phi2, phi35 = _full("microsoft/phi-2"), _full("microsoft/Phi-3.5-mini-instruct")
    assert 2.77e9 < phi2.params < 2.79e9 and 3.81e9 < phi35.params < 3.83e9  # Phi-2 2.7B, Phi-3.5-mini 3.8B
    assert set(phi2.layer_linears) == {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}
    assert phi35.layer_linears["qkv_proj"] == (3072, 3 * 3072)
    est = memory.estimate_memory(phi2, LoraArgs(), 8, 2048, True, BF16, BF16, "cuda")
    assert est.parts["weights"] == phi2.params * 2
    # LoRA r=8 on q/k/v/dense/fc1/fc2 of 32 layers: r x (in + out) each
    assert est.trainable == 32 * 8 * (4 * (2560 + 2560) + (2560 + 10240) * 2)
    assert est.parts["lora + AdamW"] == est.trainable * 16


def test_estimates_move_the_way_memory_does():
    shape = _full("microsoft/Phi-3.5-mini-instruct")
    lora = LoraArgs()

    def total(bs=4, seq=1024, ckpt=True, **kw):
        return memory.estimate_memory(shape, lora, bs, seq, ckpt, BF16, BF16, "cuda", **kw).total_bytes

    assert total(ckpt=True) < total(ckpt=False)
    assert total(bs=2) < total(bs=4) < total(bs=8)
    assert total(seq=512) < total(seq=1024)
    assert total(quantize="4bit") < total() - 3 * memory.GIB  # 3.8B weights: 7.6 GB bf16; NF4 ~1.9 GB + fp32 rest
    # activations grow linearly in tokens without checkpointing
    a = [memory.estimate_memory(shape, lora, b, 512, False, BF16, BF16, "cuda").parts["activations"] for b in (2, 4)]
    assert a[1] == pytest.approx(2 * a[0], rel=0.01)


def test_lora_count_is_what_peft_attaches(tiny_models):
    from phitune.models import adapters
    from phitune.models import loading as models
    for arch in ("phi", "phi3", "llama"):
        config = models.load_config(str(tiny_models[arch]))
        shape = memory.model_shape(config)
        lora = LoraArgs(lora_r=4, target_modules=["attention"], layers="0")
        _, _, counted = memory.lora_targets(shape, lora)
        model, _ = adapters.attach_lora(models.load_model(str(tiny_models[arch])), lora)
        assert counted == sum(p.numel() for p in model.parameters() if p.requires_grad), arch


def test_suggestion_keeps_the_effective_batch_and_fits():
    shape = _full("microsoft/phi-2")
    kw = dict(weights_dtype=BF16, compute_dtype=BF16, device="cuda")
    big = memory.estimate_memory(shape, LoraArgs(), 8, 2048, False, **kw)
    capacity = 24 * memory.GIB
    assert not memory.fits(big, capacity)
    s = memory.suggest(shape, LoraArgs(), 8, 4, 2048, False, capacity, **kw)
    assert s.batch_size * s.gradient_accumulation_steps == 32
    assert memory.fits(s.estimate, capacity)
    assert re.fullmatch(rf"use --batch_size {s.batch_size} --gradient_accumulation_steps "
                        rf"{s.gradient_accumulation_steps}( --gradient_checkpointing)?: same effective batch, "
                        r"~\d+\.\d GiB", s.text)
    assert memory.suggest(shape, LoraArgs(), 8, 4, 2048, False, 2 * memory.GIB, **kw) is None


def test_plan_command_prints_this_run_and_the_readme_configurations(tiny_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say hello " * (i + 1), "response": "Hello there!"}
                                              for i in range(12)])
    assert run_cli("plan", "--model", tiny_models["phi"], "--dataset_path", data, "--batch_size", 4,
                   "--max_length", 64) == 0
    out = capsys.readouterr().out
    assert "12 prompt_response examples" in out and "longest" in out
    for label in ("this run", "README 8x4 @2048", "README 4x8 @1024, no ckpt"):
        assert label in out
    row = next(line for line in out.splitlines() if line.strip().startswith("this run"))
    assert " yes " in row and re.search(r"\d+ s\s*$", row)  # fits, and a time per epoch
    assert run_cli("plan", "--model", tiny_models["phi"], "--dataset_path", data, "--memory_gib", 0.001) == 0
    assert "this run does not fit" in capsys.readouterr().out


def test_docs_table_is_the_generated_one(tmp_path):
    target = tmp_path / "planning.md"
    target.write_text("# Planning\n\nhand-written text stays\n")
    assert run_cli("plan", "--table", target) == 0
    text = target.read_text()
    assert text.startswith("# Planning\n\nhand-written text stays") and "| microsoft/phi-2 |" in text
    assert run_cli("plan", "--table", target) == 0 and target.read_text() == text  # regenerating is stable
    docs = (ROOT / "docs" / "planning.md").read_text()
    assert plan.table_markdown() in docs, "docs/planning.md is stale: run phitune plan --table docs/planning.md"


def _small_model(arch, path, hidden=256, layers=4):
    """A random model large enough for its activations to show in the process's memory."""
    tok = build_tokenizer(arch)
    config = build_config(arch, len(tok), layers, eos=tok.eos_token_id, bos=tok.bos_token_id)
    config.hidden_size, config.intermediate_size = hidden, 4 * hidden
    config.num_attention_heads = config.num_key_value_heads = hidden // 32
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _measure_vs_estimate(model, data, capsys, *flags):
    # A fresh process, as a user runs it: the resident-memory peak of the test process carries what
    # earlier tests left behind.
    done = subprocess.run([sys.executable, "-m", "phitune", "plan", "--model", str(model), "--dataset_path",
                           str(data), "--measure", *map(str, flags)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    m = re.search(r"peak ([\d.]+) ([GM])iB vs estimated ([\d.]+) ([GM])iB \([+-]\d+%\)", out)
    assert m, out
    unit = {"G": 1024, "M": 1}
    measured, estimated = float(m.group(1)) * unit[m.group(2)], float(m.group(3)) * unit[m.group(4)]
    assert re.search(r"step \d+\.\d+ s vs estimated \d+\.\d+ s", out)
    return measured, estimated


LONG = [{"prompt": " ".join(["name[The Eagle], eatType[coffee shop]"] * 6),
         "response": " ".join(["The Eagle is a coffee shop serving French food."] * 6)}] * 8


@pytest.mark.parametrize("arch,ckpt", [("llama", "--no-gradient_checkpointing"), ("phi", "--gradient_checkpointing"),
                                       ("phi3", "--no-gradient_checkpointing")])
def test_estimate_within_tolerance_of_measured_peak_small_models(arch, ckpt, tmp_path, capsys):
    model = _small_model(arch, tmp_path / arch)
    data = write_jsonl(tmp_path / "d.jsonl", LONG)
    measured, estimated = _measure_vs_estimate(model, data, capsys, "--batch_size", 8, "--max_length", 256, ckpt)
    assert abs(estimated - measured) <= TOLERANCE * measured, (arch, ckpt, measured, estimated)


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", ["--no-gradient_checkpointing", "--gradient_checkpointing"])
def test_estimate_within_tolerance_of_measured_peak_demo_model(ckpt, capsys):
    measured, estimated = _measure_vs_estimate("smollm2-135m-instruct", ROOT / "examples" / "e2e_demo.jsonl", capsys,
                                               "--batch_size", 4, "--max_length", 128, ckpt)
    assert abs(estimated - measured) <= TOLERANCE * measured, (ckpt, measured, estimated)


def test_train_preflight_warns_with_a_fitting_suggestion():
    import transformers
    cls, kw = plan.KNOWN_CONFIGS["microsoft/phi-2"]
    config = getattr(transformers, cls)(**kw)
    args = (config, 8_000_000, 8, 4, 2048, False, BF16, BF16, "cuda")
    assert memory.preflight(*args, capacity_bytes=200 * memory.GIB) is None
    warning = memory.preflight(*args, capacity_bytes=24 * memory.GIB)
    assert re.match(r"warning: this run needs about \d+\.\d GiB at its longest batch \(8 x 2048 tokens\) and cuda "
                    r"has 24\.0 GiB; use --batch_size \d --gradient_accumulation_steps \d+", warning), warning
    assert "lower --max_length" in memory.preflight(*args, capacity_bytes=2 * memory.GIB)


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_plan_memory_gib_must_be_positive(value, tmp_path, capsys):
    assert run_cli("plan", "--model", "microsoft/phi-2", "--memory_gib", value) == 2
    out = capsys.readouterr()
    assert "memory_gib: must be a positive number of GiB" in out.err and out.out == ""


def test_plan_measure_without_data_fails_before_printing(capsys):
    assert run_cli("plan", "--model", "microsoft/phi-2", "--measure") == 2
    out = capsys.readouterr()
    assert "--measure needs --dataset_path" in out.err and out.out == ""


def test_plan_options_are_accepted_in_yaml(tiny_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say hello", "response": "Hello there!"}] * 4)
    cfg = tmp_path / "plan.yaml"
    cfg.write_text(f"model: {tiny_models['phi']}\ndataset_path: {data}\nmax_length: 64\nmemory_gib: 0.001\n")
    assert run_cli("plan", "--config", cfg) == 0
    assert "planning for 0.001 GiB" in capsys.readouterr().out
    table = tmp_path / "table.md"
    cfg.write_text(f"table: {table}\n")
    assert run_cli("plan", "--config", cfg) == 0 and "| microsoft/phi-2 |" in table.read_text()


def test_measured_peak_counts_mapped_weight_files_and_not_other_files(tmp_path):
    """An fp32 checkpoint trained in fp32 stays mapped from its file: those pages are the run's weights and
    must be in the measured peak (on a CPU without bf16 the demo model's 515 MiB were missing)."""
    import mmap
    size = 32 * 2 ** 20
    before = plan._mapped_weights_rss()
    handles = []
    for name in ("model.safetensors", "other.dat"):
        path = tmp_path / name
        path.write_bytes(b"\1" * size)
        fh = open(path, "rb")
        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        assert sum(m[i] for i in range(0, size, 4096)) == size // 4096  # every page read: resident
        handles += [fh, m]
    try:
        grew = plan._mapped_weights_rss() - before
        assert size <= grew < 2 * size
    finally:
        for h in reversed(handles):
            h.close()
