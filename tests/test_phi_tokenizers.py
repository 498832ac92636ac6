"""Phi-2 and Phi-3.5-mini with their real tokenizers (../shared/models): the ids phitune trains on, the prompts
chat / compare / eval / serve send, where generation stops, and Phi-2's whitespace tokens in code.

Models, where one is needed, are tiny random ones with the real vocabulary size (hidden 16, 2 layers); a
"speaking" model is one whose output layer is made to say given ids, so that what the engine does with
the real tokenizer's ids (stop, decode, stream) is what is checked.
"""
import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Phi3Config, PhiConfig

from phitune import chat
from phitune.data import records as data
from phitune.data.templates import IGNORE, Template
from phitune.generation import load as gen
from phitune.models import adapters
from phitune.models.loading import load_tokenizer
from phitune.serving.routes import build_app
from phitune.training.loss import AnswerLoss, summed_loss

PHI2, PHI35 = "phi-2", "phi-3.5-mini-instruct"
END, ENDOFTEXT_35, ENDOFTEXT_2 = 32007, 32000, 50256
SYSTEM = "You are terse."
CODE = "def f(x):\n    if x != 1:\n        return x , 'café ✓'\n\n\n    return  None   # done"

SINGLE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
WITH_SYSTEM = [{"role": "system", "content": SYSTEM}] + SINGLE
THREE_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Indent this:\nif x:\nreturn 1"},
    {"role": "assistant", "content": "if x:\n    return 1"},
    {"role": "user", "content": "Thanks, naïve café 日本"},
    {"role": "assistant", "content": "You're welcome. 🙂"},
]
CONVERSATIONS = {"single": SINGLE, "system message": WITH_SYSTEM, "three turns": THREE_TURNS}


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def toks(shared_models):
    """The real tokenizers, loaded as phitune loads them."""
    return {name: load_tokenizer(str(shared_models / name)) for name in (PHI2, PHI35)}


def chat_template_ids(tok, messages, generation_prompt=False):
    """The ids the model's own chat template gives (transformers' apply_chat_template, tokenize=True)."""
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def trained_spans(labels):
    """[(start, end)] of the runs of trained labels."""
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


def expected_labels(ids, prompts, end_id):
    """Labels that train exactly each answer and its end-of-turn token: answer k runs from the end of the
    prompt before it (prompts[k], ids) to the first end_id after that, included."""
    labels = [IGNORE] * len(ids)
    for prompt in prompts:
        assert ids[:len(prompt)] == prompt, "the prompt before an answer is not a prefix of the conversation"
        end = ids.index(end_id, len(prompt)) + 1
        labels[len(prompt):end] = ids[len(prompt):end]
    return labels


