"""deltanet_hybrid.py: the parameter count against the seed's figures, causality, the Triton op against
the naive op on a training step, the seed's command line, the data windows, and end to end on
generated English: loss falls below a unigram model, exact resume, and 2-process DDP equal to
1-process gradient accumulation.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_deltanet_hybrid.py
"""

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # the Triton kernels run on CPU only under the interpreter, which is read when they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import deltanet_hybrid as dh  # noqa: E402
from prep import lm_text  # noqa: E402

TINY = os.path.join(ROOT, "configs", "tiny_deltanet_hybrid.py")
N_STEPS = 40  # the end-to-end run; the resume test splits it in two halves


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors on a shared 2-core box: threads cost more than they save; restored afterwards
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_rms(ref, out):
    ref, out = ref.detach().double(), out.detach().double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def tiny_cfg(**over):
    cfg = dict(vocab_size=97, n_layer=3, n_embd=32, attention_layers=(1,), n_head=2, gdn_n_head=2,
               gdn_head_k_dim=16, gdn_head_v_dim=24, mlp_hidden=64, use_triton=False)
    cfg.update(over)
    return dh.HybridConfig(**cfg)


# -----------------------------------------------------------------------------
# model


def count_by_hand(vocab, layers, d=768, H=12, K=256, V=256, mlp=3072, n_layer=12, conv=4):
    """Module by module, independently of parameter_formula: what the seed's FLA config builds."""
    gdn = (d * H * K * 2 + d * H * V + d * H * V + d * H * 2  # q, k, v, output gate, a, b projections
           + conv * (2 * H * K + H * V) + 2 * H + V + H * V * d)  # conv, A_log + dt_bias, o_norm, o_proj
    attn = 4 * d * d
    block = lambda mixer: mixer + 3 * d * mlp + 2 * d
    return ((n_layer - len(layers)) * block(gdn) + len(layers) * block(attn) + 2 * vocab * d + d)


@pytest.mark.parametrize("vocab", [49152, 50304])
@pytest.mark.parametrize("layers", [(5, 11), (), tuple(range(12))])
def test_parameter_count(vocab, layers):
    cfg = dh.HybridConfig(vocab_size=vocab, attention_layers=layers)
    with torch.device("meta"):  # full size, no memory
        model = dh.HybridLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"vocab {vocab}, attention {list(layers)}: {n:,} parameters")
    assert n == count_by_hand(vocab, layers) == dh.parameter_formula(cfg)["total"]


def test_parameter_count_matches_the_seeds_range():
    # Exp7 (seed's vocabulary, SmolLM's 49,152): "~188M-302M params", pure Transformer to pure DeltaNet
    assert int(count_by_hand(49152, tuple(range(12))) / 1e6) == 188  # "~188M": 188.76M
    assert int(count_by_hand(49152, ()) / 1e6) == 302  # "~302M": 302.68M


def test_causal():
    """Changing token t leaves every output before t unchanged (conv, recurrence and attention)."""
    torch.manual_seed(0)
    model = dh.HybridLM(tiny_cfg()).eval()
    idx = torch.randint(0, 97, (2, 70))
    t = 50
    idx2 = idx.clone()
    idx2[:, t] = (idx2[:, t] + 1) % 97
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    print(f"max |diff| before t: {(a[:, :t] - b[:, :t]).abs().max():.2e}, at t: {(a[:, t] - b[:, t]).abs().max():.2e}")
    assert torch.equal(a[:, :t], b[:, :t])
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 0  # the change reaches t and every later position


def test_gates_and_init():
    torch.manual_seed(0)
    gdn = dh.GatedDeltaNet(tiny_cfg(gdn_n_head=64))
    A = gdn.A_log.exp()
    dt = torch.nn.functional.softplus(gdn.dt_bias)
    assert ((A > 0) & (A <= 16)).all()  # A ~ U(0, 16)
    assert ((dt >= 1e-4 - 1e-9) & (dt <= 0.1 + 1e-6)).all()  # softplus(dt_bias) = dt in [1e-3, 0.1], clamp 1e-4


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton op runs where its inputs are


