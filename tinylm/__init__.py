"""tinylm: train a small GPT-style language model from scratch, then talk to it."""

__version__ = "0.1.0"
