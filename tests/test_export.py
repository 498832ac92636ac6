"""`phitune export`: GGUF files checked in llama.cpp itself (node-llama-cpp's prebuilt CPU build, tools/llamacpp)."""
import copy
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import MEMORISE, ROOT, run_cli, write_jsonl
from ollama_render import modelfile_parts, render_chat

ARCHS = ("phi", "phi3", "llama")
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
TEXTS = ["Hello world", "café naïve ÉLAN über straße", "def f(x):\n    return x**2  # 😀 done",
         "  two  spaces\n\n\ttab  ", "1234567 + 89 = 1234656", "emoji 🤖🎉 and 中文 and ñ",
         "name[The Eagle], food[French]"]
PROMPTS = ["Say the code for red", "Say the code for gold", "What is the capital of France?"]
N_EXACT = 12  # greedy tokens compared one for one at f32/f16/bf16


def _train(base, out, steps=6, extra=()):
    data = write_jsonl(out.parent / f"{out.name}.jsonl", MEMORISE)
    assert run_cli("train", "--model", base, "--dataset_path", data, "--output_dir", out, "--max_steps", steps,
                   "--batch_size", 4, "--max_length", 64, "--lora_r", 8, "--lora_dropout", 0.0,
                   "--learning_rate", 5e-2, "--warmup_ratio", 0.0, "--val_split", 0, "--precision", "fp32",
                   *extra) == 0
    return out / "final_adapter"


@pytest.fixture(scope="session")
def exported(tiny_models, tmp_path_factory):
    """Per architecture: a trained adapter, its merged model, and one GGUF file per out type."""
    from phitune.exporting.gguf_file import write_gguf
    from phitune.exporting.merge import merge_adapter
    out = {}
    for arch in ARCHS:
        base = tmp_path_factory.mktemp(f"export-{arch}")
        adapter = _train(tiny_models[arch], base / "run")
        merged, tok, template, _, _, _ = merge_adapter(adapter)
        files = {}
        for outtype in OUTTYPES:
            files[outtype] = base / f"model-{outtype}.gguf"
            write_gguf(files[outtype], merged, tok, template, outtype)
        out[arch] = dict(adapter=adapter, model=merged.eval(), tok=tok, template=template, files=files)
    return out


