"""Dropout, locked dropout, weight drop, tied weights, SGD with annealing and the recipes: each
component's effect shown exactly, on every backend, and resumed exactly."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from helpers import TOLERANCE, assert_rel_close

from fastlm.checkpoint import load_checkpoint
from fastlm.cli import run_main
from fastlm.config import RECIPES, TrainConfig, check_config, recipe_config
from fastlm.errors import UsageError
from fastlm.kernels import naive_lstm
from fastlm.models import lstm as lstm_module
from fastlm.models.lm import RNNLM
from fastlm.models.lstm import LSTM, sequence_dropout
from fastlm.train import main as train_main
from fastlm.training import trainer
from fastlm.training.step import TrainStep
from fastlm.training.trainer import train

BACKENDS = ["torch", "reference", "triton"]


# -- dropout masks ---------------------------------------------------------------------------------

def _mask(p, locked, shape=(4, 6, 5)):
    x = torch.rand(shape) + 0.5  # no zeros: where the output is 0 the mask is 0
    return sequence_dropout(x, p, training=True, locked=locked) / x


def test_locked_dropout_shares_one_mask_across_the_window():
    mask = _mask(0.5, locked=True)
    assert torch.equal(mask, mask[:, :1].expand_as(mask)), "every time step of a row uses the same mask"
    assert set(mask.unique().tolist()) <= {0.0, 2.0} and 0 < (mask == 0).float().mean() < 1


def test_plain_dropout_draws_per_element_and_fresh_per_window():
    first, second = _mask(0.5, locked=False), _mask(0.5, locked=False)
    assert not torch.equal(first, first[:, :1].expand_as(first)), "masks differ over time"
    assert not torch.equal(first, second), "a new window draws new masks"
    assert not torch.equal(_mask(0.5, locked=True), _mask(0.5, locked=True))


def test_no_dropout_in_eval():
    x = torch.randn(3, 4, 5)
    assert sequence_dropout(x, 0.5, training=False, locked=True) is x
    model = RNNLM(20, 8, 8, 2, dropout=0.5, weight_drop=0.5).eval()
    tokens = torch.randint(0, 20, (2, 6))
    assert torch.equal(model(tokens)[0], model(tokens)[0])


# -- the LSTM's own regularisation, against naive_lstm on every backend ---------------------------

def _expected_layers(lstm: LSTM, x, state, masks_from_seed: int, dropout: float, locked: bool, weight_drop: float):
    """Layer by layer with naive_lstm (fp32, as the masks are drawn on fp32 tensors), drawing the
    masks in the LSTM's order from the same seed."""
    torch.manual_seed(masks_from_seed)
    h0, c0 = state
    layer_input, hs, cs = x, [], []
    for k in range(lstm.num_layers):
        if k > 0:
            layer_input = sequence_dropout(layer_input, dropout, True, locked)
        w_ih, w_hh, b_ih, b_hh = (getattr(lstm, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih",
                                                                               "bias_hh"))
        if weight_drop:
            w_hh = F.dropout(w_hh, weight_drop, training=True)
        layer_input, h, c = naive_lstm(layer_input, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh)
        hs.append(h)
        cs.append(c)
    return layer_input, torch.stack(hs), torch.stack(cs)


