"""heuristic.py: FAISS retrieval against brute force, the threshold, the thought hook against a slow
reference, atomic save/load (round trip, simulated crashes, dimension and directory errors), a tiny
Coconut + memory run end to end (train, crash and continue, eval writes nothing, sweep) and a
2-process torchrun that must build one index."""

import hashlib
import json
import os
import random
import subprocess
import sys

import faiss
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import coconut  # noqa: E402
import common  # noqa: E402
import heuristic  # noqa: E402
from test_coconut import chain_example, mixed_batch, tiny_model  # noqa: E402  (coconut's test fixtures)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def filled_memory(n=300, key_dim=8, value_dim=6, n_embd=12, seed=0, **options):
    memory = heuristic.LatentMemory(key_dim, value_dim, n_embd, **options)
    meta = [{"split": "train.json", "qid": i // 3, "thought": i % 3, "correct": i % 2 == 0} for i in range(n)]
    memory.add(unit(n, key_dim, seed), torch.randn(n, value_dim, generator=torch.Generator().manual_seed(seed + 1)), meta)
    return memory


def dir_digest(path):
    """sha256 over every file (relative name and bytes) under path."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            h.update(open(full, "rb").read())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# retrieval


@pytest.mark.parametrize("index_type", ["flat", "ivf"])
def test_retrieval_is_brute_force_top_k(index_type):
    # IVF with nprobe = nlist visits every cell, so it must be exact as well; 300 entries >= 39 x 4
    memory = filled_memory(index_type=index_type, ivf_nlist=4, ivf_nprobe=4)
    assert isinstance(memory.index, faiss.IndexIVFFlat if index_type == "ivf" else faiss.IndexFlatIP)
    q = unit(25, 8, seed=7)
    sims, ids = memory.search(q, 5)
    ref_sims, ref_ids = (q @ memory.keys.T).topk(5, dim=1)
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(sims, ref_sims, atol=1e-5)
    sims, ids = filled_memory(n=3).search(q, 5)  # k is capped at the memory size
    assert ids.shape == (25, 3) and (ids >= 0).all()


def test_hnsw_finds_stored_keys():
    memory = filled_memory(index_type="hnsw")
    sims, ids = memory.search(memory.keys[:50], 1)
    assert ids[:, 0].tolist() == list(range(50)) and torch.allclose(sims[:, 0], torch.ones(50), atol=1e-5)


def test_ivf_starts_flat_until_it_can_train():
    memory = filled_memory(n=100, index_type="ivf", ivf_nlist=4)  # 100 < 39 x 4: not enough to train
    assert isinstance(memory.index, faiss.IndexFlatIP)
    memory.add(unit(60, 8, 3), torch.zeros(60, 6), [{"split": "s", "qid": 1000 + i} for i in range(60)])
    assert isinstance(memory.index, faiss.IndexIVFFlat) and memory.index.ntotal == 160


def test_add_skips_questions_already_stored():
    memory = filled_memory(n=30)
    meta = [{"split": "train.json", "qid": q, "thought": 0} for q in (5, 99, 99)]  # qid 5 is stored already
    assert memory.add(unit(3, 8, 9), torch.zeros(3, 6), meta) == 2
    assert len(memory) == memory.index.ntotal == 32 and [m["id"] for m in memory.meta] == list(range(32))


def test_threshold_and_top_k_are_honoured():
    torch.manual_seed(0)
    memory = filled_memory(n=200)
    net = heuristic.HeuristicNet(12, 8, 6, 16)
    torch.nn.init.normal_(net.nudge[-1].weight, std=100.0)  # a huge raw nudge: the clip must hold it
    h = torch.randn(40, 12)
    active = torch.ones(40, dtype=torch.bool)
    active[-5:] = False
    for threshold, k in ((0.5, 3), (0.8, 2), (1.01, 4)):
        r = heuristic.Retriever(net, memory, threshold, k, temperature=0.1, max_nudge_ratio=0.5)
        out = r(0, h, active)
        t = r.trace[0]
        sims, ids = memory.search(net.key(h), k)
        hit = t["ids"] >= 0
        assert torch.equal(hit, (sims >= threshold) & active[:, None])  # exactly the top-k above the cutoff
        assert torch.equal(t["ids"][hit], ids[hit])
        nudged = hit.any(1)
        assert torch.equal(out[~nudged], h[~nudged])  # no hit: the thought is fed back unchanged
        assert (out[nudged] != h[nudged]).any(1).all()
        # clipped to exactly max_nudge_ratio |h|
        assert torch.allclose((out - h)[nudged].norm(dim=-1), 0.5 * h[nudged].norm(dim=-1), rtol=1e-5)
        assert nudged.any() == (threshold <= 1) and hit.sum(1).max() <= k
    # train mode: an example never retrieves its own question's entries, even its exact states
    states = torch.randn(30, 12)
    memory = heuristic.LatentMemory(8, 6, 12)
    memory.add(net.key(states), torch.randn(30, 6), [{"split": "s", "qid": i // 3} for i in range(30)])
    r = heuristic.Retriever(net, memory, -1.0, 2, 0.1, 0.5)
    r(0, states, torch.ones(30, dtype=torch.bool))
    assert r.trace[0]["ids"][:, 0].tolist() == list(range(30))  # without exclusion: itself, similarity 1
    r.start(memory.qids.clone())
    r(0, states, torch.ones(30, dtype=torch.bool))
    own = memory.qids[None, :] == memory.qids[:, None]  # (30, 30): entries of the query's own question
    want = (net.key(states) @ memory.keys.T).masked_fill(own, -2).topk(2, dim=1).indices
    assert torch.equal(r.trace[0]["ids"][r.trace[0]["ids"] >= 0].view(30, 2), want)


# -----------------------------------------------------------------------------
# the thought hook


def slow_nudged_hidden(model, batch, nudge):
    """Full recompute per pass: thought i's input is the state of the column before it plus nudge(i)."""
    gpt, ids, pos, valid = model.gpt, batch["input_ids"], batch["position_ids"], batch["key_valid"]
    embeds, L, n_lat = gpt.wte(ids), batch["first_latent"], batch["n_latent"]
    for i in range(int(n_lat.max())):
        h, _ = gpt(embeds, pos, coconut.attention_mask(valid, 0))
        col = torch.zeros(*ids.shape, 1, dtype=torch.bool)
        col[:, L + i] = (n_lat > i)[:, None]
        embeds = torch.where(col, (h[:, L + i - 1] + nudge(i))[:, None, :], embeds)
    return gpt(embeds, pos, coconut.attention_mask(valid, 0))[0]


def test_hook_matches_coconut_and_slow_reference():
    batch = mixed_batch(40)  # rows with 3, 1, 0 and 2 thoughts, left and right padding
    plain = tiny_model(40).eval()
    model = heuristic.NudgedCoconut(plain.gpt, plain.latent_id).eval()
    args = [batch[k] for k in ("input_ids", "position_ids", "key_valid", "n_latent", "first_latent")]
    ref, _ = plain.hidden_states(*args)
    model.on_thought = lambda j, h, active: h + 0.0  # identity through the hook's own loop
    assert torch.equal(model.hidden_states(*args)[0], ref)
    shifts = torch.randn(3, 16)
    seen = []
    model.on_thought = lambda j, h, active: (seen.append((j, active.tolist())), h + shifts[j])[1]
    got, _ = model.hidden_states(*args)
    want = slow_nudged_hidden(model, batch, lambda i: shifts[i])
    valid = batch["key_valid"]
    assert (got - want)[valid].abs().max() <= 1e-5
    assert seen == [(0, [True, True, False, True]), (1, [True, False, False, True]), (2, [True, False, False, False])]


# -----------------------------------------------------------------------------
# persistence


def test_save_load_round_trip(tmp_path):
    memory = filled_memory(index_type="ivf", ivf_nlist=4, ivf_nprobe=2)
    net = heuristic.HeuristicNet(12, 8, 6, 16)
    torch.nn.init.normal_(net.nudge[-1].weight)
    memory.save(str(tmp_path / "idx"), {"net": net.state_dict(), "progress": {"epoch": 1}})
    loaded, extra = heuristic.LatentMemory.load(str(tmp_path / "idx"), 8, 6, 12, ivf_nprobe=2)
    assert loaded.index_bytes() == memory.index_bytes() and loaded.fingerprint() == memory.fingerprint()
    assert loaded.meta == memory.meta and torch.equal(loaded.values, memory.values)
    q = unit(10, 8, 5)
    assert all(torch.equal(a, b) for a, b in zip(loaded.search(q, 4), memory.search(q, 4)))
    net2 = heuristic.HeuristicNet(12, 8, 6, 16)
    common.load_state_dict_checked(net2, extra["net"])
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    assert extra["progress"] == {"epoch": 1}
    assert sorted(os.listdir(tmp_path / "idx")) == ["MANIFEST.json", "gen_000001"]


def test_crash_during_save_leaves_previous_memory(tmp_path, monkeypatch):
    d = str(tmp_path / "idx")
    memory = filled_memory(n=30)
    memory.save(d, {"net": {}})
    memory.add(unit(9, 8, 4), torch.zeros(9, 6), [{"split": "s", "qid": 500 + i} for i in range(9)])
    calls = []

    def failing_write(path, data):  # the disk fills up at the third file
        calls.append(path)
        if len(calls) == 3:
            raise OSError("simulated crash: no space left on device")
        return real_write(path, data)
    real_write = heuristic._write_file
    monkeypatch.setattr(heuristic, "_write_file", failing_write)
    with pytest.raises(OSError, match="simulated crash"):
        memory.save(d, {"net": {}})
    monkeypatch.setattr(heuristic, "_write_file", real_write)
    assert len(heuristic.LatentMemory.load(d, 8, 6, 12)[0]) == 30
    assert sorted(os.listdir(d)) == ["MANIFEST.json", "gen_000001"]  # the partial generation is gone

    def failing_manifest(obj, path):  # crash after the new generation is in place, before the manifest
        raise OSError("simulated crash before the manifest")
    monkeypatch.setattr(common, "write_json", failing_manifest)
    with pytest.raises(OSError, match="before the manifest"):
        memory.save(d, {"net": {}})
    monkeypatch.undo()
    assert len(heuristic.LatentMemory.load(d, 8, 6, 12)[0]) == 30  # the manifest still names generation 1
    memory.save(d, {"net": {}})
    assert len(heuristic.LatentMemory.load(d, 8, 6, 12)[0]) == 39
    assert sorted(os.listdir(d)) == ["MANIFEST.json", "gen_000003"]  # stale generation 2 removed


def test_memory_errors(tmp_path):
    d = str(tmp_path / "idx")
    filled_memory().save(d, {"net": {}})
    with pytest.raises(ValueError, match=r"built with \{'key_dim': 8, 'value_dim': 6, 'n_embd': 12\}; "
                                         r"this run has \{'key_dim': 16"):
        heuristic.LatentMemory.load(d, 16, 6, 12)
    with pytest.raises(FileNotFoundError, match="directory does not exist.*train_mode=True"):
        heuristic.LatentMemory.load(str(tmp_path / "nope"), 8, 6, 12)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="MANIFEST.json missing"):
        heuristic.LatentMemory.load(str(tmp_path / "empty"), 8, 6, 12)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        heuristic.LatentMemory.load(str(tmp_path / "file"), 8, 6, 12)
    gen = os.path.join(d, "gen_000001")
    meta = json.load(open(os.path.join(gen, "meta.json")))
    with open(os.path.join(gen, "meta.json"), "w") as f:
        json.dump(meta[:-1], f)
    with pytest.raises(ValueError, match="does not match .*corrupt"):
        heuristic.LatentMemory.load(d, 8, 6, 12)
    man = json.load(open(os.path.join(d, "MANIFEST.json")))  # a consistent checksum, an entry short
    man["sha256"]["meta.json"] = heuristic._sha256_file(os.path.join(gen, "meta.json"))
    json.dump(man, open(os.path.join(d, "MANIFEST.json"), "w"))
    with pytest.raises(ValueError, match=r"index and metadata disagree.*'index': 300.*'metadata': 299"):
        heuristic.LatentMemory.load(d, 8, 6, 12)


# -----------------------------------------------------------------------------
# configs


def test_config_files_parse_and_memory_file_is_checked(tmp_path):
    defaults = {k: getattr(heuristic, k) for k in heuristic.config_keys}
    for name in ("heuristic_gsm_train.py", "heuristic_gsm_eval.py", "tiny_heuristic.py"):
        cfg = common.parse_config(defaults, [os.path.join(ROOT, "configs", name)])
        mem = os.path.join(ROOT, cfg["heuristic_memory"])
        common.parse_config({k: defaults[k] for k in heuristic.MEMORY_KEYS}, [mem])
        assert cfg["index_type"] in heuristic.INDEX_TYPES
    bad = tmp_path / "mem.py"
    bad.write_text("key_dim = 8\nlearning_rate = 0.1\n")  # a run knob in a memory file
    with pytest.raises(KeyError, match="learning_rate"):
        heuristic.main([f"--heuristic_memory={bad}"])


# -----------------------------------------------------------------------------
# end to end: a tiny Coconut, then the memory (train, crash + continue, eval, sweep), and DDP


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("heuristic")
    rng = random.Random(0)
    for split, n in (("train", 96), ("valid", 24)):
        with open(d / f"{split}.json", "w") as f:
            json.dump([chain_example(rng) for _ in range(n)], f)
    subprocess.run([sys.executable, os.path.join(ROOT, "prep", "word_tokenizer.py"), str(d / "train.json"),
                    str(d / "valid.json"), "--out", str(d / "words.tiktoken")], check=True, capture_output=True)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "coconut.py"), os.path.join(ROOT, "configs", "tiny_coconut.py"),
                        f"--train_path={d / 'train.json'}", f"--val_path={d / 'valid.json'}",
                        f"--tokenizer={d / 'words.tiktoken'}", f"--out_dir={d / 'coconut'}", "--max_eval_examples=4"],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def args(d, out, *extra):
    return [os.path.join(ROOT, "configs", "tiny_heuristic.py"), f"--load_model_path={d / 'coconut' / 'ckpt_last.pt'}",
            f"--train_path={d / 'train.json'}", f"--val_path={d / 'valid.json'}", f"--out_dir={out}",
            f"--index_dir={d / 'index'}", *extra]


