"""The reports on a trained checkpoint (Q2.2 sampling, Q2.3 embedding distances): the measures against
hand counts, the model's scores against a float64 nn.LSTM, the rebuilt initial weights against a
run's first step, and both commands end to end."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastlm.cli import run_main
from fastlm.compare import main as compare_main
from fastlm.config import TrainConfig
from fastlm.data import EOS, Dictionary
from fastlm.errors import UsageError
from fastlm.experiments.baselines import distance_spread
from fastlm.experiments.embedding_report import conclusions, initial_model
from fastlm.experiments.sampling_report import (
    REAL,
    UNIGRAM,
    Strategy,
    _calibration,
    continuation_scores,
    continue_prompts,
    distinct,
    measure,
    prompts_and_references,
    repetition,
    share,
    strategies,
)
from fastlm.experiments.trained import load_trained
from fastlm.generation.embedding import word_vectors
from fastlm.generation.sampling import generate
from fastlm.models.lm import load_model
from fastlm.training.trainer import train
from tests.conftest import write_corpus


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(compare_main, argv)
    return exit_info.value.code, capsys.readouterr()


@pytest.fixture(scope="module")
def trained(tiny_run):
    return load_trained(str(tiny_run))


def _prompts(trained, count=6, prompt_words=3, words=10):
    return prompts_and_references(trained.corpus.valid, trained.dictionary.word2idx[EOS], count, prompt_words, words)


# -- the measures, against hand counts --------------------------------------------------------------

@pytest.mark.parametrize("samples, n, expected", [
    ([[1, 2, 1, 2]], 1, 2 / 4),
    ([[1, 2, 1, 2]], 2, 2 / 3),  # (1,2) (2,1) (1,2)
    ([[1, 2, 3], [1, 2, 3]], 2, 2 / 4),  # pooled: the second sample's bigrams are all seen
    ([[1, 2], [3, 4]], 2, 2 / 2),  # no bigram (2, 3) across the samples
    ([[7]], 2, math.nan),
], ids=["unigrams", "bigrams", "pooled-over-samples", "not-across-samples", "no-bigram"])
def test_distinct_n_against_hand_counts(samples, n, expected):
    got = distinct(samples, n)
    assert got == expected or (math.isnan(got) and math.isnan(expected))


@pytest.mark.parametrize("samples, expected", [
    ([[1, 2, 3, 1, 2, 3]], 1 / 4),  # (1,2,3) (2,3,1) (3,1,2) (1,2,3)
    ([[5, 5, 5, 5, 5]], 2 / 3),
    ([[1, 2, 3], [1, 2, 3]], 0.0),  # a repeat counts only within one sample
    ([[1, 2, 3, 4, 5], [6, 6, 6, 6]], 1 / 5),  # pooled: 0 of 3, then 1 of 2
    ([[1, 2, 1, 2, 1]], 1 / 3),  # (1,2,1) (2,1,2) (1,2,1)
], ids=["loop-of-three", "one-word", "across-samples-ignored", "pooled", "alternating"])
def test_repetition_against_hand_counts(samples, expected):
    assert repetition(samples) == pytest.approx(expected, abs=1e-15)


def test_share_counts_every_word_of_every_sample():
    assert share([[1, 0, 0], [2]], 0) == 2 / 4
    assert share([[1, 2]], None) == 0.0


# -- the prompts and the continuations -------------------------------------------------------------

def test_prompts_are_sentence_openings_followed_by_their_true_words(trained):
    text, eos = trained.corpus.valid, trained.dictionary.word2idx[EOS]
    prompts, references = _prompts(trained)
    joined = text.tolist()
    for prompt, reference in zip(prompts.tolist(), references.tolist()):
        starts = [i for i in range(len(joined)) if joined[i:i + len(prompt + reference)] == prompt + reference]
        assert any(i == 0 or joined[i - 1] == eos for i in starts)
    assert len({tuple(p) for p in prompts.tolist()}) > 1  # spread over the text, not one opening six times


def test_more_samples_than_openings_are_refused(trained):
    with pytest.raises(UsageError, match="fewer than --samples"):
        prompts_and_references(trained.corpus.valid, trained.dictionary.word2idx[EOS], 10**6, 3, 10)


@pytest.mark.parametrize("strategy", strategies(0.7, 3, 0.9), ids=lambda s: s.name.replace(" ", "-"))
def test_batched_continuations_equal_generate_on_copies_of_one_prompt(trained, strategy):
    prompt = _prompts(trained)[0][:1]
    got = continue_prompts(trained.model, prompt.expand(4, -1), 9, strategy, seed=5)
    expected = generate(trained.model, 9, num_samples=4, prompt=prompt[0].tolist(), strategy=strategy.strategy,
                        temperature=strategy.temperature, top_k=strategy.top_k, top_p=strategy.top_p, seed=5)
    assert got == expected


def _float64_scores(model, prompt: list[int], continuation: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: nn.LSTM in float64 with the model's weights, over prompt + continuation."""
    lstm = nn.LSTM(model.lstm.input_size, model.lstm.hidden_size, model.lstm.num_layers, batch_first=True).double()
    lstm.load_state_dict(model.lstm.state_dict())
    ids = torch.tensor([prompt + continuation[:-1]])
    out, _ = lstm(model.embed.weight.detach().double()[ids])
    logits = out[0, len(prompt) - 1:] @ model.linear.weight.detach().double().T + model.linear.bias.detach().double()
    log_probs = F.log_softmax(logits, dim=-1)
    return -log_probs[torch.arange(len(continuation)), continuation], -(log_probs.exp() * log_probs).sum(-1)


