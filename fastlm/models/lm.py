"""`RNNLM`: embedding → LSTM → linear over the vocabulary.

The submodule names (`embed`, `lstm`, `linear`) are those of the classic PyTorch tutorial's
language model, so a checkpoint of either loads into the other.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor, nn

from fastlm.checkpoint import check_finite_weights, load_checkpoint
from fastlm.data import Dictionary
from fastlm.errors import CheckpointError, first_line
from fastlm.models.lstm import LSTM, check_backend, sequence_dropout

State = tuple[Tensor, Tensor]


class RNNLM(nn.Module):
    """Word-level LSTM language model.

    Regularisation, all off by default (the tutorial's model): `dropout` on the embeddings, between
    LSTM layers and on the LSTM output, as the PyTorch word-language-model example places it
    (`locked_dropout`: one mask per row for the whole window, variational dropout); `weight_drop`
    on W_hh (see `LSTM`); `tied`: the output layer shares the embedding matrix (needs embed size =
    hidden size). `init_range` r draws the embedding and output weights from U(-r, r) and zeroes the
    output bias, as that example does; None keeps torch's defaults. The arguments are trusted:
    `fastlm.config.check_config` checks them, with messages naming the flags.

    Shapes: tokens (B, T) → logits (B·T, V); state (h, c), each (L, B, H).
    """

    def __init__(
        self,
        vocab_size: int,
        embed_size: int = 128,
        hidden_size: int = 1024,
        num_layers: int = 1,
        backend: str = "auto",
        dropout: float = 0.0,
        locked_dropout: bool = False,
        weight_drop: float = 0.0,
        tied: bool = False,
        init_range: float | None = None,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = LSTM(embed_size, hidden_size, num_layers, batch_first=True, backend=backend, dropout=dropout,
                         locked_dropout=locked_dropout, weight_drop=weight_drop)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.dropout, self.locked_dropout, self.tied = dropout, locked_dropout, tied
        if tied:
            self.linear.weight = self.embed.weight
        if init_range is not None:
            with torch.no_grad():
                self.embed.weight.uniform_(-init_range, init_range)
                self.linear.bias.zero_()
                self.linear.weight.uniform_(-init_range, init_range)

    @classmethod
    def from_config(cls, cfg: dict, vocab_size: int, backend: str | None = None) -> RNNLM:
        """The model a training config describes (a TrainConfig's or a checkpoint's `config` dict)."""
        return cls(vocab_size, cfg["embed_size"], cfg["hidden_size"], cfg["num_layers"],
                   backend=backend or cfg.get("backend", "auto"), dropout=cfg.get("dropout", 0.0),
                   locked_dropout=cfg.get("locked_dropout", False), weight_drop=cfg.get("weight_drop", 0.0),
                   tied=cfg.get("tied", False), init_range=cfg.get("init_range"))

    def forward(self, tokens: Tensor, state: State | None = None, return_features: bool = False
                ) -> tuple[Tensor, State] | tuple[Tensor, State, Tensor]:
        """`return_features` adds what the output layer reads, (B, T, H): the continuous cache's keys."""
        if tokens.dim() != 2:
            raise ValueError(f"RNNLM expects token ids of shape (batch, seq), got rank {tokens.dim()}")
        shard = self.lstm.shard
        x = sequence_dropout(self.embed(tokens), self.dropout, self.training, self.locked_dropout, shard)
        out, state = self.lstm(x, state)
        out = sequence_dropout(out, self.dropout, self.training, self.locked_dropout, shard)
        logits = self.linear(out.reshape(-1, out.shape[-1]))
        return (logits, state, out) if return_features else (logits, state)

    def shard_batch(self, rank: int, ranks: int) -> None:
        """Under torchrun: this replica sees rows rank·B … (rank+1)·B of a global batch of ranks·B
        rows, and takes its dropout masks from ones drawn for all of them (`sequence_dropout`)."""
        self.lstm.shard = (rank, ranks)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """Zero (h, c) for a batch, in the model's dtype, on its device unless told otherwise."""
        weight = self.linear.weight
        shape = (self.lstm.num_layers, batch_size, self.lstm.hidden_size)
        device = weight.device if device is None else device
        return (torch.zeros(shape, device=device, dtype=weight.dtype),
                torch.zeros(shape, device=device, dtype=weight.dtype))


@contextlib.contextmanager
def learning_without_dropout(model: RNNLM):
    """Training mode with every dropout off, for learning at evaluation time (dynamic evaluation):
    the scores are the deterministic model's, and cuDNN's LSTM runs its backward only in training mode."""
    saved = model.dropout, model.lstm.layer_dropout, model.lstm.weight_drop, model.training
    model.dropout = model.lstm.layer_dropout = model.lstm.weight_drop = 0.0
    model.train()
    try:
        yield model
    finally:
        model.dropout, model.lstm.layer_dropout, model.lstm.weight_drop = saved[:3]
        model.train(saved[3])


def parameter_count(cfg, vocab_size: int) -> int:
    """The number of parameters of the model a config (a TrainConfig) describes, before building it."""
    lstm = sum(4 * cfg.hidden_size * ((cfg.embed_size if layer == 0 else cfg.hidden_size) + cfg.hidden_size + 2)
               for layer in range(cfg.num_layers))
    output = vocab_size * (1 if cfg.tied else cfg.hidden_size + 1)  # tied: only its bias is its own
    return vocab_size * cfg.embed_size + lstm + output


def training_bytes(cfg, vocab_size: int) -> int:
    """At least what training this model needs at once, in bytes: fp32 weights with their gradients
    and two Adam moments, and one window's activations kept for backward (each layer's four gates and
    two states per token; the logits, their softmax and its gradient)."""
    tokens = cfg.batch_size * cfg.seq_len
    activations = tokens * (cfg.embed_size + 6 * cfg.hidden_size * cfg.num_layers + 3 * vocab_size)
    return 4 * (4 * parameter_count(cfg, vocab_size) + activations)


def load_model(checkpoint: str | os.PathLike, device: torch.device | str = "cpu", backend: str | None = None
               ) -> tuple[RNNLM, Dictionary, dict]:
    """The model and vocabulary of a checkpoint (a run folder or a .pt file), ready for inference."""
    ckpt = load_checkpoint(checkpoint, map_location=device)
    check_finite_weights(ckpt, checkpoint)
    cfg = ckpt["config"]
    check_backend(backend or cfg.get("backend", "auto"), device)  # a saved `triton` needs Triton on this machine too
    dictionary = Dictionary(ckpt["vocab"])
    model = RNNLM.from_config(cfg, len(dictionary), backend).to(device)
    load_weights(model, ckpt["model"], checkpoint)
    model.eval()
    return model, dictionary, ckpt


def load_weights(model: RNNLM, weights: dict, source: str | os.PathLike) -> None:
    """`model.load_state_dict`, with weights that do not fit (a hand-edited or foreign checkpoint)
    reported as a CheckpointError naming the first misfit."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), first_line(err))
        raise CheckpointError(f"{source}: its weights do not fit the model its config describes ({detail})") from None
