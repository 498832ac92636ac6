"""LoRA target selection: presets per architecture, layer ranges, exact parameter counts, clear errors."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from phitune.config import LoraArgs
from phitune.errors import PhituneError
from phitune.models import adapters

# (in, out) of each adapted module for the tiny models: hidden 32, MLP 64, 4 heads of 8
SHAPES = {
    "phi": {"q_proj": (32, 32), "k_proj": (32, 32), "v_proj": (32, 32), "dense": (32, 32),
            "fc1": (32, 64), "fc2": (64, 32)},
    "phi3": {"qkv_proj": (32, 96), "o_proj": (32, 32), "gate_up_proj": (32, 128), "down_proj": (64, 32)},
    "llama": {"q_proj": (32, 32), "k_proj": (32, 32), "v_proj": (32, 32), "o_proj": (32, 32),
              "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)},
}


def expected(arch, names, n_layers, r):
    return n_layers * sum(r * (SHAPES[arch][n][0] + SHAPES[arch][n][1]) for n in names)


@pytest.mark.parametrize("preset", ["all", "attention", "mlp", "qv"])
def test_exact_trainable_count_per_preset(tiny_models, arch, preset):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    peft_model, targets = adapters.attach_lora(model, LoraArgs(lora_r=4, target_modules=[preset]))
    names = adapters.FAMILIES[arch]
    wanted = names["attention"] + names["mlp"] if preset == "all" else names[preset]
    assert sorted({t.rsplit(".", 1)[-1] for t in targets}) == sorted(wanted)
    _, trainable = adapters.trainable_summary(peft_model, targets)
    assert trainable == expected(arch, wanted, 2, 4)


def test_layer_range_and_explicit_names(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["phi"])
    peft_model, targets = adapters.attach_lora(model, LoraArgs(lora_r=2, target_modules=["dense", "fc2"], layers="1"))
    assert targets == ["model.layers.1.self_attn.dense", "model.layers.1.mlp.fc2"]
    lines, trainable = adapters.trainable_summary(peft_model, targets)
    assert trainable == expected("phi", ["dense", "fc2"], 1, 2)
    assert "dense x1, fc2 x1" in lines[0] and f"{trainable:,}" in lines[1]


def test_dora_adds_magnitude_vectors(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    peft_model, targets = adapters.attach_lora(model, LoraArgs(lora_r=4, target_modules=["qv"], use_dora=True))
    _, trainable = adapters.trainable_summary(peft_model, targets)
    assert trainable == expected("llama", ["q_proj", "v_proj"], 2, 4) + 2 * (32 + 32)


def test_name_matching_nothing_lists_real_names(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["phi"])
    with pytest.raises(PhituneError) as err:
        adapters.select_targets(model, ["Wqkv"])  # Phi-2's old name (peft#1375)
    msg = str(err.value)
    assert "Wqkv matches no linear layer" in msg and "dense" in msg and "fc1" in msg and "q_proj" in msg


@pytest.mark.parametrize("spec,problem", [("0-5", "outside this model's layers 0-1"), ("a-b", "cannot read 'a-b'"),
                                          ("1-0", "outside")])
def test_bad_layer_spec(spec, problem):
    with pytest.raises(PhituneError, match=problem):
        adapters.parse_layers(spec, 2)


def test_parse_layers():
    assert adapters.parse_layers("0-3,30", 32) == [0, 1, 2, 3, 30]
    assert adapters.parse_layers(None, 3) == [0, 1, 2]


def test_unknown_architecture_falls_back_to_linear_layers(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    model.config.model_type = "somethingnew"
    targets = adapters.select_targets(model, ["all"])
    assert len(targets) == 2 * 7  # every linear layer in both blocks, never the LM head
    assert not any("lm_head" in t for t in targets)


def test_saved_adapter_reloads_with_plain_peft_and_identical_logits(tiny_models, tmp_path, arch):
    from peft import PeftModel
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    peft_model, _ = adapters.attach_lora(model, LoraArgs(lora_r=4))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)  # nonzero B, so the adapter really changes the output
    tok = __import__("transformers").AutoTokenizer.from_pretrained(tiny_models[arch])
    adapters.save_adapter(peft_model, tok, tmp_path / "a", {"base": {"model": str(tiny_models[arch])}})
    ids = torch.tensor([[5, 17, 42, 99, 3, 7]])
    peft_model.eval()
    with torch.no_grad():
        tuned = peft_model(input_ids=ids).logits
        fresh = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
        base = fresh(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(fresh, tmp_path / "a").eval()(input_ids=ids).logits
    assert torch.equal(tuned, reloaded)
    assert not torch.allclose(tuned, base)
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "phitune.json", "tokenizer.json"} <= files
