"""gru_steer.py on CPU with tiny random Qwen3 pairs (real vocabulary, nothing downloaded, nothing read
from ../shared): hook exactness, streaming = full window, phase 2 lowers the KL, H0 entropy by hand,
a 2-process torchrun, and the clear errors."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import gru_steer as g  # noqa: E402

LAYER = 1
# GSM8K-style examples in the kit's JSON format (prep/gsm_icot.py)
EXAMPLES = [
    {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
     "steps": [f"<<{a}+{b}={a + b}>>"], "answer": str(a + b)}
    for a, b in ((3, 4), (5, 9), (12, 7), (20, 5), (8, 8), (31, 2), (6, 14), (9, 1), (15, 15), (2, 40))
] + [
    {"question": f"A box holds {a} pens. How many pens are in {b} boxes?",
     "steps": [f"<<{a}*{b}={a * b}>>"], "answer": str(a * b)}
    for a, b in ((4, 3), (6, 7), (10, 12), (3, 30))
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matmuls: a second OpenMP thread only spins against the other jobs on a shared 2-core box
    # (measured 3-4x slower generation); restored for the other test modules
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("gru_steer")
    g.save_tiny_pair(str(d / "student"), str(d / "teacher"), LAYER, seed=0)
    with open(d / "train.json", "w") as f:
        json.dump(EXAMPLES[:10], f)
    with open(d / "eval.json", "w") as f:
        json.dump(EXAMPLES[10:], f)
    return d


def args(work, out, *extra):
    """The tiny config, pointed at the test's models and data, a little smaller still."""
    return [os.path.join(ROOT, "configs", "tiny_gru_steer.py"), f"--out_dir={out}",
            f"--student={work / 'student'}", f"--teacher={work / 'teacher'}",
            f"--train_path={work / 'train.json'}", f"--eval_path={work / 'eval.json'}",
            f"--intervention_layer={LAYER}", "--n_trajectories=0", "--n_val_trajectories=4",
            "--max_new_tokens=8", "--batch_size=2", "--phase1_iters=10", "--phase2_iters=20",
            "--eval_interval=10", "--log_interval=5", *extra]


def random_controller(window=6, proxy_window=4, seed=0):
    torch.manual_seed(seed)
    ctrl = g.Controller(g.ControllerConfig(d_model=64, proj_dim=16, hidden=16, window=window,
                                           proxy_window=proxy_window, rank=4))
    torch.nn.init.normal_(ctrl.plan.weight, std=0.5)  # the trained-from-zero plan would steer nothing
    return ctrl.eval()


def test_hook_removal_and_zero_gate_reproduce_unsteered_logits(work):
    model = g.load_frozen(str(work / "student"), "float32", "cpu")
    ctrl = random_controller()
    ids = torch.randint(0, 150000, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        with g.Intervention(model, LAYER, ctrl, valid=mask.bool()):
            steered = model(input_ids=ids, attention_mask=mask).logits
            ctrl.gate.bias.fill_(-math.inf)  # sigma(-inf) = 0 exactly: the gate closed
            closed = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=ids, attention_mask=mask).logits
    print("max |steered - base|", (steered - base).abs().max().item())
    ratio = SimpleNamespace(intervention_layer=-1, intervention_layer_ratio=0.5, student="tiny")
    assert g.resolve_layer(ratio, model) == 2  # int(0.5 * 4 layers); Qwen3-0.6B: int(0.15 * 28) = 4
    assert (steered - base).abs().max() > 1e-2  # the hook does act when the gate is open
    assert torch.equal(closed, base)
    assert torch.equal(after, base)


def test_hook_accepts_tuple_layer_outputs(work):
    # transformers 4.x decoder layers return (hidden, ...): element 0 is replaced, the rest kept
    model = g.load_frozen(str(work / "student"), "float32", "cpu")
    with g.Intervention(model, LAYER, random_controller()) as iv:
        h, extra = torch.randn(1, 5, 64), object()
        out = iv._hook(None, (), (h, extra))
    assert isinstance(out, tuple) and out[1] is extra and torch.equal(out[0], iv.last_output)
    assert not torch.equal(out[0], h)


