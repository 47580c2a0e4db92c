"""Scoring a model on a split.

- `plain`: perplexity with the trained weights, the state carried across windows;
- `adaptive`: the model adapting as it reads, by dynamic evaluation (`dynamic`) and a continuous
  cache (`cache`), exactly (each token scored before anything learns from it);
- `tuning`: their hyper-parameters chosen on the validation split.
"""
from fastlm.scoring.plain import evaluate, perplexity

__all__ = ["evaluate", "perplexity"]
