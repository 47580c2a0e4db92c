"""What the experiments share: a fresh report folder, the corpus a config names."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from fastlm.config import TrainConfig
from fastlm.data import Corpus, load_corpus
from fastlm.errors import TrainingError

MB = 2**20


def fresh_folder(out_dir: Path) -> Path:
    """`out_dir`, created, refused when it already holds something (a report is never overwritten) or
    is not a folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"--out {out_dir} is a file: pass a new folder for the report")
    try:
        if out_dir.exists() and any(out_dir.iterdir()):
            raise TrainingError(f"{out_dir} is not empty: pass a new --out folder for this report")
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrainingError(f"cannot create --out {out_dir} ({err.strerror or err}): pass another folder") from None
    return out_dir


@contextlib.contextmanager
def removed_if_left_empty(out_dir: Path) -> Iterator[None]:
    """Around an experiment: when it fails or is interrupted, the report folder and the parents it
    created for it are removed again if they are empty (what the arms already saved stays)."""
    created = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]
    try:
        yield
    except BaseException:
        for folder in created:
            if not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()
        raise


def corpus_of(cfg: TrainConfig) -> Corpus:
    """The corpus of `cfg.data` (PTB fetched into data/ptb when that is the folder) at its vocabulary size."""
    return load_corpus(cfg.data, max_vocab=cfg.vocab_size)