def test_tiny_end_to_end(tiny, tmp_path, monkeypatch):
    # train, with a crash after the mid-pass save at 32 examples (batch 4 of 12)
    steps = []

    def crash_at_batch_6(net, world_size):
        steps.append(1)
        if len(steps) == 6:
            raise RuntimeError("simulated crash mid-pass")
        return real_sync(net, world_size)
    real_sync = heuristic.sync_grads
    monkeypatch.setattr(heuristic, "sync_grads", crash_at_batch_6)
    with pytest.raises(RuntimeError, match="mid-pass"):
        heuristic.main(args(tiny, tmp_path / "train", "--save_interval=32"))
    monkeypatch.undo()
    memory, extra = heuristic.LatentMemory.load(str(tiny / "index"), 16, 16, 32)
    assert len(memory) == 32 * 2 and extra["progress"]["batch"] == 4  # 32 questions x 2 thoughts, usable
    heuristic.main(args(tiny, tmp_path / "train", "--save_interval=32"))  # continues from batch 4
    memory, extra = heuristic.LatentMemory.load(str(tiny / "index"), 16, 16, 32)
    assert sorted((m["qid"], m["thought"]) for m in memory.meta) == [(q, t) for q in range(96) for t in range(2)]
    assert extra["progress"]["epoch"] == 2 and extra["net"]["nudge.2.weight"].abs().sum() > 0  # the MLP learned
    for epoch in (1, 2):
        m = json.load(open(tmp_path / "train" / f"retrieval_metrics_epoch_{epoch}.json"))
        for key in ("hit_rate", "mean_similarity", "mean_nudge_norm", "accuracy_with_hit", "accuracy_without_hit"):
            assert key in m
    assert m["n"] == 96 and m["memory_entries"] == 192 and 0 < m["hit_rate"] <= 1
    assert os.path.getsize(tmp_path / "train" / "live_train.png") > 0

    # eval: frozen memory, nothing written
    before = dir_digest(tiny / "index")
    heuristic.main(args(tiny, tmp_path / "eval", "--train_mode=False"))
    assert dir_digest(tiny / "index") == before
    lines = [json.loads(line) for line in open(tmp_path / "eval" / "results.jsonl")]
    assert [r["qid"] for r in lines] == list(range(24))
    for r in lines:
        assert len(r["retrieved_ids"]) == len(r["similarities"]) == 2  # one list per thought
        assert all(s >= 0.3 for sims in r["similarities"] for s in sims)  # the tiny memory's threshold
        assert r["nudged"] == any(r["retrieved_ids"])
    summary = json.load(open(tmp_path / "eval" / "retrieval_metrics_eval.json"))
    assert summary["n"] == 24 and summary["accuracy"] == sum(r["correct"] for r in lines) / 24
    assert os.path.getsize(tmp_path / "eval" / "live_eval.png") > 0

    # without a memory the same code path is plain Coconut: its answers equal coconut.evaluate's
    heuristic.main(args(tiny, tmp_path / "plain", "--train_mode=False", "--heuristic_memory="))
    plain = json.load(open(tmp_path / "plain" / "results.json"))
    assert "memory_entries" not in plain
    enc, ids = coconut.get_tokenizer(str(tiny / "words.tiktoken"))
    ckpt = common.load_checkpoint(str(tiny / "coconut" / "ckpt_last.pt"))
    from types import SimpleNamespace
    cc = SimpleNamespace(**ckpt["config"])
    model = coconut.build_model(cc, ids, enc.n_vocab - 3)
    model.load_state_dict(ckpt["model"])
    examples = coconut.load_examples(str(tiny / "valid.json"))
    ref, records = coconut.evaluate(model, examples, coconut.tokenize_examples(examples, enc, ids["eos"]),
                                    plain["stage"], cc, ids, enc, "cpu", 0, 1)
    assert plain["final"]["accuracy"] == ref["accuracy"]
    assert [r["pred_without_memory"] for r in lines] == [r["pred"] for r in records]

    # sweep: one command, a table and a plot marking the best cutoff
    heuristic.main(args(tiny, tmp_path / "sweep", "--train_mode=False", "--sweep=True"))
    assert dir_digest(tiny / "index") == before
    sweep = json.load(open(tmp_path / "sweep" / "sweep.json"))
    assert [r["threshold"] for r in sweep["rows"]] == [0.0, 0.3, 0.6, 0.9]
    hit_rates = [r["hit_rate"] for r in sweep["rows"]]
    assert hit_rates == sorted(hit_rates, reverse=True)  # a higher cutoff never hits more
    best = max(sweep["rows"], key=lambda r: (r["accuracy"], r["threshold"]))
    assert sweep["best"]["threshold"] == best["threshold"]
    assert f"| {best['threshold']:.3f} **best** |" in open(tmp_path / "sweep" / "sweep.md").read()
    assert os.path.getsize(tmp_path / "sweep" / "sweep.png") > 0


def test_ddp_two_processes_build_one_index(tiny, tmp_path):
    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "heuristic.py"), *args(tiny, out, f"--index_dir={tmp_path / 'index'}", *extra)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return json.load(open(out / "results.json"))
    res = torchrun(tmp_path / "train", "--num_epochs=1")
    assert len(set(res["memory_sha256_per_rank"])) == 1 and len(res["memory_sha256_per_rank"]) == 2
    assert len(set(res["net_sha256_per_rank"])) == 1
    memory, _ = heuristic.LatentMemory.load(str(tmp_path / "index"), 16, 16, 32)
    assert memory.fingerprint() == res["memory_sha256_per_rank"][0]  # the saved index is the ranks' index
    assert sorted((m["qid"], m["thought"]) for m in memory.meta) == [(q, t) for q in range(96) for t in range(2)]
    assert res["final"]["n"] == 96  # both ranks' examples in the metrics
    res = torchrun(tmp_path / "eval", "--train_mode=False")
    lines = [json.loads(line) for line in open(tmp_path / "eval" / "results.jsonl")]
    assert [r["qid"] for r in lines] == list(range(24)) and res["final"]["n"] == 24
