"""The block-configuration sweep (benchmarks/tune_step.py) and the table step_config reads, on the CPU:
interpreted kernels, graphs simulated, tiny shapes."""
import json
import sys

import pytest
import torch

from benchmarks import tune_step
from fastlm.graphs import SimulatedGraphs
from fastlm.kernels.fused_lstm import StepConfig, rule_step_config, step_config

SHAPE = (3, 16)  # B, H
OTHER = StepConfig(16, 16, 32, 4, 3)


def _two_configs(batch, hidden):
    return [rule_step_config(batch, hidden, torch.bfloat16), OTHER]


@pytest.fixture
def fused_module(monkeypatch):
    module = sys.modules["fastlm.kernels.fused_lstm"]
    yield module
    module.tuned_configs.cache_clear()


def test_candidates_start_with_the_rule_and_are_distinct():
    options = tune_step.candidates(20, 1024)
    assert options[0] == rule_step_config(20, 1024, torch.bfloat16)
    assert len(set(options)) == len(options) == 24
    assert all(c.block_b >= 16 and c.block_n >= 16 and c.block_k >= 16 for c in options), "tl.dot tiles"


def test_the_sweep_times_every_candidate_and_the_table_steers_step_config(tmp_path, fused_module, monkeypatch):
    rows = tune_step.sweep("cpu", SimulatedGraphs(), shapes=(SHAPE,), seconds=600, replays=1,
                           configs=_two_configs, seq_len=2, embed=8)
    assert [(r["kernel"], r["rule"]) for r in rows] == [("fwd", True), ("fwd", False), ("bwd", True), ("bwd", False)]
    assert all(r["seconds"] > 0 and r["relative_error"] <= 1e-2 for r in rows)
    table = tune_step.fastest(rows)
    assert [entry["key"] for entry in table] == ["fwd bfloat16 B3 H16", "bwd bfloat16 B3 H16"]

    # A table naming OTHER for the backward at this shape: step_config takes it there, the rule elsewhere.
    path = tmp_path / "step_configs.json"
    path.write_text(json.dumps({"configs": [{"key": "bwd bfloat16 B3 H16", "config": OTHER.__dict__}]}))
    monkeypatch.setattr(fused_module, "TUNED_CONFIGS", path)
    fused_module.tuned_configs.cache_clear()
    assert step_config(3, 16, torch.bfloat16, "bwd") == OTHER
    assert step_config(3, 16, torch.bfloat16, "fwd") == rule_step_config(3, 16, torch.bfloat16)
    assert step_config(3, 16, torch.float32, "bwd") == rule_step_config(3, 16, torch.float32)


def test_a_fast_but_wrong_configuration_is_refused(monkeypatch):
    real = tune_step.run_kernel

    def wrong_for_other(kernel, cfg, *args):
        result = real(kernel, cfg, *args)
        return tuple(t * 1.5 for t in result) if cfg == OTHER else result

    monkeypatch.setattr(tune_step, "run_kernel", wrong_for_other)
    rows = tune_step.sweep("cpu", SimulatedGraphs(), shapes=(SHAPE,), seconds=600, replays=1,
                           configs=_two_configs, seq_len=2, embed=8)
    refused = [r for r in rows if not r["rule"]]
    assert all(r["skipped"].startswith("wrong result") and "seconds" not in r for r in refused)
    assert [entry["config"] for entry in tune_step.fastest(rows)] == [rule_step_config(*SHAPE, torch.bfloat16).__dict__] * 2


def test_the_sweep_stops_at_its_deadline():
    rows = tune_step.sweep("cpu", SimulatedGraphs(), shapes=(SHAPE,), seconds=0, replays=1,
                           configs=_two_configs, seq_len=2, embed=8)
    assert all(r["skipped"] == "out of time" for r in rows) and tune_step.fastest(rows) == []


def test_the_committed_table_is_well_formed():
    table = json.loads(tune_step.TUNED_CONFIGS.read_text())
    for entry in table["configs"]:
        StepConfig(**entry["config"])
        kernel, dtype, batch, hidden = entry["key"].split()
        assert kernel in ("fwd", "bwd") and dtype in ("float32", "bfloat16", "float16")
