"""Training: `phitune train` below its flags.

setup.py builds a Run (data, model, adapters, hardware plan, optimizer, resume) and finishes it;
loop.py is the loop itself, one optimizer step per iteration; loss.py computes the answer-token loss;
checkpoints.py writes and reads atomic checkpoints; trackers.py talks to TensorBoard / wandb / MLflow /
trackio; report.py prints summaries and plots the loss. May import errors, data, config, models and
hardware; never generation, serving, exporting or a command.
"""