def test_the_models_scores_of_continuations_match_a_float64_lstm(trained):
    prompts, references = _prompts(trained)
    sampled = torch.tensor(continue_prompts(trained.model, prompts, references.shape[1], Strategy("T=1"), seed=3))
    for continuations in (references, sampled):
        losses, entropies = continuation_scores(trained.model, prompts, continuations)
        assert losses.dtype == entropies.dtype == torch.float64
        for row in range(prompts.shape[0]):
            want_loss, want_entropy = _float64_scores(trained.model, prompts[row].tolist(), continuations[row].tolist())
            assert torch.allclose(losses[row], want_loss, rtol=1e-4, atol=1e-5)
            assert torch.allclose(entropies[row], want_entropy, rtol=1e-4, atol=1e-5)


def test_greedy_continuations_are_likelier_to_the_model_than_t1_samples(trained):
    prompts, _ = _prompts(trained, count=8, words=20)
    ppl = {}
    for strategy in strategies(0.7, 3, 0.9)[:2]:
        texts = continue_prompts(trained.model, prompts, 20, strategy, seed=11)
        scores = continuation_scores(trained.model, prompts, torch.tensor(texts))
        ppl[strategy.name] = measure(texts, *scores, trained.dictionary)["model_ppl"]
    assert ppl["greedy"] < ppl["multinomial T=1"]


@pytest.mark.parametrize("gap, verdict", [((0.05, 0.04), "calibrated"), ((0.3, 0.05), "overconfident"),
                                          ((-0.3, 0.05), "underconfident")],
                         ids=["gap-within-two-errors", "surer-than-right", "less-sure-than-right"])
def test_calibration_is_called_from_the_gap_and_its_standard_error(gap, verdict):
    sentence = _calibration({"surprise_gap": gap})
    assert verdict in sentence
    assert {"calibrated", "overconfident", "underconfident"} - {verdict} & set(sentence.replace("(", " ").replace(
        ")", " ").split()) == set()


def test_measure_reports_the_mean_loss_and_entropy_as_perplexities():
    dictionary = Dictionary(["a", "b", EOS])
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    row = measure([[0, 2], [1, 1]], losses, torch.full((2, 2), 0.5, dtype=torch.float64), dictionary)
    assert row["model_ppl"] == pytest.approx(math.exp(2.5))
    assert (row["model_ppl_lowest"], row["model_ppl_highest"]) == pytest.approx((math.exp(1.5), math.exp(3.5)))
    assert row["expected_ppl"] == pytest.approx(math.exp(0.5))
    assert row["eos_share"] == 1 / 4 and row["unk_share"] == 0
    assert row["surprise_gap"] == pytest.approx((2.0, 1.0))  # gaps 1 and 3: sd √2 over 2 continuations


# -- the embedding report --------------------------------------------------------------------------