def _rounded(model, dtype):
    """The merged model with its matrices rounded as the file stores them (1-D tensors stay float32)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim >= 2:
                p.copy_(p.to(dtype).to(torch.float32))
    return m


def _prompt_ids(e):
    return [e["template"].encode_prompt([{"role": "user", "content": p}]) for p in PROMPTS]


def _greedy(model, ids, n, stops):
    with torch.no_grad():
        g = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=stops,
                           pad_token_id=stops[0])
    return g[0, len(ids):].tolist()


# f16: ggml multiplies with f16 activations too, so probabilities agree to a few 1e-3, not exactly.
PROB_TOL = {"f32": 1e-3, "f16": 5e-3}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_llamacpp_greedy_equals_transformers(exported, llamacpp, arch, outtype):
    """llama.cpp continues each prompt token for token like the merged transformers model (same weights)."""
    e = exported[arch]
    ref = e["model"] if outtype == "f32" else _rounded(e["model"], torch.float16)
    prompts = _prompt_ids(e)
    res = llamacpp({"model": str(e["files"][outtype]), "probs": prompts,
                    "generate": [{"ids": ids, "max_tokens": N_EXACT} for ids in prompts]})
    stops = e["template"].stop_token_ids()
    for ids, got, probs in zip(prompts, res["generated"], res["probs"]):
        want = _greedy(ref, ids, N_EXACT, stops)
        hf_stopped = len(want) < N_EXACT or want[-1] in stops
        # llama.cpp ends on the stop token without returning it; transformers returns it.
        assert got["ids"] == [t for t in want if t not in stops], (outtype, got, want)
        assert got["stopped"] == hf_stopped
        with torch.no_grad():
            p = ref(torch.tensor([ids])).logits[0].softmax(-1)
        for pos, top in enumerate(probs):
            for tok, prob in top[:5]:
                assert abs(prob - float(p[pos, tok])) < PROB_TOL[outtype], (pos, tok, prob, float(p[pos, tok]))


# bf16 and quantized files are compared with the float32 merged model by agreement: top-1 next-token
# agreement along each prompt + its greedy continuation (teacher-forced), and the mean total-variation
# distance between the two next-token distributions. Tiny random models have flat distributions, so
# q4_0's rounding flips many near-ties; on real models agreement is far higher.
QUANT_AGREEMENT = {"bf16": (0.95, 0.02), "q8_0": (0.95, 0.05), "q4_0": (0.5, 0.25)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("outtype", ["bf16", "q8_0", "q4_0"])
def test_llamacpp_quantized_agrees_with_transformers(exported, llamacpp, arch, outtype):
    e = exported[arch]
    stops = e["template"].stop_token_ids()
    seqs = [ids + _greedy(e["model"], ids, N_EXACT, stops) for ids in _prompt_ids(e)]
    res = llamacpp({"model": str(e["files"][outtype]), "probs": seqs, "top": 1000})
    agree, total, tv = 0, 0, []
    for ids, probs in zip(seqs, res["probs"]):
        with torch.no_grad():
            p = e["model"](torch.tensor([ids])).logits[0].softmax(-1).numpy()
        for pos, top in enumerate(probs):
            q = np.zeros(p.shape[1])
            for tok, prob in top:
                q[tok] = prob
            agree += int(top[0][0] == int(p[pos].argmax()))
            total += 1
            tv.append(0.5 * float(np.abs(q - p[pos]).sum()))
    min_agree, max_tv = QUANT_AGREEMENT[outtype]
    assert agree / total >= min_agree, f"{outtype}: top-1 agreement {agree}/{total}"
    assert float(np.mean(tv)) <= max_tv, f"{outtype}: mean total variation {np.mean(tv):.3f}"


@pytest.mark.parametrize("arch", ARCHS)
def test_llamacpp_tokenizes_like_the_hf_tokenizer(exported, llamacpp, arch):
    e = exported[arch]
    tok, template = e["tok"], e["template"]
    rendered = [template.render_prompt([{"role": "user", "content": t}]) for t in TEXTS[:3]]
    res = llamacpp({"model": str(e["files"]["f16"]), "tokenize_plain": TEXTS, "tokenize": rendered})
    assert res["tokens_plain"] == [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    # The chat prompt, special tokens included, is the token sequence phitune trains and prompts with.
    want = [template.encode_prompt([{"role": "user", "content": t}]) for t in TEXTS[:3]]
    assert res["tokens"] == want
    assert res["eos"] == tok.eos_token_id


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_in_file_renders_like_phitune(exported, arch):
    """The template stored in the GGUF renders conversations exactly as phitune's own template does."""
    import gguf
    e = exported[arch]
    reader = gguf.GGUFReader(str(e["files"]["f16"]))
    field = reader.fields["tokenizer.chat_template"]
    stored = bytes(field.parts[field.data[0]]).decode("utf-8")
    tok = copy.copy(e["tok"])
    tok.chat_template = stored
    for messages in ([{"role": "user", "content": "Hi there"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                     [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]):
        got = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert got == e["template"].render_prompt(messages)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_transformers_reads_the_file_back(exported, arch, tmp_path):
    """transformers' own GGUF loader gives the merged model's logits back (f32 file)."""
    from transformers import AutoModelForCausalLM
    e = exported[arch]
    path = e["files"]["f32"]
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([_prompt_ids(e)[0]])
    with torch.no_grad():
        diff = float((back(ids).logits - e["model"](ids).logits).abs().max())
    assert diff < 1e-4


def test_memorised_adapter_answers_and_stops_in_llamacpp(memorised_adapter, llamacpp, tmp_path):
    """The exported fine-tune gives the trained answers in llama.cpp and ends them by itself."""
    out = tmp_path / "mem.gguf"
    assert run_cli("export", "--adapter_path", memorised_adapter, "--output", out, "--outtype", "q8_0") == 0
    from phitune.data.templates import Template
    from phitune.models.loading import load_tokenizer
    meta = json.loads((memorised_adapter / "phitune.json").read_text())
    template = Template.from_meta(load_tokenizer(meta["base"]["model"]), meta["template"])
    prompts = [template.encode_prompt([{"role": "user", "content": r["prompt"]}]) for r in MEMORISE]
    res = llamacpp({"model": str(out), "generate": [{"ids": ids, "max_tokens": 40} for ids in prompts]})
    for row, got in zip(MEMORISE, res["generated"]):
        assert got["stopped"], got
        assert got["text"].replace("<|im_end|>", "").strip() == row["response"]


@pytest.mark.parametrize("arch", ARCHS)
def test_export_cli_writes_gguf_and_ollama_modelfile(exported, tmp_path, capsys, arch):
    e = exported[arch]
    out = tmp_path / "tuned.gguf"
    assert run_cli("export", "--adapter_path", e["adapter"], "--output", out, "--format", "ollama") == 0
    printed = capsys.readouterr().out
    assert "check: max |logit difference|" in printed and "tuned.gguf" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "tuned.gguf"]  # no temporary files left
    text = (tmp_path / "Modelfile").read_text()
    assert "FROM ./tuned.gguf" in text
    assert re.findall(r'PARAMETER stop "(.*)"', text) == e["template"].stop_tokens
    # The Go template, rendered as Ollama renders a chat, gives phitune's prompt text, in one turn and in three.
    go, _, _ = modelfile_parts(text)
    history = [{"role": "user", "content": "Hi"}]
    assert render_chat(go, history) == e["template"].render_prompt(history)
    history += [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"},
                {"role": "assistant", "content": "Bye."}, {"role": "user", "content": "Ok"}]
    assert render_chat(go, history) == e["template"].render_prompt(history)


def test_system_prompt_travels_to_gguf_and_modelfile(tiny_models, tmp_path):
    import gguf
    adapter = _train(tiny_models["phi"], tmp_path / "run", steps=1, extra=("--system_prompt", "You are terse."))
    out = tmp_path / "m.gguf"
    assert run_cli("export", "--adapter_path", adapter, "--output", out, "--format", "ollama") == 0
    assert 'SYSTEM """You are terse."""' in (tmp_path / "Modelfile").read_text()
    field = gguf.GGUFReader(str(out)).fields["tokenizer.chat_template"]
    assert "You are terse." in bytes(field.parts[field.data[0]]).decode("utf-8")


# ---------------------------------------------------------------- bad input: exit 2, nothing written

def test_unsupported_architecture_is_refused(tmp_path, tiny_models, capsys):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    base = tmp_path / "qwen"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4)).save_pretrained(base)
    tok.save_pretrained(base)
    adapter = _train(base, tmp_path / "run", steps=1)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    assert run_cli("export", "--adapter_path", adapter, "--output", out) == 2
    err = capsys.readouterr().err
    assert "qwen2" in err and "llama" in err and "phi3" in err
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("fmt", ["gguf", "lora"])
def test_adapter_for_another_base_is_refused(exported, tiny_models, tmp_path, capsys, fmt):
    out = tmp_path / "m.gguf"
    assert run_cli("export", "--adapter_path", exported["llama"]["adapter"], "--model", tiny_models["phi3"],
                   "--output", out, "--format", fmt) == 2
    assert "trained on a base with model_type=llama" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["missing_dir", "is_dir", "not_gguf"])
