"""Inference: greedy generation and scoring (exact-match, contains, loss/perplexity)."""
from lorakit.infer.evaluate import evaluate
from lorakit.infer.generate import greedy_generate
from lorakit.infer.metrics import accuracy, contains, exact_match, normalize, token_loss

__all__ = ["accuracy", "contains", "evaluate", "exact_match", "greedy_generate", "normalize",
           "token_loss"]
