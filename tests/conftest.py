# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before anything
# imports fastlm.kernels: the kernels then run on the CPU, one program after another.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    # Triton's interpreter before 3.7 turns a 1-element array into an int, which numpy 2.4 refuses:
    # every kernel test would fail inside Triton with "only 0-dimensional arrays can be converted".
    if os.environ["TRITON_INTERPRET"] not in ("", "0"):
        try:
            import numpy
            import triton
        except ImportError:
            return
        version = lambda text: tuple(int(part) for part in text.split(".")[:2] if part.isdigit())
        if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
            pytest.exit(f"triton {triton.__version__}'s interpreter cannot run on numpy {numpy.__version__}: "
                        "pip install 'numpy<2.4' (or triton>=3.7, if your torch allows it)", returncode=2)

REPO = Path(__file__).resolve().parents[1]
PTB = REPO / "data" / "ptb"


def write_corpus(folder: Path, seed: int = 0, lines: tuple[int, int, int] = (400, 40, 40)) -> Path:
    """A small learnable corpus: sentences that count through a cycle of words from a random start.

    After a word the next is almost always its successor in the cycle, so a model that learns
    should push the loss far below ln(V). Every seventh line ends in <unk>, as rare words do in PTB.
    """
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(12)]
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "valid", "test"), lines):
        out = []
        for _ in range(count):
            start, length = rng.randrange(12), rng.randrange(3, 9)
            out.append(" ".join(words[(start + k) % 12] for k in range(length)) + (" <unk>" * (len(out) % 7 == 6)))
        (folder / f"{split}.txt").write_text("\n".join(out) + "\n")
    return folder


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def ptb_dir() -> Path:
    if not all((PTB / f"{s}.txt").is_file() for s in ("train", "valid", "test")):
        pytest.skip(f"Penn Treebank not in {PTB} (.ci/run places it there from ../shared/data/ptb)")
    return PTB


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture
def nan_empty(monkeypatch):
    """Every floating tensor made by torch.empty from Python starts as NaN, so an output element a
    kernel forgets to write shows up as NaN instead of as leftover memory that happens to be right."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", poisoned_empty)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder with a small model trained for two epochs on the counting corpus."""
    from fastlm.config import TrainConfig
    from fastlm.training.trainer import train

    root = tmp_path_factory.mktemp("tiny_run")
    corpus = write_corpus(root / "corpus")
    train(TrainConfig(data=str(corpus), embed_size=16, hidden_size=32, epochs=2, batch_size=4, seq_len=5,
                      lr=0.01, log_interval=50, eval_batch_size=3, out=str(root / "run"), device="cpu"))
    return root / "run"


@pytest.fixture
def cpu_with_16_bit_units(monkeypatch):
    """Tests of what 16-bit autocast computes, not of how fast: let the trainer accept --amp bf16/fp16
    on any CPU (it refuses them where the CPU has no units for them)."""
    from fastlm import device

    monkeypatch.setattr(device, "_cpu_capabilities", lambda: {unit: True for units in device.CPU_UNITS.values()
                                                              for unit in units})