def test_the_rebuilt_initial_weights_are_those_the_run_started_from(tmp_path):
    """One Adam step moves no weight by more than lr: the run's weights after it must lie within lr of
    the rebuilt ones, and those of another seed must not."""
    lr = 0.01
    cfg = TrainConfig(data=str(write_corpus(tmp_path / "corpus")), embed_size=8, hidden_size=16, batch_size=4,
                      seq_len=5, lr=lr, max_steps=1, eval_batch_size=3, out=str(tmp_path / "run"), device="cpu",
                      seed=77)
    train(cfg)
    model, dictionary, ckpt = load_model(tmp_path / "run")
    for matrix in ("input", "output"):
        after = word_vectors(model, matrix)
        start = word_vectors(initial_model(ckpt["config"], len(dictionary)), matrix)
        other = word_vectors(initial_model({**ckpt["config"], "seed": 78}, len(dictionary)), matrix)
        assert (after - start).abs().max() <= lr * (1 + 1e-6)
        assert (after - other).abs().max() > 10 * lr


def _cosine_distance(m: np.ndarray, a: int, b: int) -> float:
    return 1 - m[a] @ m[b] / (np.linalg.norm(m[a]) * np.linalg.norm(m[b]))


def _exact_spread(m: np.ndarray) -> tuple[float, float]:
    """Mean and sd of the cosine distance over every ordered pair of distinct rows."""
    unit = m / np.linalg.norm(m, axis=1, keepdims=True)
    distances = 1 - unit @ unit.T
    off = ~np.eye(len(m), dtype=bool)
    return distances[off].mean(), distances[off].std()


def test_embedding_report_numbers_against_direct_computation(tiny_run, tmp_path, capsys):
    out = tmp_path / "embedding"
    code, printed = _run(["embedding", "--checkpoint", str(tiny_run), "--out", str(out), "--pair", "w1/w5",
                          "--word", "w2", "--word", "w7", "-k", "3", "--spread-pairs", "20000"], capsys)
    assert code == 0, printed.err
    report = json.loads((out / "report.json").read_text())
    assert "## What this does not show" in (out / "report.md").read_text()
    facts = report["checkpoints"][0]
    model, dictionary, ckpt = load_model(tiny_run)
    untrained = initial_model(ckpt["config"], len(dictionary))
    a, b = dictionary.word2idx["w1"], dictionary.word2idx["w5"]
    counts = np.bincount(load_trained(str(tiny_run)).corpus.train.numpy(), minlength=len(dictionary))
    for matrix, attribute in (("input", "embed"), ("output", "linear")):
        got = facts["pairs"]["w1/w5"][matrix]
        after = getattr(model, attribute).weight.detach().double().numpy()
        start = getattr(untrained, attribute).weight.detach().double().numpy()
        assert got["distance"] == pytest.approx(_cosine_distance(after, a, b), abs=1e-12)
        assert got["before_training"] == pytest.approx(_cosine_distance(start, a, b), abs=1e-12)
        assert got["closed_form"] == pytest.approx([1.0, 1 / math.sqrt(after.shape[1])])
        for key, matrix_values in (("random", start), ("typical", after)):
            mean, sd = _exact_spread(matrix_values)
            assert got[key][0] == pytest.approx(mean, abs=5 * sd / math.sqrt(20000))
            assert got[key][1] == pytest.approx(sd, rel=0.05)
        assert got["z_random"] == pytest.approx((got["distance"] - got["random"][0]) / got["random"][1])
        word = facts["words"]["w1"][matrix]
        change = np.linalg.norm(after[a] - start[a]) / np.linalg.norm(start[a])
        assert word["relative_change"] == pytest.approx(change, rel=1e-12)
        assert facts["words"]["w1"]["train_count"] == counts[a]
        sims = after @ after[dictionary.word2idx["w2"]] / (np.linalg.norm(after, axis=1) *
                                                            np.linalg.norm(after[dictionary.word2idx["w2"]]))
        sims[dictionary.word2idx["w2"]] = -np.inf
        assert [w for w, _ in facts["neighbors"]["w2"][matrix]["trained"]] == \
            [dictionary.idx2word[i] for i in np.argsort(-sims)[:3]]
    assert f"report: {out / 'report.md'}" in printed.out


def test_embedding_report_covers_every_checkpoint_given(tiny_run, tmp_path, capsys):
    out = tmp_path / "embedding"
    code, printed = _run(["embedding", "--checkpoint", str(tiny_run), "--checkpoint", str(tiny_run / "best.pt"),
                          "--out", str(out), "--pair", "w1/w5", "--word", "w2"], capsys)
    assert code == 0, printed.err
    files = [facts["file"] for facts in json.loads((out / "report.json").read_text())["checkpoints"]]
    assert files == [str(tiny_run / "checkpoint.pt"), str(tiny_run / "best.pt")]
    assert (out / "report.md").read_text().count("### Distances") == 2


