"""AnswerLoss equals the plain model's cross-entropy on answer tokens, value and gradients."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from phitune import adapters, loss
from phitune.config import LoraArgs
from phitune.data import IGNORE
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