def tiny_dir(shared_models, name, out):
    """A tiny random model with the real tokenizer files and the real vocabulary (hidden 16, 2 layers)."""
    src = shared_models / name
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("config.json", "generation_config.json", "README.md"):
            shutil.copy(f, out / f.name)
    real = json.loads((src / "config.json").read_text())
    size = dict(vocab_size=len(load_tokenizer(str(src))), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=real["bos_token_id"], eos_token_id=real["eos_token_id"])
    config = PhiConfig(**size, partial_rotary_factor=0.5) if name == PHI2 else Phi3Config(**size, pad_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(shared_models, tmp_path_factory):
    base = tmp_path_factory.mktemp("phi-real-tok")
    return {name: tiny_dir(shared_models, name, base / name) for name in (PHI2, PHI35)}


def tuned_adapter(model_dir, out, system_prompt):
    """An adapter directory as `phitune train` writes it, with its template (and a system prompt) recorded."""
    tok = load_tokenizer(str(model_dir))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    meta = {"base": {"model": str(model_dir), "model_type": model.config.model_type},
            "template": Template(tok, "auto", system_prompt).to_meta()}
    adapters.save_adapter(model, tok, out, meta)
    return out


def listen(loaded):
    """Record the ids of each prompt the model is prefilled with (its first forward of each answer)."""
    seen = []

    def hook(module, inputs):
        ids = inputs[0]
        if ids.shape[-1] > 1:
            seen.append(ids.reshape(-1).tolist())
    embed = (loaded.model.get_base_model() if loaded.adapters else loaded.model).get_input_embeddings()
    embed.register_forward_pre_hook(hook)
    return seen


def speak(loaded, ids):
    """Make the model say `ids`, one per forward, then its last one again and again; returns the hook's handle."""
    script = list(ids)

    def hook(module, inputs, output):
        token = script.pop(0) if len(script) > 1 else script[0]
        said = torch.full_like(output, -30.0)
        said[..., token] = 30.0
        return said
    base = loaded.model.get_base_model() if loaded.adapters else loaded.model
    return base.get_output_embeddings().register_forward_hook(hook)


# ---------------------------------------------------------------- training ids

@pytest.mark.parametrize("system_prompt", [None, SYSTEM], ids=["", "--system_prompt"])
@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_phi35_trains_on_its_chat_template_ids_and_only_on_answers(toks, case, system_prompt):
    """Phi-3.5: the training ids are apply_chat_template(tokenize=True)'s, up to the <|endoftext|> the template
    writes after the last turn; every answer (earlier ones too) and its <|end|> are trained, nothing else."""
    tok = toks[PHI35]
    messages = CONVERSATIONS[case]
    template = Template(tok, "auto", system_prompt)
    ids, labels = template.encode({"messages": messages})

    rendered = messages if not system_prompt or messages[0]["role"] == "system" else \
        [{"role": "system", "content": system_prompt}] + messages
    reference = chat_template_ids(tok, rendered)
    # The template closes a conversation with <|endoftext|>; generation stops at <|end|> before it, so it is
    # left out of training (see test_phi35_end_of_conversation_token_would_change_no_loss).
    assert reference[-1] == ENDOFTEXT_35 and ids == reference[:-1]

    prompts = [chat_template_ids(tok, rendered[:i], generation_prompt=True)
               for i, m in enumerate(rendered) if m["role"] == "assistant"]
    assert labels == expected_labels(ids, prompts, END)
    answers = [m["content"] for m in rendered if m["role"] == "assistant"]
    assert [tok.decode(ids[a:b]) for a, b in trained_spans(labels)] == [f"{a}<|end|>" for a in answers]


def test_phi35_end_of_conversation_token_would_change_no_loss(tiny, toks):
    """The <|endoftext|> after the last <|end|> is never a label and nothing follows it, so the loss with it is
    the loss without it: leaving it out changes nothing that is learned."""
    tok = toks[PHI35]
    ids, labels = Template(tok).encode({"messages": THREE_TURNS})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny[PHI35]),
                           LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    loss = AnswerLoss(model).eval()
    with torch.no_grad():
        without = summed_loss(loss, [{"input_ids": ids, "labels": labels}], 1, tok.pad_token_id, torch.device("cpu"))
        with_it = summed_loss(loss, [{"input_ids": ids + [ENDOFTEXT_35], "labels": labels + [IGNORE]}], 1,
                              tok.pad_token_id, torch.device("cpu"))
    assert int(without[1]) == int(with_it[1]) == sum(label != IGNORE for label in labels[1:])
    assert torch.allclose(without[0], with_it[0], rtol=1e-6, atol=0)


