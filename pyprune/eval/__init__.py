"""Evaluation: perplexity (and zero-shot tasks through lm-evaluation-harness, optional)."""
from pyprune.eval.perplexity import perplexity

__all__ = ["perplexity"]
