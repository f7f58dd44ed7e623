"""The model artifact: network definition, vocabulary, checkpoint format and sampling.

Imported by both ``training`` and ``app``; it imports neither of them, nor FastAPI.
"""
