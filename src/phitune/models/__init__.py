"""Models: the base model and its LoRA adapters.

loading.py loads a base model and tokenizer (hub id, local directory, .gguf, the demo alias) and owns the
device and dtype policy; adapters.py picks LoRA targets (checked: a name that matches nothing is an
error), attaches, loads and merges adapters and reads the self-describing adapter directory. May import
errors, data and config.
"""
