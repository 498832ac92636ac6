"""`phitune export` with the real Phi-2 and Phi-3.5-mini tokenizers (tiny random weights): llama.cpp splits text
as transformers does, and the GGUF's chat template and the Ollama Modelfile render a conversation to the text
and ids phitune trained on."""
import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import MEMORISE, ROOT, run_cli, write_jsonl
from ollama_render import modelfile_parts, render_chat

NAMES = ("phi-2", "phi-3.5-mini-instruct")
SYSTEM = "You are a careful assistant."
CORPUS = [
    "Hello world", "café naïve ÉLAN über straße Ångström façade", "  leading and trailing  ",
    "def f(x):\n    return x**2\n\n\tif x:\n        pass\n",
    "class A:\n    def g(self):\n            return  '  two  '",
    "x = [1,\n     2]\n" + " " * 31 + "deep\n" + " " * 40 + "deeper", "emoji 🤖🎉👨‍👩‍👧 and 中文字符 日本語 한국어",
    "1234567 + 89 = 1234656, 3.14159e-10", "\n\nnewlines\n\n\n", "Instruct: hi\nOutput: there<|endoftext|>",
    "<|endoftext|> text <|end|>\n<|user|>\nhi<|assistant|>\n x<|system|> y", "<s> <unk> plain",
]
# llama.cpp forces a token spelled "</s>" to be a control token (it ends generation there), so with special
# tokens not parsed it splits "</s>" into characters where transformers keeps Phi-3.5's non-special "</s>".
PARSED_ONLY = ["</s> after", "a</s>\nb"]


def shared_models():
    """The real tokenizer/config folders: $PHITUNE_SHARED_MODELS, <repo>/../shared/models or /work/shared/models."""
    env = os.environ.get("PHITUNE_SHARED_MODELS")
    for path in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "models", Path("/work/shared/models")]:
        if (path / "phi-2" / "tokenizer.json").is_file():
            return path
    pytest.fail("the real Phi tokenizers are missing: set PHITUNE_SHARED_MODELS to the folder holding phi-2/ "
                "and phi-3.5-mini-instruct/")


def build_tiny(name, path, seed=0):
    """A tiny random model of the real model's family, with the real tokenizer and a matching vocab_size."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Phi3Config, PhiConfig
    src = shared_models() / name
    tok = AutoTokenizer.from_pretrained(src)
    real = AutoConfig.from_pretrained(src)
    common = dict(vocab_size=real.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, initializer_range=0.25,
                  tie_word_embeddings=False)
    cfg = (PhiConfig(**common, partial_rotary_factor=0.5) if real.model_type == "phi"
           else Phi3Config(**common, pad_token_id=tok.pad_token_id))
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


_BUILT = {}


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """real(name) -> dict(base, adapter, tok, template, gguf, modelfile): a tiny model with the real tokenizer,
    an adapter trained two steps, and its `phitune export --format ollama --outtype f32` output."""
    from phitune.data.templates import Template
    from phitune.models.loading import load_tokenizer

    def get(name):
        if name not in _BUILT:
            root = tmp_path_factory.mktemp(name)
            base = build_tiny(name, root / "base")
            data = write_jsonl(root / "data.jsonl", MEMORISE)
            run = root / f"{name}-run"
            assert run_cli("train", "--model", base, "--dataset_path", data, "--output_dir", run, "--max_steps", 2,
                           "--batch_size", 4, "--max_length", 64, "--lora_r", 4, "--lora_dropout", 0.0,
                           "--learning_rate", 5e-2, "--warmup_ratio", 0.0, "--val_split", 0,
                           "--precision", "fp32") == 0
            out = root / "export"
            out.mkdir()
            gguf = out / "tuned.gguf"
            assert run_cli("export", "--adapter_path", run / "final_adapter", "--output", gguf, "--format", "ollama",
                           "--outtype", "f32") == 0
            tok = load_tokenizer(str(base))
            _BUILT[name] = dict(base=base, adapter=run / "final_adapter", tok=tok, template=Template(tok),
                                gguf=gguf, modelfile=out / "Modelfile")
        return _BUILT[name]
    return get


# Ollama's own expectations for templates of this form (ollama/ollama template/template_test.go,
# TestExecuteWithMessages): the renderer the tests use must reproduce them.
_MISTRAL = "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] "
_CHATML = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n"
           "{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n")
_CHAT = [{"role": "user", "content": "Hello friend!"}, {"role": "assistant", "content": "Hello human!"},
         {"role": "user", "content": "What is your name?"}]
_SYS = [{"role": "system", "content": "You are a helpful assistant!"}]
OLLAMA_CASES = [
    (_MISTRAL, _CHAT, "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] "),
    (_MISTRAL + "{{ .Response }}", _CHAT, "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] "),
    (_MISTRAL, _SYS + _CHAT,
     "[INST] You are a helpful assistant!\n\nHello friend![/INST] Hello human![INST] What is your name?[/INST] "),
    ("[INST] {{ .Prompt }}[/INST] {{ .Response }}",
     _CHAT + [{"role": "assistant", "content": "My name is Ollama and I"}],
     "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] My name is Ollama and I"),
    (_CHATML, _SYS + _CHAT, "<|im_start|>system\nYou are a helpful assistant!<|im_end|>\n<|im_start|>user\nHello "
     "friend!<|im_end|>\n<|im_start|>assistant\nHello human!<|im_end|>\n<|im_start|>user\nWhat is your name?"
     "<|im_end|>\n<|im_start|>assistant\n"),
]


@pytest.mark.parametrize("template, messages, want", OLLAMA_CASES)
def test_ollama_renderer_matches_ollamas_own_cases(template, messages, want):
    assert render_chat(template, messages) == want


def _hf_ids(tok, text, parse_special=True):
    return tok(text, add_special_tokens=False, split_special_tokens=not parse_special)["input_ids"]


@pytest.mark.parametrize("name", NAMES)
def test_llamacpp_splits_text_like_transformers(real, llamacpp, name):
    """Accents, code indentation (Phi-2's whitespace tokens), emoji, CJK, digits and special-token text: the
    GGUF's tokenizer gives transformers' ids, with special tokens parsed (prompts) and kept as text."""
    e = real(name)
    tok = e["tok"]
    parsed = CORPUS + PARSED_ONLY
    res = llamacpp({"model": str(e["gguf"]), "tokenize": parsed, "tokenize_plain": CORPUS})
    for text, got in zip(parsed, res["tokens"]):
        assert got == _hf_ids(tok, text), (text, got, _hf_ids(tok, text))
    for text, got in zip(CORPUS, res["tokens_plain"]):
        assert got == _hf_ids(tok, text, parse_special=False), (text, got, _hf_ids(tok, text, False))
    if name == "phi-2":  # the corpus does exercise the added whitespace tokens 50257-50294
        used = {i for text in CORPUS for i in _hf_ids(tok, text)}
        assert len(used & set(range(50257, 50295))) >= 4


def _conversation(system):
    turns = [("Write a function that adds two numbers.", "def add(a, b):\n    return a + b"),
             ("Now one line, with café and 中文?", "add = lambda a, b: a + b  # 🤖"),
             ("Thanks! 12345", "You are welcome.")]
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages


def _prompts(template, messages):
    """For each answer of `messages`: (history before it, the training ids up to its first trained token)."""
    ids, labels = template.encode({"messages": messages})
    starts = [i for i, lab in enumerate(labels) if lab != -100 and (i == 0 or labels[i - 1] == -100)]
    histories = [messages[:i] for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(starts) == len(histories) == 3
    return [(h, ids[:s]) for h, s in zip(histories, starts)], ids


def _stored_chat_template(path):
    import gguf
    field = gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


@pytest.mark.parametrize("system", [None, SYSTEM])
@pytest.mark.parametrize("name", NAMES)
def test_gguf_and_modelfile_templates_render_training_text(real, llamacpp, name, system):
    """A three-turn conversation: before each answer, the GGUF's Jinja chat template (rendered by transformers)
    and the Modelfile's Go template (rendered as Ollama does) give exactly the text phitune trained on, and
    llama.cpp splits that text into the training ids."""
    e = real(name)
    template = e["template"]
    tok = copy.copy(e["tok"])
    tok.chat_template = _stored_chat_template(e["gguf"])
    go, _, _ = modelfile_parts(e["modelfile"].read_text(encoding="utf-8"))
    cases, full_ids = _prompts(template, _conversation(system))
    texts, want_ids = [], []
    for history, ids in cases:
        want = template.render_prompt(history)
        assert template.encode_prompt(history) == ids  # the training prefix is what chat and serve send
        jinja = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        assert jinja == want, (jinja, want)
        ollama = render_chat(go, history)
        assert ollama == want, (ollama, want)
        texts.append(want)
        want_ids.append(ids)
    # The whole conversation as the GGUF template writes it (after the last answer) tokenises to the trained ids.
    whole = tok.apply_chat_template(_conversation(system), tokenize=False)
    whole_ids = template._tokenize(whole)
    assert whole_ids[:len(full_ids)] == full_ids
    assert whole_ids[len(full_ids):] in ([], [tok.eos_token_id])
    res = llamacpp({"model": str(e["gguf"]), "tokenize": texts})
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and template._tokenize("a")[:1] == [tok.bos_token_id] \
        else []
    assert [bos + t for t in res["tokens"]] == want_ids


@pytest.mark.parametrize("name", NAMES)
def test_modelfile_system_prompt_renders_training_text(real, name):
    """An adapter trained with a system prompt: Ollama puts the Modelfile's SYSTEM where training put it, in
    every turn of a three-turn conversation."""
    from phitune.data.templates import Template
    from phitune.exporting.ollama import modelfile
    tok = real(name)["tok"]
    template = Template(tok, system_prompt=SYSTEM)
    go, system, _ = modelfile_parts(modelfile("m.gguf", template, "run/final_adapter"))
    assert system == SYSTEM
    cases, _ = _prompts(template, _conversation(None))
    for history, ids in cases:
        assert render_chat(go, history, system=system) == template.render_prompt(history)
        assert template.encode_prompt(history) == ids


# Largest |log p(LoRA applied) - log p(merged)| over the top-50 tokens at every position (measured: 6.9e-4 on
# 144 positions; both differ from transformers' own f32 log-probabilities by up to 9e-3, llama.cpp's arithmetic).
LORA_LOGPROB_TOL = 2e-3


def _logprobs(probs):
    return [{tok: math.log(p) for tok, p in top} for top in probs]


def test_phi35_lora_gguf_applied_by_llamacpp_equals_merged_export(real, llamacpp, tmp_path):
    """Phi-3.5's fused qkv_proj / gate_up_proj: the adapter written with --format lora, applied by llama.cpp to
    an f32 GGUF of the base, gives the merged f32 export's next-token log-probabilities."""
    from transformers import AutoModelForCausalLM

    from phitune.exporting.gguf_file import write_gguf
    e = real("phi-3.5-mini-instruct")
    targets = json.loads((e["adapter"] / "adapter_config.json").read_text())["target_modules"]
    assert {t.rsplit(".", 1)[-1] for t in targets} >= {"qkv_proj", "gate_up_proj"}
    base = AutoModelForCausalLM.from_pretrained(e["base"], dtype=torch.float32).eval()
    write_gguf(tmp_path / "base.gguf", base, e["tok"], e["template"], "f32")
    lora = tmp_path / "adapter.gguf"
    assert run_cli("export", "--adapter_path", e["adapter"], "--format", "lora", "--output", lora) == 0
    prompts = [e["template"].encode_prompt(h) for h, _ in _prompts(e["template"], _conversation(SYSTEM))[0]]
    applied = llamacpp({"model": str(tmp_path / "base.gguf"), "lora": str(lora), "probs": prompts, "top": 50})
    merged = llamacpp({"model": str(e["gguf"]), "probs": prompts, "top": 50})
    plain = llamacpp({"model": str(tmp_path / "base.gguf"), "probs": prompts, "top": 50})
    worst, moved = 0.0, 0.0
    for a_seq, m_seq, b_seq in zip(applied["probs"], merged["probs"], plain["probs"]):
        for a, m, b in zip(_logprobs(a_seq), _logprobs(m_seq), _logprobs(b_seq)):
            assert max(a, key=a.get) == max(m, key=m.get)
            common = set(a) & set(m)
            assert len(common) >= 40
            worst = max(worst, max(abs(a[t] - m[t]) for t in common))
            moved = max(moved, max((abs(b[t] - m[t]) for t in set(b) & set(m)), default=math.inf))
    assert worst < LORA_LOGPROB_TOL, worst
    assert moved > 100 * LORA_LOGPROB_TOL, moved  # the adapter changes the answers far more than the tolerance

