"""Exporting: leaving phitune for other runtimes.

merge.py folds an adapter into its base (checked logit by logit); gguf_writer.py maps a model's tensors,
tokenizer and template to GGUF, gguf_file.py writes and reads back one GGUF file, gguf_lora.py writes an
adapter alone as a GGUF LoRA, ollama.py writes the Modelfile. May import every earlier stage;
never serving or a command.
"""
