"""Where the commands write: a device, a FIFO or a link to one is written through, never replaced; a
file fastlm owns (a run's records, its lock, a checkpoint) is never written over; an interrupted write
leaves no temporary file; plot names the file it wrote and refuses what it cannot write or read."""
import builtins
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fastlm.cli import run_main
from fastlm.plot import main as plot_main
from fastlm.sample import main as sample_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run, so that a test that fails by writing over its files spoils only its own."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def cli(main, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def sample_argv(run, out) -> list:
    return ["--checkpoint", run, "--num-words", 8, "--seed", 3, "--device", "cpu", "--out", out]


def read_in_background(fifo: Path) -> tuple[threading.Thread, list]:
    """Read a FIFO to its end in a thread (a writer blocks until a reader opens it). A daemon: when the
    FIFO was replaced by a file, nothing will ever open it for writing, and the test fails on its own."""
    chunks = []

    def read():
        with open(fifo, "rb") as file:
            chunks.append(file.read())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, chunks


def expected_sample(run, tmp_path, capsys) -> bytes:
    assert cli(sample_main, sample_argv(run, tmp_path / "reference.txt"), capsys)[0] == 0
    return (tmp_path / "reference.txt").read_bytes()


# -- sample --out: devices, FIFOs and links to them ------------------------------------------------

@pytest.mark.parametrize("through_a_link", [False, True], ids=["the-fifo", "a-link-to-the-fifo"])
def test_a_fifo_is_written_through_not_replaced(run, tmp_path, capsys, through_a_link):
    expected = expected_sample(run, tmp_path, capsys)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    out = tmp_path / "link" if through_a_link else fifo
    if through_a_link:
        out.symlink_to(fifo)
    reader, chunks = read_in_background(fifo)
    code, err = cli(sample_main, sample_argv(run, out), capsys)
    reader.join(timeout=10)
    assert code == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and out.is_symlink() == through_a_link
    assert chunks == [expected]


def test_a_link_to_dev_null_is_written_through_not_replaced(run, tmp_path, capsys):
    # The link, not /dev/null, is what a rename would replace: the test cannot harm the device.
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    code, err = cli(sample_main, sample_argv(run, link), capsys)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == "/dev/null"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert not list(tmp_path.glob(".null.*"))


def test_a_link_to_this_process_stdout_is_written_into_it(run, tmp_path, capfd):
    # What --out /dev/stdout is under a redirection to a file (here pytest's capture file): written
    # into, where a rename would have replaced the link and left the file without the sample.
    expected = expected_sample(run, tmp_path, capfd).decode()
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    with pytest.raises(SystemExit) as exit_info:
        run_main(sample_main, [str(a) for a in sample_argv(run, link)])
    printed = capfd.readouterr()
    assert exit_info.value.code == 0, printed.err
    assert link.is_symlink() and printed.out.count(expected.rstrip("\n")) == 2  # printed, and written


# -- sample --out: files fastlm owns ---------------------------------------------------------------

