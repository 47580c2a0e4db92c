"""python -m fastlm.sample: generate text from a checkpoint."""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from fastlm.cli import run_main
from fastlm.config import pick_device
from fastlm.data import EOS
from fastlm.model import load_model
from fastlm.sampling import STRATEGIES, encode_prompt, generate, to_text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlm.sample", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a run folder or a .pt file in it")
    p.add_argument("--strategy", choices=STRATEGIES, default="multinomial",
                   help="multinomial samples from the softmax; greedy takes the arg-max")
    p.add_argument("--temperature", type=float, default=1.0, help="> 0; lower is more conservative")
    p.add_argument("--top-k", type=int, help="sample only among the k most likely words")
    p.add_argument("--top-p", type=float, help="sample only among the most likely words holding this mass")
    p.add_argument("--prompt", default="", help="words fed first to set the state")
    p.add_argument("--num-words", type=int, default=50, help="words to generate per sample")
    p.add_argument("--num-samples", type=int, default=1, help="samples generated together in one batch")
    p.add_argument("--seed", type=int, help="same seed, same text (default: random, printed)")
    p.add_argument("--stop-at-eos", action="store_true", help="end each sample at its first <eos>")
    p.add_argument("--out", default="sample.txt", help="where the text goes (<eos> written as a newline)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    model, dictionary, _ = load_model(args.checkpoint, pick_device(args.device))
    prompt = encode_prompt(args.prompt.split(), dictionary)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    samples = generate(model, args.num_words, num_samples=args.num_samples, prompt=prompt, strategy=args.strategy,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed,
                       eos_id=dictionary.word2idx[EOS] if args.stop_at_eos else None)
    texts = [to_text(prompt + sample, dictionary).rstrip("\n") for sample in samples]
    Path(args.out).write_text("\n\n".join(texts) + "\n")
    for k, text in enumerate(texts, 1):
        print(f"--- sample {k} ---" if len(texts) > 1 else "---")
        print(text)
    print(f"--- wrote {len(texts)} sample(s) to {args.out} (seed {seed})")
    return 0


if __name__ == "__main__":
    run_main(main)
