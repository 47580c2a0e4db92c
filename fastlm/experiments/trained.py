"""What the reports on a trained checkpoint share: the model, the corpus it was trained on, and the
sentence that states its setting.

The corpus is checked against the fingerprint the checkpoint recorded, because these reports read
word counts and reference text from it: counts from another train.txt would describe another run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fastlm.checkpoint import checkpoint_path
from fastlm.data import Corpus, Dictionary, load_corpus
from fastlm.errors import CheckpointError
from fastlm.models.lm import RNNLM, load_model


@dataclass
class Trained:
    file: Path  # the checkpoint file actually read (a run folder means its checkpoint.pt)
    model: RNNLM
    dictionary: Dictionary
    config: dict
    epoch: int | None  # epochs completed when it was written
    global_step: int | None
    best_valid_loss: float | None  # the run's best validation loss when it was written
    corpus: Corpus


def load_trained(checkpoint: str, data: str | None = None, device: torch.device | str = "cpu") -> Trained:
    """The checkpoint's model and the corpus in `data` (default: the folder it was trained on)."""
    file = checkpoint_path(checkpoint)
    model, dictionary, ckpt = load_model(file, device)
    folder = data or ckpt["config"]["data"]
    corpus = load_corpus(folder, dictionary)
    saved = ckpt.get("data")  # absent in checkpoints written before fastlm recorded it
    if saved is not None and saved != corpus.fingerprint():
        raise CheckpointError(f"{Path(folder) / 'train.txt'} is not the text {file} was trained on "
                              f"({corpus.train.numel():,} words read, the run's had {saved['train_words']:,}): "
                              "pass --data with that run's data folder")
    return Trained(file, model, dictionary, ckpt["config"], ckpt.get("epoch"), ckpt.get("global_step"),
                   ckpt.get("best_valid_loss"), corpus)


def setting(trained: Trained) -> str:
    """One paragraph: which weights, of which model, trained how, on what."""
    cfg = trained.config
    position = (f"written after {trained.epoch} epoch(s), optimizer step {trained.global_step}"
                if trained.epoch is not None else "position not recorded")
    valid = (f"; the run's best validation perplexity when it was written: {math.exp(trained.best_valid_loss):.2f}"
             if trained.best_valid_loss is not None and math.isfinite(trained.best_valid_loss) else "")
    regularised = ", ".join(f"{name} {cfg[name]}" for name in ("dropout", "weight_drop") if cfg.get(name))
    return (f"Checkpoint `{trained.file}` ({position}{valid}). Model: vocabulary {len(trained.dictionary):,}, "
            f"embed {cfg['embed_size']}, hidden {cfg['hidden_size']}, {cfg['num_layers']} layer(s)"
            f"{', tied' if cfg.get('tied') else ''}{', ' + regularised if regularised else ''}; trained with "
            f"{cfg.get('optimizer', 'adam')} lr {cfg.get('lr')}, batch {cfg.get('batch_size')}, seq_len "
            f"{cfg['seq_len']}, seed {cfg.get('seed')}, on `{trained.corpus.folder}`.")


def html_escaped(markdown: str) -> str:
    """A report's markdown with <unk> and <eos> shown as text: viewers drop them as unknown HTML tags."""
    return markdown.replace("<", "&lt;")
