"""Tiny random Phi / Phi-3 / Llama models with a small byte-level BPE tokenizer, built from configs."""
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config, PhiConfig, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
    "Instruct: Say hello\nOutput: Hello there!", "name[The Eagle], eatType[coffee shop], food[French]",
    "The Eagle is a coffee shop serving French food near the river.", "one two three four five six seven",
    "Translate to French: good morning. Bonjour.", "0123456789 + - * / = ( ) [ ] { } , . ; : ! ?",
]

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PHI3 = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + '<|end|>\n' }}"
        "{% elif m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '<|end|>\n' }}"
        "{% else %}{{ '<|assistant|>\n' + m['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

ARCHS = {
    "phi": dict(specials=["<|endoftext|>"], eos="<|endoftext|>", pad=None, bos=None, template=None),
    "phi3": dict(specials=["<s>", "<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"],
                 eos="<|endoftext|>", pad=None, bos="<s>", template=PHI3),
    "llama": dict(specials=["<|im_start|>", "<|im_end|>"], eos="<|im_end|>", pad="<|im_end|>", bos="<|im_start|>",
                  template=CHATML),
}


def build_tokenizer(arch, extra_corpus=()):
    spec = ARCHS[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=spec["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS + list(extra_corpus), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=spec["eos"], bos_token=spec["bos"],
                                   pad_token=spec["pad"])
    if spec["template"]:
        fast.chat_template = spec["template"]
    return fast


def build_config(arch, vocab_size, layers=2, eos=None, bos=None):
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                  eos_token_id=eos, bos_token_id=bos,
                  # a wider init than real models so that a 2-layer, 32-wide model can fit a few answers exactly
                  initializer_range=0.25)
    if arch == "phi":
        return PhiConfig(**common, partial_rotary_factor=0.5, tie_word_embeddings=False)
    if arch == "phi3":
        return Phi3Config(**common, pad_token_id=None, tie_word_embeddings=False)
    return LlamaConfig(**common, tie_word_embeddings=True)


def build_model_dir(arch, path, layers=2, seed=0):
    """Save a tiny random model and its tokenizer into `path`, as a local model directory."""
    path = Path(path)
    tok = build_tokenizer(arch)
    torch.manual_seed(seed)
    config = build_config(arch, len(tok), layers, eos=tok.eos_token_id, bos=tok.bos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
