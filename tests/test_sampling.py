"""Sampling: each strategy and filter against an independent recomputation of the distributions."""
import pytest
import torch
from torch import nn

from fastlm.cli import run_main
from fastlm.data import EOS
from fastlm.generation.sampling import filter_logits, generate, next_words
from fastlm.models.lm import load_model
from fastlm.sample import main as sample_main


class FullPrefix(nn.Module):
    """Independent reference: nn.LSTM over the whole prefix from a zero state, at every step."""

    def __init__(self, model):
        super().__init__()
        self.embed, self.linear = model.embed, model.linear
        self.lstm = nn.LSTM(model.lstm.input_size, model.lstm.hidden_size, model.lstm.num_layers, batch_first=True)
        self.lstm.load_state_dict(model.lstm.state_dict())

    @torch.no_grad()
    def next_logits(self, prefix: list[int]) -> torch.Tensor:
        out, _ = self.lstm(self.embed(torch.tensor([prefix])))
        return self.linear(out[0, -1]).double()


@pytest.fixture(scope="module")
def loaded(tiny_run):
    model, dictionary, _ = load_model(tiny_run)
    return model, dictionary, FullPrefix(model)


def test_greedy_is_the_step_by_step_argmax(loaded):
    model, dictionary, reference = loaded
    prompt = [dictionary.word2idx[w] for w in ("w3", "w4")]
    got = generate(model, 12, prompt=prompt, strategy="greedy", num_samples=2)
    assert got[0] == got[1]
    prefix = list(prompt)
    for word in got[0]:
        assert word == int(reference.next_logits(prefix).argmax())
        prefix.append(word)
    assert generate(model, 12, prompt=prompt, strategy="greedy") == got[:1]


def test_without_prompt_the_first_word_is_uniform(loaded):
    model, dictionary, _ = loaded
    firsts = [s[0] for s in generate(model, 1, num_samples=4000, seed=1)]
    counts = torch.bincount(torch.tensor(firsts), minlength=len(dictionary)).double()
    assert (counts / 4000 - 1 / len(dictionary)).abs().max() < 0.03


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_never_leaves_the_k_most_likely(loaded, top_k):
    model, _, reference = loaded
    samples = generate(model, 10, num_samples=12, prompt=[0], top_k=top_k, temperature=2.0, seed=3)
    for sample in samples:
        prefix = [0]
        for word in sample:
            allowed = torch.topk(reference.next_logits(prefix), top_k).indices.tolist()
            assert word in allowed
            prefix.append(word)


def test_top_p_keeps_the_smallest_set_with_that_mass(loaded):
    model, _, reference = loaded
    p = 0.6
    samples = generate(model, 10, num_samples=12, prompt=[0], top_p=p, temperature=1.5, seed=4)
    for sample in samples:
        prefix = [0]
        for word in sample:
            probs = torch.softmax(reference.next_logits(prefix) / 1.5, dim=-1)
            mass_before = probs[probs > probs[word]].sum().item()
            assert mass_before < p, f"word with {mass_before:.3f} of the mass ranked above it"
            prefix.append(word)


def test_filters_on_a_known_distribution():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=torch.float64)
    logits = probs.log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw)).nonzero().flatten().tolist()
    assert kept(top_p=0.7) == [1, 3]
    assert kept(top_p=0.5) == [1]
    assert kept(top_p=1.0) == [0, 1, 2, 3]
    assert kept(top_k=2) == [1, 3]
    assert kept(top_k=3, top_p=0.9) == [1, 2, 3]
    # Sampling frequencies follow the renormalised kept mass.
    generator = torch.Generator().manual_seed(0)
    draws = next_words(logits.expand(40000, 4), top_p=0.7, generator=generator)
    freq = torch.bincount(draws, minlength=4).double() / 40000
    expected = torch.tensor([0, 0.5, 0, 0.3], dtype=torch.float64) / 0.8
    assert (freq - expected).abs().max() < 0.01


