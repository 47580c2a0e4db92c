"""The benchmarks' tools: `python -m benchmarks.plot` and the plain loop served from its own process.
(gpu_check.sh and gpu_summary.py: tests/test_gpu_check.py.)"""
import json
import subprocess
import sys

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

