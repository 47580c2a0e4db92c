"""python -m fastlm.evaluate: perplexity of a checkpoint over a whole split."""
from __future__ import annotations

import argparse

from fastlm.checkpoint import load_checkpoint
from fastlm.cli import run_main
from fastlm.data import Corpus, Dictionary, batchify
from fastlm.model import RNNLM
from fastlm.trainer import evaluate, perplexity, pick_device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlm.evaluate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a run folder or a .pt file in it (checkpoint.pt, best.pt)")
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--data", help="data folder (default: the one the run trained on)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, help="rows (default: the run's eval batch size)")
    p.add_argument("--backend", help="LSTM backend (default: the run's)")
    args = p.parse_args(argv)

    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt["config"]
    device = pick_device(args.device)
    corpus = Corpus(args.data or cfg["data"], Dictionary(ckpt["vocab"]))
    model = RNNLM(len(corpus.dictionary), cfg["embed_size"], cfg["hidden_size"], cfg["num_layers"],
                  backend=args.backend or cfg["backend"]).to(device)
    model.load_state_dict(ckpt["model"])
    data = batchify(getattr(corpus, args.split), args.batch_size or cfg["eval_batch_size"]).to(device)
    loss = evaluate(model, data, cfg["seq_len"])
    print(f"{args.split} perplexity: {perplexity(loss):.2f} (loss {loss:.4f}, {data.numel()} tokens, "
          f"after {ckpt['global_step']} training steps, {args.checkpoint})")
    return 0


if __name__ == "__main__":
    run_main(main)
