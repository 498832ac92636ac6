"""phitune: fine-tune small causal language models with LoRA.

The top level holds the entry point (cli.py), one thin module per command (train, chat, compare,
evaluate, merge, export, serve, plan, data_cli) with the flag schemas they share (config.py for a
training run, config_commands.py for the others), and errors.py. The stages live in folders, each
importing only earlier ones (tools/check_layout.py, run by `make lint`, enforces it):
data -> models -> hardware -> training | generation -> serving | exporting.
"""

__version__ = "0.1.0"
