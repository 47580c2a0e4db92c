"""RNNLM: the classic tutorial's keys, and the same function as a model built from nn modules."""
import pytest
import torch
from helpers import assert_rel_close
from torch import nn

from fastlm.models.lm import RNNLM

KEYS = ["embed.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0",
        "linear.weight", "linear.bias"]


class ClassicRNNLM(nn.Module):
    """The classic PyTorch tutorial's language model, written independently of fastlm."""

    def __init__(self, vocab_size, embed_size, hidden_size, num_layers):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, vocab_size)

    def forward(self, x, h):
        out, (h, c) = self.lstm(self.embed(x), h)
        return self.linear(out.reshape(out.size(0) * out.size(1), out.size(2))), (h, c)


def test_state_dict_keys_are_the_classic_models():
    assert list(RNNLM(50).state_dict()) == KEYS


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_checkpoints_load_both_ways_and_compute_the_same(backend):
    ours = RNNLM(30, 8, 16, 2, backend=backend).double()
    classic = ClassicRNNLM(30, 8, 16, 2).double()
    classic.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, 30, (3, 7))
    state = tuple(torch.randn(2, 3, 16, dtype=torch.float64) for _ in range(2))
    logits, (h, c) = ours(tokens, state)
    ref_logits, (ref_h, ref_c) = classic(tokens, state)
    assert logits.shape == (3 * 7, 30)
    for name, a, b in (("logits", logits, ref_logits), ("h", h, ref_h), ("c", c, ref_c)):
        assert_rel_close(a, b, 1e-10, name)
    ours_again = RNNLM(30, 8, 16, 2, backend=backend).double()
    ours_again.load_state_dict(classic.state_dict())
    assert_rel_close(ours_again(tokens, state)[0], ref_logits, 1e-10, "logits after loading the classic weights")


def test_init_state():
    model = RNNLM(10, 4, 6, 3)
    h, c = model.init_state(5)
    assert h.shape == c.shape == (3, 5, 6)
    assert not h.any() and not c.any()


def test_token_rank_is_checked():
    with pytest.raises(ValueError, match=r"shape \(batch, seq\)"):
        RNNLM(10, 4, 6)(torch.zeros(5, dtype=torch.long))
