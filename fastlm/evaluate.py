"""python -m fastlm.evaluate: perplexity of a checkpoint over a whole split."""
from __future__ import annotations

import sys

from fastlm.cli import ArgumentParser, run_main
from fastlm.data import UNK, Corpus, batchify_for_eval
from fastlm.device import pick_device
from fastlm.models.lm import load_model
from fastlm.models.lstm import BACKENDS
from fastlm.scoring import evaluate, perplexity

OUT_OF_VOCABULARY_WARNING = 0.01


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m fastlm.evaluate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a run folder or a .pt file in it (checkpoint.pt, best.pt)")
    p.add_argument("--split", choices=("valid", "test"), default="test", help="(default: test)")
    p.add_argument("--data", help="data folder (default: the one the run trained on)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--batch-size", type=int, help="rows (default: the run's eval batch size)")
    p.add_argument("--backend", choices=BACKENDS, help="LSTM backend (default: the run's)")
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size must be a positive integer, got {args.batch_size}")

    device = pick_device(args.device)
    model, dictionary, ckpt = load_model(args.checkpoint, device, args.backend)
    cfg = ckpt["config"]
    corpus = Corpus(args.data or cfg["data"], dictionary, splits=(args.split,))
    batch_size = args.batch_size or cfg["eval_batch_size"]
    data = batchify_for_eval(getattr(corpus, args.split), batch_size, args.split, "--batch-size").to(device)
    loss = evaluate(model, data, cfg["seq_len"])
    scored = data.shape[0] * (data.shape[1] - 1)  # every token of a row but its first
    unknown = corpus.out_of_vocabulary[args.split] / max(1, getattr(corpus, args.split).numel())
    print(f"{args.split} perplexity: {perplexity(loss):.2f} (loss {loss:.4f}, {scored} tokens scored, "
          f"{unknown:.2%} out of vocabulary, after {ckpt['global_step']} training steps, {args.checkpoint})")
    if unknown > OUT_OF_VOCABULARY_WARNING:
        print(f"warning: {unknown:.1%} of the {args.split} words are not in the model's vocabulary and were scored "
              f"as {UNK}, which is easier to predict than the words themselves: this perplexity is not comparable "
              "with one on text the vocabulary covers", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