def step_grads(use_triton, state, idx, targets):
    model = dh.HybridLM(tiny_cfg(use_triton=use_triton, n_layer=2, attention_layers=(1,))).to(DEVICE)
    model.load_state_dict(state)
    loss = model(idx.to(DEVICE), targets.to(DEVICE))
    loss.backward()
    return loss.item(), {n: p.grad.cpu() for n, p in model.named_parameters()}


def test_triton_op_matches_naive_on_a_training_step():
    """The same weights and batch through chunk_gated_delta_rule (Triton; the interpreter on CPU) and
    naive_chunk_gated_delta_rule: equal loss and gradients. T = 100 crosses a chunk boundary."""
    torch.manual_seed(0)
    state = dh.HybridLM(tiny_cfg(n_layer=2, attention_layers=(1,))).state_dict()
    idx, targets = torch.randint(0, 97, (2, 100)), torch.randint(0, 97, (2, 100))
    loss_naive, g_naive = step_grads(False, state, idx, targets)
    loss_triton, g_triton = step_grads(True, state, idx, targets)
    # float32: exact math under the interpreter, TF32 dots on a GPU (as tests/kernels)
    tol = 1e-4 if not torch.cuda.is_available() else 5e-3
    print(f"loss naive {loss_naive:.6f} triton {loss_triton:.6f}")
    assert abs(loss_triton - loss_naive) / abs(loss_naive) < tol
    for name in g_naive:
        err = rel_rms(g_naive[name], g_triton[name])
        print(f"  {name}: rel-rms {err:.2e}")
        assert err < tol, name


# -----------------------------------------------------------------------------
# configuration and the seed's command line


def parse(argv):
    argv = dh.translate_seed_args(argv)
    c = SimpleNamespace(**common.parse_config({k: getattr(dh, k) for k in dh.config_keys}, argv))
    dh.check_config(c)
    return c


def test_attention_layers_from_the_command_line():
    assert parse(["--attention_layers=[5,11]"]).attention_layers == [5, 11]
    assert parse(["--attention_layers=[]"]).attention_layers == []
    assert parse([f"--attention_layers={list(range(12))}".replace(" ", "")]).attention_layers == list(range(12))
    with pytest.raises(TypeError, match="expected list"):
        parse(["--attention_layers=5"])
    with pytest.raises(ValueError, match="distinct layer indices"):
        parse(["--attention_layers=[5,12]"])
    with pytest.raises(ValueError, match="distinct layer indices"):
        parse(["--attention_layers=[5,5]"])


def test_seed_flags():
    ext = os.path.join(ROOT, "configs", "deltanet_extended.py")
    assert dh.translate_seed_args(["--experiment", "extended", "--resume", "c/best_model.pt",
                                   "--extend-steps", "10000", "--lr_decay_iters=7"]) == \
        [ext, "--resume=c/best_model.pt", "--max_iters=10000", "--lr_decay_iters=7"]
    assert dh.translate_seed_args(["--experiment=extended", "--extend-steps=3"]) == [ext, "--max_iters=3"]
    c = parse(["--experiment", "extended"])
    assert (c.max_iters, c.warmup_iters) == (5000, 500)
    assert parse(["--experiment", "extended", "--extend-steps", "10000"]).max_iters == 10000  # later wins
    with pytest.raises(FileNotFoundError, match="experiments: .*extended"):
        dh.translate_seed_args(["--experiment", "nope"])
    with pytest.raises(ValueError, match="needs a value"):
        dh.translate_seed_args(["--resume"])
    with pytest.raises(NotImplementedError, match="--compare .* not implemented yet"):
        dh.translate_seed_args(["--compare"])
    for argv in (["--model-type", "recursive"], ["--model_type=recursive"]):
        with pytest.raises(NotImplementedError, match="recursive.*not implemented yet"):
            dh.main(argv)  # stops before touching data or devices
    with pytest.raises(ValueError, match="allowed: baseline"):
        parse(["--model_type=transformer"])


DELTANET_CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                          if f.startswith(("deltanet_", "tiny_deltanet")))


@pytest.mark.parametrize("name", DELTANET_CONFIGS)
def test_config_files_parse(name):
    c = parse([os.path.join(ROOT, "configs", name)])
    assert c.batch_size % c.micro_batch_size == 0


