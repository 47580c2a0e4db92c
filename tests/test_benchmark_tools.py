"""The benchmarks' tools: `python -m benchmarks.plot` and the plain loop served from its own process."""
import json
import subprocess
import sys

import pytest

from conftest import REPO


def plot(*paths):
    return subprocess.run([sys.executable, "-m", "benchmarks.plot", *map(str, paths)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_plot_draws_a_png_beside_each_result(tmp_path):
    rows = [{"group": "g", "provider": name, "baseline": name == "plain", "median_s": median, "iqr_s": 0.01,
             "speedup_vs_baseline": 0.3 / median} for name, median in (("plain", 0.3), ("fastlm", 0.2))]
    result = tmp_path / "cpu-test.json"
    result.write_text(json.dumps({"machine": {"cpu": "test cpu", "torch": "x"}, "time": "t", "results": rows}))
    proc = plot(result)
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / "cpu-test.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stdout.strip() == f"wrote {png}"


def test_plot_refuses_what_is_not_a_result_in_one_line(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"configs": []}))
    for path, reason in ((tmp_path / "missing.json", "cannot be read"), (other, "is not a saved benchmark result")):
        proc = plot(path)
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1 and reason in proc.stderr


def test_the_plain_loop_serves_steps_from_its_own_process():
    # The train-step benchmark's as-it-comes baseline: one step per "step" line, each answered with
    # its seconds, and a clean exit when stdin closes.
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.classic", "--serve"], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "ready"
        times = []
        for _ in range(2):
            proc.stdin.write("step\n")
            proc.stdin.flush()
            times.append(float(proc.stdout.readline()))
        assert all(0 < t < 60 for t in times)
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_the_plain_loop_module_says_what_it_needs():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.classic"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "pass --serve" in proc.stderr


GRAPHED = "fastlm: 10000 words, 1549 steps/epoch, device cuda, LSTM backend triton, CUDA graphs, run folder x\n"


def _gpu_check_output(folder, epoch1_ppl: float, zero_output_layer: bool = False, kernel_status: str = "0",
                      log: str = GRAPHED):
    """What gpu_check.sh leaves in its OUTDIR, made up: a run folder, logs, a benchmark result."""
    import torch

    from fastlm.model import RNNLM

    run = folder / "run-full"
    run.mkdir(parents=True)
    (folder / "kernel_tests.status").write_text(kernel_status + "\n")
    records = [{"split": "train", "global_step": 300, "loss": 5.1}, {"split": "valid", "epoch": 1, "ppl": epoch1_ppl},
               {"split": "valid", "epoch": 2, "ppl": epoch1_ppl - 10}, {"split": "test", "weights": "last", "ppl": 120.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    model = RNNLM(30, 8, 16)
    if zero_output_layer:
        torch.nn.init.zeros_(model.linear.weight)
    torch.save({"model": model.state_dict()}, run / "checkpoint.pt")
    (folder / "train_full.txt").write_text(log + "Training time: 9.5 s for 7745 steps and 6 validation passes\n")
    (folder / "train_small.txt").write_text(GRAPHED)
    (folder / "cuda-1.json").write_text(json.dumps({"results": [
        {"group": "g", "provider": "fastlm-graphs-bf16", "median_s": 0.001, "speedup_vs_baseline": 3.0}]}))
    return folder


def gpu_summary(folder):
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_summary", str(folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_gpu_summary_passes_a_sound_run_and_gathers_the_readme_figures(tmp_path):
    proc = gpu_summary(_gpu_check_output(tmp_path / "out", epoch1_ppl=145.0))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASS") == 5 and "FAIL" not in proc.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    run = summary["default_run"]
    assert run["valid_ppl_by_epoch"] == [145.0, 135.0] and run["training_seconds"] == 9.5 and run["steps"] == 7745
    assert run["step_300_loss"] == 5.1 and summary["benchmarks"][0]["provider"] == "fastlm-graphs-bf16"


@pytest.mark.parametrize("changes, failed", [
    ({"epoch1_ppl": 150.0}, "epoch-1 validation perplexity within 5%"),  # 6% above the CPU's 141.48
    ({"epoch1_ppl": 140.0, "zero_output_layer": True}, "parameters are not degenerate: linear.weight is constant"),
    ({"epoch1_ppl": 140.0, "kernel_status": "1"}, "kernel tests pass on the compiled kernel"),
    ({"epoch1_ppl": 140.0, "log": GRAPHED + "CUDA graphs off: the capture failed (x); training eagerly\n"},
     "the default run is graphed, with the fused kernel: CUDA graphs off: the capture failed"),
    ({"epoch1_ppl": 140.0, "log": GRAPHED.replace("triton, CUDA graphs", "torch, eager steps")},
     "the default run is graphed, with the fused kernel: its first line names another path"),
], ids=["perplexity-off", "zeroed-model", "kernel-tests-failed", "fell-back-to-eager", "never-graphed"])
def test_gpu_summary_fails_loudly(tmp_path, changes, failed):
    proc = gpu_summary(_gpu_check_output(tmp_path / "out", **changes))
    assert proc.returncode == 1
    assert [line for line in proc.stdout.splitlines() if line.startswith("FAIL")][0].startswith(f"FAIL  {failed}")


def test_gpu_check_refuses_an_outdir_it_did_not_make(tmp_path):
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "is not empty and not an earlier gpu_check OUTDIR" in proc.stderr
    assert keep.read_text() == "mine"
