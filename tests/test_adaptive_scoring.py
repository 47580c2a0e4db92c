"""Dynamic evaluation and the continuous cache (fastlm.scoring): each token scored before anything
learns from it, plain evaluation's scores when they do nothing, the cache against a hand-written loop,
the update rule and the gradient RMS in float64, and `python -m fastlm.evaluate` with them."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastlm.cli import run_main
from fastlm.device import SIMULATE_ENV
from fastlm.evaluate import main as evaluate_main
from fastlm.models.lm import RNNLM
from fastlm.scoring import evaluate, perplexity, tuning
from fastlm.scoring.adaptive import adaptive_pass
from fastlm.scoring.cache import CacheSettings, Memory, cache_distribution, cache_log_prob, mixed_log_prob
from fastlm.scoring.dynamic import RMS_FLOOR, DecayToTrained, DynamicSettings, gradient_rms
from fastlm.training.simulated_graphs import SimulatedGraphs
from tests.helpers import assert_rel_close

VOCAB = 40
BACKENDS = ["torch", "reference", "triton"]
NOTHING = {  # settings under which adapting changes nothing
    "dynamic-sgd-lr-0": dict(dynamic=DynamicSettings(0.0, 0.0, "sgd", 4)),
    "dynamic-rms-lr-0": dict(dynamic=DynamicSettings(0.0, 0.0, "rms", 3)),
    "cache-lambda-0": dict(caches=[CacheSettings(8, 0.5, 0.0)]),
}


def _model(backend: str = "torch") -> RNNLM:
    return RNNLM(VOCAB, 12, 20, 2, backend=backend).eval()


def _plain_token_losses(model: RNNLM, data: torch.Tensor) -> torch.Tensor:
    """−log p of every target, read in one window from a zero state: the unadapted model, (B, L−1)."""
    with torch.no_grad():
        logits, _ = model(data[:, :-1])
    return F.cross_entropy(logits, data[:, 1:].reshape(-1), reduction="none").view(data.shape[0], -1)


def _rms(model: RNNLM) -> list[torch.Tensor]:
    return gradient_rms(model, torch.randint(0, VOCAB, (2, 60)), 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("settings", NOTHING.values(), ids=NOTHING.keys())
def test_adapting_by_nothing_scores_as_plain_evaluation(backend, settings):
    model = _model(backend)
    data = torch.randint(0, VOCAB, (3, 23))
    plain = evaluate(model, data, 5)
    rms = _rms(model) if "dynamic" in settings and settings["dynamic"].rule == "rms" else None
    result = adaptive_pass(model, data, 5, rms=rms, **settings)
    for key, loss in result.losses.items():
        assert abs(loss - plain) <= 1e-6 * plain, (key, loss, plain)
        assert f"{perplexity(loss):.2f}" == f"{perplexity(plain):.2f}"


def test_on_a_repeated_text_the_cache_holds_only_the_tokens_before():
    # θ = 0 weighs the cache's states equally: p_cache(w) is the share of w among the words before t,
    # so a first occurrence gets only the model's (1 − λ) share and a repeat gets more
    model = _model()
    half = torch.randint(0, VOCAB, (2, 30))
    data = torch.cat([half, half], 1)
    lam = 0.25
    cache = CacheSettings(100, 0.0, lam)
    cached = adaptive_pass(model, data, 7, caches=[cache], keep_token_losses=True).token_losses[cache]
    plain = _plain_token_losses(model, data).double()
    for row in range(data.shape[0]):
        words = data[row].tolist()
        expected = [plain[row, 0].item()]  # the first target meets an empty cache: the model alone
        for t in range(1, data.shape[1] - 1):
            target, before = words[t + 1], words[1:t + 1]  # the words that followed the t states before
            p_cache = before.count(target) / len(before)
            expected.append(-math.log((1 - lam) * math.exp(-plain[row, t].item()) + lam * p_cache))
        assert_rel_close(cached[row], torch.tensor(expected, dtype=torch.float64), 1e-6, f"row {row}")
    second_copy = slice(30, None)
    assert cached[:, second_copy].mean() < plain[:, second_copy].mean() - 0.1


def test_dynamic_evaluation_scores_each_token_before_it_learns_from_it():
    model = _model()
    text = torch.randint(0, VOCAB, (2, 40))
    other_ending = torch.cat([text[:, :23], (text[:, 23:] + 1) % VOCAB], 1)  # differs from token 23 on
    settings = dict(dynamic=DynamicSettings(0.5, 0.0, "sgd", 4), caches=[CacheSettings(50, 1.0, 0.2)],
                    keep_token_losses=True)
    scored = adaptive_pass(model, text, 5, **settings).token_losses
    rescored = adaptive_pass(model, other_ending, 5, **settings).token_losses
    for key in scored:
        # targets 0..21 (tokens 1..22) are the same text, the last two in the middle of a segment:
        # what follows them must not change their scores
        assert torch.equal(scored[key][:, :22], rescored[key][:, :22]), key
    # before the first update (the first segment) the model is the trained one
    assert_rel_close(scored[None][:, :4], _plain_token_losses(model, text)[:, :4], 1e-5, "first segment")
    assert not torch.allclose(scored[None][:, 4:], _plain_token_losses(model, text)[:, 4:])


@pytest.mark.parametrize("dynamic, layers, ratio", [
    (DynamicSettings(1.0, 0.0, "sgd", 2), 1, 0.85),
    (DynamicSettings(0.02, 0.0, "rms", 5), 2, 0.6),
], ids=["sgd", "rms"])
def test_dynamic_evaluation_learns_a_repeated_text(dynamic, layers, ratio):
    model = RNNLM(VOCAB, 12, 20, layers).eval()
    half = torch.randint(0, VOCAB, (1, 150))
    data = torch.cat([half, half], 1)
    rms = _rms(model) if dynamic.rule == "rms" else None
    adapted = adaptive_pass(model, data, 10, dynamic=dynamic, rms=rms, keep_token_losses=True).token_losses[None]
    plain = _plain_token_losses(model, data)
    copies = lambda losses: (losses[:, :149].mean().exp().item(), losses[:, 149:].mean().exp().item())  # noqa: E731
    (first, second), (plain_first, plain_second) = copies(adapted), copies(plain)
    assert abs(plain_second / plain_first - 1) < 0.1  # the model as trained finds both copies alike
    assert second < ratio * first, f"second copy {second:.1f} vs first {first:.1f}"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("rule", ["sgd", "rms"])
def test_the_weights_are_put_back_after_dynamic_evaluation(tied, rule):
    model = RNNLM(VOCAB, 20, 20, 2, tied=tied, dropout=0.3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.randint(0, VOCAB, (2, 30))
    rms = _rms(model) if rule == "rms" else None
    adapted = adaptive_pass(model, data, 5, dynamic=DynamicSettings(1.0, 0.1, rule, 5), rms=rms)
    assert adapted.losses[None] != pytest.approx(evaluate(model, data, 5), rel=1e-4)  # it did adapt
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and model.dropout == 0.3 and model.lstm.layer_dropout == 0.3
    assert (model.linear.weight is model.embed.weight) == tied


def test_learning_runs_the_lstm_in_training_mode_without_dropout(monkeypatch):
    # cuDNN's LSTM refuses a backward unless its forward ran in training mode: what every forward
    # that dynamic evaluation back-propagates through must ask for (oneDNN, on the CPU, does not care)
    calls, real = [], torch._VF.lstm
    monkeypatch.setattr(torch._VF, "lstm", lambda *a: calls.append((torch.is_grad_enabled(), a[6])) or real(*a))
    model = RNNLM(VOCAB, 12, 20, 1, backend="torch", dropout=0.5).eval()
    data = torch.randint(0, VOCAB, (2, 23))
    plain = evaluate(model, data, 5)
    result = adaptive_pass(model, data, 5, dynamic=DynamicSettings(0.0, 0.0, "sgd", 4))
    assert result.losses[None] == pytest.approx(plain, rel=1e-6)  # no dropout while learning
    gradient_rms(model, data, 4)
    learning = [train for grad, train in calls if grad]
    assert learning and all(learning), calls


def test_the_cache_distribution_equals_a_hand_written_loop():
    B, T, M, H, size, theta = 2, 5, 6, 4, 7, 0.7
    filled = 4  # the memory's first M − filled slots are not real yet
    queries = torch.randn(B, T, H)
    memory = Memory(B, H, M, "cpu")
    memory.keys, memory.words, memory.filled = torch.randn(B, M, H), torch.randint(0, 6, (B, M)), filled
    targets = torch.randint(0, 6, (B, T))
    keys, words = memory.with_window(queries, targets)
    similarity = queries @ keys.transpose(1, 2)
    got = cache_distribution(similarity, words, filled, size, theta, 6)

    expected = torch.zeros(B, T, 6, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            position = M + t  # of query t among the keys
            readable = [i for i in range(M - filled, position) if i >= position - size]
            scores = [theta * float(queries[b, t].double() @ keys[b, i].double()) for i in readable]
            top = max(scores)
            norm = sum(math.exp(s - top) for s in scores)
            for i, s in zip(readable, scores):
                expected[b, t, words[b, i]] += math.exp(s - top) / norm
    assert_rel_close(got, expected, 1e-5, "p_cache")
    log_prob, any_key = cache_log_prob(similarity, words, targets, filled, size, theta)
    assert any_key.all()
    assert_rel_close(log_prob.exp(), expected.gather(2, targets.unsqueeze(2)).squeeze(2), 1e-5, "p_cache(target)")


def test_an_empty_cache_leaves_the_model_alone():
    similarity = torch.randn(1, 3, 3)  # a memory of length 0 and a window of 3: position 0 reads nothing
    log_prob, any_key = cache_log_prob(similarity, torch.tensor([[1, 2, 1]]), torch.tensor([[1, 2, 1]]), 0, 5, 1.0)
    assert any_key.tolist() == [False, True, True]
    model = torch.log(torch.tensor([[0.2, 0.3, 0.4]]))
    mixed = mixed_log_prob(model, log_prob, any_key, 0.5)
    assert mixed[0, 0] == model[0, 0]
    p_cache = log_prob.exp()[0, 1:].double()
    assert_rel_close(mixed[0, 1:].exp(), 0.5 * model[0, 1:].exp().double() + 0.5 * p_cache, 1e-6, "mixture")
    assert torch.equal(mixed_log_prob(model, log_prob, any_key, 0.0), model)  # λ = 0: the model to the bit


def test_the_cache_pairs_each_state_with_the_word_that_followed_it_across_windows():
    # an independent loop over the model's own hidden states, against the pass in windows of 3 and
    # of 7 (the memory of 12 fills, then forgets): each setting's N, θ and λ
    model = _model()
    data = torch.randint(0, VOCAB, (2, 41))
    caches = [CacheSettings(5, 0.8, 0.3), CacheSettings(12, 0.2, 0.1)]
    with torch.no_grad():
        logits, _, states = model(data[:, :-1], return_features=True)
    p_model = logits.softmax(-1).double().view(2, 40, VOCAB)
    targets = data[:, 1:]
    for window in (3, 7):
        scored = adaptive_pass(model, data, window, caches=caches, keep_token_losses=True).token_losses
        for cache in caches:
            expected = torch.zeros(2, 40, dtype=torch.float64)
            for b in range(2):
                for t in range(40):
                    p = p_model[b, t, targets[b, t]].item()
                    before = range(max(0, t - cache.size), t)
                    if before:
                        scores = torch.tensor([cache.theta * float(states[b, t].double() @ states[b, i].double())
                                               for i in before], dtype=torch.float64)
                        weights = scores.softmax(0)
                        p_cache = sum(w.item() for w, i in zip(weights, before) if targets[b, i] == targets[b, t])
                        p = (1 - cache.lam) * p + cache.lam * p_cache
                    expected[b, t] = -math.log(p)
            assert_rel_close(scored[cache], expected, 1e-5, f"{cache}, windows of {window}")


@pytest.mark.parametrize("rule", ["sgd", "rms"])
def test_the_update_rule_in_float64(rule):
    params = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    trained = [p.clone() for p in params]
    rms = [torch.rand_like(p) + 0.1 for p in params] if rule == "rms" else None
    lr, decay = 0.3, 0.2
    optimizer = DecayToTrained(params, lr, decay, rms)
    for _ in range(2):
        before = [p.clone() for p in params]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        if rule == "sgd":
            expected = [b - lr * p.grad + decay * (t - b) for b, p, t in zip(before, params, trained)]
        else:
            mean = sum(r.sum() for r in rms) / sum(r.numel() for r in rms)
            expected = [b - lr * p.grad / r + (decay * r / mean).clamp(max=1) * (t - b)
                        for b, p, t, r in zip(before, params, trained, rms)]
        for i, (p, e) in enumerate(zip(params, expected)):
            assert_rel_close(p, e, 1e-12, f"parameter {i}")


def test_gradient_rms_is_the_root_mean_square_of_segment_gradients():
    model = _model().double()
    train = torch.randint(0, VOCAB, (2, 40))
    got = gradient_rms(model, train, 4, tokens=3 * 2 * 4)  # three segments
    squares, state = [torch.zeros_like(p) for p in model.parameters()], None
    for start in (0, 4, 8):
        model.zero_grad()
        logits, state = model(train[:, start:start + 4], state)
        F.cross_entropy(logits, train[:, start + 1:start + 5].reshape(-1)).backward()
        state = tuple(s.detach() for s in state)
        squares = [s + p.grad ** 2 for s, p in zip(squares, model.parameters())]
    for i, (g, s) in enumerate(zip(got, squares)):
        rms = (s / 3).sqrt()
        assert_rel_close(g, rms.clamp_min(RMS_FLOOR * rms.mean()), 1e-10, f"parameter {i}")


class _FailingGraphs(SimulatedGraphs):
    def capture(self, fn, buffers):
        fn()
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.mark.parametrize("graphs", [SimulatedGraphs, _FailingGraphs], ids=["captured", "capture-fails"])
def test_captured_dynamic_evaluation_scores_as_eager(graphs):
    model = _model()
    data = torch.randint(0, VOCAB, (2, 33))
    settings = dict(dynamic=DynamicSettings(0.3, 0.05, "rms", 4), rms=_rms(model),
                    caches=[CacheSettings(20, 0.5, 0.2)], keep_token_losses=True)
    said = []
    eager = adaptive_pass(model, data, 5, **settings).token_losses
    graphed = adaptive_pass(model, data, 5, graphs=graphs(), say=said.append, **settings).token_losses
    for key in eager:
        assert_rel_close(graphed[key], eager[key], 1e-5, str(key))
    if graphs is _FailingGraphs:
        assert said and said[0].startswith("CUDA graphs off for dynamic evaluation: the capture failed")
    else:
        assert said == []


# -- python -m fastlm.evaluate ----------------------------------------------------------------------


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        run_main(evaluate_main, argv)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_evaluate_adapts_without_writing_the_checkpoint(tiny_run, capsys, monkeypatch):
    checkpoint = tiny_run / "checkpoint.pt"
    before = checkpoint.read_bytes()
    argv = ["--checkpoint", str(tiny_run), "--device", "cpu", "--dynamic", "--dynamic-rule", "rms", "--cache", "30"]
    code, out, _ = _cli(argv, capsys)
    assert code == 0
    assert out.startswith("gradient RMS for the rms rule: ")
    scored = out.splitlines()[1]
    assert scored.startswith("test perplexity: ") and "with dynamic rms" in scored and "cache 30" in scored
    assert "the same pass without the cache (with dynamic evaluation alone)" in out
    assert checkpoint.read_bytes() == before
    # the GPU's path: the step captured as a (simulated) CUDA graph scores the same
    monkeypatch.setenv(SIMULATE_ENV, "1")
    code, graphed, _ = _cli(argv, capsys)
    assert code == 0 and "CUDA graphs off" not in graphed
    assert graphed.splitlines()[1].split(" (")[0] == scored.split(" (")[0]


def test_evaluate_tune_chooses_on_valid_then_scores_test(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tuning, "DYNAMIC_GRID", {"sgd": {"lr": (0.0, 0.3), "decay": (0.0,)},
                                                 "rms": {"lr": (1e-3,), "decay": (0.0,)}})
    monkeypatch.setattr(tuning, "CACHE_GRID", {"size": (20,), "theta": (0.3, 1.0), "lam": (0.0, 0.2)})
    out_file = tmp_path / "scores.json"
    code, out, _ = _cli(["--checkpoint", str(tiny_run), "--device", "cpu", "--dynamic", "--dynamic-seq-len", "4",
                         "--cache", "--tune", "--out", str(out_file)], capsys)
    assert code == 0, out
    result = json.loads(out_file.read_text())
    methods = {m["method"]: m for m in result["methods"]}
    assert list(methods) == ["plain", "cache", "dynamic", "dynamic + cache"]
    grid = result["tuning"]
    assert len(grid) == 1 + 3  # no dynamic evaluation, then each setting
    assert methods["plain"]["valid_perplexity"] == grid[0]["perplexity"]
    assert methods["dynamic"]["valid_perplexity"] == min(row["perplexity"] for row in grid[1:])
    assert methods["dynamic + cache"]["valid_perplexity"] == min(row["perplexity_with_best_cache"] for row in grid[1:])
    assert methods["dynamic"]["dynamic"]["seq_len"] == 4  # the value given is held
    assert "| dynamic + cache |" in out and "tuning on the validation split: 4 pass(es)" in out
    # plain's test perplexity is what evaluate prints without adapting
    code, plain_out, _ = _cli(["--checkpoint", str(tiny_run), "--device", "cpu"], capsys)
    assert plain_out.startswith(f"test perplexity: {methods['plain']['test_perplexity']:.2f} ")


@pytest.mark.parametrize("argv, problem", [
    (["--dynamic-lr", "1"], "--dynamic-lr sets dynamic evaluation: add --dynamic"),
    (["--cache-theta", "1"], "--cache-theta sets the cache: add --cache"),
    (["--tune"], "--tune chooses the values of --dynamic and --cache: add one or both"),
    (["--tune", "--cache", "--split", "valid"], "drop --split"),
    (["--cache", "0"], "--cache N must be a positive integer, got 0"),
    (["--cache", "-1"], "--cache N must be a positive integer, got -1"),
    (["--cache", "--cache-lambda", "1"], "--cache-lambda must be at least 0 and below 1, got 1.0"),
    (["--dynamic", "--dynamic-decay", "2"], "--dynamic-decay must be between 0 and 1, got 2.0"),
    (["--dynamic", "--dynamic-lr", "nan"], "--dynamic-lr must be a finite number ≥ 0, got nan"),
    (["--dynamic", "--dynamic-seq-len", "0"], "--dynamic-seq-len must be a positive integer, got 0"),
    (["--dynamic", "--dynamic-seq-len", "100000"], "--dynamic-seq-len 100000 is longer than the rows of test.txt"),
], ids=["lr-without-dynamic", "theta-without-cache", "tune-alone", "tune-with-split", "cache-0", "cache-minus-1",
        "lambda-1", "decay-2", "lr-nan", "seq-len-0", "seq-len-longer-than-rows"])
def test_evaluate_refuses_inconsistent_flags(tiny_run, capsys, argv, problem):
    code, out, err = _cli(["--checkpoint", str(tiny_run), *argv], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and problem in err, err