def test_lr_schedule():
    c = SimpleNamespace(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=100, lr_decay_iters=0)
    lrs = [dh.get_lr(i, c) for i in range(120)]
    assert lrs[9] == 1.0 and lrs[0] == 0.1  # linear warmup to the peak
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then non-increasing
    assert lrs[100] == lrs[119] == 0.1 and abs(lrs[55] - 0.55) < 1e-12  # cosine midpoint, floor
    c.lr_decay_iters = 200  # nanoGPT's separate horizon: a short run on a long schedule
    assert dh.get_lr(99, c) > 0.5


# -----------------------------------------------------------------------------
# data windows


def test_token_windows():
    shards = [np.arange(0, 50, dtype=np.uint16), np.arange(100, 141, dtype=np.uint16)]
    w = dh.TokenWindows(shards, B=2, T=4, name="t")  # 8 + 1 tokens per window
    assert w.n == 6 + 5  # (50 - 1) // 8 and (41 - 1) // 8: no window straddles shards
    x, y = w.batch(0, "cpu")
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert w.batch(6, "cpu")[0][0].tolist() == [100, 101, 102, 103]  # first window of shard 2
    assert torch.equal(w.batch(11, "cpu")[0], x)  # wraps
    with pytest.raises(ValueError, match="fewer than one window"):
        dh.TokenWindows([np.arange(8, dtype=np.uint16)], B=2, T=4, name="val")


def test_missing_data_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="prep/lm_text.py"):
        dh.load_shards(str(tmp_path), "train", 50304)


# -----------------------------------------------------------------------------
# end to end on generated English (in-process runs; DDP through torchrun)

SUBJECTS = ["the farmer", "the old miller", "a young girl", "the captain", "my brother", "the baker",
            "a tired soldier", "the teacher", "her mother", "the fisherman", "a quiet boy", "the doctor"]
VERBS = ["carried", "found", "painted", "sold", "washed", "mended", "lost", "bought", "opened", "hid"]
OBJECTS = ["a basket of apples", "the broken chair", "an old letter", "the red boat", "a loaf of bread",
           "the wooden gate", "a small lamp", "the silver key", "a pair of boots", "the heavy box"]
PLACES = ["in the village", "by the river", "at the market", "near the church", "on the hill",
          "behind the mill", "at the harbour", "in the garden"]
TIMES = ["before the rain", "after supper", "at dawn", "on Sunday", "in the evening", "during the storm"]
LINKS = ["Then", "Later", "Afterwards", "The next day", "Soon"]


def english_text(n_paragraphs, seed=0):
    """Short stories of plain English sentences, ~22K words for 400 paragraphs."""
    rng = random.Random(seed)

    def sentence():
        s = " ".join(rng.choice(words) for words in (SUBJECTS, VERBS, OBJECTS, PLACES, TIMES)) + "."
        return s[0].upper() + s[1:]

    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = [sentence()]
        for _ in range(rng.randint(2, 5)):
            s = sentence()
            sentences.append(f"{rng.choice(LINKS)} {s[0].lower()}{s[1:]}" if rng.random() < 0.3 else s)
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("english")
    (d / "stories.txt").write_text(english_text(400))
    lm_text.prepare(str(d / "data"), inputs=[str(d / "stories.txt")], threads=1)
    return d / "data"


def train_args(data_dir, out, *extra):
    return [TINY, f"--data_dir={data_dir}", f"--checkpoint_dir={out / 'ckpt'}", f"--results_dir={out / 'results'}",
            "--device=cpu", f"--max_iters={N_STEPS}", f"--lr_decay_iters={N_STEPS}", "--eval_interval=10",
            *extra]


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    dh.main(train_args(data_dir, out))
    return out


def results(out):
    return json.load(open(out / "results" / "training_results_baseline.json"))


def unigram_cross_entropy(data_dir):
    """Val loss of the train split's unigram distribution (add-one smoothed over the seen tokens)."""
    meta = json.load(open(data_dir / "meta.json"))
    read = lambda split: np.fromfile(data_dir / meta["shards"][split][0][0], dtype=np.uint16)
    counts, val = Counter(read("train").tolist()), read("val")[1:]
    total = sum(counts.values()) + len(counts) + 1
    return -sum(math.log((counts.get(t, 0) + 1) / total) for t in val.tolist()) / len(val)