PHI2_TEXTS = {  # Phi-2's documented format, written out; <|endoftext|> is its EOS
    "single": "Instruct: What is 2+2?\nOutput: It is 4.<|endoftext|>",
    "system message": "You are terse.\nInstruct: What is 2+2?\nOutput: It is 4.<|endoftext|>",
    "three turns": "Instruct: Hi\nOutput: Hello! How can I help?<|endoftext|>\n"
                   "Instruct: Indent this:\nif x:\nreturn 1\nOutput: if x:\n    return 1<|endoftext|>\n"
                   "Instruct: Thanks, naïve café 日本\nOutput: You're welcome. 🙂<|endoftext|>",
}


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_phi2_trains_on_instruct_output_text_and_only_on_answers(toks, case):
    """Phi-2 (no chat template): the training ids are its `Instruct: ...\\nOutput: ...<|endoftext|>` text tokenised
    whole; every answer (with the space after `Output:`) and its <|endoftext|> are trained, nothing else."""
    tok = toks[PHI2]
    template = Template(tok)
    assert template.kind == "phi2"
    ids, labels = template.encode({"messages": CONVERSATIONS[case]})
    text = PHI2_TEXTS[case]
    assert ids == tok(text)["input_ids"]
    prompts = [tok(text[:i + len("Output:")])["input_ids"] for i in _find_all(text, "Output:")]
    assert labels == expected_labels(ids, prompts, ENDOFTEXT_2)
    answers = [m["content"] for m in CONVERSATIONS[case] if m["role"] == "assistant"]
    assert [tok.decode(ids[a:b]) for a, b in trained_spans(labels)] == [f" {a}<|endoftext|>" for a in answers]


def _find_all(text, part):
    out, i = [], text.find(part)
    while i >= 0:
        out.append(i)
        i = text.find(part, i + 1)
    return out


# ---------------------------------------------------------------- prompts sent = training prefix

@pytest.mark.parametrize("name", [PHI2, PHI35])
def test_every_prompt_is_the_training_prefix(toks, name):
    """encode_prompt(history before answer k) is, token for token, the ids training put before answer k (and
    for Phi-3.5, its chat template's generation prompt)."""
    tok = toks[name]
    for system_prompt in (None, SYSTEM):
        template = Template(tok, "auto", system_prompt)
        for messages in CONVERSATIONS.values():
            ids, labels = template.encode({"messages": messages})
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            for k, (start, _) in zip(turns, trained_spans(labels)):
                prompt = template.encode_prompt(messages[:k])
                assert prompt == ids[:start]
                if name == PHI35:
                    rendered = template._with_system(messages[:k])
                    assert prompt == chat_template_ids(tok, rendered, generation_prompt=True)


def _last_prompt(template):
    """The ids training puts before THREE_TURNS' last answer."""
    ids, labels = template.encode({"messages": THREE_TURNS})
    return ids[:trained_spans(labels)[-1][0]]


@pytest.mark.parametrize("name", [PHI2, PHI35])
def test_chat_compare_eval_and_serve_prefill_the_training_prefix(tiny, toks, tmp_path, name):
    """The ids each command's model is prefilled with, for the history before the last answer of a three-turn
    conversation, are the ids training put there, with the adapter's recorded system prompt."""
    adapter = tuned_adapter(tiny[name], tmp_path / "tuned", SYSTEM)
    trained = _last_prompt(Template(toks[name], "auto", SYSTEM))
    history = THREE_TURNS[:-1]
    sampling = gen.Sampling(max_new_tokens=2)

    loaded = gen.load([f"tuned={adapter}"], precision="fp32")
    seen = listen(loaded)
    gen.generate_jobs(loaded, [(history, "tuned", sampling)])  # compare, and eval's answers
    assert seen == [trained]
    examples, _ = data.encode_records([{"messages": THREE_TURNS}], loaded.template_for("tuned"), 4096)  # eval's loss
    assert examples[0]["input_ids"] == Template(toks[name], "auto", SYSTEM).encode({"messages": THREE_TURNS})[0]

    seen.clear()
    with TestClient(build_app(loaded)) as client:  # serve
        reply = client.post("/v1/chat/completions", json={"model": "tuned", "messages": history, "max_tokens": 2})
        assert reply.status_code == 200
    assert seen == [trained]

    merged = gen.load([str(adapter)], precision="fp32", merge=True)  # chat
    seen = listen(merged)
    chat.answer(merged, history, sampling, merged.first_adapter, echo=False)
    assert seen == [trained]