def _checkpoint_bytes(run, tmp_path, name):
    shutil.copy(run / "best.pt", tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("make_out, message", [
    (lambda run, tmp: run / "metrics.jsonl", "is a run's metrics.jsonl"),
    (lambda run, tmp: run / ".lock", "is a run's lock file"),
    (lambda run, tmp: run / "best.pt", "is a checkpoint (or named like one)"),
    (lambda run, tmp: tmp / "weights.pth", "is a checkpoint (or named like one)"),
    (lambda run, tmp: _checkpoint_bytes(run, tmp, "weights.txt"), "is a checkpoint (or named like one)"),
    (lambda run, tmp: (tmp / "old.txt").write_bytes(b"\x80\x02}q\x00.") and tmp / "old.txt",
     "is a checkpoint (or named like one)"),
    (lambda run, tmp: (tmp / "records.txt").symlink_to(run / "metrics.jsonl") or tmp / "records.txt",
     "is a run's metrics.jsonl"),
], ids=["metrics", "lock", "best-pt", "a-pth-name", "zip-bytes-named-txt", "pickle-bytes", "a-link-to-metrics"])
def test_files_fastlm_owns_are_refused_before_any_work(run, tmp_path, capsys, monkeypatch, make_out, message):
    import fastlm.sample

    out = make_out(run, tmp_path)
    before = {p: p.read_bytes() for p in run.iterdir()} | ({out: out.read_bytes()} if out.exists() else {})
    monkeypatch.setattr(fastlm.sample, "generate", lambda *a, **k: pytest.fail("generated before checking --out"))
    code, err = cli(sample_main, sample_argv(run, out), capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "name another file" in err
    assert {p: p.read_bytes() for p in before} == before


# -- an interrupted write --------------------------------------------------------------------------

class Interrupting:
    """A file whose first write stores half its data, then the interrupt comes."""

    def __init__(self, file, interrupt):
        self.file, self.interrupt = file, interrupt

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        self.interrupt()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __getattr__(self, name):
        return getattr(self.file, name)


def interrupt_writes_in(folder: Path, interrupt, patch=setattr) -> None:
    """Every file opened for writing in `folder` is interrupted at its first write; `patch` is
    monkeypatch.setattr in this process, setattr in a child."""
    real_open = io.open

    def interrupting_open(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        writes = isinstance(file, (str, os.PathLike)) and Path(file).parent == folder and set(mode) & set("wax")
        return Interrupting(opened, interrupt) if writes else opened

    patch(io, "open", interrupting_open)
    patch(builtins, "open", interrupting_open)


def test_a_ctrl_c_during_the_write_leaves_no_temporary_file_and_the_old_text(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sample.txt"
    out.write_text("the sample kept from before\n")

    def ctrl_c():
        raise KeyboardInterrupt

    interrupt_writes_in(tmp_path, ctrl_c, monkeypatch.setattr)
    code, err = cli(sample_main, sample_argv(run, out), capsys)
    assert code == 130 and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "sample.txt"]
    assert out.read_text() == "the sample kept from before\n"


def test_a_sigterm_during_the_write_leaves_no_temporary_file_and_the_old_text(run, tmp_path):
    # What a scheduler or `kill` sends: the process must unwind and clean up as for a Ctrl-C.
    out = tmp_path / "sample.txt"
    out.write_text("the sample kept from before\n")
    script = "\n".join([
        "import os, sys", "from pathlib import Path", f"sys.path.insert(0, {str(REPO / 'tests')!r})",
        "from test_outputs import interrupt_writes_in", "from fastlm.cli import run_main",
        "from fastlm.sample import main",
        f"interrupt_writes_in(Path({str(tmp_path)!r}), lambda: os.kill(os.getpid(), {int(signal.SIGTERM)}))",
        f"run_main(main, {[str(a) for a in sample_argv(run, out)]!r})",
    ])
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode > 0 and "Traceback" not in done.stderr, (done.returncode, done.stderr)  # not killed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "sample.txt"]
    assert out.read_text() == "the sample kept from before\n"


# -- plot ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["curves.pt", "curves.docx"], ids=["a-checkpoint-name", "a-word-document"])
def test_plot_refuses_a_format_matplotlib_cannot_write(run, tmp_path, capsys, name):
    code, err = cli(plot_main, [run, "--out", tmp_path / name], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert f"cannot draw --out {tmp_path / name}" in err and "png, pdf, svg" in err
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("name, magic", [("curves", b"\x89PNG"), ("curves.svg", b"<?xml"), ("curves.PDF", b"%PDF")],
                         ids=["no-suffix-is-png", "svg", "upper-case-pdf"])
def test_plot_writes_the_file_it_names(run, tmp_path, capsys, name, magic):
    code, err = cli(plot_main, [run, "--out", tmp_path / name], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", name])
    assert (tmp_path / name).read_bytes().startswith(magic)


def test_plot_refuses_a_folder_as_out(run, tmp_path, capsys):
    folder = tmp_path / "figures"
    folder.mkdir()
    code, err = cli(plot_main, [run, "--out", folder], capsys)
    assert code == 2 and err.count("\n") == 1 and f"--out {folder} is a folder: name a file" in err, err
    assert list(folder.iterdir()) == [] and not (tmp_path / "figures.png").exists()


def test_plot_streams_into_a_fifo(run, tmp_path, capsys):
    fifo = tmp_path / "curves.png"
    os.mkfifo(fifo)
    reader, chunks = read_in_background(fifo)
    code, err = cli(plot_main, [run, "--out", fifo], capsys)
    reader.join(timeout=10)
    assert code == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and chunks and chunks[0].startswith(b"\x89PNG")


def test_plot_refuses_a_checkpoint_renamed_as_a_picture(run, tmp_path, capsys):
    out = _checkpoint_bytes(run, tmp_path, "curves.png")
    before = out.read_bytes()
    code, err = cli(plot_main, [run, "--out", out], capsys)
    assert code == 2 and err.count("\n") == 1 and "is a checkpoint (or named like one)" in err, err
    assert out.read_bytes() == before


FIX = "pass run folders that fastlm.train wrote"


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00garbage\n", FIX),  # whether the reader skips such a line or refuses the file, one line
    (b"[1, 2]\n", FIX),
    (b"not json\n", f"holds no records (no line of it is a JSON object): {FIX}"),
    (b'{"global_step": 1, "loss": 2.0}\n', "has a record plot cannot draw (no split): {\"global_step\": 1"),
    (b'{"split": "train", "global_step": 1}\n', "has a record plot cannot draw (no numeric global_step and loss)"),
    (b'{"split": "train", "global_step": 1, "loss": 2}\n{"split": "valid", "global_step": 2, "ppl": "x"}\n',
     "has a record plot cannot draw (no numeric global_step and ppl)"),
], ids=["not-utf-8", "not-an-object", "not-json", "no-split", "train-without-loss", "ppl-not-a-number"])
def test_plot_refuses_metrics_it_cannot_read(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(content)
    code, err = cli(plot_main, [run, "--out", tmp_path / "curves.png"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {run / 'metrics.jsonl'}"), err
    assert message in err and not (tmp_path / "curves.png").exists()


def test_plot_draws_a_run_with_a_torn_last_line(run, tmp_path, capsys):
    with open(run / "metrics.jsonl", "a") as records:
        records.write(json.dumps({"split": "train", "global_step": 999, "loss": 1.0})[:20])
    code, err = cli(plot_main, [run, "--out", tmp_path / "curves.png"], capsys)
    assert code == 0, err
