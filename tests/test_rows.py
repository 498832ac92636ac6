"""A row's answer does not depend on its batch (rows.py), and --precision int8 (int8.py)."""
import subprocess
import threading

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import MEMORISE
from phitune.generation import load as gen
from phitune.generation.engine import Engine
from phitune.generation.int8 import Int8Linear
from test_chat_compare import PHITUNE
from test_engine import QUESTIONS, two_adapters  # noqa: F401  (fixture)


def _requests(loaded, n_new=10):
    cols = [None, "a", "b", "a", None, "b", "b"]
    return [loaded.request(loaded.template_for(c).encode_prompt([{"role": "user", "content": q}]), c,
                           gen.Sampling(max_new_tokens=n_new), stop_ids=[])
            for q, c in zip(QUESTIONS + QUESTIONS[:2], cols)]


def exact_here(loaded) -> bool:
    """Whether this CPU's kernels for this model treat every row alike (rows.exact_rows), as the engine sees it."""
    return Engine(loaded)._rows().exact


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("arch", ["phi", "phi3", "llama"])
def test_every_row_of_a_busy_batch_equals_the_row_alone(arch, precision, tiny_models, two_adapters):  # noqa: F811
    """Rows of base, a and b join a running batch at different steps (as a server's requests do) and leave
    it at different times; each row's tokens are bit for bit the ones it gets alone. Tiny random models have
    near-flat logits, so a last-bit difference in any layer shows up as another token."""
    a, b = two_adapters[arch]
    loaded = gen.load([f"a={a}", f"b={b}"], precision=precision)
    if not exact_here(loaded):
        pytest.skip(f"this CPU's {precision} matmul gives a row different bits in different batches")
    busy = _requests(loaded)
    for r, n in zip(busy, (10, 4, 10, 7, 10, 3, 10)):
        r.sampling = gen.Sampling(max_new_tokens=n)
    engine = Engine(loaded)
    engine.add(busy[:2])
    for r in busy[2:]:  # one more row joins at every step
        engine.step()
        engine.add([r])
    while engine.rows:
        engine.step()
    for r in busy:
        alone = loaded.request(r.prompt_ids, r.adapter, r.sampling, stop_ids=[])
        Engine(loaded).run([alone], batch_size=1)
        assert r.tokens == alone.tokens, (r.adapter, r.prompt_ids)


def test_generation_gives_peft_its_layers_back_for_a_loss(tiny_models, two_adapters):  # noqa: F811
    """After the engine ran mixed batches, the model under use(name) computes what PEFT computes (eval's loss)."""
    a, b = two_adapters["llama"]
    loaded = gen.load([f"a={a}", f"b={b}"], precision="fp32")
    gen.generate_jobs(loaded, [([{"role": "user", "content": q}], c, gen.Sampling(max_new_tokens=4))
                               for q in QUESTIONS[:2] for c in (None, "a", "b")])
    ids = torch.tensor([loaded.template.encode_prompt([{"role": "user", "content": QUESTIONS[0]}])])
    fresh_base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    fresh_a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), a).eval()
    with torch.no_grad():  # straight after generation, without use(): the model is PEFT's, adapter a active
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, fresh_a(input_ids=ids).logits)
    fresh_b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), b).eval()
    with torch.no_grad():
        with loaded.use("b"):
            mine_b = loaded.model(input_ids=ids).logits
        with loaded.use(None):
            mine_base = loaded.model(input_ids=ids).logits
        torch.testing.assert_close(mine_b, fresh_b(input_ids=ids).logits)
        torch.testing.assert_close(mine_base, fresh_base(input_ids=ids).logits)


def test_int8_linear_is_the_rounded_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    q = Int8Linear(linear)
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() >= 126
    dequant = q.qweight.float() * q.scale.float()[:, None]
    assert (dequant - linear.weight).abs().max() <= q.scale.float().max() / 2 + 1e-6  # half a step at most
    x = torch.randn(5, 3, 64)
    want = torch.nn.functional.linear(x.bfloat16().float(), dequant, linear.bias.detach().bfloat16().float())
    torch.testing.assert_close(q(x).float(), want, atol=0.05, rtol=0.02)


def test_int8_keeps_the_memorised_answers_and_the_adapters_apart(tiny_models, memorised_adapter):
    """int8 weights with the adapter merged (chat) and unmerged beside the base (compare, serve)."""
    chat = gen.load([memorised_adapter], precision="int8", merge=True)
    assert sum(isinstance(m, Int8Linear) for m in chat.model.modules()) == 1 + 7 * chat.model.config.num_hidden_layers
    served = gen.load([f"tuned={memorised_adapter}"], precision="int8")
    convs = [[{"role": "user", "content": row["prompt"]}] for row in MEMORISE]
    sampling = gen.Sampling(max_new_tokens=30)
    assert [a.text for a in gen.generate(chat, convs, sampling)] == [row["response"] for row in MEMORISE]
    jobs = [(c, col, sampling) for c in convs for col in ("tuned", None)]
    answers = gen.generate_jobs(served, jobs)
    assert [a.text for a in answers[::2]] == [row["response"] for row in MEMORISE]
    assert all(a.text != row["response"] for a, row in zip(answers[1::2], MEMORISE))  # the base never learned them


