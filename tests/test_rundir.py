"""What a run never loses: its folder belongs to one run and one process, a diverged model is never
saved, a full disk or a kill leaves whole files, and every record of metrics.jsonl is whole and once."""
import errno
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from fastlm import checkpoint as checkpoint_module
from fastlm.checkpoint import load_checkpoint
from fastlm.cli import run_main
from fastlm.config import TrainConfig
from fastlm.errors import RunFolderError, TrainingError
from fastlm.train import main as train_main
from fastlm.training import rundir as run_module
from fastlm.training import trainer as trainer_module
from fastlm.training.rundir import RunFolder
from fastlm.training.trainer import train


def tiny(corpus_dir, out, **changes) -> TrainConfig:
    cfg = TrainConfig(data=str(corpus_dir), embed_size=16, hidden_size=32, epochs=2, batch_size=4, seq_len=5,
                      lr=0.01, log_interval=1, eval_batch_size=3, out=str(out), device="cpu")
    return replace(cfg, **changes)


def cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_main(train_main, [str(a) for a in argv])
    err = capsys.readouterr().err
    return exit_info.value.code, err


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- divergence ------------------------------------------------------------------------------------

def _diverge_from_call(monkeypatch, first: int) -> None:
    """Make the loss NaN from the `first`-th cross-entropy on: the step's backward then NaNs the weights."""
    real, calls = torch.nn.functional.cross_entropy, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= first else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)


ARGS = ["--embed-size", 16, "--hidden-size", 32, "--batch-size", 4, "--seq-len", 5, "--device", "cpu"]