@pytest.mark.parametrize("locked", [False, True], ids=["dropout", "locked-dropout"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_between_layers_and_weight_drop_on_every_backend(backend, locked, nan_empty):
    torch.manual_seed(0)
    lstm = LSTM(5, 16, num_layers=2, backend=backend, dropout=0.4, locked_dropout=locked, weight_drop=0.3)
    x, state = torch.randn(3, 4, 5), (torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    torch.manual_seed(7)
    out, (h, c) = lstm(x, state)
    want_out, want_h, want_c = _expected_layers(lstm, x, state, 7, 0.4, locked, 0.3)
    for name, got, want in (("out", out, want_out), ("hN", h, want_h), ("cN", c, want_c)):
        assert_rel_close(got, want, TOLERANCE[torch.float32], f"{backend} {name}")
    lstm.eval()
    assert_rel_close(lstm(x, state)[0], naive_two_layers(lstm, x, state), TOLERANCE[torch.float32], "eval: none")


def naive_two_layers(lstm, x, state):
    out = x
    for k in range(2):
        out, _, _ = naive_lstm(out, state[0][k], state[1][k], *(getattr(lstm, f"{n}_l{k}") for n in
                                                                ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
    return out


def test_weight_drop_draws_one_mask_per_window_for_all_its_steps(monkeypatch):
    masks = []
    real = F.dropout
    monkeypatch.setattr(lstm_module.F, "dropout",
                        lambda w, p, training: masks.append(real(w, p, training)) or masks[-1])
    lstm = LSTM(3, 8, backend="reference", weight_drop=0.5)
    lstm(torch.randn(2, 7, 3))
    lstm(torch.randn(2, 7, 3))
    assert len(masks) == 2 and not torch.equal(masks[0], masks[1]), "one mask per forward (window), fresh each"


# -- tied weights ----------------------------------------------------------------------------------

def test_tied_weights_are_one_tensor_and_untied_keep_the_tutorial_keys():
    keys = ["embed.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0",
            "linear.weight", "linear.bias"]
    assert list(RNNLM(30, 16, 16, dropout=0.5, weight_drop=0.5).state_dict()) == keys
    assert list(RNNLM(30, 16, 16, tied=True).state_dict()) == keys, "tied: the same keys, one tensor behind two"
    tied = RNNLM(30, 16, 16, tied=True)
    assert tied.linear.weight is tied.embed.weight
    assert len(list(tied.parameters())) == len(list(RNNLM(30, 16, 16).parameters())) - 1
    optimizer = torch.optim.SGD(tied.parameters(), lr=1.0)
    logits, _ = tied(torch.randint(0, 30, (2, 5)))
    logits.sum().backward()
    optimizer.step()
    assert tied.linear.weight is tied.embed.weight, "still one tensor after an update"
    with pytest.raises(UsageError, match="--embed-size must equal --hidden-size"):  # the model trusts a checked config
        check_config(TrainConfig(embed_size=8, hidden_size=16, tied=True))


def test_init_range_is_the_examples():
    model = RNNLM(1000, 32, 32, init_range=0.1)
    for weight in (model.embed.weight, model.linear.weight):
        assert weight.abs().max() <= 0.1 and weight.std() > 0.05
    assert not model.linear.bias.any()


# -- SGD and annealing -------------------------------------------------------------------------------

def tiny(corpus_dir, out, **changes) -> TrainConfig:
    cfg = TrainConfig(data=str(corpus_dir), embed_size=16, hidden_size=16, epochs=4, batch_size=4, seq_len=5,
                      lr=0.01, log_interval=20, eval_batch_size=3, out=str(out), device="cpu")
    return dataclasses.replace(cfg, **changes)


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "simulated-graph"])
def test_sgd_divides_the_rate_when_validation_does_not_improve(corpus_dir, tmp_path, monkeypatch, graphed):
    if graphed:
        monkeypatch.setenv("FASTLM_SIMULATE_CUDA_GRAPHS", "1")
    losses = iter([3.0, 2.0, 2.5, 2.4])  # epoch 2 improves, 3 and 4 do not
    real_validate = trainer.Run.validate
    monkeypatch.setattr(trainer.Run, "validate",
                        lambda self, data: next(losses) if data is self.valid_data else real_validate(self, data))
    captures = []
    real_capture = TrainStep._capture
    monkeypatch.setattr(TrainStep, "_capture", lambda self, api: captures.append(1) or real_capture(self, api))
    run = tmp_path / "run"
    train(tiny(corpus_dir, run, optimizer="sgd", lr=1.0, lr_decay=4.0))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = {r["epoch"]: r["lr"] for r in records if r["split"] == "train"}
    assert rates == {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.25}
    assert load_checkpoint(run)["optimizer"]["param_groups"][0]["lr"] == 1.0 / 16
    assert len(captures) == (3 if graphed else 0), "captured at the start and again after each change of rate"


def test_a_captured_step_refuses_a_rate_changed_behind_its_back(corpus_dir):
    from fastlm.training.optimizer import make_optimizer
    from fastlm.training.simulated_graphs import SimulatedGraphs
    from fastlm.training.step import TrainStep

    model = RNNLM(14, 8, 8)
    optimizer = make_optimizer(model, 1.0, capturable=True, kind="sgd")
    stepper = TrainStep(model, optimizer, 2, 3, 0.5, graphs=SimulatedGraphs())
    tokens = torch.randint(0, 14, (2, 3))
    stepper.step(tokens, tokens)
    stepper.detach_state()
    optimizer.param_groups[0]["lr"] = 0.5
    with pytest.raises(RuntimeError, match="learning rate changed since the step was captured"):
        stepper.step(tokens, tokens)


# -- exact resume, graphed runs, recipes --------------------------------------------------------------

REGULARISED = dict(dropout=0.3, locked_dropout=True, weight_drop=0.2, num_layers=2, optimizer="sgd", lr=1.0,
                   lr_decay=2.0, tied=True, init_range=0.1)


def test_a_regularised_run_with_the_fused_kernel_resumes_exactly(corpus_dir, tmp_path):
    # Interpreted, so fewer steps; the split lands mid-epoch all the same.
    regularised = {**REGULARISED, "embed_size": 16, "hidden_size": 16}
    straight = train(tiny(corpus_dir, tmp_path / "straight", max_steps=12, log_interval=1, backend="triton",
                          **regularised))
    first = train(tiny(corpus_dir, tmp_path / "split", max_steps=6, log_interval=1, backend="triton", **regularised))
    second = train(TrainConfig(), resume=str(tmp_path / "split"), overrides={"max_steps": 12})
    assert first.train_losses + second.train_losses == straight.train_losses


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_regularised_run_resumes_exactly(corpus_dir, tmp_path, backend):
    # Epochs of 132 steps: the split at 150 is inside the second; dropout draws from the saved RNG.
    straight = train(tiny(corpus_dir, tmp_path / "straight", epochs=3, log_interval=1, backend=backend, **REGULARISED))
    first = train(tiny(corpus_dir, tmp_path / "split", epochs=3, log_interval=1, max_steps=150, backend=backend,
                       **REGULARISED))
    second = train(TrainConfig(), resume=str(tmp_path / "split"), overrides={"max_steps": None})
    assert first.train_losses + second.train_losses == straight.train_losses
    assert len(set(straight.train_losses[:20])) == 20


def test_simulated_graph_training_with_dropout_equals_eager_training(corpus_dir, tmp_path, monkeypatch, capsys):
    eager = train(tiny(corpus_dir, tmp_path / "eager", epochs=2, log_interval=1, **REGULARISED))
    monkeypatch.setenv("FASTLM_SIMULATE_CUDA_GRAPHS", "1")
    capsys.readouterr()
    graphed = train(tiny(corpus_dir, tmp_path / "graphed", epochs=2, log_interval=1, **REGULARISED))
    out = capsys.readouterr().out
    assert "CUDA graphs," in out and "CUDA graphs off" not in out, "the self-check passes with dropout on"
    assert graphed.train_losses == eager.train_losses, "the same masks, drawn fresh at every replay"


@pytest.mark.parametrize("saved", ["current-device", "every-device"], ids=["current-device", "older-checkpoint"])
def test_the_rng_state_puts_the_saved_cuda_state_on_the_current_device(monkeypatch, saved):
    # One helper for checkpoints and for the step's snapshots around capture: dropout masks on a GPU
    # come from the current device's generator, saved alone. Under torchrun every rank (here one on
    # cuda:1) takes rank 0's saved state onto its own device. Older checkpoints, from one process,
    # hold every device's state by index: the current device's is the one that process drew from.
    from fastlm.device import rng_state, set_rng_state

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: calls.append("get") or "saved state")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: calls.append(("set", state)))
    state = rng_state()
    assert state["cuda"] == "saved state" and torch.equal(state["torch"], torch.get_rng_state())
    if saved == "every-device":
        state["cuda"] = ["cuda:0 state", "cuda:1 state"]
    set_rng_state(state)
    assert calls == ["get", ("set", "saved state" if saved == "current-device" else "cuda:1 state")]


def test_masks_that_would_be_drawn_per_word_are_refused_with_scheduled_sampling(corpus_dir, tmp_path):
    from fastlm.errors import TrainingError

    for extra in ({"weight_drop": 0.2}, {"dropout": 0.2, "locked_dropout": True}):
        with pytest.raises(TrainingError, match="would draw a mask per word, not per window"):
            check_config(tiny(corpus_dir, tmp_path, teacher_forcing=0.5, **extra))
    check_config(tiny(corpus_dir, tmp_path, teacher_forcing=0.5, dropout=0.2))


def test_recipes_set_what_they_say_and_flags_override_them(capsys):
    small = recipe_config("small", {})
    assert {k: getattr(small, k) for k in RECIPES["small"][0]} == RECIPES["small"][0] and small.recipe == "small"
    overridden = recipe_config("small", {"epochs": 1, "dropout": 0.0, "optimizer": "adam"})
    assert (overridden.epochs, overridden.dropout, overridden.optimizer, overridden.tied) == (1, 0.0, "adam", True)
    assert recipe_config("tutorial", {}) == dataclasses.replace(TrainConfig(), recipe="tutorial")
    with pytest.raises(SystemExit) as exit_info:
        run_main(train_main, ["--recipe", "list"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(name in out for name in RECIPES) and "--optimizer sgd" in out
    with pytest.raises(SystemExit) as exit_info:
        run_main(train_main, ["--recipe", "large"])
    assert exit_info.value.code == 2 and "unknown --recipe 'large'" in capsys.readouterr().err


def test_the_plot_tool_draws_the_curves_of_several_runs(tiny_run, tmp_path):
    from fastlm.plot import run_curves

    other = tmp_path / "other"
    other.mkdir()
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    (other / "metrics.jsonl").write_text("".join(json.dumps({**r, "loss": r.get("loss", 0) * 2}) + "\n"
                                                 for r in records))
    (train_steps, train_loss), (valid_steps, valid_ppl) = run_curves(tiny_run)
    assert train_steps == [r["global_step"] for r in records if r["split"] == "train"]
    assert valid_ppl == [r["ppl"] for r in records if r["split"] == "valid" and "tokens" not in r]
    assert run_curves(other)[0][1] == [2 * loss for loss in train_loss]
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "-m", "fastlm.plot", str(tiny_run), str(other), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and proc.stdout.strip() == f"wrote {out}"
    proc = subprocess.run([sys.executable, "-m", "fastlm.plot", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "has no metrics.jsonl" in proc.stderr