def test_chat_with_int8_weights_from_the_command_line(memorised_adapter):
    args = PHITUNE + ["chat", "--adapter_path", str(memorised_adapter), "--precision", "int8", "--temperature", "0"]
    done = subprocess.run(args + ["--prompt", "Say the code for green"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "The code for green is three.\n"


def test_cancelled_row_leaves_within_one_step_in_a_shared_batch(tiny_models, two_adapters):  # noqa: F811
    a, b = two_adapters["phi3"]
    loaded = gen.load([f"a={a}", f"b={b}"], precision="bf16")
    reqs = _requests(loaded, n_new=1000)[:3]
    reqs[1].cancel = threading.Event()
    engine = Engine(loaded)
    engine.add(reqs)
    engine.step()
    reqs[1].cancel.set()
    engine.step()
    assert reqs[1].finish_reason == "cancelled" and engine.rows == [reqs[0], reqs[2]]


def test_packed_bf16_layers_give_the_same_answers(tiny_models, monkeypatch):
    """Weights packed once for oneDNN (packed.py) give F.linear's bits: same layer outputs, same answers."""
    from phitune.generation import packed
    if not packed.available():
        pytest.skip("this PyTorch build has no oneDNN bf16 linear")
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(7, 3, 96, dtype=torch.bfloat16)
    assert torch.equal(packed.PackedLinear(linear)(x), torch.nn.functional.linear(x, linear.weight, linear.bias))
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    sampling = gen.Sampling(max_new_tokens=12)
    for arch in ("phi", "llama"):
        fast = gen.load(model=str(tiny_models[arch]), precision="bf16")
        assert any(isinstance(m, packed.PackedLinear) for m in fast.model.modules())
        with monkeypatch.context() as m:
            m.setattr(packed, "pack", lambda model: 0)
            plain = gen.load(model=str(tiny_models[arch]), precision="bf16")
        assert not any(isinstance(m, packed.PackedLinear) for m in plain.model.modules())
        assert [a.text for a in gen.generate(fast, convs, sampling)] == [a.text for a in gen.generate(plain, convs,
                                                                                                      sampling)]


def test_modules_to_save_adapters_keep_the_base_apart(tiny_models, tmp_path):
    """An adapter that replaces a whole module (modules_to_save) is served by PEFT's own paths: base rows
    never get the adapter's copy."""
    from peft import LoraConfig, get_peft_model

    from phitune.data.templates import Template
    from phitune.models import adapters as adapters_io
    from phitune.models.loading import load_tokenizer
    from test_engine import plain
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models["phi"]),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      modules_to_save=["lm_head"], init_lora_weights=False))
    for name, p in model.named_parameters():
        if "modules_to_save" in name:
            p.data.normal_(0, 0.5)
    tok = load_tokenizer(str(tiny_models["phi"]))
    adapters_io.save_adapter(model, tok, tmp_path / "m", {"base": {"model": str(tiny_models["phi"]),
                                                                    "model_type": "phi"},
                                                           "template": Template(tok).to_meta()})
    loaded = gen.load([f"m={tmp_path / 'm'}"], precision="fp32")
    ids = loaded.template_for(None).encode_prompt([{"role": "user", "content": QUESTIONS[1]}])
    base, tuned = (loaded.request(ids, a, gen.Sampling(max_new_tokens=8), stop_ids=[]) for a in (None, "m"))
    Engine(loaded).run([base, tuned], batch_size=2)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_models["phi"]).eval()
    fresh_m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["phi"]), tmp_path / "m").eval()
    with torch.no_grad():
        assert base.tokens == plain(fresh, ids, [], loaded.tokenizer.pad_token_id, 8)
        assert tuned.tokens == plain(fresh_m, ids, [], loaded.tokenizer.pad_token_id, 8)
    # The server takes such requests one model at a time instead of failing PEFT's mixed batch.
    import time

    from phitune.generation.scheduler import Scheduler
    scheduler = Scheduler(Engine(loaded), max_batch=4)
    served = [loaded.request(ids, a, gen.Sampling(max_new_tokens=8), stop_ids=[]) for a in (None, "m", None, "m")]
    for r in served:
        scheduler.submit(r)
    deadline = time.time() + 60
    while not all(r.done for r in served) and time.time() < deadline:
        time.sleep(0.01)
    scheduler.close()
    assert [r.finish_reason for r in served] == ["length"] * 4
    assert [r.tokens for r in served] == [base.tokens, tuned.tokens] * 2


def test_lora_rows_of_a_layer_fed_flattened_tokens(tiny_models, two_adapters):  # noqa: F811
    """Some models flatten (batch, tokens) before a projection (Qwen2-MoE's shared expert): each row still
    gets its own adapter's update."""
    from phitune.generation import rows
    from phitune.generation.rows import RowLora, RowLoraLinear
    a, b = two_adapters["llama"]
    loaded = gen.load([f"a={a}", f"b={b}"], precision="fp32")
    swaps = RowLora(loaded.model, ["a", "b"]).swaps
    _, _, peft_layer, mine = next(s for s in swaps if isinstance(s[3], RowLoraLinear))
    x = torch.randn(3, 5, mine.base_layer.in_features)
    with torch.no_grad(), rows.batch([0, 0, 0], ["b", None, "a"]):
        flat = mine(x.reshape(15, -1)).reshape(3, 5, -1)
        shaped = mine(x)
    torch.testing.assert_close(flat, shaped)
    with torch.no_grad():
        for row, name in enumerate(["b", None, "a"]):
            if name is None:
                want = peft_layer.get_base_layer()(x[row])
            else:
                peft_layer.set_adapter(name)
                want = peft_layer(x[row])
            torch.testing.assert_close(shaped[row], want, rtol=1e-5, atol=1e-5)