def test_unwritable_output_is_refused(exported, tmp_path, capsys, where):
    target = {"missing_dir": tmp_path / "nope" / "m.gguf", "is_dir": tmp_path / "d.gguf",
              "not_gguf": tmp_path / "m.bin"}[where]
    if where == "is_dir":
        target.mkdir()
    before = sorted(tmp_path.rglob("*"))
    assert run_cli("export", "--adapter_path", exported["llama"]["adapter"], "--output", target) == 2
    assert "--output" in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before


def test_failed_write_leaves_no_partial_file(exported, tmp_path):
    """A failure while writing (here: a tensor the read-back check rejects) leaves neither file nor temp file."""
    from phitune.errors import PhituneError
    from phitune.exporting import gguf_file as export
    e = exported["phi3"]
    tol = dict(export.READBACK_TOL)
    export.READBACK_TOL["q4_0"] = -1.0  # no q4_0 tensor can pass: the check fails after the data is written
    try:
        with pytest.raises(PhituneError, match="reads back"):
            export.write_gguf(tmp_path / "m.gguf", e["model"], e["tok"], e["template"], "q4_0")
    finally:
        export.READBACK_TOL.update(tol)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the demo model (slow)

@pytest.mark.slow
def test_demo_model_export_answers_like_the_tuned_model(tmp_path, llamacpp):
    """SmolLM2-135M-Instruct tuned a few steps on E2E: the f16 file answers an E2E prompt in llama.cpp as
    the tuned model does in transformers (same f16 weights), and stops by itself."""
    out = tmp_path / "demo"
    assert run_cli("train", "--model", "smollm2-135m-instruct", "--dataset_path", ROOT / "examples/e2e_demo.jsonl",
                   "--output_dir", out, "--max_steps", 4, "--batch_size", 4, "--gradient_accumulation_steps", 1,
                   "--max_length", 128, "--lora_r", 8, "--learning_rate", 1e-3, "--val_split", 0,
                   "--no-gradient_checkpointing") == 0
    gguf_path = tmp_path / "demo.gguf"
    assert run_cli("export", "--adapter_path", out / "final_adapter", "--output", gguf_path,
                   "--outtype", "f16") == 0
    from phitune.exporting.merge import merge_adapter
    merged, tok, template, _, _, _ = merge_adapter(out / "final_adapter")
    ref = _rounded(merged.eval(), torch.float16)
    question = ("Write one sentence describing this restaurant: name[The Eagle], eatType[coffee shop], "
                "food[French], priceRange[moderate], area[riverside], familyFriendly[yes]")
    ids = template.encode_prompt([{"role": "user", "content": question}])
    want = _greedy(ref, ids, 80, template.stop_token_ids())
    res = llamacpp({"model": str(gguf_path), "context": 1024, "generate": [{"ids": ids, "max_tokens": 80}],
                    "tokenize_plain": TEXTS, "chat": [question], "max_tokens": 80})
    got = res["generated"][0]
    assert got["stopped"], got  # ended on <|im_end|> by itself
    assert want[-1] in template.stop_token_ids()
    assert got["ids"] == want[:-1], (tok.decode(got["ids"]), tok.decode(want))  # llama.cpp omits the stop token
    assert res["tokens_plain"] == [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    # As a user of a llama.cpp chat front end would: the file's own chat template, no prompt built by hand.
    assert res["chat"][0]["text"].strip() == tok.decode(want[:-1], skip_special_tokens=True).strip(), res["chat"]
    # q8_0: the same next token as the tuned answer, under teacher forcing, in at least 80% of positions
    # (measured 17 of 19 on an AVX512 CPU: 8-bit rounding flips a few near-ties on a 135M model).
    from phitune.exporting.gguf_file import write_gguf
    q8 = tmp_path / "demo-q8_0.gguf"
    write_gguf(q8, merged, tok, template, "q8_0")
    seq = ids + want
    top = llamacpp({"model": str(q8), "context": 1024, "probs": [seq], "top": 1})["probs"][0]
    agree = sum(top[i][0][0] == seq[i + 1] for i in range(len(ids) - 1, len(seq) - 1))
    assert agree >= 0.8 * len(want), (agree, len(want))


def test_phi3_longrope_factors_in_llamacpp(llamacpp, tmp_path):
    """Phi-3.5's LongRoPE (short/long factors and attention scaling) gives the same logits in llama.cpp
    within the original context (where both use the short factors)."""
    import gguf
    from transformers import AutoModelForCausalLM, Phi3Config

    from phitune.data.templates import Template
    from phitune.exporting.gguf_file import write_gguf
    from tiny import build_tokenizer
    tok = build_tokenizer("phi3")
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                     original_max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                     bos_token_id=tok.bos_token_id, pad_token_id=None, tie_word_embeddings=False,
                     initializer_range=0.25, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                              "long_factor": [1.0, 2.0, 4.0, 8.0],
                                                              "short_factor": [1.0, 1.5, 2.0, 3.0]})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    path = tmp_path / "longrope.gguf"
    write_gguf(path, model, tok, Template(tok), "f32")
    fields = gguf.GGUFReader(str(path)).fields
    attn_factor = float(fields["phi3.rope.scaling.attn_factor"].parts[-1][0])
    assert abs(attn_factor - (1 + np.log(4) / np.log(256)) ** 0.5) < 1e-6
    ids = tok("The Eagle is a coffee shop serving French food near the river.")["input_ids"] * 3
    res = llamacpp({"model": str(path), "context": 256, "probs": [ids]})
    with torch.no_grad():
        p = model(torch.tensor([ids])).logits[0].softmax(-1)
    for pos, top in enumerate(res["probs"][0]):
        assert top[0][0] == int(p[pos].argmax())
        for t, prob in top[:5]:
            assert abs(prob - float(p[pos, t])) < 1e-3, (pos, t, prob, float(p[pos, t]))


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_gguf_on_base_gguf_equals_merged_model(exported, tiny_models, llamacpp, arch, tmp_path):
    """--format lora: the adapter alone, applied by llama.cpp to a GGUF of the base, answers like the merge."""
    from transformers import AutoModelForCausalLM

    from phitune.exporting.gguf_file import write_gguf
    e = exported[arch]
    base = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    write_gguf(tmp_path / "base.gguf", base, e["tok"], e["template"], "f32")
    lora = tmp_path / "adapter.gguf"
    assert run_cli("export", "--adapter_path", e["adapter"], "--format", "lora", "--output", lora) == 0
    prompts = _prompt_ids(e)
    res = llamacpp({"model": str(tmp_path / "base.gguf"), "lora": str(lora), "probs": prompts,
                    "generate": [{"ids": ids, "max_tokens": N_EXACT} for ids in prompts]})
    stops = e["template"].stop_token_ids()
    for ids, got, probs in zip(prompts, res["generated"], res["probs"]):
        assert got["ids"] == [t for t in _greedy(e["model"], ids, N_EXACT, stops) if t not in stops]
        with torch.no_grad():
            p = e["model"](torch.tensor([ids])).logits[0].softmax(-1)
        assert all(abs(prob - float(p[pos, t])) < 1e-3 for pos, top in enumerate(probs) for t, prob in top[:5])
    # ... and like the merged f32 file in llama.cpp itself (log-probabilities of each position's top tokens).
    merged = llamacpp({"model": str(e["files"]["f32"]), "probs": prompts})
    for applied_seq, merged_seq in zip(res["probs"], merged["probs"]):
        for applied, want in zip(applied_seq, merged_seq):
            assert applied[0][0] == want[0][0]
            want = dict(want)
            assert max(abs(np.log(p) - np.log(want[t])) for t, p in applied if t in want) < 2e-3
    with torch.no_grad():  # the adapter matters: without it the base answers measurably differently
        ids = torch.tensor([prompts[0]])
        assert float((base(ids).logits.softmax(-1) - e["model"](ids).logits.softmax(-1)).abs().max()) > 0.02


