"""AnswerLoss equals the plain model's cross-entropy on answer tokens, value and gradients."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from phitune.config import LoraArgs
from phitune.data.records import IGNORE
from phitune.models import adapters
from phitune.training import loss
from tiny import build_config


def _reference(peft_model, ids, labels, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


@pytest.mark.parametrize("arch", ["phi", "llama"])  # phi's head has a bias, llama's is tied to the embedding
@pytest.mark.parametrize("autocast", [False, True])
def test_answer_loss_matches_cross_entropy(arch, autocast, monkeypatch):
    monkeypatch.setattr(loss, "CHUNK", 7)  # several chunks, the last one short
    monkeypatch.setattr(loss, "CPU_CHUNK", 7)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(arch, 300))
    peft_model, _ = adapters.attach_lora(model, LoraArgs(lora_r=4, lora_dropout=0.0), seed=0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    ids = torch.randint(0, 300, (3, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE  # a prompt
    labels[2, 9:] = IGNORE
    answer_loss = loss.AnswerLoss(peft_model)
    assert type(answer_loss.head) is torch.nn.Linear  # the fused path is the one under test

    ref = _reference(peft_model, ids, labels, autocast)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        total, count = answer_loss(ids, torch.ones_like(ids), labels)
    (total * 0.5).backward()  # the scale must reach the gradients
    assert count.item() == int((labels[:, 1:] != IGNORE).sum())
    assert total.item() == pytest.approx(ref.item(), rel=1e-2 if autocast else 1e-5)
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            g, want = p.grad.flatten() * 2, ref_grads[n].flatten()
            assert (g - want).norm() <= (3e-2 if autocast else 1e-4) * want.norm(), n
    with torch.no_grad():
        again, _ = answer_loss(ids, torch.ones_like(ids), labels)
    assert again.item() == pytest.approx(total.item(), rel=1e-2)


def _family_configs():
    """Every model family phitune lists, as a tiny config (with Granite's and Cohere-style logit scaling)."""
    import transformers

    from phitune.models.adapters import FAMILIES, LLAMA_LIKE
    names = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
             "gemma": "GemmaConfig", "gemma2": "Gemma2Config", "olmo": "OlmoConfig", "olmo2": "Olmo2Config",
             "granite": "GraniteConfig", "smollm3": "SmolLM3Config", "phi": "PhiConfig", "phi3": "Phi3Config"}
    assert set(names) == set(FAMILIES) | LLAMA_LIKE  # a new family in the list needs a case here
    common = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=8, max_position_embeddings=128, pad_token_id=0)
    extra = {"granite": dict(logits_scaling=8.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                             attention_multiplier=0.3)}
    return [(t, getattr(transformers, names[t])(**common, **extra.get(t, {}))) for t in sorted(names)]


@pytest.mark.parametrize("model_type,config", _family_configs(), ids=lambda x: x if isinstance(x, str) else "")
def test_answer_loss_equals_the_models_own_loss_for_every_family(model_type, config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    peft_model, _ = adapters.attach_lora(model, LoraArgs(lora_r=4, lora_dropout=0.0), seed=0)
    ids = torch.randint(0, 300, (2, 10))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    with torch.no_grad():
        want = _reference(peft_model, ids, labels, autocast=False)
        got, _ = loss.AnswerLoss(peft_model)(ids, torch.ones_like(ids), labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