def test_streaming_state_matches_full_window(work):
    """generate() steers one token at a time from the controller's own buffers and GRU state; a
    teacher-forced pass over the finished sequence computes every window at once. A left-padded batch
    whose first prompt is shorter than the window covers padding and partial windows."""
    model = g.load_frozen(str(work / "student"), "float32", "cpu")
    ctrl = random_controller(window=6, proxy_window=4)
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 150000, (n,), generator=rng).tolist() for n in (3, 11)]
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=12, pad_token_id=151643, eos_token_id=[151645],
                               suppress_tokens=list(range(151643, 151936)))  # never stops early
    steered, _ = g.generate(model, prompts, LAYER, gen_cfg, (), "cpu", controller=ctrl)
    plain, _ = g.generate(model, prompts, LAYER, gen_cfg, (), "cpu")
    for prompt, row, base in zip(prompts, steered, plain):
        seq = torch.tensor([prompt + row["output_ids"][:-1]])  # every token generate() fed
        with torch.no_grad(), g.Intervention(model, LAYER, ctrl), g.Recorder(model, LAYER) as rec:
            logits = model(input_ids=seq).logits[0]
        full = rec.outputs[0][0]
        diff = (full - row["acts"]).abs().max().item()
        print(f"prompt {len(prompt)}: streaming vs full-window layer output max diff {diff:.2e}")
        assert full.shape == row["acts"].shape
        assert diff < 1e-4
        assert logits[len(prompt) - 1:].argmax(-1).tolist() == row["output_ids"]
        assert (row["acts"] - base["acts"]).abs().max() > 1e-2  # steering changed the trajectory


def test_gradient_checkpointing_gives_the_same_controller_grads(work):
    grads = []
    for ckpt in (False, True):
        model = g.load_frozen(str(work / "student"), "float32", "cpu")
        if ckpt:
            g.enable_checkpointing(model)
            model.train()
        ctrl = random_controller().train()
        ids = torch.randint(0, 150000, (2, 16), generator=torch.Generator().manual_seed(2))
        with g.Intervention(model, LAYER, ctrl):
            model(input_ids=ids).logits[:, -4:, :1000].square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ctrl.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_entropy_proxies_match_their_definitions():
    ctrl = random_controller(window=5, proxy_window=4)
    ctrl.cfg.entropy_proxy = "both"
    h = torch.randn(1, 9, 64)
    _, prox, _ = ctrl.encode(h)
    u = g.rms_normalize(h)[0].numpy()
    for t in range(9):
        w = u[max(0, t - 3):t + 1]  # the last 4 tokens (fewer at the start)
        variance = w.var(axis=0).mean()
        cos = [np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(w[:-1], w[1:])]
        cosine = 1 - np.mean(cos) if cos else 0.0
        np.testing.assert_allclose(prox[0, t].numpy(), [variance, cosine], rtol=1e-4, atol=1e-5)


def test_persistence_entropy_equals_hand_computed_mst():
    # points 0, 1, 3, 6, 10 on a line: the MST is the 4 gaps 1, 2, 3, 4 (total 10)
    deaths = g.h0_deaths(np.array([[0.0], [1.0], [3.0], [6.0], [10.0]]))
    np.testing.assert_allclose(deaths, [1, 2, 3, 4], atol=1e-6)
    expected = -sum(l / 10 * math.log(l / 10) for l in (1, 2, 3, 4))  # 1.27985
    assert g.persistence_entropy(deaths) == pytest.approx(expected, abs=1e-6)
    # unit square + a point 3 right of (1, 1): MST 1, 1, 1, 3 -> p = 1/6, 1/6, 1/6, 1/2 -> ln(12)/2;
    # a duplicate point adds a zero-length bar, which does not count
    square = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [4, 1], [4, 1]], dtype=float)
    tda = g.trajectory_tda(square, fixed_n=6, normalize=False)
    assert tda["n"] == 6
    assert tda["pe"] == pytest.approx(0.5 * math.log(12), abs=1e-6)
    assert tda["pe_norm"] == pytest.approx(0.5 * math.log(12) / math.log(5), abs=1e-6)
    assert tda["pe_fixed"] == pytest.approx(tda["pe"], abs=1e-6)  # N = fixed_n: all points
    # 32 evenly spaced points: 31 equal bars, PE = ln 31 = 3.434, the seed's "3.41" with no structure
    tda = g.trajectory_tda(np.arange(32.0)[:, None], fixed_n=8, normalize=False)
    assert tda["pe"] == pytest.approx(math.log(31), abs=1e-6) and tda["pe_norm"] == pytest.approx(1.0)
    # fixed N = 8: indices round(linspace(0, 31, 8)) = 0 4 9 13 18 22 27 31, gaps 4 5 4 5 4 5 4
    assert tda["pe_fixed"] == pytest.approx(-sum(l / 31 * math.log(l / 31) for l in (4, 5, 4, 5, 4, 5, 4)), abs=1e-6)


