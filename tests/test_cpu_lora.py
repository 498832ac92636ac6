"""The fused CPU LoRA layer computes what PEFT computes under bf16 autocast, forward and backward."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from phitune import adapters
from phitune.config import LoraArgs
from phitune.cpu_lora import FastDropout, _LoraLinear, drop_mask, use_fused_lora
from tiny import build_config


def _pair(arch, dropout):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(arch, 300))
    peft_model, targets = adapters.attach_lora(model, LoraArgs(lora_r=8, lora_dropout=dropout), seed=0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give the adapter something to contribute
            p.data.normal_(0, 0.2)
    fused = copy.deepcopy(peft_model)
    return peft_model, fused, targets


def _loss_and_grads(model, ids, seed):
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["phi", "phi3", "llama"])
def test_fused_matches_peft_without_dropout(arch):
    peft_model, fused, targets = _pair(arch, 0.0)
    assert use_fused_lora(fused) == len(targets)  # every target layer fused
    ids = torch.randint(0, 300, (3, 24))
    ref_loss, ref_grads = _loss_and_grads(peft_model, ids, 1)
    loss, grads = _loss_and_grads(fused, ids, 1)
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    assert ref_grads.keys() == grads.keys() and len(grads) == 2 * len(targets)
    for name, g in grads.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[name].flatten(), dim=0)
        assert cos > 0.98, name
    frozen = [m.base_layer.weight.dtype for m in fused.modules() if hasattr(m, "_phitune_fused")]
    assert frozen and all(d == torch.bfloat16 for d in frozen)


def test_fused_dropout_draws_the_same_masks_as_fast_dropout():
    """Same RNG stream, same masks: the fused layer equals PEFT with phitune's dropout module."""
    peft_model, fused, _ = _pair("llama", 0.3)
    use_fused_lora(peft_model, fuse=False)
    assert isinstance(peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"],
                      FastDropout)
    use_fused_lora(fused)
    peft_model.train(), fused.train()
    ids = torch.randint(0, 300, (2, 16))
    ref_loss, ref_grads = _loss_and_grads(peft_model, ids, 7)
    loss, grads = _loss_and_grads(fused, ids, 7)
    other_loss, _ = _loss_and_grads(fused, ids, 8)
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    assert abs(other_loss - loss) > 1e-4  # and the masks really depend on the draw
    for name, g in grads.items():
        assert torch.nn.functional.cosine_similarity(g.flatten(), ref_grads[name].flatten(), dim=0) > 0.98, name


def test_layer_gradients_match_autograd():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 32, requires_grad=True)
    w, bias = torch.randn(48, 32).bfloat16(), torch.randn(48).bfloat16()
    a, b = torch.randn(4, 32, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    torch.manual_seed(3)
    y = _LoraLinear.apply(x, w, bias, a, b, 2.0, 0.25)
    y.float().square().sum().backward()
    torch.manual_seed(3)
    drop = drop_mask((35, 32), 0.25)
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    xd = x2.reshape(35, 32).masked_fill(drop, 0)
    y2 = x2.reshape(35, 32) @ w.float().t() + bias.float() + (xd @ a2.t() @ b2.t()) * (2.0 / 0.75)
    y2.square().sum().backward()
    assert torch.allclose(y.float().reshape(35, 48), y2, rtol=0.05, atol=0.5)
    for got, want in ((x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_drop_masks_are_bernoulli(p):
    """Both draws (sparse below p ~0.39, bitwise above): the rate, and no structure across rows or columns."""
    torch.manual_seed(0)
    drop = drop_mask((1000, 1000), p).double()
    assert drop.mean().item() == pytest.approx(p, abs=2e-3)
    assert drop.mean(0).std().item() == pytest.approx((p * (1 - p) / 1000) ** 0.5, rel=0.1)
    assert drop.mean(1).std().item() == pytest.approx((p * (1 - p) / 1000) ** 0.5, rel=0.1)
    flat = drop.flatten() - p
    assert abs((flat[1:] * flat[:-1]).mean().item()) < 5 * p * (1 - p) / 1000  # neighbours independent
    assert not drop_mask((10, 10), 0.0).any()
