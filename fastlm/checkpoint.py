"""Checkpoints: written atomically, read with `torch.load(weights_only=True)`.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (nothing pickled that
`weights_only` refuses), so loading one never runs code from the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fastlm.device import rng_state
from fastlm.errors import CheckpointError
from fastlm.files import CHECKPOINT_MAGIC, write_atomically

CHECKPOINT = "checkpoint.pt"  # the last state of a run, to resume from
BEST = "best.pt"  # the weights with the lowest validation loss so far


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a checkpoint,
    and a failed write (disk full) leaves the file that was there as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as either
        # torch's own message for a short write names its zip writer's internals, not the cause
        why = err.strerror if isinstance(err, OSError) and err.strerror else "the write failed: is the disk full?"
        kept = f"the {path.name} already there is intact" if path.exists() else "nothing was saved there"
        then = ("then --resume the run" if (path.parent / CHECKPOINT).is_file() else
                "then start the run again (it saved no checkpoint to resume from)")
        raise CheckpointError(f"cannot write {path} ({why}): {kept}; free some space, {then}") from None


def checkpoint_path(path: str | os.PathLike) -> Path:
    """`RUN/` or `RUN/checkpoint.pt` → the checkpoint file, which must exist."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: pass a run folder or its checkpoint.pt")
    return path


FORMAT = 1  # the layout of `run_checkpoint`'s dict; a newer fastlm that changes it bumps this
FOR_INFERENCE = ("model", "config", "vocab")
# The config entries a model is built and evaluated from (every checkpoint fastlm writes has them all).
CONFIG_KEYS = ("data", "embed_size", "hidden_size", "num_layers", "seq_len", "eval_batch_size")
FOR_RESUME = FOR_INFERENCE + ("optimizer", "epoch", "step", "global_step", "state", "rng", "best_valid_loss")


def run_checkpoint(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict, vocab: list[str],
                   data: dict, epoch: int, step: int, global_step: int, best_valid_loss: float,
                   state: tuple[torch.Tensor, torch.Tensor] | None, fed_back: torch.Tensor | None,
                   scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """Everything a run needs to resume exactly where it is: weights, optimizer, config, vocabulary,
    the training text's fingerprint (`Corpus.fingerprint`), position (`step` windows into epoch
    `epoch`), the carried (h, c) of a mid-epoch position and scheduled sampling's last prediction
    (all rows, on the CPU), the random generators, float16's loss scale and the best validation loss."""
    return {
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": config,
        "vocab": vocab,
        "data": data,
        "epoch": epoch,
        "step": step,
        "global_step": global_step,
        "state": state,
        "fed_back": fed_back,
        "rng": rng_state(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "best_valid_loss": best_valid_loss,
    }


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    needs: tuple[str, ...] = FOR_INFERENCE) -> dict[str, Any]:
    """A fastlm checkpoint with at least the entries `needs`, read without running code from the
    file; anything else is a CheckpointError saying what is wrong with it."""
    path = checkpoint_path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (a write that never finished?): use another checkpoint, "
                              "such as best.pt beside it")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic.startswith(CHECKPOINT_MAGIC):
        raise CheckpointError(f"{path} is not a checkpoint (not a file torch.save wrote): pass a run folder or "
                              "its checkpoint.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        if "unsupported global" in str(err).lower():
            raise CheckpointError(f"{path} holds Python objects besides tensors and numbers, which could run code "
                                  "when loaded: fastlm opens only checkpoints it wrote") from None
        raise CheckpointError(f"{path} is not a readable checkpoint (damaged, or not one fastlm wrote): "
                              "use another, such as best.pt beside it") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a fastlm checkpoint (no model/config entries)")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {ckpt.get('format')}, this fastlm reads format "
                              f"{FORMAT}: open it with the fastlm version that wrote it")
    missing = [key for key in needs if key not in ckpt]
    config = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
    missing += [f"config[{key!r}]" for key in CONFIG_KEYS if key not in config]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: it is not a complete fastlm checkpoint")
    bad = next((key for key in CONFIG_KEYS[1:] if type(config[key]) is not int or config[key] < 1), None)
    if bad is not None or not isinstance(config["data"], str):
        key = bad or "data"
        raise CheckpointError(f"{path} has config[{key!r}] = {config[key]!r}, which fastlm never writes: it is not a "
                              "checkpoint fastlm wrote (or was edited); use another")
    return ckpt


def check_same_data(ckpt: dict[str, Any], fingerprint: dict, folder: str) -> None:
    """Refuse to resume on another training text: its windows would not continue where the run stopped."""
    saved = ckpt.get("data")  # absent in checkpoints written before fastlm recorded it
    if saved is not None and saved != fingerprint:
        raise CheckpointError(f"--data {folder}: its train.txt is not the text this run trained on "
                              f"({fingerprint['train_words']:,} words read, the run's had {saved['train_words']:,}): "
                              "resume with the original data, or start a new run with --out NEW_FOLDER")


def check_finite_weights(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    for name, tensor in ckpt["model"].items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path} holds non-finite weights ({name}): that run diverged; use an earlier "
                                  "checkpoint, such as best.pt beside it")
