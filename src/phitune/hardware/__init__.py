"""Hardware: what runs fastest on the device at hand, and what fits in its memory.

backends.py makes the DevicePlan (attention kernel, LoRA layer, checkpointing) and applies it to a model;
cpu_attention.py and cpu_lora.py are the CPU kernels a plan may pick; memory.py is the memory model
behind `plan`, the train pre-flight and `--gradient_checkpointing auto`. May import errors, data,
config and models.
"""
