"""The training configuration: each flag declared once (default, help, whether a resume may change
it), the named recipes, resume merging, and `check_config`, every rule on the flags in one place.

`TrainConfig` is what `python -m fastlm.train` fills from its flags and what a checkpoint stores, so
a run can be resumed (and its shape-changing fields refused) from the checkpoint alone. The model,
the LSTM and the trainer trust a config that passed `check_config`.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields, replace

import torch

from fastlm.data import PTB_FOLDER
from fastlm.device import AMP_DTYPES, check_seed, cuda_graphs_available
from fastlm.errors import TrainingError
from fastlm.models.lstm import BACKENDS, check_backend

SCHEDULES = ("constant", "linear", "exponential", "inverse-sigmoid")  # formulas: training/scheduled_sampling.py
FREE_RUNNING_TOKENS = ("argmax", "sample")


def _flag(default, help: str, resumable: bool = False, type=None):
    """A TrainConfig field: its default, its --help text and whether a resumed run may change it,
    declared once; `flag_parser` builds the command line from these."""
    return field(default=default, metadata={"help": help, "resumable": resumable, "type": type})


@dataclass
class TrainConfig:
    data: str = _flag(PTB_FOLDER, "folder with train.txt, valid.txt, test.txt (PTB is downloaded into "
                      "data/ptb if missing)", resumable=True)
    embed_size: int = _flag(128, "word embedding size")
    hidden_size: int = _flag(1024, "LSTM hidden size")
    num_layers: int = _flag(1, "stacked LSTM layers")
    vocab_size: int | None = _flag(None, "a vocabulary of N words in all: the most frequent training words, "
                                   "<eos> and <unk>; the rest read as <unk> (default: every word of train.txt)",
                                   type=int)
    epochs: int = _flag(5, "passes over the training data", resumable=True)
    batch_size: int = _flag(20, "rows the token stream is cut into")
    seq_len: int = _flag(30, "TBPTT window length (tokens between detaches)")
    lr: float = _flag(0.002, "learning rate")
    clip: float = _flag(0.5, "gradient-norm clipping threshold")
    optimizer: str = _flag("adam", "adam (fused) or sgd (plain, as the PyTorch word-language-model example)")
    lr_decay: float = _flag(1.0, "divide the learning rate by this after an epoch whose validation loss did not "
                            "improve (the example's 4; 1 keeps it)")
    dropout: float = _flag(0.0, "dropout on the embeddings, between LSTM layers and on the LSTM output")
    locked_dropout: bool = _flag(False, "one dropout mask per row for a whole window (variational dropout) instead "
                                 "of one per element", type=bool)
    weight_drop: float = _flag(0.0, "DropConnect on the recurrent weights W_hh, one mask per window (AWD-LSTM)")
    tied: bool = _flag(False, "the output layer shares the embedding matrix (needs --embed-size = --hidden-size)",
                       type=bool)
    init_range: float | None = _flag(None, "draw the embedding and output weights from U(-r, r), output bias 0, as "
                                     "the example (default: torch's initialisation)", type=float)
    recipe: str | None = _flag(None, "a named set of settings (--recipe list shows them); flags given override it",
                               type=str)
    backend: str = _flag("auto", f"LSTM backend: {', '.join(BACKENDS)} (auto: the fused kernel for a bf16/fp16 "
                         "step captured as a CUDA graph, torch's LSTM otherwise)", resumable=True)
    device: str = _flag("auto", "cpu, cuda, cuda:N or auto", resumable=True)
    seed: int = _flag(1234, "random seed")
    out: str | None = _flag(None, "run folder (default: runs/<timestamp>)", resumable=True, type=str)
    max_steps: int | None = _flag(None, "stop after this many optimizer steps in total, counted across resumes",
                                  resumable=True, type=int)
    log_interval: int = _flag(100, "steps between log lines", resumable=True)
    eval_batch_size: int = _flag(10, "rows for validation and test")
    eval_interval: int | None = _flag(None, "also validate every N steps (metrics.jsonl), besides each epoch end",
                                      resumable=True, type=int)
    eval_tokens: int | None = _flag(None, "validate those interim points on the first N validation tokens only",
                                    resumable=True, type=int)
    teacher_forcing: float = _flag(1.0, "probability of feeding the true word at each step (1: teacher forcing, "
                                   "0: free running)")
    teacher_forcing_schedule: str = _flag("constant", f"decay of --teacher-forcing over training: "
                                          f"{', '.join(SCHEDULES)}")
    teacher_forcing_steps: int | None = _flag(None, "steps over which the schedule decays (default: the whole "
                                              "run, epochs x steps)", type=int)
    free_running_token: str = _flag("argmax", "the model's word fed back when not teacher forcing: argmax or sample")
    cuda_graphs: bool | None = _flag(None, "replay each training step as one CUDA graph (default: on for CUDA)",
                                     resumable=True, type=bool)
    amp: str = _flag("auto", "autocast dtype: off, bf16, fp16 or auto (bf16 on a GPU that has it, off on the CPU)",
                     resumable=True)


def scheduled_sampling(cfg: TrainConfig) -> bool:
    """Whether the run ever feeds the model its own words (steps then run one word at a time)."""
    return cfg.teacher_forcing < 1 or cfg.teacher_forcing_schedule != "constant"


def add_flag(parser: argparse.ArgumentParser, name: str, default=argparse.SUPPRESS) -> None:
    """Add TrainConfig's field `name` as --name, with its help, type and default from the field.

    The default SUPPRESS keeps flags that were not given out of the namespace, so a resume knows
    what changed."""
    spec = next(f for f in fields(TrainConfig) if f.name == name)
    meta, shown = spec.metadata, spec.default
    help_text = meta["help"] if "(default" in meta["help"] or shown is None else f"{meta['help']} (default: {shown})"
    flag = f"--{name.replace('_', '-')}"
    if meta["type"] is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
    else:
        parser.add_argument(flag, type=meta["type"] or type(shown), default=default, help=help_text)


# Named recipes: the settings each sets (explicit flags override them) and where it comes from.
RECIPES = {
    "tutorial": ({}, "the classic PyTorch tutorial's language model and training: fastlm's defaults"),
    "small": (dict(embed_size=200, hidden_size=200, num_layers=2, tied=True, dropout=0.2, optimizer="sgd", lr=20.0,
                   clip=0.25, seq_len=35, batch_size=20, eval_batch_size=10, epochs=6, lr_decay=4.0, init_range=0.1),
              "the PyTorch word-language-model example's defaults with --tied --epochs 6 (its README: test 110.44)"),
    "medium": (dict(embed_size=650, hidden_size=650, num_layers=2, tied=True, dropout=0.5, optimizer="sgd", lr=20.0,
                    clip=0.25, seq_len=35, batch_size=20, eval_batch_size=10, epochs=40, lr_decay=4.0,
                    init_range=0.1),
               "the example's medium model: 2 x 650, tied, dropout 0.5, 40 epochs (hours on a CPU)"),
}


def recipe_config(name: str, flags: dict) -> TrainConfig:
    """The recipe's settings with the flags given on the command line on top."""
    if name not in RECIPES:
        raise TrainingError(f"unknown --recipe {name!r}: choose {', '.join(RECIPES)} (--recipe list shows them)")
    return TrainConfig(**{**RECIPES[name][0], **flags, "recipe": name})


