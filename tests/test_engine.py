"""The decoding engine: batched, merged and mixed-adapter answers equal plain transformers generate."""
import json
import shutil
import threading

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import MEMORISE
from phitune.data.templates import Template
from phitune.generation import load as gen
from phitune.generation.engine import Engine, TextStream
from phitune.models import adapters
from phitune.models.loading import load_tokenizer

QUESTIONS = ["Say the code for red", "What is the capital of France?", "one two three", "The quick brown fox",
             "Translate to French: good morning."]


def random_adapter(model_dir, out, seed, arch):
    """A LoRA adapter with random (non-zero) B, saved as phitune saves adapters."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    tok = load_tokenizer(str(model_dir))
    meta = {"base": {"model": str(model_dir), "model_type": base.config.model_type},
            "template": Template(tok).to_meta()}
    adapters.save_adapter(model, tok, out, meta)
    return out


@pytest.fixture(scope="module")
def two_adapters(tiny_models, tmp_path_factory):
    base = tmp_path_factory.mktemp("adapters")
    return {arch: (random_adapter(tiny_models[arch], base / f"{arch}-a", 1, arch),
                   random_adapter(tiny_models[arch], base / f"{arch}-b", 2, arch)) for arch in ("phi", "phi3", "llama")}


def plain(model, prompt_ids, stop_ids, pad_id, n):
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=stop_ids, pad_token_id=pad_id)
    return out[0, len(prompt_ids):].tolist()


def strip_stop(tokens, stop_ids):
    return tokens if not tokens or tokens[-1] not in stop_ids else tokens[:-1]


@pytest.mark.parametrize("arch", ["phi", "phi3", "llama"])
def test_mixed_batches_equal_plain_generate_per_model(arch, tiny_models, two_adapters):
    """Base, adapter a and adapter b rows in the same batches: each row equals its own model run alone."""
    a, b = two_adapters[arch]
    loaded = gen.load([f"a={a}", f"b={b}"], precision="fp32")
    jobs = [([{"role": "user", "content": q}], col, gen.Sampling(max_new_tokens=12))
            for q in QUESTIONS for col in (None, "a", "b")]
    answers = gen.generate_jobs(loaded, jobs, batch_size=4)  # rows of all three models share batches
    tok = loaded.tokenizer
    fresh = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    models = {None: fresh,
              "a": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models[arch]), a).eval(),
              "b": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models[arch]), b).eval()}
    for (conv, col, _), answer in zip(jobs, answers):
        template = loaded.template_for(col)
        prompt = template.encode_prompt(conv)
        want = plain(models[col], prompt, template.stop_token_ids(), tok.pad_token_id, 12)
        assert answer.tokens == len(want)
        assert answer.text == tok.decode(strip_stop(want, template.stop_token_ids()), skip_special_tokens=True).strip()


def test_switching_adapters_leaves_answers_unchanged(tiny_models, two_adapters):
    """Runs of a, b, the base and a loss computation in between: a's answers are the same every time."""
    a, b = two_adapters["llama"]
    loaded = gen.load([f"a={a}", f"b={b}"], precision="fp32")
    prompts = [loaded.template_for("a").encode_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    first = gen.generate_ids(loaded, prompts, gen.Sampling(max_new_tokens=12), adapter="a")
    with torch.no_grad(), loaded.use(None):  # PEFT's own layers are back for this (eval's loss does it)
        loaded.model(input_ids=torch.tensor([prompts[0]]))
    gen.generate_ids(loaded, prompts, gen.Sampling(max_new_tokens=12), adapter="b")
    gen.generate_ids(loaded, prompts, gen.Sampling(max_new_tokens=12), adapter=None)
    again = gen.generate_ids(loaded, prompts, gen.Sampling(max_new_tokens=12), adapter="a")
    assert [x.text for x in again] == [x.text for x in first]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), a).eval()
    stop = loaded.template_for("a").stop_token_ids()
    for p, answer in zip(prompts, first):
        want = strip_stop(plain(tuned, p, stop, loaded.tokenizer.pad_token_id, 12), stop)
        assert answer.text == loaded.tokenizer.decode(want, skip_special_tokens=True).strip()


def test_chat_merge_equals_adapter(tiny_models, memorised_adapter):
    """chat loads its one adapter merged into the weights: same answers as base + adapter."""
    merged = gen.load([memorised_adapter], precision="fp32", merge=True)
    assert not merged.adapters and not hasattr(merged.model, "peft_config")
    for row in MEMORISE:
        text = "".join(gen.stream(merged, [{"role": "user", "content": row["prompt"]}],
                                  gen.Sampling(max_new_tokens=30)))
        assert text.strip() == row["response"]


