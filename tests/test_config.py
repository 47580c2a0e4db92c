"""The training configuration: each setting declared once, with its default, help and resume rule."""
import argparse
from dataclasses import fields

import pytest

from fastlm.compare import MODEL_FLAGS
from fastlm.config import RESUMABLE_OVERRIDES, TrainConfig, add_flag
from fastlm.train import parser


def test_every_field_is_one_train_flag_with_its_help_and_default_shown_once():
    p = parser()
    options = {option: action for action in p._actions for option in action.option_strings}
    for spec in fields(TrainConfig):
        action = options[f"--{spec.name.replace('_', '-')}"]
        assert action.help.startswith(spec.metadata["help"])
        assert action.help.count("(default") <= 1 and "default: None" not in action.help, action.help
    assert len([a for a in p._actions if a.dest not in ("help", "resume")]) == len(fields(TrainConfig))


def test_flags_parse_to_the_field_types_and_leave_untouched_fields_out():
    args = vars(parser().parse_args(["--lr", "0.01", "--max-steps", "7", "--no-cuda-graphs", "--out", "r"]))
    assert args == {"lr": 0.01, "max_steps": 7, "cuda_graphs": False, "out": "r", "resume": None}
    args.pop("resume")
    assert TrainConfig(**args).batch_size == 20


def test_what_a_resume_may_change_is_marked_on_the_fields():
    assert RESUMABLE_OVERRIDES == {"epochs", "max_steps", "log_interval", "device", "out", "backend", "data",
                                   "eval_interval", "eval_tokens", "cuda_graphs", "amp"}


@pytest.mark.parametrize("name", MODEL_FLAGS)
def test_compare_takes_the_same_flags_with_their_defaults(name):
    p = argparse.ArgumentParser()
    add_flag(p, name, default=getattr(TrainConfig(), name))
    assert getattr(p.parse_args([]), name) == getattr(TrainConfig(), name)


def test_cuda_devices_are_checked_against_the_machine_and_their_memory_read(monkeypatch):
    import torch

    from fastlm.device import available_bytes, pick_device
    from fastlm.errors import TrainingError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (123 * 2**20, 456 * 2**20))
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(TrainingError, match=r"this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        pick_device("cuda:2")
    assert available_bytes(torch.device("cuda", 1)) == 123 * 2**20


@pytest.mark.parametrize("name", ["cpu:1", "cpu:7"])
def test_there_is_one_cpu_device(name):
    from fastlm.device import pick_device
    from fastlm.errors import TrainingError

    with pytest.raises(TrainingError, match=f"--device {name}: there is one CPU device"):
        pick_device(name)
    assert pick_device("cpu:0").type == "cpu"
