"""python -m fastlm.embed: word-vector distances, neighbours and analogies of one or more checkpoints.

    python -m fastlm.embed distance army taxpayer --checkpoint runs/a --checkpoint runs/b
    python -m fastlm.embed neighbors money -k 10 --checkpoint runs/a
    python -m fastlm.embed analogy he she his --checkpoint runs/a --matrix output
"""
from __future__ import annotations

import argparse

from fastlm.cli import ArgumentParser, run_main
from fastlm.generation.embedding import MATRICES, analogy, cosine_distance, neighbors, word_id, word_vectors
from fastlm.models.lm import load_model


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", action="append", required=True,
                        help="run folder or .pt file; repeat to compare checkpoints")
    common.add_argument("--matrix", choices=MATRICES, default="input",
                        help="input embedding or output-layer rows (default: input)")
    p = ArgumentParser(prog="python -m fastlm.embed", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    distance = commands.add_parser("distance", parents=[common], help="cosine distance of two words")
    distance.add_argument("words", nargs=2, metavar="WORD")
    near = commands.add_parser("neighbors", parents=[common], help="nearest words by cosine similarity")
    near.add_argument("word")
    near.add_argument("-k", type=int, default=10, help="how many neighbours (default: 10)")
    analog = commands.add_parser(
        "analogy", parents=[common], help="A is to B as C is to ? (3CosAdd)",
        description="A is to B as C is to ?, by 3CosAdd (as gensim's most_similar): A, B and C are "
                    "unit-normalised, and the answers are the words most cosine-similar to B − A + C of "
                    "the unit vectors, A, B and C excluded. The score printed is that cosine similarity.")
    for word in ("A", "B", "C"):  # one positional each: a tuple metavar breaks --help on Python 3.11
        analog.add_argument(word.lower(), metavar=word)
    analog.add_argument("-k", type=int, default=5, help="how many answers (default: 5)")
    args = p.parse_args(argv)
    if args.command == "analogy":
        args.words = [args.a, args.b, args.c]

    for k, path in enumerate(args.checkpoint):
        model, dictionary, _ = load_model(path)
        vectors = word_vectors(model, args.matrix)
        if args.command == "distance":
            a, b = (word_id(dictionary, w) for w in args.words)  # an unknown word stops before any output
            if k == 0:
                print(f"{'checkpoint':40} cosine distance ({args.matrix}) {args.words[0]} / {args.words[1]}")
            print(f"{path:40} {cosine_distance(vectors, a, b):.4f}")
            continue
        if args.command == "neighbors":
            found = neighbors(vectors, word_id(dictionary, args.word), args.k)
            title = f"nearest to {args.word!r}"
        else:
            found = analogy(vectors, *(word_id(dictionary, w) for w in args.words), k=args.k)
            title = f"{args.words[0]} : {args.words[1]} = {args.words[2]} : ?"
        print(f"{path} ({args.matrix} vectors): {title}")
        for rank, (i, similarity) in enumerate(found, 1):
            print(f"  {rank:2}. {dictionary.idx2word[i]:20} {similarity:.4f}")
    return 0


if __name__ == "__main__":
    run_main(main)