# ---------------------------------------------------------------- stopping

STOPS = {PHI35: [END, ENDOFTEXT_35], PHI2: [ENDOFTEXT_2]}


@pytest.mark.parametrize("name", [PHI2, PHI35])
def test_stop_ids_are_the_end_of_turn_and_eos_tokens(tiny, toks, name):
    """Phi-3.5 stops at <|end|> (32007) and <|endoftext|> (32000); Phi-2 at <|endoftext|> (50256), which is also
    its unknown-token id."""
    assert Template(toks[name]).stop_token_ids() == STOPS[name]
    loaded = gen.load(model=str(tiny[name]), precision="fp32")
    assert loaded.request([1]).stop_ids == STOPS[name]


@pytest.mark.parametrize("name,stop", [(PHI2, ENDOFTEXT_2), (PHI35, END), (PHI35, ENDOFTEXT_35)])
def test_generation_ends_at_the_stop_token(tiny, toks, name, stop):
    """A model that says "Sure, 42." then a stop token then more: the answer is "Sure, 42.", ended by a stop."""
    tok = toks[name]
    loaded = gen.load(model=str(tiny[name]), precision="fp32")
    said = tok("Sure, 42.", add_special_tokens=False)["input_ids"]
    speak(loaded, said + [stop] + tok(" More text", add_special_tokens=False)["input_ids"])
    answer = gen.generate(loaded, [SINGLE[:1]], gen.Sampling(max_new_tokens=40))[0]
    assert (answer.text, answer.finish_reason, answer.tokens) == ("Sure, 42.", "stop", len(said) + 1)


# ---------------------------------------------------------------- whitespace in code

def test_phi2_code_keeps_its_whitespace_tokens_in_training(toks):
    """Runs of spaces in a Phi-2 answer are its added whitespace tokens (50257-50294), and the trained ids decode
    back to the answer exactly."""
    tok = toks[PHI2]
    ids, labels = Template(tok).encode({"messages": [{"role": "user", "content": "Write f"},
                                                     {"role": "assistant", "content": CODE}]})
    (start, end), = trained_spans(labels)
    answer = ids[start:end - 1]
    runs = {n: tok.convert_tokens_to_ids(" " * n) for n in (3, 4, 8)}  # "None   #", "    if", "        return"
    assert all(50257 <= i <= 50294 for i in runs.values()) and set(runs.values()) <= set(answer)
    assert tok.decode(answer) == " " + CODE and ids[end - 1] == ENDOFTEXT_2


@pytest.mark.parametrize("name", [PHI2, PHI35])
def test_streamed_code_is_the_trained_text(tiny, toks, name):
    """A model that says the trained ids of a code answer streams exactly the trained text (engine.TextStream),
    piece by piece (for Phi-2 with the space its format puts after `Output:`), and chat/compare get the code."""
    tok = toks[name]
    messages = [{"role": "user", "content": "Write f"}, {"role": "assistant", "content": CODE}]
    ids, labels = Template(tok).encode({"messages": messages})
    (start, end), = trained_spans(labels)
    answer = ids[start:end]  # the code and its end-of-turn token
    if name == PHI2:
        assert any(50257 <= i <= 50294 for i in answer)
    loaded = gen.load(model=str(tiny[name]), precision="fp32")
    hook = speak(loaded, answer + answer)
    pieces = list(gen.stream(loaded, messages[:1], gen.Sampling(max_new_tokens=200)))
    assert len(pieces) > 5 and "".join(pieces) == (" " if name == PHI2 else "") + CODE
    hook.remove()
    speak(loaded, answer + answer)
    assert gen.generate(loaded, [messages[:1]], gen.Sampling(max_new_tokens=200))[0].text == CODE
