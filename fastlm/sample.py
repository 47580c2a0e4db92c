"""python -m fastlm.sample: generate text from a checkpoint."""
from __future__ import annotations

import random
import sys
from pathlib import Path

from fastlm.checkpoint import checkpoint_path
from fastlm.cli import ArgumentParser, run_main
from fastlm.data import EOS, UNK
from fastlm.device import available_bytes, check_seed, pick_device
from fastlm.errors import UsageError
from fastlm.files import check_output_path, write_output
from fastlm.generation.sampling import STRATEGIES, encode_prompt, generate, to_text
from fastlm.models.lm import load_model


def check_batch_fits(num_samples: int, model, device) -> None:
    """Refuse a --num-samples whose batch (a row of logits and a state per sample) exceeds free memory."""
    per_sample = 4 * 3 * (model.linear.out_features + 4 * model.lstm.hidden_size * model.lstm.num_layers)
    free = available_bytes(device)
    if free is not None and num_samples * per_sample > free:
        raise UsageError(f"--num-samples {num_samples} needs about {num_samples * per_sample / 2**30:.0f} GiB at once "
                         f"and {device} has {free / 2**30:.1f} GiB free: ask for at most {free // per_sample:,}")


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m fastlm.sample", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a run folder or a .pt file in it")
    p.add_argument("--strategy", choices=STRATEGIES, default="multinomial",
                   help="multinomial samples from the softmax; greedy takes the arg-max (default: multinomial)")
    p.add_argument("--temperature", type=float, default=1.0, help="> 0; lower is more conservative (default: 1.0)")
    p.add_argument("--top-k", type=int, help="sample only among the k most likely words")
    p.add_argument("--top-p", type=float, help="sample only among the most likely words holding this mass")
    p.add_argument("--prompt", default="", help="words fed first to set the state (default: none, the first word "
                   "is drawn uniformly)")
    p.add_argument("--num-words", type=int, default=50, help="words to generate per sample (default: 50)")
    p.add_argument("--num-samples", type=int, default=1, help="samples generated together in one batch (default: 1)")
    p.add_argument("--seed", type=int, help="same seed, same text (default: random, printed)")
    p.add_argument("--stop-at-eos", action="store_true", help="end each sample at its first <eos>")
    p.add_argument("--out", help="where the text goes, <eos> written as a newline (default: sample.txt in the "
                   "checkpoint's run folder)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    args = p.parse_args(argv)

    out = Path(args.out) if args.out else checkpoint_path(args.checkpoint).parent / "sample.txt"
    check_output_path(out, example="sample.txt")
    if args.seed is not None:
        check_seed(args.seed)
    device = pick_device(args.device)
    model, dictionary, _ = load_model(args.checkpoint, device)
    check_batch_fits(args.num_samples, model, device)
    words = args.prompt.split()
    unknown = sorted({word for word in words if word not in dictionary})
    if unknown and UNK in dictionary:
        print(f"note: prompt words not in the vocabulary, read as {UNK}: {', '.join(unknown)}", file=sys.stderr)
    prompt = encode_prompt(words, dictionary)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    samples = generate(model, args.num_words, num_samples=args.num_samples, prompt=prompt, strategy=args.strategy,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed,
                       eos_id=dictionary.word2idx[EOS] if args.stop_at_eos else None)
    texts = [to_text(prompt + sample, dictionary).rstrip("\n") for sample in samples]
    write_output(out, "\n\n".join(texts) + "\n", example="sample.txt")
    for k, text in enumerate(texts, 1):
        print(f"--- sample {k} ---" if len(texts) > 1 else "---")
        print(text)
    print(f"--- wrote {len(texts)} sample(s) to {out} (seed {seed})")
    return 0


if __name__ == "__main__":
    run_main(main)
