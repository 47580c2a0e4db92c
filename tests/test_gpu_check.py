"""benchmarks/gpu_check.sh and the summary that decides it, on the CPU: the whole check rehearsed
(--rehearse), a CUDA-only line broken on purpose, a failed registration, the GPU branch's machine
step, and gpu_summary's checks on made-up OUTDIRs."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

from benchmarks import gpu_summary

GRAPHED = "fastlm: 10000 words, 16,256,784 parameters, 1549 steps/epoch, device cuda, LSTM backend triton, CUDA graphs, run folder x\n"
ENDED = "Training time: 9.5 s for 7745 steps and 6 validation passes\n"
STEPS = ("machine", "register", "kernel_tests", "compile", "tune", "benchmarks", "run_full", "run_small")


def gpu_check(*args, env=None, script=REPO / "benchmarks" / "gpu_check.sh", timeout=120):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(script), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def failed(outdir) -> dict[str, str]:
    return {name: detail for name, (ok, detail) in gpu_summary.checks(outdir).items() if not ok}


# -- the script ------------------------------------------------------------------------------------


def test_the_rehearsal_passes_every_check(tmp_path):
    out = tmp_path / "out"
    proc = gpu_check("--rehearse", out, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    checks = json.loads((out / "summary.json").read_text())["checks"]
    assert all(check["passed"] for check in checks.values())
    assert len(checks) == 17 and all((out / f"{step}.status").read_text() == "0\n" for step in STEPS)
    assert not list(out.glob("run-*/*.pt")), "checkpoints are removed once read"
    assert "cudnn_kernels=none: a rehearsal on the CPU has no cuDNN" in (out / "benchmarks.log").read_text()


def test_a_broken_cuda_only_line_fails_the_benchmarks_step(tmp_path):
    # The graphed rows run only on the GPU path: with their graphs built as in the first review
    # (CudaGraphs() without its device), the rehearsal fails the benchmarks step, naming the error.
    copy = tmp_path / "checkout"
    shutil.copytree(REPO / "benchmarks", copy / "benchmarks", ignore=shutil.ignore_patterns("results", "__pycache__"))
    for name in ("kernels", "tests"):
        (copy / name).symlink_to(REPO / name)
    bench = copy / "benchmarks" / "test_train_step.py"
    line = "graphs=graph_api(torch.device(DEVICE)) if capture else None"
    assert line in bench.read_text()
    bench.write_text(bench.read_text().replace(line, "graphs=CudaGraphs() if capture else None")
                     .replace("from fastlm.training.graphs import", "from fastlm.training.graphs import CudaGraphs,"))
    out = tmp_path / "out"
    proc = gpu_check("--rehearse", out, script=copy / "benchmarks" / "gpu_check.sh",
                     env={"GPU_CHECK_STEPS": "benchmarks"}, timeout=300)
    assert proc.returncode == 1
    benchmarks = next(line for line in proc.stdout.splitlines() if line.startswith("FAIL  benchmarks:"))
    assert "exit status 1: FAILED benchmarks/test_train_step.py::" in benchmarks
    assert "TypeError: CudaGraphs.__init__() missing 1 required positional argument: 'device'" in benchmarks


def test_a_failed_registration_is_recorded_and_the_rest_runs_from_the_checkout(tmp_path):
    out = tmp_path / "out"
    proc = gpu_check("--rehearse", out, env={"GPU_CHECK_STEPS": "register", "PIP_CONSTRAINT": str(tmp_path / "none")})
    assert proc.returncode == 1
    assert (out / "register.status").read_text() == "1\n"
    assert f"fastlm.kernels from {out / 'checkout' / 'fastlm' / 'kernels'}" in (out / "register.log").read_text()
    register = failed(out)["register: the checkout installed (pip install -e)"]
    assert register.startswith("exit status 1: ERROR: Could not open requirements file")
    assert register.endswith("the other steps ran from the checkout (OUTDIR/checkout)")


def test_the_gpu_machine_step_reads_nvidia_smi_and_the_versions(tmp_path):
    # The GPU branch of the script, on the CPU: nvidia-smi made up, the rest as on the GPU.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'name, driver_version'\necho 'NVIDIA H200, 570.1'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    out = tmp_path / "out"
    proc = gpu_check(out, env={"GPU_CHECK_STEPS": "machine", "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert proc.returncode == 1, "the other steps did not run"
    log = (out / "machine.log").read_text()
    assert log.startswith("name, driver_version\nNVIDIA H200, 570.1\ncpu ") and f"torch {torch.__version__}" in log
    assert (out / "machine.status").read_text() == "0\n" and (out / ".gpu_check").read_text() == "gpu\n"


def test_gpu_check_refuses_an_outdir_it_did_not_make(tmp_path):
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    proc = gpu_check(tmp_path, timeout=60)
    assert proc.returncode == 2 and "is not empty and not an earlier gpu_check OUTDIR" in proc.stderr
    assert keep.read_text() == "mine"


def test_the_cudnn_kernels_are_read_from_the_cuda_profiler(monkeypatch):
    # The profiler read runs only on CUDA: here with the profiler and the synchronisation recorded.
    from benchmarks import test_lstm_layer

    asked, ran = [], []

    @contextlib.contextmanager
    def profile(activities):
        asked.append(activities)
        names = ["void cudnn::rnn::lstm_fwd_kernel<16>", "aten::addmm", "RNN_blockPersist_fp_LSTM", "aten::lstm"]
        yield SimpleNamespace(key_averages=lambda: [SimpleNamespace(key=name) for name in names])

    monkeypatch.setattr(test_lstm_layer, "CUDA", True)
    monkeypatch.setattr(torch.profiler, "profile", profile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: ran.append("synchronized"))
    kernels = test_lstm_layer._cudnn_kernels(lambda: ran.append("called"))
    assert asked == [[torch.profiler.ProfilerActivity.CUDA]] and ran == ["called", "synchronized"]
    assert kernels == "RNN_blockPersist_fp_LSTM, aten::lstm, void cudnn::rnn::lstm_fwd_kernel<16>"


# -- the summary -----------------------------------------------------------------------------------


def _write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def gpu_check_output(folder, epoch1_ppl: float = 140.0):
    """What a sound gpu_check.sh run on a GPU leaves in its OUTDIR, made up."""
    from fastlm.models.lm import RNNLM

    _write(folder / ".gpu_check", "gpu\n")
    for step in STEPS:
        _write(folder / f"{step}.status", "0\n")
    records = [{"split": "train", "global_step": 300, "loss": 5.1},
               {"split": "valid", "epoch": 1, "ppl": epoch1_ppl}, {"split": "valid", "epoch": 2, "ppl": epoch1_ppl - 10},
               {"split": "test", "weights": "last", "ppl": 120.0}]
    _write(folder / "run-full" / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    torch.save({"model": RNNLM(30, 8, 16).state_dict()}, folder / "run-full" / "checkpoint.pt")
    _write(folder / "run_full.log", GRAPHED + ENDED)
    _write(folder / "run_small.log", GRAPHED + ENDED)
    rows = [{"key": key, "rule": rule, "seconds": 1e-4} for key in ("fwd bfloat16 B20 H1024", "bwd bfloat16 B20 H1024")
            for rule in (True, False)]
    _write(folder / "tune_step.json", json.dumps({"rows": rows}))
    _write(folder / "cuda-1.json", json.dumps({"results": [
        {"group": "g", "provider": provider, "median_s": 0.001, "speedup_vs_baseline": 3.0}
        for provider in sorted(gpu_summary.GPU_ROWS)]}))
    return folder


def test_a_sound_run_passes_and_its_figures_are_gathered(tmp_path):
    out = gpu_check_output(tmp_path, epoch1_ppl=145.0)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_summary", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASS") == 16 and "FAIL" not in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    run = summary["default_run"]
    assert run["valid_ppl_by_epoch"] == [145.0, 135.0] and run["training_seconds"] == 9.5 and run["steps"] == 7745
    assert run["step_300_loss"] == 5.1 and len(summary["benchmarks"]) == len(gpu_summary.GPU_ROWS)


@pytest.mark.parametrize("step, check", [
    ("machine", "machine: the device and the versions read"),
    ("kernel_tests", "kernel tests: the fused kernel's tests pass"),
    ("compile", "compile: every sweep candidate built, the rule's configurations included"),
    ("tune", "tuning: the sweep timed the rule's configuration for every kernel and shape"),
    ("benchmarks", "benchmarks: every GPU row of the layer and step benchmarks measured"),
])
@pytest.mark.parametrize("status, ended", [
    ("1", "exit status 1"), ("124", "cut by its timeout (exit 124)"),
    ("137", "killed (exit 137): by its timeout's KILL, or out of memory"),
])
def test_a_failed_or_timed_out_step_fails_its_check(tmp_path, step, check, status, ended):
    out = gpu_check_output(tmp_path)
    _write(out / f"{step}.status", f"{status}\n")
    _write(out / f"{step}.log", "....F\nFAILED tests/test_kernels.py::test_x - AssertionError\n1 failed\n")
    assert failed(out) == {check: f"{ended}: FAILED tests/test_kernels.py::test_x - AssertionError"}


def test_a_run_killed_mid_epoch_fails_and_its_parameters_are_not_judged(tmp_path):
    out = gpu_check_output(tmp_path)
    _write(out / "run_full.status", "124\n")
    _write(out / "run_full.log", GRAPHED + "SIGTERM: stopping after this step and saving a checkpoint\n"
           "Stopped at epoch 1, step 74/1549; saved x/checkpoint.pt. Continue with: ...\n" + ENDED)
    assert failed(out) == {"the default run ran to its end": "cut by its timeout (exit 124): " + ENDED.strip(),
                           "the default run ended within its timeout": "cut by its timeout (exit 124)",
                           "parameters are not degenerate": "the default run did not finish"}


def test_a_run_stopped_by_a_signal_from_elsewhere_did_not_run_to_its_end(tmp_path):
    out = gpu_check_output(tmp_path)
    stopped = "Stopped at epoch 1, step 74/1549; saved x/checkpoint.pt. Continue with: ..."
    _write(out / "run_small.log", GRAPHED + stopped + "\n" + ENDED)  # the trainer exits 0 then
    assert failed(out) == {"the small recipe (dropout, SGD) ran to its end": stopped}


@pytest.mark.parametrize("line, check", [
    ("CUDA graphs off: the capture failed (x); training eagerly from the same weights",
     "the default run trained on CUDA graphs, with the fused kernel"),
    ("CUDA graph capture of validation failed (x): validating eagerly",
     "the default run validated on a captured graph"),
], ids=["training", "validation"])
def test_a_capture_that_fell_back_to_eager_fails(tmp_path, line, check):
    out = gpu_check_output(tmp_path)
    _write(out / "run_full.log", GRAPHED + line + "\n" + ENDED)
    assert failed(out) == {check: line}


def test_a_run_on_another_path_fails(tmp_path):
    out = gpu_check_output(tmp_path)
    _write(out / "run_small.log", GRAPHED.replace("triton, CUDA graphs", "torch, eager steps") + ENDED)
    assert failed(out) == {"the small recipe (dropout, SGD) trained on CUDA graphs, with the fused kernel":
                           "its first line names another path"}


def test_a_failed_registration_fails_though_the_rest_passed(tmp_path):
    out = gpu_check_output(tmp_path)
    _write(out / "register.status", "1\n")
    _write(out / "register.log", "ERROR: setuptools>=64 is not installed\n")
    assert failed(out) == {"register: the checkout installed (pip install -e)":
                           "exit status 1: ERROR: setuptools>=64 is not installed; the other steps ran from the "
                           "checkout (OUTDIR/checkout)"}


def test_a_sweep_that_timed_no_rule_or_benchmarks_that_skipped_a_row_fail(tmp_path):
    out = gpu_check_output(tmp_path)
    rows = [{"key": "fwd bfloat16 B20 H1024", "rule": True, "skipped": "failed: RuntimeError: x"}]
    _write(out / "tune_step.json", json.dumps({"rows": rows}))
    _write(out / "cuda-1.json", json.dumps({"results": [{"provider": "plain"}]}))
    problems = failed(out)
    assert problems.pop(gpu_summary.STEPS["tune"]) == ("the rule's configuration was not timed for "
                                                       "fwd bfloat16 B20 H1024 (failed: RuntimeError: x)")
    assert problems.pop(gpu_summary.STEPS["benchmarks"]).startswith("missing rows: fastlm-eager-bf16-cudnn, ")
    assert not problems


@pytest.mark.parametrize("epoch1_ppl, zeroed, check", [
    (150.0, False, "epoch-1 validation perplexity within 5%"),  # 6% above the CPU's 141.48
    (140.0, True, "parameters are not degenerate"),
])
def test_an_unsound_model_fails(tmp_path, epoch1_ppl, zeroed, check):
    out = gpu_check_output(tmp_path, epoch1_ppl)
    if zeroed:  # the first review's capture zeroed the model
        model = torch.load(out / "run-full" / "checkpoint.pt", weights_only=True)["model"]
        torch.nn.init.zeros_(model["linear.weight"])
        torch.save({"model": model}, out / "run-full" / "checkpoint.pt")
    assert list(failed(out)) == [check]


def test_a_rehearsal_is_held_to_its_eager_fp32_reference_run(tmp_path):
    out = gpu_check_output(tmp_path, epoch1_ppl=12.0)
    _write(out / ".gpu_check", "rehearsal\n")
    _write(out / "run_reference.status", "0\n")
    _write(out / "run-reference" / "metrics.jsonl", json.dumps({"split": "valid", "epoch": 1, "ppl": 12.5}) + "\n")
    assert failed(out) == {}
    _write(out / "run-reference" / "metrics.jsonl", json.dumps({"split": "valid", "epoch": 1, "ppl": 11.0}) + "\n")
    assert list(failed(out)) == ["epoch-1 validation perplexity within 5%"]


def test_a_results_file_cut_while_writing_fails_its_check_without_crashing(tmp_path):
    (tmp_path / "tune.status").write_text("0\n")
    (tmp_path / "tune_step.json").write_text('{"rows": [')
    (tmp_path / "cuda-20261206.json").write_text('{"results": [')
    found = failed(tmp_path)
    assert "unreadable" in found["tuning: the sweep timed the rule's configuration for every kernel and shape"]
    assert gpu_summary.summarize(tmp_path)["benchmarks"] == []
