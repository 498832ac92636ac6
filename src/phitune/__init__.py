"""phitune: fine-tune small causal language models with LoRA."""

__version__ = "0.1.0"