def _sentencepiece_style_tokenizer():
    """A tiny tokenizer laid out like Llama 2's / Phi-3's tokenizer.json: '▁' for spaces, byte fallback to
    <0xXX> tokens, ids in merge order (the layout llama.cpp reads as a SentencePiece 'llama' vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tiny import CORPUS, PHI3
    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner = Tokenizer(models.BPE())
    learner.normalizer = norm
    learner.pre_tokenizer = pre_tokenizers.Split("\n", "isolated")
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<|endoftext|>")
    fast.chat_template = PHI3
    return fast


def test_sentencepiece_style_tokenizer_in_llamacpp(llamacpp, tmp_path):
    """Phi-3.5's kind of tokenizer (byte-fallback BPE over '▁') tokenizes and generates alike in llama.cpp."""
    from transformers import AutoModelForCausalLM

    from phitune.data.templates import Template
    from phitune.exporting.gguf_file import write_gguf
    from tiny import build_config
    tok = _sentencepiece_style_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config("phi3", len(tok), eos=tok.eos_token_id,
                                                          bos=tok.bos_token_id)).eval()
    template = Template(tok)
    path = tmp_path / "spm.gguf"
    write_gguf(path, model, tok, template, "f32")
    prompts = [template.encode_prompt([{"role": "user", "content": t}]) for t in TEXTS]
    rendered = [template.render_prompt([{"role": "user", "content": t}]) for t in TEXTS]
    res = llamacpp({"model": str(path), "tokenize_plain": TEXTS, "tokenize": rendered,
                    "generate": [{"ids": prompts[0], "max_tokens": N_EXACT}]})
    assert res["tokens_plain"] == [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert res["tokens"] == prompts
    stops = template.stop_token_ids()
    assert res["generated"][0]["ids"] == [t for t in _greedy(model, prompts[0], N_EXACT, stops) if t not in stops]


# ---------------------------------------------------------------- a full disk: exit 2, nothing left behind

@pytest.fixture
def small_fs(tmp_path):
    """small_fs(n_bytes) -> an empty directory on a fresh tmpfs of that size (rounded down to whole pages)."""
    mounted = []

    def make(n_bytes):
        path = tmp_path / f"fs{len(mounted)}"
        path.mkdir()
        pages = max(1, int(n_bytes) // 4096)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * 4}k", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({(r.stderr or r.stdout).strip()}); needs root")
        mounted.append(path)
        return path
    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("when", ["before", "while_writing"])
@pytest.mark.parametrize("fmt", ["lora", "q8_0", "ollama"])
def test_full_disk_is_reported_and_leaves_nothing(exported, tmp_path, small_fs, capsys, monkeypatch, fmt, when):
    """On a filesystem too small for the file, at several sizes: exit 2, a message naming the filesystem and
    the space needed, and no file or temp file. `while_writing` skips the free-space check made before writing,
    as when another program fills the disk meanwhile: the write itself fails in the header, the metadata or
    the tensors."""
    if when == "while_writing":
        from phitune.exporting import gguf_file
        monkeypatch.setattr(gguf_file, "ensure_space", lambda path, need: None)
    e = exported["llama"]
    args = {"lora": ["--format", "lora"], "q8_0": ["--outtype", "q8_0"], "ollama": ["--format", "ollama"]}[fmt]
    (tmp_path / "ref").mkdir()
    ref = tmp_path / "ref" / "ref.gguf"
    assert run_cli("export", "--adapter_path", e["adapter"], "--output", ref, *args) == 0
    size = ref.stat().st_size
    capsys.readouterr()
    pages = sorted({max(1, int(size * f) // 4096) for f in (0.05, 0.3, 0.6, 0.9, 0.999)})
    assert len(pages) >= 3 and pages[-1] * 4096 < size
    for n in pages:
        mnt = small_fs(n * 4096)
        code = run_cli("export", "--adapter_path", e["adapter"], "--output", mnt / "m.gguf", *args)
        err = capsys.readouterr().err
        assert code == 2, (n, err)
        assert "no space left on" in err and str(mnt) in err, err
        need = float(re.search(r"needs ([\d.]+) MB", err).group(1))
        assert abs(need - size / 2**20) <= 0.01, (need, size)
        assert "Traceback" not in err
        assert list(mnt.iterdir()) == [], n


def test_lora_export_is_read_back(exported, tmp_path):
    """The GGUF LoRA file is read back and its tensors equal the adapter's (A as stored, B as stored)."""
    import gguf
    from safetensors.numpy import load_file
    e = exported["phi3"]
    out = tmp_path / "a.gguf"
    assert run_cli("export", "--adapter_path", e["adapter"], "--format", "lora", "--output", out) == 0
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    stored = load_file(str(e["adapter"] / "adapter_model.safetensors"))
    assert len(tensors) == len(stored)
    qkv = [k for k in stored if "layers.0." in k and "qkv_proj.lora_B" in k][0]
    assert np.array_equal(tensors["blk.0.attn_qkv.weight.lora_b"], stored[qkv])


# ---------------------------------------------------------------- the Ollama Modelfile and the file's name

def test_ollama_export_refuses_to_replace_a_modelfile(exported, tmp_path, capsys):
    e = exported["phi"]
    first = tmp_path / "Modelfile"
    first.write_text("FROM ./first.gguf\n")
    out = tmp_path / "second.gguf"
    assert run_cli("export", "--adapter_path", e["adapter"], "--output", out, "--format", "ollama") == 2
    err = capsys.readouterr().err
    assert str(first) in err and "--force" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile"]
    assert first.read_text() == "FROM ./first.gguf\n"
    assert run_cli("export", "--adapter_path", e["adapter"], "--output", out, "--format", "ollama", "--force") == 0
    assert "FROM ./second.gguf" in first.read_text()


def _general_name(path):
    import gguf
    field = gguf.GGUFReader(str(path)).fields["general.name"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


@pytest.mark.parametrize("layout, want", [("my-e2e-run/final_adapter", "my-e2e-run"),
                                          ("my-e2e-run/best_adapter", "my-e2e-run"),
                                          ("adapters/ckpt-7", "ckpt-7"),
                                          ("phi3-vs-smol/final_adapter", "phi 3-vs-smol")])
def test_gguf_is_named_after_the_run(exported, llamacpp, tmp_path, layout, want):
    """general.name is the training run's name. A name llama.cpp would read as Phi-3's (which makes special
    tokens swallow the newline after them) is kept off a model whose tokenizer does not do that."""
    e = exported["llama"]
    adapter = tmp_path / layout
    shutil.copytree(e["adapter"], adapter)
    out = tmp_path / "m.gguf"
    assert run_cli("export", "--adapter_path", adapter, "--output", out, "--outtype", "f32") == 0
    assert _general_name(out) == want
    rendered = e["template"].render_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                            {"role": "user", "content": "c"}])
    assert llamacpp({"model": str(out), "tokenize": [rendered]})["tokens"][0] == e["tok"](
        rendered, add_special_tokens=False)["input_ids"]
