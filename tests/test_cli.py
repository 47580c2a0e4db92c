"""What the entry points share (fastlm/cli.py): one line per error, printed once under torchrun, and
signals that unwind (cleaning up what was set up) and end with the conventional exit codes."""
import os
import signal
import subprocess
import sys
import time

import pytest

from fastlm.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, run_main
from fastlm.errors import UsageError


def _fails(argv):
    raise UsageError("a bad flag: use a good one")


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)], ids=["rank-0", "rank-1"])
def test_under_torchrun_only_rank_0_prints_the_error(monkeypatch, capsys, rank, printed):
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as exit_info:
        run_main(_fails, [])
    assert exit_info.value.code == EXIT_USAGE, "every rank exits with the same code"
    assert capsys.readouterr().err == ("error: a bad flag: use a good one\n" if printed else "")


# A training whose start-up (reading the corpus) or checkpoint writes take seconds, so that signals
# reach it there; it says where it is on stdout.
SLOW = """
import sys, time
import fastlm.checkpoint, fastlm.training.trainer as trainer
real_load, real_save = trainer.load_corpus, fastlm.checkpoint.torch.save
def slow_load(*args, **kwargs):
    print("LOADING", flush=True); time.sleep(float(sys.argv[2])); return real_load(*args, **kwargs)
def slow_save(obj, path):
    print("SAVING", flush=True); time.sleep(3); real_save(obj, path)
trainer.load_corpus, fastlm.checkpoint.torch.save = slow_load, slow_save
from fastlm.cli import run_main
from fastlm.train import main
run_main(main, ["--data", sys.argv[3], "--out", sys.argv[1], "--embed-size", "8", "--hidden-size", "8",
                "--batch-size", "4", "--seq-len", "5", "--eval-batch-size", "3", "--epochs", "50",
                "--log-interval", "1", "--device", "cpu"])
"""


def _start(run, corpus_dir, load_seconds):
    return subprocess.Popen([sys.executable, "-c", SLOW, str(run), str(load_seconds), str(corpus_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, prefix):
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"the run ended before printing {prefix!r}: {proc.stderr.read()}")


def test_sigterm_during_start_up_leaves_no_run_folder(corpus_dir, tmp_path):
    run = tmp_path / "run"
    proc = _start(run, corpus_dir, load_seconds=30)
    _wait_for(proc, "LOADING")
    assert (run / ".lock").exists(), "the folder is open and locked by now"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_TERMINATED and err == "terminated\n"
    assert not run.exists(), "a folder holding only its lock is removed"


def test_more_ctrl_c_while_saving_ends_quietly_with_130(corpus_dir, tmp_path):
    run = tmp_path / "run"
    proc = _start(run, corpus_dir, load_seconds=0)
    _wait_for(proc, "First step")
    proc.send_signal(signal.SIGINT)  # the first asks the loop to stop and save
    _wait_for(proc, "SAVING")
    time.sleep(0.5)
    for _ in range(3):  # the second aborts the save; the rest arrive while the program exits
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED and err == "interrupted\n"
    assert not list(run.glob(".*.tmp")), "the aborted write left no temporary file"
    assert not os.path.exists(run / "checkpoint.pt") or (run / "checkpoint.pt").stat().st_size > 0


def test_a_closed_terminal_stops_training_politely(corpus_dir, tmp_path):
    run = tmp_path / "run"
    proc = _start(run, corpus_dir, load_seconds=0)
    _wait_for(proc, "First step")
    proc.send_signal(signal.SIGHUP)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED
    assert "SIGHUP: stopping after this step and saving a checkpoint" in out
    assert (run / "checkpoint.pt").is_file(), "the run can be resumed"


def test_a_word_the_terminal_cannot_show_is_escaped_not_a_crash():
    script = "from fastlm.cli import run_main; run_main(lambda argv: print('café 東京') or 0, [])"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "ascii"}, timeout=60)
    assert proc.returncode == 0 and proc.stdout == b"caf\\xe9 \\u6771\\u4eac\n", proc.stderr
