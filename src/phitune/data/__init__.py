"""Data: everything between a user's file and the token ids a model trains on.

sources.py reads files and datasets into records (with file:line in every error), records.py validates
them and turns them into examples (ids, answer-only labels, batches), and templates.py renders a
conversation exactly as training and every later command see it. Imports nothing from phitune but
errors; every later stage may import it.
"""