@pytest.mark.parametrize("logits, top_k", [
    ([3.0, 2.0, 2.0, 2.0, 1.0], 2),
    ([1.0, 1.0, 1.0, 1.0], 3),
    ([2.0, 2.0, 2.0, 0.0], 1),
    ([[3.0, 2.0, 2.0, 2.0, 1.0], [0.0, 5.0, 5.0, -1.0, 5.0]], 2),
], ids=["tie-at-the-kth", "all-equal", "tie-at-the-first", "batch-of-two-rows"])
@pytest.mark.parametrize("top_p", [None, 0.999], ids=["top-k-alone", "then-top-p-0.999"])
def test_top_k_keeps_exactly_k_when_logits_tie(logits, top_k, top_p):
    logits = torch.tensor(logits)
    filtered = filter_logits(logits, top_k=top_k, top_p=top_p)
    kept = torch.isfinite(filtered)
    assert (kept.sum(dim=-1) == top_k).all()
    assert torch.equal(filtered[kept], logits[kept]), "kept logits are passed through unchanged"
    kept_values = filtered.masked_fill(~kept, float("inf")).sort(dim=-1).values[..., :top_k]
    assert torch.equal(kept_values.flip(-1), torch.topk(logits, top_k, dim=-1).values)
    assert torch.equal(filter_logits(logits, top_k=top_k, top_p=top_p), filtered), "ties broken the same each time"


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0], ids=lambda t: f"temperature-{t}")
def test_sampled_words_stay_within_k_when_logits_tie(temperature):
    logits = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0])
    draws = next_words(logits.expand(4000, 5), top_k=2, temperature=temperature,
                       generator=torch.Generator().manual_seed(0))
    assert 0 in draws.tolist() and len(set(draws.tolist())) == 2


def test_low_temperature_approaches_greedy(loaded):
    model, _, _ = loaded
    greedy = generate(model, 15, prompt=[1, 2], strategy="greedy")
    assert generate(model, 15, prompt=[1, 2], temperature=1e-4, seed=5) == greedy


def test_seed_reproduces(loaded):
    model, _, _ = loaded
    a = generate(model, 20, num_samples=3, seed=11, temperature=3.0)
    assert generate(model, 20, num_samples=3, seed=11, temperature=3.0) == a
    assert generate(model, 20, num_samples=3, seed=12, temperature=3.0) != a