def test_each_model_is_prompted_with_its_own_template(memorised_adapter, tmp_path):
    """Adapters keep their own system prompt and template kind whatever their order; the base gets none."""
    other = tmp_path / "other"
    shutil.copytree(memorised_adapter, other)
    meta = json.loads((other / "phitune.json").read_text())
    meta["template"]["system_prompt"] = "You answer in codes."
    (other / "phitune.json").write_text(json.dumps(meta))
    msgs = [{"role": "user", "content": "Say the code for red"}]
    for order in ([f"plain={memorised_adapter}", f"other={other}"], [f"other={other}", f"plain={memorised_adapter}"]):
        loaded = gen.load(order, precision="fp32")
        assert "You answer in codes." in loaded.template_for("other").render_prompt(msgs)
        assert "You answer in codes." not in loaded.template_for("plain").render_prompt(msgs)
        assert "You answer in codes." not in loaded.template_for(None).render_prompt(msgs)
        answers = gen.generate_jobs(loaded, [(msgs, "plain", gen.Sampling(max_new_tokens=30))])
        assert answers[0].text == "The code for red is one."


def test_token_limit_is_not_a_stop(tiny_models):
    """An answer cut by max_new_tokens is reported as such even when its text is only whitespace."""
    loaded = gen.load(model=str(tiny_models["phi"]), precision="fp32")
    space = loaded.tokenizer.convert_tokens_to_ids("\u0120")  # byte-level BPE's space
    loaded.model.lm_head.bias.data[space] = 1e4  # this model now only ever says " "
    answer = gen.generate(loaded, [[{"role": "user", "content": "hi"}]], gen.Sampling(max_new_tokens=5))[0]
    assert answer.tokens == 5 and answer.finish_reason == "length" and answer.stopped is False


def test_text_stream_cuts_a_stop_string_split_across_tokens(tiny_models):
    tok = load_tokenizer(str(tiny_models["llama"]))
    ids = tok("The code for red is one.", add_special_tokens=False)["input_ids"]
    s = TextStream(tok, ["for red"])
    shown = "".join(s.push(ids[:n]) for n in range(1, len(ids) + 1))
    assert s.hit and shown == "The code " and s.answer == "The code "


def test_cancel_frees_the_row_within_one_step(tiny_models):
    loaded = gen.load(model=str(tiny_models["llama"]), precision="fp32")
    engine = Engine(loaded)
    cancel = threading.Event()
    slow = loaded.request(loaded.template.encode_prompt([{"role": "user", "content": "hi"}]), None,
                          gen.Sampling(max_new_tokens=1000), cancel=cancel, stop_ids=[])
    other = loaded.request(loaded.template.encode_prompt([{"role": "user", "content": "one two"}]), None,
                           gen.Sampling(max_new_tokens=1000), stop_ids=[])
    engine.add([slow, other])
    engine.step()
    cancel.set()
    engine.step()
    assert slow.finish_reason == "cancelled" and engine.rows == [other]


@pytest.mark.parametrize("arch", ["phi", "phi3", "llama"])
def test_rows_of_different_models_in_one_batch_equal_each_model_alone(arch, tiny_models, two_adapters):
    """A batch that mixes base, a and b rows (the server's case) gives each row its own model's answer."""
    from phitune.generation.rows import RowLora
    a, b = two_adapters[arch]
    loaded = gen.load([f"a={a}", f"b={b}"], precision="fp32")
    assert RowLora.supports(loaded.model)
    cols = [None, "a", "b", "a", None, "b"]
    reqs = [loaded.request(loaded.template_for(c).encode_prompt([{"role": "user", "content": q}]), c,
                           gen.Sampling(max_new_tokens=10)) for q, c in zip(QUESTIONS + QUESTIONS[:1], cols)]
    engine = Engine(loaded)
    engine.add(reqs)
    assert len(engine.rows) == 6
    while engine.rows:
        engine.step()
    for r in reqs:
        alone = loaded.request(r.prompt_ids, r.adapter, gen.Sampling(max_new_tokens=10))
        Engine(loaded).run([alone], batch_size=1)
        assert r.tokens == alone.tokens, r.adapter


def test_closing_the_scheduler_ends_rows_in_flight_and_waiting(tiny_models):
    import time

    from phitune.generation.scheduler import Scheduler
    loaded = gen.load(model=str(tiny_models["llama"]), precision="fp32")
    scheduler = Scheduler(Engine(loaded), max_batch=1)
    ids = loaded.template.encode_prompt([{"role": "user", "content": "hi"}])
    reqs = [loaded.request(ids, None, gen.Sampling(max_new_tokens=100_000), stop_ids=[]) for _ in range(3)]
    for r in reqs:
        scheduler.submit(r)
    deadline = time.time() + 30
    while not reqs[0].tokens and time.time() < deadline:
        time.sleep(0.01)
    scheduler.close()
    assert [r.finish_reason for r in reqs] == ["error"] * 3
    assert all("shutting down" in r.error for r in reqs)