def test_tokenizer_prompt_and_scoring():
    enc = g.get_tokenizer()
    assert enc.n_vocab == 151669 and g.encode(enc, "Hello world") == [9707, 1879]
    ids = g.chat_prompt(enc, "What is 2+3?", [], thinking=False)
    assert enc.decode(ids) == ("<|im_start|>user\nWhat is 2+3?" + g.PROMPT_SUFFIX + "<|im_end|>\n"
                               "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert g.extract_answer("so 3 + 4 = 7 apples, total $1,234.") == "1234"
    assert g.extract_answer("#### -3.5") == "-3.5" and g.extract_answer("no number") == ""
    assert g.is_correct("18.0", "18") and g.is_correct("1234", "1,234") and not g.is_correct("17", "18")


def test_pipeline_trains_and_phase2_lowers_kl(work, tmp_path):
    """prep -> phase 1 -> phase 2 -> eval in one process. The teacher is the student plus a constant
    correction after layer LAYER + 1, so the KL has something steering can remove."""
    out = tmp_path / "run"
    g.main(args(work, out, "--mode=all"))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    p1 = [r["bce"] for r in rows if r["kind"] == "train1"]
    kl = [r["kl"] for r in rows if r["kind"] == "val2"]
    unsteered = rows[-1]["kl_unsteered"]
    print("phase 1 train bce", p1, "| phase 2 val kl", kl, "unsteered", unsteered)
    assert p1[-1] < p1[0]
    assert kl[0] == pytest.approx(unsteered, rel=0.05)  # the plan starts at zero: no steering yet
    assert kl[-1] < 0.6 * unsteered
    results = json.load(open(out / "results.json"))
    s = results["summary"]
    assert s["n"] == 4 and 0 < s["steered"]["mean_gate"] < 1
    for cond in ("baseline", "steered"):
        for r in results["examples"]:
            assert r[cond]["n"] == r[cond]["n_new_tokens"] and r[cond]["pe_norm"] is not None
    for png in ("persistence_diagrams.png", "h0_entropy_hist.png", "train_curves.png"):
        assert (out / png).stat().st_size > 1000


def test_torchrun_two_processes_train_the_controller(work, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "gru_steer.py"), *args(work, out, "--mode=all", "--phase1_iters=4",
                                                     "--phase2_iters=4", "--eval_interval=2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    assert len(json.load(open(out / "trajectories" / "index.json"))) == 10  # both ranks' shards
    for phase in (1, 2):
        shas = json.load(open(out / f"phase{phase}.json"))["param_sha256_per_rank"]
        assert len(shas) == 2 and shas[0] == shas[1]  # hand-averaged gradients kept the replicas equal
    ckpt = torch.load(out / "ckpt_phase2.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["controller"]["plan.weight"].abs().sum() > 0  # trained away from 0
    assert json.load(open(out / "results.json"))["summary"]["n"] == 4


def test_clear_errors(work, tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        g.main(args(work, tmp_path / "a", "--mode=prep", "--intervention_layer=4"))
    with pytest.raises(ValueError, match="longer than the sequence"):
        g.main(args(work, tmp_path / "b", "--window=300", "--seq_len=256"))
    # a teacher with another vocabulary
    from transformers import Qwen3Config, Qwen3ForCausalLM
    other = Qwen3Config(vocab_size=152064, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    Qwen3ForCausalLM(other).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="different vocabularies"):
        g.main(args(work, tmp_path / "c", "--mode=phase2", f"--teacher={tmp_path / 'other'}"))
    # a controller checkpoint of another shape (rank 4 saved, rank 2 asked for)
    ctrl = random_controller()
    torch.save({"controller": ctrl.state_dict()}, tmp_path / "ctrl.pt")
    with pytest.raises(ValueError, match="shape of factor_a.weight"):
        g.main(args(work, tmp_path / "d", "--mode=eval", "--steer_rank=2", "--proj_dim=16", "--gru_hidden=16",
                    "--window=6", f"--controller_ckpt={tmp_path / 'ctrl.pt'}"))
