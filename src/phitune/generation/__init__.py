"""Generation: turning a loaded model into answers, for chat, compare, eval and serve.

load.py loads one base model with its adapters and templates; engine.py decodes a batch of requests one
token per row per step (stops, sampling, token limits); rows.py keeps each row's answer independent of
its batch; scheduler.py runs the engine on one thread for concurrent requests; packed.py, int8.py and
top_logits.py are the weight formats and the exact last-logits path. May import errors, data, config,
models and hardware; never training, serving, exporting or a command.
"""
