"""
Write a small tiktoken BPE ranks file whose tokens are the whole words of some kit JSON files.

The CPU demo trains tiny models: with GPT-2's 50,257-token vocabulary the output layer alone would
cost more than the rest of the model. This file keeps the same tokenizer code path (a tiktoken
Encoding with GPT-2's pre-tokenizer regex) with a vocabulary of a few hundred tokens.

Ranks: the 256 single bytes first (any text stays encodable), then every prefix of every
pre-token piece, shortest first. Prefix-closure guarantees BPE merges each seen piece into one
token: the first two parts of a partly merged piece always form a prefix, which is a rank.

  python prep/word_tokenizer.py data/prosqa_small/*.json --out data/prosqa_small/words.tiktoken
"""

import argparse
import base64
import json
import os

import regex
from tiktoken_ext.openai_public import r50k_pat_str


def texts(path):
    """Every string coconut.py tokenizes for one file, with the same separators."""
    for ex in json.load(open(path)):
        yield ex["question"] + "\n"
        yield from (s + "\n" for s in ex["steps"])
        yield "### " + ex["answer"]


def build_ranks(paths):
    pieces = {"<<"}  # coconut.py initialises the latent tokens from the `<<` token
    pattern = regex.compile(r50k_pat_str)
    for path in paths:
        for text in texts(path):
            pieces.update(pattern.findall(text))
    ranks = {bytes([b]): b for b in range(256)}
    prefixes = {p.encode()[:n] for p in pieces for n in range(2, len(p.encode()) + 1)}
    for token in sorted(prefixes, key=lambda t: (len(t), t)):
        ranks[token] = len(ranks)
    return ranks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="kit JSON files (question/steps/answer)")
    parser.add_argument("--out", required=True, help="ranks file to write (tiktoken format)")
    args = parser.parse_args()
    ranks = build_ranks(args.files)
    tmp = args.out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(tmp, "w") as f:
        for token, rank in ranks.items():
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    os.replace(tmp, args.out)
    print(f"{args.out}: {len(ranks)} tokens from {len(args.files)} files")


if __name__ == "__main__":
    main()