def describe_recipes() -> str:
    lines = []
    flag = lambda key, value: f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}")  # noqa: E731
    for name, (settings, source) in RECIPES.items():
        shown = " ".join(flag(k, v) for k, v in settings.items()) or "(the defaults)"
        lines.append(f"{name:9} {source}\n          {shown}")
    return "\n".join(lines)


# What a resumed run may change; everything else must match the checkpoint.
RESUMABLE_OVERRIDES = {f.name for f in fields(TrainConfig) if f.metadata["resumable"]}


def resume_config(saved: dict, overrides: dict) -> TrainConfig:
    """The saved config with the flags given on resume applied; shape-changing flags must agree."""
    cfg = TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved})
    for key, value in overrides.items():
        if key not in RESUMABLE_OVERRIDES and value != getattr(cfg, key):
            raise TrainingError(
                f"--{key.replace('_', '-')} {value} differs from the checkpoint's {getattr(cfg, key)}: "
                "a resumed run keeps the settings it was trained with (start a new run to change it)"
            )
    return replace(cfg, **overrides)


def check_config(cfg: TrainConfig, world=None, device: torch.device | None = None,
                 flags: dict[str, str] | None = None) -> None:
    """Every rule on the flags and their combinations, checked before any work: a TrainingError
    naming the flag and the fix. Rules that depend on torchrun's `world` (a `distributed.World`) or
    on the chosen `device` are checked when those are given (the trainer gives both). `flags` names
    fields that a command sets under flags of its own (compare's --arm)."""
    flag = lambda name: (flags or {}).get(name, f"--{name.replace('_', '-')}")  # noqa: E731
    positive = ("embed_size", "hidden_size", "num_layers", "batch_size", "seq_len", "log_interval", "eval_batch_size")
    for name in positive:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if cfg.epochs < 0 or (cfg.max_steps is not None and cfg.max_steps < 0):
        raise TrainingError("--epochs and --max-steps cannot be negative")
    if not (0 < cfg.lr < math.inf and 0 < cfg.clip < math.inf):
        raise TrainingError(f"--lr and --clip must be positive and finite, got lr={cfg.lr}, clip={cfg.clip}")
    check_seed(cfg.seed)
    if not 0 <= cfg.teacher_forcing <= 1:
        raise TrainingError(f"{flag('teacher_forcing')} is a probability in [0, 1], got {cfg.teacher_forcing}")
    if cfg.teacher_forcing_schedule not in SCHEDULES:
        raise TrainingError(f"unknown {flag('teacher_forcing_schedule')} {cfg.teacher_forcing_schedule!r}: "
                            f"choose {', '.join(SCHEDULES)}")
    if cfg.free_running_token not in FREE_RUNNING_TOKENS:
        raise TrainingError(f"{flag('free_running_token')} must be argmax or sample, got {cfg.free_running_token!r}")
    if cfg.amp not in (*AMP_DTYPES, "auto"):
        raise TrainingError(f"--amp must be off, bf16, fp16 or auto, got {cfg.amp!r}")
    if cfg.optimizer not in ("adam", "sgd"):
        raise TrainingError(f"--optimizer must be adam or sgd, got {cfg.optimizer!r}")
    if not 1 <= cfg.lr_decay < math.inf:
        raise TrainingError(f"--lr-decay divides the learning rate: it must be at least 1, got {cfg.lr_decay}")
    for name in ("dropout", "weight_drop"):
        if not 0 <= getattr(cfg, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} is a probability in [0, 1), got {getattr(cfg, name)}")
    if cfg.tied and cfg.embed_size != cfg.hidden_size:
        raise TrainingError(f"--tied shares the embedding with the output layer, so --embed-size must equal "
                            f"--hidden-size (got {cfg.embed_size} and {cfg.hidden_size})")
    if cfg.init_range is not None and not 0 < cfg.init_range < math.inf:
        raise TrainingError(f"--init-range must be positive, got {cfg.init_range}")
    if scheduled_sampling(cfg) and (cfg.weight_drop or cfg.locked_dropout and cfg.dropout):
        raise TrainingError("free running calls the model one word at a time, so --weight-drop and --locked-dropout "
                            "would draw a mask per word, not per window: use plain --dropout with scheduled sampling")
    if cfg.vocab_size is not None and cfg.vocab_size < 2:
        raise TrainingError(f"--vocab-size must be at least 2 (a word and <unk>), got {cfg.vocab_size}")
    for name in ("eval_interval", "eval_tokens", "teacher_forcing_steps"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    check_backend(cfg.backend, device)
    if device is not None and cfg.cuda_graphs and not cuda_graphs_available(device):
        raise TrainingError("--cuda-graphs needs a CUDA device: use --no-cuda-graphs on the CPU")
    if world is not None and (world.enabled or world.launch) and cfg.out is None:
        raise TrainingError("under torchrun pass --out (every rank, and every attempt after a restart, must find the "
                            "run folder)")
    if world is not None and world.enabled:
        for flag, rows in (("--batch-size", cfg.batch_size), ("--eval-batch-size", cfg.eval_batch_size)):
            if rows % world.size:  # each rank takes an equal block of the rows
                raise TrainingError(f"{flag} {rows} is not divisible by the world size {world.size}: use a multiple "
                                    f"of {world.size}")
        if scheduled_sampling(cfg):
            raise TrainingError("scheduled sampling runs step by step and is not supported under torchrun yet: "
                                "train it in one process")