def test_loss_falls_below_a_unigram_model(straight, data_dir):
    r = results(straight)
    val = [v["loss"] for v in r["history"]["val"]]
    train = [t["loss"] for t in r["history"]["train"]]
    unigram = unigram_cross_entropy(data_dir)
    print(f"val loss by step {[(v['step'], round(v['loss'], 3)) for v in r['history']['val']]}; "
          f"train {[round(t, 3) for t in train]}; unigram {unigram:.3f}; ln(vocab) {math.log(50257):.3f}")
    assert abs(val[0] - math.log(50257)) < 0.5  # untrained: about uniform over the vocabulary
    assert val[-1] < unigram  # it uses context, not only token frequencies
    assert train[-1] < train[0]


def test_outputs(straight):
    r = results(straight)
    for f in ("ckpt/best_model.pt", "ckpt/latest_model.pt", "results/training_curves_baseline.png"):
        assert (straight / f).exists(), f
    assert r["steps"] == N_STEPS and r["tokens_seen"] == N_STEPS * 8 * 32
    assert r["parameters"] == r["parameter_formula"]["total"]
    best = min(r["history"]["val"], key=lambda v: v["loss"])
    assert r["best"] == {"val_loss": best["loss"], "step": best["step"]}
    assert common.load_checkpoint(str(straight / "ckpt" / "best_model.pt"))["step"] == best["step"]


def test_resume_is_exact(straight, data_dir, tmp_path):
    dh.main(train_args(data_dir, tmp_path, f"--max_iters={N_STEPS // 2}"))  # same schedule, stops halfway
    latest = tmp_path / "ckpt" / "latest_model.pt"
    assert common.load_checkpoint(str(latest))["step"] == N_STEPS // 2
    # the seed's spelling; the checkpoint's config is the base, so only the step count is given
    dh.main(["--resume", str(latest), "--extend-steps", str(N_STEPS)])
    a = common.load_checkpoint(str(straight / "ckpt" / "latest_model.pt"))
    b = common.load_checkpoint(str(latest))
    assert a["step"] == b["step"] == N_STEPS
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    logged = lambda ckpt: [(t["step"], t["loss"], t["lr"]) for t in ckpt["history"]["train"]]
    assert logged(a) == logged(b)  # every logged loss of both halves, bit for bit


def test_resume_errors(straight):
    latest = str(straight / "ckpt" / "latest_model.pt")
    with pytest.raises(ValueError, match="raise it"):
        dh.main(["--resume", latest])  # already at max_iters
    with pytest.raises(ValueError, match="missing: blocks.0.attn"):
        dh.main(["--resume", latest, "--extend-steps", str(N_STEPS + 1), "--attention_layers=[0,1]"])


def test_ddp_two_processes_match_gradient_accumulation(straight, data_dir, tmp_path):
    """2 ranks x 1 micro-step read the same windows per step as 1 rank x 2 micro-steps (the straight
    run), so the trained weights agree up to float reduction order. Also: use_triton on a CPU without
    the interpreter falls back to the naive op."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "deltanet_hybrid.py"), *train_args(data_dir, tmp_path), "--use_triton=True"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 micro-steps x 2 ranks per step" in r.stdout
    assert "TRITON_INTERPRET unset -> naive_chunk_gated_delta_rule" in r.stdout
    ddp = results(tmp_path)
    assert ddp["gdn_op"] == "naive chunk" and ddp["world_size"] == 2
    assert len(ddp["param_sha256_per_rank"]) == 2 and len(set(ddp["param_sha256_per_rank"])) == 1
    a = common.load_checkpoint(str(straight / "ckpt" / "latest_model.pt"))["model"]
    b = common.load_checkpoint(str(tmp_path / "ckpt" / "latest_model.pt"))["model"]
    worst = max(rel_rms(a[k], b[k]) for k in a)
    val_a, val_b = results(straight)["final_val_loss"], ddp["final_val_loss"]
    print(f"DDP vs accumulation: worst weight rel-rms {worst:.2e}, final val {val_a:.6f} vs {val_b:.6f}")
    assert worst < 1e-4
    assert abs(val_a - val_b) < 1e-4 * val_a
