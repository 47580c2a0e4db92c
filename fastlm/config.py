"""The training configuration: its fields and defaults, the checks on them, and device and dtype choice.

`TrainConfig` is what `python -m fastlm.train` fills from its flags and what a checkpoint stores, so
a run can be resumed (and its shape-changing fields refused) from the checkpoint alone.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from fastlm.lstm import resolve_backend
from fastlm.scheduled_sampling import FREE_RUNNING_TOKENS, SCHEDULES

DEFAULT_DATA = "data/ptb"


@dataclass
class TrainConfig:
    data: str = DEFAULT_DATA
    embed_size: int = 128
    hidden_size: int = 1024
    num_layers: int = 1
    epochs: int = 5
    batch_size: int = 20
    seq_len: int = 30
    lr: float = 0.002
    clip: float = 0.5
    backend: str = "auto"
    device: str = "auto"
    seed: int = 1234
    out: str | None = None  # the run folder; None → runs/<timestamp>
    max_steps: int | None = None  # optimizer steps in total, counted across resumes
    log_interval: int = 100
    eval_batch_size: int = 10
    eval_interval: int | None = None  # also validate every N steps (besides each epoch end)
    eval_tokens: int | None = None  # validate those interim points on the first N tokens only
    teacher_forcing: float = 1.0  # probability of feeding the true word (1: teacher forcing)
    teacher_forcing_schedule: str = "constant"
    teacher_forcing_steps: int | None = None  # the schedule's horizon; None → epochs × steps per epoch
    free_running_token: str = "argmax"  # what is fed back when not teacher forcing: argmax | sample
    cuda_graphs: bool | None = None  # replay each step as one CUDA graph; None → on for CUDA
    amp: str = "auto"  # autocast dtype: off | bf16 | fp16 | auto (bf16 where the GPU has it, else off)


# What a resumed run may change; everything else must match the checkpoint.
RESUMABLE_OVERRIDES = {"epochs", "max_steps", "log_interval", "device", "out", "backend", "data", "eval_interval",
                       "eval_tokens", "cuda_graphs", "amp"}
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(Exception):
    """A training request that cannot be carried out; the message says what to change."""


def resume_config(saved: dict, overrides: dict) -> TrainConfig:
    """The saved config with the flags given on resume applied; shape-changing flags must agree."""
    cfg = TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved})
    for key, value in overrides.items():
        if key not in RESUMABLE_OVERRIDES and value != getattr(cfg, key):
            raise TrainingError(
                f"--{key.replace('_', '-')} {value} differs from the checkpoint's {getattr(cfg, key)}: "
                "a resumed run keeps its model and data layout (start a new run to change it)"
            )
    return replace(cfg, **overrides)


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: `auto` is bf16 on a GPU that supports it, else off.

    Off on every CPU, so a CPU run reproduces float32 math by default; on CPUs with AMX (see
    `cpu_multiplies_bf16`) the trainer points at `--amp bf16`."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return AMP_DTYPES[amp]


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has AMX bfloat16 tiles, where oneDNN's bf16 matmuls run ~2x float32's rate."""
    capabilities = getattr(torch.cpu, "get_capabilities", lambda: {})()
    return bool(capabilities.get("amx_bf16"))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    return device


def check_config(cfg: TrainConfig) -> None:
    positive = ("embed_size", "hidden_size", "num_layers", "batch_size", "seq_len", "log_interval", "eval_batch_size")
    for name in positive:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if cfg.epochs < 0 or (cfg.max_steps is not None and cfg.max_steps < 0):
        raise TrainingError("--epochs and --max-steps cannot be negative")
    if not (cfg.lr > 0 and cfg.clip > 0):
        raise TrainingError(f"--lr and --clip must be positive, got lr={cfg.lr}, clip={cfg.clip}")
    if not 0 <= cfg.teacher_forcing <= 1:
        raise TrainingError(f"--teacher-forcing is a probability in [0, 1], got {cfg.teacher_forcing}")
    if cfg.teacher_forcing_schedule not in SCHEDULES:
        raise TrainingError(f"unknown --teacher-forcing-schedule {cfg.teacher_forcing_schedule!r}: "
                            f"choose {', '.join(SCHEDULES)}")
    if cfg.free_running_token not in FREE_RUNNING_TOKENS:
        raise TrainingError(f"--free-running-token must be argmax or sample, got {cfg.free_running_token!r}")
    if cfg.amp not in (*AMP_DTYPES, "auto"):
        raise TrainingError(f"--amp must be off, bf16, fp16 or auto, got {cfg.amp!r}")
    for name in ("eval_interval", "eval_tokens", "teacher_forcing_steps"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    resolve_backend(cfg.backend, "cpu")  # raises ValueError naming the choices
