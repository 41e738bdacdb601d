"""prep/lm_text.py: GPT-2 ids, the byte-exact round trip of local files, document separators, the
val split, shards, the val/train/max_tokens rule of the download path, no partial output, and the
download failing clearly offline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from prep import lm_text  # noqa: E402

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "Caf\u00e9 na\u00efve \u2014 \u00fcber \u4e2d\u6587 \U0001F600, "
        "and a literal <|endoftext|> inside the text.\n") * 40


@pytest.fixture(scope="module")
def enc():
    return lm_text.gpt2_encoding()


def read_split(out_dir, split):
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    parts = [np.fromfile(os.path.join(out_dir, name), dtype=np.uint16) for name, _ in meta["shards"][split]]
    for (name, n), part in zip(meta["shards"][split], parts):
        assert len(part) == n, name
    return np.concatenate(parts)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "prep", "lm_text.py"), *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def leftovers(folder):
    return [f for f in os.listdir(folder) if f.startswith((".tmp_", ".old_"))]


def test_gpt2_ids(enc):
    # GPT-2's published ids: "Hello" 15496, " world" 995, <|endoftext|> 50256
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.encode("<|endoftext|>", allowed_special="all") == [lm_text.EOT]


def test_local_file_round_trip(tmp_path, enc):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    r = run_cli("--input", str(tmp_path / "a.txt"), "--out_dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    train, val = read_split(tmp_path / "out", "train"), read_split(tmp_path / "out", "val")
    stream = np.concatenate([train, val])
    assert enc.decode(stream.tolist()) == "<|endoftext|>" + TEXT  # byte-exact, unicode included
    assert np.flatnonzero(stream == lm_text.EOT).tolist() == [0]  # the literal in the text is plain text
    assert len(val) == int(len(stream) * 0.1)  # the last 10%
    meta = json.load(open(tmp_path / "out" / "meta.json"))
    assert meta["tokens"] == {"train": len(train), "val": len(val)} and meta["documents"] == 1
    assert f"train: {len(train):,} tokens in 1 shard(s)" in r.stdout
    assert oct(os.stat(tmp_path / "out").st_mode & 0o777) == "0o755"
    assert not leftovers(tmp_path)


def test_files_are_documents_and_shards_split_the_stream(tmp_path, enc):
    texts = ["One short document.\n", "A second one, a little longer than the first.\n", "Third.\n"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    paths = [str(tmp_path / f"{i}.txt") for i in range(3)]
    whole = lm_text.prepare(str(tmp_path / "whole"), inputs=paths, val_fraction=0.2, threads=1)
    sharded = lm_text.prepare(str(tmp_path / "sharded"), inputs=paths, val_fraction=0.2, shard_tokens=4, threads=1)
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "whole", split), read_split(tmp_path / "sharded", split))
        assert all(n <= 4 for _, n in sharded["shards"][split])
        assert [n for _, n in sharded["shards"][split]][:-1] == [4] * (len(sharded["shards"][split]) - 1)
    assert len(whole["shards"]["train"]) == 1 and whole["documents"] == 3
    stream = np.concatenate([read_split(tmp_path / "whole", s) for s in ("train", "val")])
    starts = np.flatnonzero(stream == lm_text.EOT).tolist()
    docs = [enc.decode(stream[a + 1:b].tolist()) for a, b in zip(starts, starts[1:] + [len(stream)])]
    assert docs == texts  # every document is <|endoftext|> + its text


def test_rerun_replaces_the_folder(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    lm_text.prepare(str(tmp_path / "out"), inputs=[str(tmp_path / "a.txt")], shard_tokens=100, threads=1)
    assert len(os.listdir(tmp_path / "out")) > 3
    lm_text.prepare(str(tmp_path / "out"), inputs=[str(tmp_path / "a.txt")], threads=1)
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "train_000000.bin", "val_000000.bin"]
    assert not leftovers(tmp_path)


def test_errors_leave_nothing_behind(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    lm_text.prepare(str(tmp_path / "out"), inputs=[str(tmp_path / "a.txt")], threads=1)
    before = {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")}
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(ValueError, match="empty.txt: the file is empty"):
        lm_text.prepare(str(tmp_path / "out"), inputs=[str(tmp_path / "a.txt"), str(tmp_path / "empty.txt")])
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        lm_text.prepare(str(tmp_path / "out"), inputs=[str(tmp_path / "nope.txt")])
    with pytest.raises(ValueError, match="too few for a val split"):
        (tmp_path / "tiny.txt").write_text("Hi.")
        lm_text.prepare(str(tmp_path / "out"), inputs=[str(tmp_path / "tiny.txt")])
    assert {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")} == before
    assert not leftovers(tmp_path)


def test_download_rule_val_first_then_train_capped(tmp_path):
    writers = {s: lm_text.ShardWriter(str(tmp_path), s, 1000) for s in ("train", "val")}
    docs = [list(range(i * 10, i * 10 + 4)) for i in range(10)]  # ten 4-token documents
    used = lm_text.write_stream(iter(docs), writers, val_tokens=6, max_tokens=9)
    for w in writers.values():
        w.close()
    val = np.fromfile(tmp_path / "val_000000.bin", dtype=np.uint16).tolist()
    train = np.fromfile(tmp_path / "train_000000.bin", dtype=np.uint16).tolist()
    assert val == docs[0] + docs[1]  # whole documents until val holds >= 6 tokens
    assert train == docs[2] + docs[3] + docs[4][:1]  # then train, cut at exactly 9 tokens
    assert used == 5  # and no sixth document was asked for


def test_download_fails_clearly_offline(tmp_path):
    # a closed local port stands in for "no network": the Hub client gets a connection error at once
    r = run_cli("--dataset", "fineweb", "--out_dir", str(tmp_path / "fw"),
                env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})
    assert r.returncode == 1
    assert "error: could not reach the Hugging Face Hub" in r.stderr and "Offline?" in r.stderr
    assert "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []
