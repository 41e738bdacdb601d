"""coconut.py against independent references: HF GPT-2 logits, a slow full-recompute multi-pass,
cache-free greedy decoding; Meta's curriculum and collator; config, data and checkpoint errors;
exact resume and 2-process DDP."""

import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import coconut  # noqa: E402
import common  # noqa: E402

# -----------------------------------------------------------------------------
# fixtures: a small ProsQA-shaped chain data set and its word-level tokenizer

NAMES = ["Tom", "Sally", "Rex", "Wren"]
CONCEPTS = ["bompus", "dumpus", "gorpus", "lempus", "rompus", "terpus", "wumpus", "yumpus"]


def chain_example(rng):
    """'Is X a A or B?' where a stated chain leads from X to A: steps follow the chain."""
    name = rng.choice(NAMES)
    path = rng.sample(CONCEPTS, rng.randint(2, 4))
    other = rng.choice([w for w in CONCEPTS if w not in path])
    facts = [f"{name} is a {path[0]}."] + [f"Every {a} is a {b}." for a, b in zip(path, path[1:])]
    steps = list(facts)
    rng.shuffle(facts)
    options = [path[-1], other]
    rng.shuffle(options)
    return {"question": " ".join(facts) + f" Is {name} a {options[0]} or {options[1]}?",
            "steps": steps, "answer": f"{name} is a {path[-1]}."}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chains")
    rng = random.Random(0)
    for split, n in (("train", 96), ("valid", 24)):
        with open(d / f"{split}.json", "w") as f:
            json.dump([chain_example(rng) for _ in range(n)], f)
    subprocess.run([sys.executable, os.path.join(ROOT, "prep", "word_tokenizer.py"), str(d / "train.json"),
                    str(d / "valid.json"), "--out", str(d / "words.tiktoken")], check=True, capture_output=True)
    return d


def tiny_config(**over):
    cfg = {k: getattr(coconut, k) for k in coconut.config_keys}
    cfg.update(method="coconut", feedback_mode="continuous", c_thought=1, max_latent_stage=3,
               pad_latent_to_max=True, uniform_prob=0.0, block_size=128, batch_size=8, seed=0)
    cfg.update(over)
    return SimpleNamespace(**cfg)


def tiny_model(vocab=40, feedback_mode="continuous", seed=0, dropout=0.0):
    torch.manual_seed(seed)
    gpt = coconut.GPT(coconut.GPTConfig(vocab_size=vocab, block_size=64, n_layer=2, n_head=2, n_embd=16,
                                        dropout=dropout))
    return coconut.Coconut(gpt, latent_id=vocab - 1, feedback_mode=feedback_mode, pause_init_id=3)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# -----------------------------------------------------------------------------
# model vs HF GPT-2


def test_gpt_matches_hf_logits(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=3, n_head=4)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = coconut.GPT.from_hf(str(tmp_path / "hf"), extra_tokens=3, dropout=0.0).eval()
    ids = torch.randint(0, 97, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 15:] = False  # right padding in one row
    pos = torch.arange(20).expand(3, 20)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).logits
        h, _ = ours(ours.wte(ids), pos, coconut.attention_mask(mask, 0))
        got = ours.lm_head(h)[..., :97]
    diff = (got - ref)[mask].abs().max().item()
    print(f"max |ours - HF| logits: {diff:.2e}")
    assert diff <= 1e-5


# -----------------------------------------------------------------------------
# multi-pass forward vs a slow exact reference that recomputes the whole sequence every pass


def slow_reference_loss(model, batch):
    """Meta's semantics computed naively: pass i runs the full sequence and writes the hidden state
    of the column before thought i into thought i; the final full pass gives every logit."""
    gpt = model.gpt
    ids, pos, valid = batch["input_ids"], batch["position_ids"], batch["key_valid"]
    B, T = ids.shape
    embeds = gpt.wte(ids)
    L, n_lat = batch["first_latent"], batch["n_latent"]
    for i in range(int(n_lat.max())):
        h, _ = gpt(embeds, pos, coconut.attention_mask(valid, 0))
        fill = model.pause.expand(B, -1) if model.feedback_mode != "continuous" else h[:, L + i - 1]
        col = torch.zeros(B, T, 1, dtype=torch.bool)
        col[:, L + i] = (n_lat > i)[:, None]
        embeds = torch.where(col, fill[:, None, :], embeds)
    h, _ = gpt(embeds, pos, coconut.attention_mask(valid, 0))
    logits = gpt.lm_head(h)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)


def mixed_batch(vocab):
    """Rows with 3, 1, 0 and 2 thoughts, different question lengths (so left and right padding)."""
    c = tiny_config(method="coconut", max_latent_stage=3)
    ids = {"start": vocab - 3, "end": vocab - 2, "latent": vocab - 1, "eos": 0}
    g = torch.Generator().manual_seed(1)
    samples = []
    for q_len, n_steps, stage in ((7, 3, 3), (11, 3, 1), (5, 2, 0), (9, 4, 2)):
        tok = {"question": torch.randint(4, vocab - 3, (q_len,), generator=g).tolist(),
               "steps": [torch.randint(4, vocab - 3, (3,), generator=g).tolist() for _ in range(n_steps)],
               "answer": torch.randint(4, vocab - 3, (4,), generator=g).tolist() + [0]}
        samples.append(coconut.build_sample(tok, stage, c, ids))
    return coconut.collate(samples, pad_id=0)


@pytest.mark.parametrize("feedback_mode", ["continuous", "frozen", "learned_shared"])
def test_multipass_matches_slow_reference(feedback_mode):
    batch = mixed_batch(40)
    assert batch["n_latent"].tolist() == [3, 1, 0, 2]
    fast_model = tiny_model(40, feedback_mode)
    slow_model = tiny_model(40, feedback_mode)
    fast = fast_model(**batch)
    slow = slow_reference_loss(slow_model, batch)
    fast.backward()
    slow.backward()
    print(f"{feedback_mode}: loss fast {fast.item():.6f} slow {slow.item():.6f}")
    assert abs(fast.item() - slow.item()) <= 1e-5 * abs(slow.item())
    slow_grads = dict(slow_model.named_parameters())
    for name, p in fast_model.named_parameters():
        r = rel(p.grad, slow_grads[name].grad)
        assert r <= 1e-5, f"{name}: relative gradient error {r:.2e}"
    if feedback_mode == "learned_shared":
        assert fast_model.pause.grad.abs().sum() > 0


def test_generate_with_cache_matches_full_recompute():
    model = tiny_model(40).eval()
    c = tiny_config(max_latent_stage=2)
    ids = {"start": 37, "end": 38, "latent": 39, "eos": 0}
    toks = [{"question": list(range(5, 5 + n)), "steps": [[7, 8]] * 2, "answer": [9, 0]} for n in (4, 9, 6)]
    prompts = [coconut.eval_prompt(t, 2, c, ids)[0] for t in toks]
    batch = coconut.collate_prompts(prompts, 2, pad_id=0)
    out = model.generate(**batch, max_new_tokens=6, eos_id=-1)  # no EOS: always 6 tokens
    for row, prompt in enumerate(prompts):  # naive: batch of one, full forward for every token
        seq = list(prompt)
        for _ in range(6):
            one = coconut.collate([(seq, [-100] * len(seq), 2, len(prompt) - 3)], pad_id=0)
            h, _ = model.hidden_states(one["input_ids"], one["position_ids"], one["key_valid"],
                                       one["n_latent"], one["first_latent"])
            seq.append(int(model.gpt.lm_head(h[0, -1]).argmax()))
        assert out[row].tolist() == seq[len(prompt):]


# -----------------------------------------------------------------------------
# tokenizer, curriculum, collator, answer parsing


def test_gpt2_tokenizer_offline():
    enc, ids = coconut.get_tokenizer("gpt2")
    assert enc.encode("Hello world") == [15496, 995]
    assert ids == {"eos": 50256, "start": 50257, "end": 50258, "latent": 50259, "init": 16791}
    assert enc.decode([ids["start"], ids["latent"], ids["end"]]) == "<|start-latent|><|latent|><|end-latent|>"


def test_curriculum_follows_meta():
    ids = {"start": 100, "end": 101, "latent": 102, "eos": 0}
    tok = {"question": [1, 2], "steps": [[10], [11], [12]], "answer": [20, 0]}
    c = tiny_config(max_latent_stage=6, c_thought=2)
    seq, labels, k, first = coconut.build_sample(tok, 0, c, ids)
    assert seq == [1, 2, 100, 101, 10, 11, 12, 20, 0] and k == 0 and first == -1  # stage 0 keeps the markers
    assert labels == [-100] * 4 + [10, 11, 12, 20, 0]
    seq, labels, k, first = coconut.build_sample(tok, 1, c, ids)
    assert seq == [1, 2, 100, 102, 102, 101, 11, 12, 20, 0] and k == 2 and first == 3  # first step replaced
    assert labels == [-100] * 6 + [11, 12, 20, 0]
    seq, _, k, _ = coconut.build_sample(tok, 5, c, ids)  # more stages than steps: still 5*c thoughts
    assert seq == [1, 2, 100] + [102] * 10 + [101, 20, 0] and k == 10
    seq, _, k, _ = coconut.build_sample(tok, 7, c, ids)  # past max_latent_stage: padded to max
    assert k == 12 and seq[-3:] == [101, 20, 0]
    seq, _, k, _ = coconut.build_sample(tok, 7, tiny_config(max_latent_stage=6, c_thought=2,
                                                            pad_latent_to_max=False), ids)
    assert k == 6
    for method, expect in (("cot", [1, 2, 10, 11, 12, 20, 0]), ("no_cot", [1, 2, 20, 0])):
        seq, labels, k, _ = coconut.build_sample(tok, 3, tiny_config(method=method), ids)
        assert seq == expect and labels[:2] == [-100, -100] and labels[2:] == expect[2:] and k == 0
    seq, _, _, _ = coconut.build_sample(tok, 2, tiny_config(method="no_thoughts"), ids)
    assert seq == [1, 2, 12, 20, 0]


def test_collator_aligns_first_thought():
    samples = [([1, 2, 3, 9, 9, 8, 5], [-100] * 6 + [5], 2, 3),
               ([1, 9, 8, 5, 6], [-100] * 3 + [5, 6], 1, 1),
               ([1, 2, 5], [-100, -100, 5], 0, -1)]
    b = coconut.collate(samples, pad_id=0)
    assert b["first_latent"] == 3
    assert b["input_ids"][1].tolist() == [0, 0, 1, 9, 8, 5, 6]  # left pad 2 to align its thought
    assert b["position_ids"][1].tolist() == [0, 0, 0, 1, 2, 3, 4]
    assert b["key_valid"][1].tolist() == [False, False, True, True, True, True, True]
    assert b["input_ids"][2].tolist() == [1, 2, 5, 0, 0, 0, 0]  # no thought: right pad only
    assert b["labels"][2].tolist() == [-100, -100, 5] + [-100] * 4


def test_parse_answer_meta_rule():
    assert coconut.parse_answer("Tom is a x.\n### Tom is a lempus.") == "Tom is a lempus."
    assert coconut.parse_answer("<<2*3=6>>\n### 1,234") == "1234"
    assert coconut.parse_answer("no hash") == "no hash"


# -----------------------------------------------------------------------------
# parameter counts of the feedback modes (gate0 prints them at GPT-2 small size)


def test_feedback_mode_parameter_counts():
    count = lambda m, trainable: sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)
    cont, frozen, shared = (tiny_model(40, m) for m in ("continuous", "frozen", "learned_shared"))
    assert count(frozen, True) == count(cont, True) and "pause" in dict(frozen.named_buffers())
    assert count(shared, True) == count(cont, True) + 16
    assert torch.equal(shared.pause.detach(), shared.gpt.wte.weight[3].detach())  # `<<` row


# -----------------------------------------------------------------------------
# errors: config, data, checkpoints


def test_config_errors(tmp_path):
    defaults = {"batch_size": 32, "learning_rate": 1e-4, "bf16": False, "out_dir": "out"}
    bad = tmp_path / "bad.py"
    bad.write_text("batch_sise = 8\n")
    with pytest.raises(KeyError, match="batch_sise.*Valid keys.*batch_size"):
        common.parse_config(defaults, [str(bad)])
    with pytest.raises(KeyError, match="unknown config key 'lr'"):
        common.parse_config(defaults, ["--lr=1"])
    with pytest.raises(TypeError, match="batch_size"):
        common.parse_config(defaults, ["--batch_size=0.5"])
    with pytest.raises(TypeError, match="bf16"):
        common.parse_config(defaults, ["--bf16=1"])
    cfg = common.parse_config(defaults, ["--learning_rate=1", "--out_dir=out/x"])
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float) and cfg["out_dir"] == "out/x"


def test_data_errors(tmp_path):
    def write(content):
        p = tmp_path / "d.json"
        p.write_text(content)
        return str(p)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        coconut.load_examples(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="not valid JSON"):
        coconut.load_examples(write("[{"))
    with pytest.raises(ValueError, match="empty"):
        coconut.load_examples(write("[]"))
    with pytest.raises(ValueError, match="example 1 lacks 'steps'"):
        coconut.load_examples(write(json.dumps([{"question": "q", "answer": "a", "steps": []},
                                                {"question": "q", "answer": "a"}])))
    with pytest.raises(ValueError, match="example 0: 'steps' must be a list of strings"):
        coconut.load_examples(write(json.dumps([{"question": "q", "answer": "a", "steps": [1]}])))
    with pytest.raises(ValueError, match=r"d.json: example 3 is \d+ tokens, longer than block_size 4"):
        coconut.check_length([1] * 9, 3, write("[]"), tiny_config(block_size=4))


def test_checkpoint_of_another_shape_names_tensors(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint({"model": tiny_model(40).state_dict()}, path)
    with pytest.raises(ValueError, match=r"shape of gpt.wte.weight: .*\(40, 16\) vs model \(50, 16\)"):
        coconut.load_weights(tiny_model(50), path)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # atomic save left no temp file


# -----------------------------------------------------------------------------
# end to end: exact resume and 2-process DDP (subprocesses, tiny config)


def run_script(data_dir, out_dir, *extra, torchrun=False):
    args = [os.path.join(ROOT, "coconut.py"), os.path.join(ROOT, "configs", "tiny_coconut.py"),
            f"--train_path={data_dir / 'train.json'}", f"--val_path={data_dir / 'valid.json'}",
            f"--tokenizer={data_dir / 'words.tiktoken'}", f"--out_dir={out_dir}", *extra]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
           if torchrun else [sys.executable]) + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_resume_is_exact(data_dir, tmp_path):
    common_args = ("--dropout=0.1", "--reset_optimizer=never", "--max_eval_examples=4")
    run_script(data_dir, tmp_path / "straight", "--num_epochs=2", *common_args)
    run_script(data_dir, tmp_path / "resumed", "--num_epochs=1", *common_args)
    r = run_script(data_dir, tmp_path / "resumed", "--num_epochs=2", *common_args)
    assert "resuming from" in r.stdout
    a = common.load_checkpoint(str(tmp_path / "straight" / "ckpt_last.pt"))
    b = common.load_checkpoint(str(tmp_path / "resumed" / "ckpt_last.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    loss = lambda d: [json.loads(l)["loss"] for l in open(d / "metrics.jsonl") if '"train"' in l][-1]
    assert loss(tmp_path / "straight") == loss(tmp_path / "resumed")


def test_ddp_two_processes_agree(data_dir, tmp_path):
    run_script(data_dir, tmp_path / "ddp", "--num_epochs=2", "--max_eval_examples=10", torchrun=True)
    res = json.load(open(tmp_path / "ddp" / "results.json"))
    assert len(res["param_sha256_per_rank"]) == 2
    assert res["param_sha256_per_rank"][0] == res["param_sha256_per_rank"][1]
    assert res["final"]["n"] == 10  # both shards gathered
    ev = json.load(open(tmp_path / "ddp" / "eval_epoch2.json"))
    assert sorted(r["idx"] for r in ev["examples"]) == list(range(10))


COCONUT_CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                         if f.startswith(("prosqa_", "prontoqa_", "gsm_", "demo_prosqa", "tiny_coconut")))


@pytest.mark.parametrize("name", COCONUT_CONFIGS)
def test_config_files_parse(name):
    defaults = {k: getattr(coconut, k) for k in coconut.config_keys}
    cfg = common.parse_config(defaults, [os.path.join(ROOT, "configs", name)])
    assert cfg["method"] in coconut.METHODS and cfg["feedback_mode"] in coconut.FEEDBACK_MODES
    assert cfg["reset_optimizer"] in coconut.OPTIMIZER_RESETS