def test_a_divergence_between_log_points_is_never_saved(corpus_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert cli(["--data", corpus_dir, "--out", run, *ARGS, "--max-steps", 1, "--log-interval", 1], capsys)[0] == 0
    saved = (run / "checkpoint.pt").read_bytes()
    _diverge_from_call(monkeypatch, 3)
    code, err = cli(["--resume", run, "--max-steps", 6, "--log-interval", 100], capsys)
    assert code == 1 and err.count("\n") == 1
    assert f"stopped without saving: {run / 'checkpoint.pt'} keeps step 1 (try a lower --lr)" in err
    assert (run / "checkpoint.pt").read_bytes() == saved, "the checkpoint of step 1 is left as it was"


def test_a_fresh_run_that_diverges_says_it_saved_nothing(corpus_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _diverge_from_call(monkeypatch, 2)
    code, err = cli(["--data", corpus_dir, "--out", run, *ARGS, "--max-steps", 6, "--log-interval", 100], capsys)
    assert code == 1 and f"stopped without saving: no checkpoint was written to {run}" in err
    assert not (run / "checkpoint.pt").exists()


# -- one run, one process per folder ---------------------------------------------------------------

def test_a_fresh_run_refuses_a_folder_that_holds_a_run(corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(corpus_dir, run, max_steps=5))
    before = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    code, err = cli(["--data", corpus_dir, "--out", run, "--device", "cpu"], capsys)
    assert code == 2 and f"{run} already holds a run: continue it with --resume {run}, or pick another --out" in err
    assert {name: (run / name).read_bytes() for name in before} == before


def test_a_folder_with_only_the_records_of_a_run_says_how_to_start_over(corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"split": "train", "global_step": 1, "loss": NaN}\n')
    code, err = cli(["--data", corpus_dir, "--out", run, "--device", "cpu"], capsys)
    assert code == 2 and "holds a metrics.jsonl but no checkpoint" in err and "remove" in err


def test_a_second_process_is_refused_and_a_killed_one_leaves_no_lock(corpus_dir, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fastlm.training.rundir import RunFolder; "
                               f"folder = RunFolder({str(run)!r}); folder.open(fresh=True); "
                               "print('locked', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError, match=rf"is in use by another training \(pid {holder.pid}\): wait for it"):
            train(tiny(corpus_dir, run, max_steps=2))
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    assert train(tiny(corpus_dir, run, max_steps=2)).global_step == 2


def _file(tmp, *below):
    (tmp / "file").write_text("x")
    return tmp.joinpath("file", *below)


@pytest.mark.parametrize("make_bad, reason", [
    (lambda tmp: _file(tmp), "File exists"),
    (lambda tmp: _file(tmp, "run"), "Not a directory"),
    (lambda tmp: "/proc/fastlm-run", "No such file or directory"),
], ids=["a-file", "under-a-file", "under-proc"])
def test_an_unusable_out_is_one_line(corpus_dir, tmp_path, capsys, make_bad, reason):
    out = make_bad(tmp_path)
    code, err = cli(["--data", corpus_dir, "--out", out, "--device", "cpu"], capsys)
    assert code == 2 and err == f"error: cannot use {out} as the run folder ({reason}): pick another --out\n"


def test_resuming_from_best_pt_refuses_to_roll_back_the_checkpoint(corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(corpus_dir, run, epochs=2, max_steps=150))  # best.pt at step 132, checkpoint.pt at 150
    code, err = cli(["--resume", run / "best.pt", "--max-steps", 160], capsys)
    assert code == 2 and "(step 132) in" in err and "would overwrite" in err and "(step 150)" in err
    assert load_checkpoint(run)["global_step"] == 150
    branch = tmp_path / "from-best"
    code, _ = cli(["--resume", run / "best.pt", "--out", branch, "--max-steps", 140], capsys)
    assert code == 0 and load_checkpoint(branch)["global_step"] == 140 and load_checkpoint(run)["global_step"] == 150


def test_stale_temporary_files_of_killed_writes_are_removed(corpus_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny(corpus_dir, run, max_steps=3))
    stale = run / ".checkpoint.pt.99999.tmp"
    stale.write_bytes(b"half a checkpoint")
    train(TrainConfig(), resume=str(run), overrides={"max_steps": 5})
    assert not stale.exists()


# -- whole files ---------------------------------------------------------------------------------

def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(corpus_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train(tiny(corpus_dir, run, max_steps=3))
    before = (run / "checkpoint.pt").read_bytes()

    def full_disk(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 part of it")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 369280 vs 369168")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    code, err = cli(["--resume", run, "--max-steps", 5], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"cannot write {run / 'checkpoint.pt'} (the write failed: is the disk full?)" in err
    assert "the checkpoint.pt already there is intact" in err and "then --resume the run" in err
    assert "inline_container" not in err, "torch's internals are no reason a user can act on"
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not list(run.glob(".*.tmp"))


def test_a_disk_full_before_the_first_checkpoint_says_to_start_again(corpus_dir, tmp_path, monkeypatch, capsys):
    def full_disk(obj, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    run = tmp_path / "run"
    code, err = cli(["--data", corpus_dir, "--out", run, "--embed-size", 8, "--hidden-size", 8, "--batch-size", 4,
                     "--seq-len", 5, "--eval-batch-size", 3, "--max-steps", 2, "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "(No space left on device): nothing was saved there; free some space, then start the run again" in err
    assert "--resume" not in err, "there is nothing to resume"


def test_a_record_cut_short_by_a_full_disk_is_taken_back(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path / "run")
    folder.open(fresh=True)
    folder.append({"split": "train", "global_step": 1, "loss": 2.5})
    intact = (folder.path / "metrics.jsonl").read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 8:
            return real_write(fd, data[:8])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_module.os, "write", half_then_full)
    with pytest.raises(RunFolderError, match="No space left on device.*earlier records are intact"):
        folder.append({"split": "train", "global_step": 2, "loss": 2.4})
    assert (folder.path / "metrics.jsonl").read_bytes() == intact
    folder.close()


def test_a_resumed_run_writes_each_step_once_even_after_a_crash(corpus_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny(corpus_dir, run, max_steps=20))
    # What a run killed after step 23 leaves: records past its checkpoint (step 20), the last one torn.
    with open(run / "metrics.jsonl", "a") as metrics:
        for step in (21, 22, 23):
            metrics.write(json.dumps({"split": "train", "global_step": step, "loss": 9.0}) + "\n")
        metrics.write('{"split": "train", "glo')
    train(TrainConfig(), resume=str(run), overrides={"max_steps": 30})
    steps = [r["global_step"] for r in records(run) if r["split"] == "train"]
    assert steps == list(range(1, 31)) and all(r["loss"] != 9.0 for r in records(run))


# -- checkpoints that cannot be used ---------------------------------------------------------------

def _tamper(run, change):
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, run / "checkpoint.pt")


@pytest.mark.parametrize("change, message", [
    (lambda run: (run / "checkpoint.pt").write_bytes(b""), "is empty (a write that never finished?)"),
    (lambda run: _tamper(run, lambda c: c.update(format=99)), "has checkpoint format 99, this fastlm reads format 1"),
    (lambda run: _tamper(run, lambda c: c.pop("vocab")), "lacks vocab: it is not a complete fastlm checkpoint"),
    (lambda run: _tamper(run, lambda c: c.pop("optimizer")), "lacks optimizer: it is not a complete"),
    (lambda run: _tamper(run, lambda c: c["model"].update({"linear.bias": torch.zeros(3)})),
     "its weights do not fit the model its config describes (size mismatch for linear.bias"),
    (lambda run: _tamper(run, lambda c: c["model"]["linear.weight"].fill_(float("nan"))),
     "holds non-finite weights (linear.weight): that run diverged"),
    (lambda run: torch.save({"model": {}, "config": {}, "format": 1, "evil": object.__new__(RunFolder)},
                            run / "checkpoint.pt"), "holds Python objects besides tensors and numbers"),
    (lambda run: (run / "checkpoint.pt").write_bytes(b"<html><body>404 Not Found</body></html>"),
     "is not a checkpoint (not a file torch.save wrote)"),
    (lambda run: (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:4000]),
     "is not a readable checkpoint (damaged, or not one fastlm wrote)"),
    (lambda run: _tamper(run, lambda c: c.update(config={})),
     "lacks config['data'], config['embed_size'], config['hidden_size'], config['num_layers'], config['seq_len'], "
     "config['eval_batch_size']: it is not a complete"),
    (lambda run: _tamper(run, lambda c: c["config"].pop("hidden_size")), "lacks config['hidden_size']"),
], ids=["zero-bytes", "format-99", "no-vocab", "no-optimizer", "wrong-shape", "nan-weights", "pickled-object",
        "html-page", "truncated", "empty-config", "config-without-hidden-size"])
def test_a_checkpoint_that_cannot_be_used_is_one_line_everywhere(tiny_run, tmp_path, capsys, change, message):
    from fastlm.embed import main as embed_main
    from fastlm.evaluate import main as evaluate_main
    from fastlm.sample import main as sample_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((tiny_run / "checkpoint.pt").read_bytes())
    change(run)
    entry_points = [(train_main, ["--resume", run])]
    if "optimizer" not in message:  # inference needs no optimizer
        entry_points += [(evaluate_main, ["--checkpoint", run, "--device", "cpu"]),
                         (sample_main, ["--checkpoint", run, "--out", tmp_path / "s.txt", "--device", "cpu"]),
                         (embed_main, ["distance", "w1", "w2", "--checkpoint", run])]
    for main, argv in entry_points:
        with pytest.raises(SystemExit) as exit_info:
            run_main(main, [str(a) for a in argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (main.__module__, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (main.__module__, err)
        assert "weights_only=False" not in err


def test_sigint_while_starting_up_exits_quietly():
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['-m']; import fastlm, os, signal, time; "
                           "os.kill(os.getpid(), signal.SIGINT); time.sleep(30)"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 130 and proc.stderr == "interrupted\n"


def test_bad_input_leaves_no_run_folder_behind(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = cli(["--data", tmp_path / "nowhere", "--out", run, "--device", "cpu"], capsys)
    assert code == 2 and "lacks train.txt" in err and not run.exists()


# -- round 3 ---------------------------------------------------------------------------------------

def test_a_resume_on_another_training_text_is_refused(corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(corpus_dir, run, max_steps=3))
    shorter = tmp_path / "shorter"
    shorter.mkdir()
    for split in ("train", "valid", "test"):
        lines = (corpus_dir / f"{split}.txt").read_text().splitlines()
        (shorter / f"{split}.txt").write_text("\n".join(lines[: len(lines) // 3]) + "\n")
    before = (run / "checkpoint.pt").read_bytes()
    code, err = cli(["--resume", run, "--data", shorter, "--max-steps", 6], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"--data {shorter}: its train.txt is not the text this run trained on" in err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(run)["data"]["train_words"] == sum(
        len(line.split()) + 1 for line in (corpus_dir / "train.txt").read_text().splitlines())


def test_a_metrics_file_with_foreign_bytes_still_resumes(corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(corpus_dir, run, max_steps=3))
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe not UTF-8 \x80\n[1, 2]\n")
    code, err = cli(["--resume", run, "--max-steps", 5], capsys)
    assert code == 0, err
    assert [r["global_step"] for r in records(run) if r["split"] == "train"] == [1, 2, 3, 4, 5]


def test_an_infinite_perplexity_is_written_as_valid_json_and_read_back(tmp_path):
    import math

    from fastlm.training.rundir import read_metrics

    folder = RunFolder(tmp_path / "run")
    folder.open(fresh=True)
    folder.append({"split": "valid", "loss": 800.0, "ppl": math.inf})
    line = (folder.path / "metrics.jsonl").read_text()
    assert "Infinity" not in line and json.loads(line)["ppl"] is None  # strict JSON readers accept it
    assert read_metrics(folder.path) == [{"split": "valid", "loss": 800.0, "ppl": math.inf}]


def test_bad_input_leaves_no_folder_it_created(corpus_dir, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "run"
    code, err = cli(["--data", tmp_path / "no-corpus", "--out", out, "--device", "cpu"], capsys)
    assert code == 2 and "lacks train.txt" in err
    assert not (tmp_path / "new").exists(), "the parents it created for the run folder are gone too"
    (tmp_path / "kept").mkdir()
    code, err = cli(["--data", tmp_path / "no-corpus", "--out", tmp_path / "kept" / "run", "--device", "cpu"], capsys)
    assert code == 2 and (tmp_path / "kept").is_dir(), "a folder that was there stays"


def test_a_run_file_that_is_a_fifo_is_refused_instead_of_blocking(corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(corpus_dir, run, max_steps=3))
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")  # a write to it would wait for a reader forever
    code, err = cli(["--resume", run, "--max-steps", 5], capsys)
    assert code == 2 and f"{run / 'metrics.jsonl'} is not a regular file" in err


def test_a_refused_folder_that_is_not_a_run_keeps_nothing_of_the_attempt(corpus_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text("my own notes, not JSON\n")
    code, err = cli(["--data", corpus_dir, "--out", mine, "--device", "cpu"], capsys)
    assert code == 2 and "holds a metrics.jsonl but no checkpoint" in err
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.jsonl"], "no .lock left behind"


@pytest.mark.parametrize("key, value", [("hidden_size", "8"), ("num_layers", -1), ("seq_len", 2.5), ("data", 7)])
def test_a_checkpoint_with_config_values_fastlm_never_writes_is_one_line(tiny_run, tmp_path, capsys, key, value):
    from fastlm.evaluate import main as evaluate_main
    from fastlm.sample import main as sample_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((tiny_run / "checkpoint.pt").read_bytes())
    _tamper(run, lambda c: c["config"].update({key: value}))
    for main, argv in [(train_main, ["--resume", run]), (evaluate_main, ["--checkpoint", run, "--device", "cpu"]),
                       (sample_main, ["--checkpoint", run, "--out", tmp_path / "s.txt", "--device", "cpu"])]:
        with pytest.raises(SystemExit) as exit_info:
            run_main(main, [str(a) for a in argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, (main.__module__, err)
        assert f"has config[{key!r}] = {value!r}, which fastlm never writes" in err, (main.__module__, err)


def test_a_resume_into_a_new_folder_says_when_it_has_no_best_weights_to_test(corpus_dir, tmp_path, capsys):
    first = tmp_path / "first"
    train(tiny(corpus_dir, first, epochs=1))
    capsys.readouterr()
    real_validate = trainer_module.Run.validate
    trainer_module.Run.validate = lambda self, data: (real_validate(self, data), 99.0)[1]  # never better
    try:
        train(TrainConfig(), resume=str(first), overrides={"out": str(tmp_path / "second"), "epochs": 2})
    finally:
        trainer_module.Run.validate = real_validate
    out = capsys.readouterr().out
    assert "No test of the best weights: validation never improved on the run's best in" in out
