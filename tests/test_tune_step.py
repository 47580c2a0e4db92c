"""The block-configuration sweep (benchmarks/tune_step.py) and the table step_config reads, on the CPU:
interpreted kernels, graphs simulated, tiny shapes."""
import json
import sys

import pytest
import torch

from benchmarks import tune_step
from fastlm.kernels.fused_lstm import StepConfig, rule_step_config, step_config
from fastlm.training import simulated_graphs
from fastlm.training.simulated_graphs import SimulatedGraphs

SHAPE = (3, 16)  # B, H
OTHER = StepConfig(16, 16, 32, 4, 3)
RULE = rule_step_config(*SHAPE, torch.bfloat16)


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
    table = tune_step.fastest(rows, "cpu")
    assert [entry["key"] for entry in table] == ["fwd bfloat16 B3 H16", "bwd bfloat16 B3 H16"]

    # A table naming OTHER for the backward at this shape on this device: step_config takes it there,
    # the rule for other shapes, dtypes and GPUs.
    path = tmp_path / "step_configs.json"
    entry = {"gpu": "cpu", "key": "bwd bfloat16 B3 H16", "config": OTHER.__dict__}
    path.write_text(json.dumps({"configs": [entry, {**entry, "gpu": "NVIDIA H200", "config": RULE.__dict__}]}))
    monkeypatch.setattr(fused_module, "TUNED_CONFIGS", path)
    fused_module.tuned_configs.cache_clear()
    cpu = torch.device("cpu")
    assert step_config(3, 16, torch.bfloat16, "bwd", cpu) == OTHER
    assert step_config(3, 16, torch.bfloat16, "fwd", cpu) == RULE
    assert step_config(3, 16, torch.float32, "bwd", cpu) == rule_step_config(3, 16, torch.float32)
    assert step_config(3, 16, torch.bfloat16, "bwd") == RULE, "no device: the rule"
    monkeypatch.setattr(fused_module, "device_name", lambda device: "NVIDIA A100")
    assert step_config(3, 16, torch.bfloat16, "bwd", cpu) == RULE, "another GPU's winner does not apply"

    # The launchers read it: the backward with OTHER gives the rule's result (and ran: it was asked for).
    asked = []
    real = fused_module.step_config
    monkeypatch.setattr(fused_module, "device_name", lambda device: "cpu")
    monkeypatch.setattr(fused_module, "step_config", lambda *a: asked.append(real(*a)) or asked[-1])
    inputs, saved, upstream = tune_step.layer(*SHAPE, "cpu", seq_len=2, embed=8)
    fused_module.lstm_backward(*upstream, *inputs[:5], *saved)
    assert asked == [OTHER]


def test_a_winner_must_beat_the_rule_by_the_margin_and_other_gpus_entries_are_kept(tmp_path):
    rows = [{"key": "k", "rule": True, "seconds": 1.0, "config": {"rule": 1}},
            {"key": "k", "rule": False, "seconds": 0.98, "config": {"other": 1}},
            {"key": "j", "rule": True, "seconds": 1.0, "config": {"rule": 1}},
            {"key": "j", "rule": False, "seconds": 0.90, "config": {"other": 1}},
            {"key": "j", "rule": False, "skipped": "failed: OutOfResources", "config": {"big": 1}}]
    table = tune_step.fastest(rows, "gpu-a")
    assert [(e["key"], e["config"]) for e in table] == [("k", {"rule": 1}), ("j", {"other": 1})]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"configs": [{"gpu": "gpu-b", "key": "k"}, {"gpu": "gpu-a", "key": "old"}]}))
    assert [(e["gpu"], e["key"]) for e in tune_step.merged(path, table, "gpu-a")] == [
        ("gpu-b", "k"), ("gpu-a", "k"), ("gpu-a", "j")]


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
    assert [entry["config"] for entry in tune_step.fastest(rows, "cpu")] == [RULE.__dict__] * 2


def test_a_configuration_that_fails_to_run_is_recorded_and_passed_over(monkeypatch):
    real = tune_step.run_kernel

    def too_big_for_this_gpu(kernel, cfg, *args):
        if cfg == OTHER:
            raise RuntimeError("out of resource: shared memory, Required: 196608, Hardware limit: 166912")
        return real(kernel, cfg, *args)

    monkeypatch.setattr(tune_step, "run_kernel", too_big_for_this_gpu)
    rows = tune_step.sweep("cpu", SimulatedGraphs(), shapes=(SHAPE,), seconds=600, replays=1,
                           configs=_two_configs, seq_len=2, embed=8)
    assert [r.get("skipped", "timed")[:31] for r in rows] == ["timed", "failed: RuntimeError: out of re"] * 2


def test_the_committed_table_is_well_formed():
    table = json.loads(tune_step.TUNED_CONFIGS.read_text())
    for entry in table["configs"]:
        StepConfig(**entry["config"])
        assert entry["gpu"]
        kernel, dtype, batch, hidden = entry["key"].split()
        assert kernel in ("fwd", "bwd") and dtype in ("float32", "bfloat16", "float16")


def test_the_compile_warm_up_runs_each_candidate_and_passes_over_failures(monkeypatch):
    real = tune_step.run_kernel
    monkeypatch.setattr(tune_step, "run_kernel", lambda kernel, cfg, *args: (_ for _ in ()).throw(
        RuntimeError("out of resource")) if cfg == OTHER else real(kernel, cfg, *args))
    items = [(kernel, *SHAPE, cfg) for kernel in tune_step.KERNELS for cfg in _two_configs(*SHAPE)]
    assert tune_step._warm(items, "cpu", seq_len=2, embed=8) == 2, "the rule ran, the failing candidate was skipped"


def test_replays_are_timed_between_device_synchronisations(monkeypatch):
    syncs, runs, replays = [], [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(1))
    replay = simulated_graphs.SimulatedGraph.replay
    monkeypatch.setattr(simulated_graphs.SimulatedGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    seconds = tune_step.time_replays(lambda: runs.append(1), SimulatedGraphs(), replays=3, device="cuda")
    assert seconds >= 0 and len(syncs) == 10, "before and after each of the five timed batches"
    assert len(runs) == 2, "the Python runs for the warm-up and the capture; a replay runs the record"
    assert len(replays) == 5 * 3


def test_the_sweep_needs_a_compiled_kernel_on_a_gpu(capsys):
    assert tune_step.main([]) == 2
    assert "the sweep times compiled kernels on a CUDA GPU" in capsys.readouterr().err


def test_a_sweep_out_of_time_still_times_the_rule_of_every_shape():
    # The summary fails a sweep that left a rule untimed: a slow GPU must still give every baseline.
    rows = tune_step.sweep("cpu", SimulatedGraphs(), shapes=(SHAPE,), seconds=0, replays=1, configs=_two_configs,
                           seq_len=2, embed=8)
    assert [("seconds" in r, r.get("skipped")) for r in rows] == [(True, None), (False, "out of time")] * 2
    assert [entry["config"] == RULE.__dict__ for entry in tune_step.fastest(rows, "cpu")] == [True, True]
