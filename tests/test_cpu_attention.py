"""phitune's CPU attention (bf16, grouped queries) computes what eager attention computes."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from phitune.hardware.cpu_attention import use_cpu_attention
from tiny import build_config


@pytest.mark.parametrize("arch", ["phi", "phi3", "llama"])
def test_matches_eager_with_padding_and_grouped_heads(arch):
    cfg = build_config(arch, 300)
    if arch == "llama":
        cfg.num_key_value_heads = 2  # two query heads per k/v head
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(cfg)
    eager.set_attn_implementation("eager")
    ours = copy.deepcopy(eager)
    use_cpu_attention(ours)
    assert ours.config._attn_implementation == "phitune_cpu"
    ids = torch.randint(0, 300, (3, 20))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding: fully masked query rows must not turn into NaN
    with torch.no_grad():
        exact = eager(input_ids=ids, attention_mask=mask).logits[:, 6:]
    results = []
    for model in (eager, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logits[:, 6:].square().mean().backward()
        results.append((logits[:, 6:], [p.grad for p in model.parameters()]))
    (eager_logits, eager_grads), (our_logits, our_grads) = results
    assert torch.isfinite(our_logits).all()
    # No further from the fp32 result than eager attention under the same autocast
    assert (our_logits - exact).abs().max() <= 1.5 * (eager_logits - exact).abs().max() + 1e-3
    for mine, theirs in zip(our_grads, eager_grads):
        assert torch.isfinite(mine).all()
        assert torch.nn.functional.cosine_similarity(mine.flatten(), theirs.flatten(), dim=0) > 0.99