def test_stop_at_eos(loaded):
    model, dictionary, _ = loaded
    eos = dictionary.word2idx[EOS]
    samples = generate(model, 40, num_samples=6, seed=2, eos_id=eos)
    assert all((s[-1] == eos and s.count(eos) == 1) or (len(s) == 40 and eos not in s) for s in samples)
    assert any(s[-1] == eos for s in samples)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0}, "temperature must be > 0"),
    ({"temperature": -1}, "temperature must be > 0"),
    ({"top_p": 0}, r"top-p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top-p must be in \(0, 1\]"),
    ({"top_k": 0}, "top-k must be at least 1"),
    ({"strategy": "beam"}, "unknown strategy 'beam'"),
], ids=["temperature-0", "temperature-negative", "top-p-0", "top-p-1.5", "top-k-0", "strategy"])
def test_bad_values_are_refused(loaded, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(loaded[0], 5, **kwargs)


def test_command_line(tiny_run, tmp_path, capsys):
    out = tmp_path / "sample.txt"
    argv = ["--checkpoint", str(tiny_run), "--prompt", "w1 zebra", "--num-words", "30", "--num-samples", "2",
            "--seed", "7", "--out", str(out), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        run_main(sample_main, argv)
    assert exit_info.value.code == 0
    text = out.read_text()
    assert "<eos>" not in text and text.startswith("w1 <unk>")
    first = capsys.readouterr()
    assert first.err == "note: prompt words not in the vocabulary, read as <unk>: zebra\n"
    with pytest.raises(SystemExit):
        run_main(sample_main, argv)
    assert capsys.readouterr().out == first.out  # same seed, same text
    try:
        with pytest.raises(SystemExit):  # no --out: beside the checkpoint, in the run folder
            run_main(sample_main, argv[:-4] + ["--device", "cpu"])
        assert (tiny_run / "sample.txt").read_text() == text
        assert f"to {tiny_run / 'sample.txt'}" in capsys.readouterr().out
    finally:
        (tiny_run / "sample.txt").unlink(missing_ok=True)
    with pytest.raises(SystemExit) as exit_info:
        run_main(sample_main, ["--checkpoint", str(tiny_run), "--temperature", "0", "--device", "cpu"])
    assert exit_info.value.code == 2 and "temperature must be > 0" in capsys.readouterr().err


def test_a_vanishing_temperature_is_greedy_not_nan(loaded):
    model, _, _ = loaded
    greedy = generate(model, 15, prompt=[1, 2], strategy="greedy")
    assert generate(model, 15, prompt=[1, 2], temperature=1e-300, seed=5) == greedy
    logits = torch.tensor([[3.0, 1.0, 3.0, -2.0]])
    assert set(next_words(logits.expand(400, 4), temperature=1e-300).tolist()) == {0, 2}, "ties share the draw"


@pytest.mark.parametrize("out, message", [
    (lambda run, tmp: run / "checkpoint.pt", "is a checkpoint (or named like one): fastlm never writes over one"),
    (lambda run, tmp: tmp / "copy.pt", "is a checkpoint (or named like one)"),
    (lambda run, tmp: tmp, "is a folder: name a file"),
    (lambda run, tmp: "/proc/fastlm/sample.txt", "cannot write --out /proc/fastlm/sample.txt"),
], ids=["the-checkpoint-read", "a-pt-name", "a-folder", "unwritable"])
def test_a_bad_out_is_refused_before_any_work(tiny_run, tmp_path, capsys, monkeypatch, out, message):
    import fastlm.sample

    out = out(tiny_run, tmp_path)
    before = (tiny_run / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(fastlm.sample, "generate", lambda *a, **k: pytest.fail("generated before checking --out"))
    with pytest.raises(SystemExit) as exit_info:
        run_main(sample_main, ["--checkpoint", str(tiny_run), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err
    assert (tiny_run / "checkpoint.pt").read_bytes() == before


def test_more_samples_than_memory_holds_is_refused(tiny_run, tmp_path, capsys, monkeypatch):
    import fastlm.sample

    monkeypatch.setattr(fastlm.sample, "available_bytes", lambda device: 2**20)
    with pytest.raises(SystemExit) as exit_info:
        run_main(sample_main, ["--checkpoint", str(tiny_run), "--num-samples", "1000000000", "--out",
                               str(tmp_path / "s.txt"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--num-samples 1000000000 needs about" in err and "ask for at most" in err


@pytest.mark.parametrize("top_p", [1e-50, 1e-300, 5e-324], ids=["1e-50", "1e-300", "smallest-float"])
def test_top_p_below_float32_keeps_the_most_likely_word(top_p):
    logits = torch.tensor([[0.5, 3.0, 1.0, -2.0], [0.0, 0.0, 4.0, 1.0]])
    kept = torch.isfinite(filter_logits(logits, top_p=top_p))
    assert kept.tolist() == [[False, True, False, False], [False, False, True, False]]
    draws = next_words(logits, top_p=top_p, temperature=3.0, generator=torch.Generator().manual_seed(0))
    assert draws.tolist() == [1, 2]


def test_top_p_below_float32_on_the_command_line_is_greedy(tiny_run, tmp_path, capsys):
    argv = ["--checkpoint", str(tiny_run), "--prompt", "w1", "--num-words", "12", "--device", "cpu"]
    for extra, name in ((["--top-p", "1e-50", "--seed", "3"], "top-p.txt"), (["--strategy", "greedy"], "greedy.txt")):
        with pytest.raises(SystemExit) as exit_info:
            run_main(sample_main, argv + extra + ["--out", str(tmp_path / name)])
        assert exit_info.value.code == 0, capsys.readouterr().err
    assert (tmp_path / "top-p.txt").read_text() == (tmp_path / "greedy.txt").read_text()


@pytest.mark.parametrize("seed", [str(2**70), str(2**63), "-1"], ids=["2**70", "2**63", "negative"])
def test_a_seed_outside_64_bits_is_refused_before_any_work(tiny_run, tmp_path, capsys, monkeypatch, seed):
    import fastlm.sample

    monkeypatch.setattr(fastlm.sample, "load_model", lambda *a, **k: pytest.fail("loaded before checking --seed"))
    with pytest.raises(SystemExit) as exit_info:
        run_main(sample_main, ["--checkpoint", str(tiny_run), "--seed", seed, "--out", str(tmp_path / "s.txt"),
                               "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == f"error: --seed must be between 0 and 2**63 - 1, got {seed}\n"
    with pytest.raises(ValueError, match="seed must be between 0 and 2\\*\\*63 - 1"):
        generate(load_model(tiny_run)[0], 3, seed=int(seed))


def test_the_largest_seed_is_accepted(loaded):
    model = loaded[0]
    assert generate(model, 5, seed=2**63 - 1) == generate(model, 5, seed=2**63 - 1)
