"""
Training-step time and memory of coconut.py's multi-pass forward against a re-implementation of
Meta's algorithm (facebookresearch/coconut, coconut.py `Coconut.forward`): HF GPT-2 called once per
pass with `past_key_values` cut to the computed columns, the thought slots filled by rebuilding the
embedding tensor from per-position slices, logits of every position, one CrossEntropyLoss.
Same weights, same batch; the two losses must agree.

  python checks/bench_coconut.py                       # GPU: GPT-2 small shape, ProsQA-length batch
  python checks/bench_coconut.py --size tiny           # CPU-sized
Targets (issue): on a GPU at GPT-2-small size, >= 3x faster per step and <= 0.7x peak memory.
Memory is torch.cuda.max_memory_allocated on a GPU; on CPU it is the bytes of the tensors autograd
saves for backward (activation memory), the part of the peak the two methods differ in.
Exit code 1 if the losses disagree.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import coconut  # noqa: E402

SIZES = {  # model shape and a ProsQA-like batch at the last stage (6 thoughts, no steps left)
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab=50260, batch=32, question=(250, 400), thoughts=6, answer=9),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, vocab=2000, batch=8, question=(60, 100), thoughts=6, answer=9),
}


def make_batch(s, ids, seed=0):
    """Question, markers with s['thoughts'] thoughts (fewer in a few rows), answer; Meta's collator."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for b in range(s["batch"]):
        q_len = int(torch.randint(s["question"][0], s["question"][1], (1,), generator=g))
        k = s["thoughts"] - (b % 3 == 2)  # mixed thought counts, as under uniform_prob or pad=False
        q = torch.randint(0, s["vocab"] - 4, (q_len,), generator=g).tolist()
        answer = torch.randint(0, s["vocab"] - 4, (s["answer"],), generator=g).tolist() + [ids["eos"]]
        prefix = q + [ids["start"]] + [ids["latent"]] * k + [ids["end"]]
        samples.append((prefix + answer, [-100] * len(prefix) + answer, k, len(q) + 1))
    return coconut.collate(samples, ids["eos"])


# -----------------------------------------------------------------------------
# Meta's algorithm on HF GPT-2


def to_hf_cache(pairs):
    from transformers import DynamicCache
    try:
        return DynamicCache(ddp_cache_data=pairs)       # transformers 5.x
    except TypeError:
        return DynamicCache.from_legacy_cache(pairs)    # transformers 4.x


def from_hf_cache(cache):
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return cache.to_legacy_cache() if hasattr(cache, "to_legacy_cache") else cache


def meta_loss(hf, batch, latent_id):
    ids, labels = batch["input_ids"], batch["labels"]
    attn, pos = batch["key_valid"].long(), batch["position_ids"]
    latent_cols = [(row == latent_id).nonzero().flatten().tolist() for row in ids]
    n = max(len(cols) for cols in latent_cols)
    embeds = hf.get_input_embeddings()(ids)
    lo, hi = 0, (min(col for cols in latent_cols for col in cols) if n else ids.shape[1])
    logits, cache = [], None
    for p in range(n + 1):
        past = to_hf_cache([(k[:, :, :lo], v[:, :, :lo]) for k, v in cache]) if cache else None
        out = hf(inputs_embeds=embeds[:, lo:hi], attention_mask=attn[:, :hi] if past else attn[:, lo:hi],
                 position_ids=pos[:, lo:hi], past_key_values=past, output_hidden_states=True, use_cache=True)
        logits.append(out.logits)
        if p == n:
            break
        hidden, offset = out.hidden_states[-1], lo
        cache = from_hf_cache(out.past_key_values)
        lo, hi = hi, (ids.shape[1] if p + 1 >= n else hi + 1)
        # Meta rebuilds the whole embedding tensor from per-position slices to keep autograd happy
        rows = [[embeds[b, t] for t in range(embeds.shape[1])] for b in range(embeds.shape[0])]
        for b, cols in enumerate(latent_cols):
            if len(cols) > p:
                rows[b][cols[p]] = hidden[b, cols[p] - 1 - offset]
        embeds = torch.stack([torch.stack(r) for r in rows])
    logits = torch.cat(logits, dim=1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


# -----------------------------------------------------------------------------


def saved_bytes(fn):
    """Run fn() and count the bytes of distinct storages autograd saves for backward."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def bench(step, device, iters):
    for _ in range(2):
        step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: gpt2 on GPU, tiny on CPU")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = SIZES[args.size or ("gpt2" if device == "cuda" else "tiny")]
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=s["vocab"], n_positions=1024, n_embd=s["n_embd"],
                                    n_layer=s["n_layer"], n_head=s["n_head"], resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0)).to(device).train()
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        gpt = coconut.GPT.from_hf(d, extra_tokens=0, dropout=0.0)
    ids = {"eos": s["vocab"] - 4, "start": s["vocab"] - 3, "end": s["vocab"] - 2, "latent": s["vocab"] - 1}
    ours = coconut.Coconut(gpt, ids["latent"]).to(device).train()
    batch = coconut.to_device(make_batch(s, ids), device)
    print(f"device {device} | {s['n_layer']} layers, d {s['n_embd']}, vocab {s['vocab']} | batch "
          f"{tuple(batch['input_ids'].shape)}, thoughts {batch['n_latent'].tolist()[:4]}...")

    loss_ours = lambda: ours(**batch)
    loss_meta = lambda: meta_loss(hf, batch, ids["latent"])
    (lo, mem_ours), (lm, mem_meta) = saved_bytes(loss_ours), saved_bytes(loss_meta)
    diff = abs(lo.item() - lm.item()) / abs(lm.item())
    print(f"loss ours {lo.item():.6f} | Meta {lm.item():.6f} | rel diff {diff:.1e}")

    def step(model, loss_fn):
        def run():
            loss_fn().backward()
            model.zero_grad(set_to_none=True)
        return run
    results = {}
    for label, model, fn in (("ours", ours, loss_ours), ("meta", hf, loss_meta)):
        t = bench(step(model, fn), device, args.iters)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        results[label] = (t, peak)
        print(f"{label:5s} step {t * 1000:8.1f} ms" + (f" | peak {peak / 2**20:8.0f} MiB" if peak else ""))
    speed = results["meta"][0] / results["ours"][0]
    print(f"speed-up (Meta time / ours): {speed:.2f}x   (target on GPU >= 3x)")
    if device == "cuda":
        print(f"peak memory ours / Meta: {results['ours'][1] / results['meta'][1]:.2f}   (target <= 0.7)")
    print(f"saved-for-backward bytes ours / Meta: {mem_ours / 2**20:.1f} / {mem_meta / 2**20:.1f} MiB "
          f"= {mem_ours / mem_meta:.2f}")
    if diff > (1e-4 if device == "cpu" else 1e-3):
        print("FAIL: losses differ")
        sys.exit(1)


if __name__ == "__main__":
    main()