def test_an_unchanged_row_is_reported_as_the_initial_one():
    from fastlm.experiments.embedding_report import row_change

    start = torch.randn(4, 8, dtype=torch.float64)
    after = start.clone()
    after[1] += 0.5
    assert row_change(after, start, 0) == {"relative_change": 0.0, "cosine_to_initial": pytest.approx(1.0),
                                           "unchanged": True}
    assert row_change(after, start, 1)["unchanged"] is False


@pytest.mark.parametrize("nearest, grouped", [(0.55, True), (0.38, False), (0.2, False)],
                         ids=["well-above-chance", "a-hair-above-chance", "below-chance"])
def test_neighbours_count_as_grouped_only_well_above_chance(nearest, grouped):
    facts = {"pairs": {}, "words": {}, "neighbors": {"w": {m: {"trained": [("v", nearest)], "random_nearest": 0.3}
                                                           for m in ("input", "output")}}}
    sentences = conclusions(facts, ["w"])
    assert len(sentences) == 2
    assert all(("training has grouped" in s) == grouped and ("no grouping beyond chance" in s) != grouped
               for s in sentences)


def test_distance_spread_of_a_random_matrix_is_the_closed_form():
    """The reference the report leans on: N(0, 1) rows in d dimensions are at 1 ± 1/√d."""
    mean, sd = distance_spread(torch.randn(5000, 64), 20000, seed=1)
    assert mean == pytest.approx(1.0, abs=0.005) and sd == pytest.approx(1 / 8, rel=0.03)


# -- the commands ----------------------------------------------------------------------------------

def test_sampling_report_end_to_end(tiny_run, tmp_path, capsys):
    out = tmp_path / "sampling"
    code, printed = _run(["sampling", "--checkpoint", str(tiny_run), "--out", str(out), "--samples", "4", "--words",
                          "12", "--prompt-words", "3", "--top-k", "3", "--show", "2", "--note",
                          "Same weights as run X."], capsys)
    assert code == 0, printed.err
    report = json.loads((out / "report.json").read_text())
    names = [s.name for s in strategies(0.7, 3, 0.9)]
    assert list(report["rows"]) == [*names, UNIGRAM, REAL]
    assert len(report["texts"]) == 4 and all(len(t[REAL].split()) >= 1 for t in report["texts"])
    markdown = (out / "report.md").read_text()
    for heading in ("## Setting", "## Conclusions", "## Side by side", "## What this does not show"):
        assert heading in markdown
    assert markdown.count("Prompt: *") == 2
    assert "Same weights as run X." in markdown and "&lt;eos>" in markdown and "<eos>" not in markdown
    assert report["conclusions"][0] in printed.out


@pytest.mark.parametrize("argv, message", [
    (["embedding", "--pair", "w1/nosuchword"], "'nosuchword' is not in the vocabulary"),
    (["embedding", "--pair", "w1/w5", "--word", "w1x"], "'w1x' is not in the vocabulary (closest: w1"),
    (["embedding", "--pair", "w1-w5"], "--pair w1-w5: give two words joined by one slash"),
    (["embedding", "--pair", "w1/w5", "--word", "w2", "-k", "0"], "-k must be at least 1"),
    (["sampling", "--samples", "0"], "--samples and --prompt-words must be at least 1"),
    (["sampling", "--words", "2"], "--words at least 3"),
    (["sampling", "--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["sampling", "--temperature", "0"], "temperature must be > 0"),
    (["sampling", "--samples", "100000"], "fewer than --samples 100000"),
], ids=["unknown-pair-word", "unknown-probe-word", "pair-without-slash", "k-zero", "no-samples", "too-few-words",
        "top-p-above-one", "temperature-zero", "more-samples-than-openings"])
def test_bad_input_is_one_line_and_leaves_no_folder(tiny_run, tmp_path, capsys, argv, message):
    out = tmp_path / "nested" / "report"
    code, printed = _run([*argv, "--checkpoint", str(tiny_run), "--out", str(out)], capsys)
    assert code == 2
    assert message in printed.err and len(printed.err.strip().splitlines()) == 1, printed.err
    assert not (tmp_path / "nested").exists()


def test_another_training_text_is_refused(tiny_run, tmp_path, capsys):
    other = write_corpus(tmp_path / "other", seed=1)
    code, printed = _run(["embedding", "--checkpoint", str(tiny_run), "--data", str(other), "--out",
                          str(tmp_path / "report")], capsys)
    assert code == 2 and "is not the text" in printed.err and "--data" in printed.err
