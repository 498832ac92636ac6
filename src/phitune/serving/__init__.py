"""Serving: the HTTP face of generation.

routes.py is the OpenAI-compatible FastAPI app (chat and text completions, models, health); schemas.py
holds the request schemas and OpenAI-shaped errors; webui/ is the browser page and its /phitune/*
routes. May import every earlier stage (generation included); never exporting or a command.
"""
