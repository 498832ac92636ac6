"""The fused CPU LoRA layer computes what PEFT computes, forward and backward: under bf16 autocast (CPUs
with AVX512-BF16/AMX) and in fp32 (CPUs with AVX2 only)."""
import copy
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import MEMORISE, run_cli, write_jsonl
from phitune.config import LoraArgs
from phitune.hardware.cpu_lora import FastDropout, _LoraLinear, drop_mask, use_fused_lora
from phitune.models import adapters
from tiny import build_config

FP32 = torch.float32


def _pair(arch, dropout):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(arch, 300))
    peft_model, targets = adapters.attach_lora(model, LoraArgs(lora_r=8, lora_dropout=dropout), seed=0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give the adapter something to contribute
            p.data.normal_(0, 0.2)
    fused = copy.deepcopy(peft_model)
    return peft_model, fused, targets


def _loss_and_grads(model, ids, seed, autocast=True):
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _float_close(got, want, tol=1e-4):
    """Equal up to float rounding: the largest difference is a tiny fraction of the largest value."""
    return bool((got - want).abs().max() <= tol * want.abs().max())


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
    use_fused_lora(peft_model, None)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP32])
def test_layer_gradients_match_autograd(dtype):
    torch.manual_seed(0)
    x = torch.randn(5, 7, 32, requires_grad=True)
    w, bias = torch.randn(48, 32).to(dtype), torch.randn(48).to(dtype)
    a, b = torch.randn(4, 32, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    torch.manual_seed(3)
    y = _LoraLinear.apply(x, w, bias, a, b, 2.0, 0.25)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    torch.manual_seed(3)
    drop = drop_mask((35, 32), 0.25)
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    xd = x2.reshape(35, 32).masked_fill(drop, 0)
    y2 = x2.reshape(35, 32) @ w.float().t() + bias.float() + (xd @ a2.t() @ b2.t()) * (2.0 / 0.75)
    y2.square().sum().backward()
    close = dict(rtol=0.05, atol=0.5) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    assert torch.allclose(y.float().reshape(35, 48), y2, **close)
    for got, want in ((x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
        if dtype == FP32:  # the same sums in another order: equal to float rounding
            assert _float_close(got, want)


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


# ---------------------------------------------------------------- fp32 compute (CPUs without native bf16)

@pytest.mark.parametrize("arch", ["phi", "phi3", "llama"])
def test_fp32_fused_matches_peft(arch):
    """No autocast: every target layer fused, base weights stay fp32, loss and gradients equal PEFT's to
    float rounding."""
    peft_model, fused, targets = _pair(arch, 0.0)
    assert use_fused_lora(fused, FP32) == len(targets)
    ids = torch.randint(0, 300, (3, 24))
    ref_loss, ref_grads = _loss_and_grads(peft_model, ids, 1, autocast=False)
    loss, grads = _loss_and_grads(fused, ids, 1, autocast=False)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert ref_grads.keys() == grads.keys() and len(grads) == 2 * len(targets)
    for name, g in grads.items():
        assert _float_close(g, ref_grads[name]), name
    frozen = [m.base_layer.weight.dtype for m in fused.modules() if hasattr(m, "_phitune_fused")]
    assert len(frozen) == len(targets) and all(d == FP32 for d in frozen)


def test_fp32_fused_dropout_matches_peft_with_fast_dropout():
    """Same RNG stream, same masks: in fp32 the fused layer equals PEFT with phitune's dropout to float
    rounding, and another seed gives other masks."""
    peft_model, fused, _ = _pair("phi3", 0.3)
    use_fused_lora(peft_model, None)
    use_fused_lora(fused, FP32)
    peft_model.train(), fused.train()
    ids = torch.randint(0, 300, (2, 16))
    ref_loss, ref_grads = _loss_and_grads(peft_model, ids, 7, autocast=False)
    loss, grads = _loss_and_grads(fused, ids, 7, autocast=False)
    other_loss, _ = _loss_and_grads(fused, ids, 8, autocast=False)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert abs(other_loss - loss) > 1e-4
    for name, g in grads.items():
        assert _float_close(g, ref_grads[name]), name


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_fp32_layer_dropout_rate_and_scale(p):
    """Through the fused fp32 layer (identity A and B, zero base): a fraction p of the inputs is dropped and
    the rest is scaled by exactly 1/(1-p), as nn.Dropout does; the input gradient drops the same ones."""
    torch.manual_seed(0)
    n, d = 2000, 64
    x = torch.ones(n, d, requires_grad=True)
    eye = torch.eye(d)
    y = _LoraLinear.apply(x, torch.zeros(d, d), None, eye, eye, 1.0, p)
    dropped = y == 0
    assert dropped.double().mean().item() == pytest.approx(p, abs=4 * (p * (1 - p) / (n * d)) ** 0.5)
    assert torch.allclose(y[~dropped], torch.tensor(1 / (1 - p)))
    y.sum().backward()  # d/dx of the kept elements is 1/(1-p); of the dropped ones 0
    assert torch.equal(x.grad == 0, dropped)


def test_fp32_fused_layer_under_autocast_takes_peft_path():
    """A model fused for fp32 that is run under bf16 autocast anyway computes what PEFT does there."""
    peft_model, fused, _ = _pair("llama", 0.0)
    use_fused_lora(fused, FP32)
    ids = torch.randint(0, 300, (2, 16))
    ref_loss, _ = _loss_and_grads(peft_model, ids, 1)
    loss, _ = _loss_and_grads(fused, ids, 1)
    assert loss == pytest.approx(ref_loss, rel=1e-6)


def test_unfusable_layers_keep_peft(tmp_path):
    """DoRA layers are left to PEFT (with phitune's dropout); compute_dtype must be one phitune fuses for."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config("llama", 300))
    peft_model, targets = adapters.attach_lora(model, LoraArgs(lora_r=8, lora_dropout=0.1, use_dora=True), seed=0)
    assert use_fused_lora(peft_model, FP32) == 0
    assert all(isinstance(d, FastDropout) for m in peft_model.modules()
               for d in getattr(m, "lora_dropout", {}).values() if isinstance(m.lora_dropout, torch.nn.ModuleDict))
    with pytest.raises(ValueError, match="compute_dtype"):
        use_fused_lora(peft_model, torch.float16)


def test_train_fp32_reports_fused_layers(tiny_models, tmp_path, capsys):
    """`phitune train --precision fp32` on CPU fuses every LoRA layer, says so, and still learns."""
    data = write_jsonl(tmp_path / "memorise.jsonl", MEMORISE)
    code = run_cli("train", "--model", tiny_models["llama"], "--dataset_path", data, "--output_dir", tmp_path / "run",
                   "--precision", "fp32", "--epochs", 2, "--batch_size", 4, "--max_length", 64, "--lora_r", 8,
                   "--lora_dropout", 0.1, "--learning_rate", 3e-2, "--warmup_ratio", 0.0, "--val_split", 0)
    assert code == 0
    err = capsys.readouterr().err
    assert "compute float32" in err
    found = re.search(r"(\d+) of (\d+) LoRA layers on phitune's fused CPU path", err)
    assert found and found[1] == found[2] and int(found[1]) >= 8
