"""
Throughput of jepa.py's encoders and latent operations, in problems per second, so later changes can be
compared on the same machine. It also checks the latent operations' contract: no row's verifier score
may drop (exit 1 on a miss).

    python checks/bench_jepa.py                                        # tiny config, random predictor/decoder
    python checks/bench_jepa.py --checkpoint out/jepa_math_demo/ckpt_final.pt --n 200
    python checks/bench_jepa.py --device cuda --n 1000

Encode: context (question, with token states) + target (solution) encoders with no feature cache.
Search: each operation on the untouched prediction, batches of the config's eval_batch_size.
"""

import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import jepa  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="", help="a jepa.py checkpoint (default: --config, random init)")
    parser.add_argument("--config", default="configs/tiny_jepa.py")
    parser.add_argument("--n", type=int, default=64, help="problems")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    defaults = {k: getattr(jepa, k) for k in jepa.config_keys}
    if args.checkpoint:
        ckpt = common.load_checkpoint(args.checkpoint)
        c = SimpleNamespace(**{**defaults, **ckpt["config"]})
    else:
        c = SimpleNamespace(**common.parse_config(defaults, [args.config]))
    torch.manual_seed(0)
    enc, eos = jepa.get_tokenizer(c.tokenizer)
    model = jepa.build_model(c, enc, eos, args.device).eval()
    if args.checkpoint:
        jepa.load_model_state(model, ckpt["model"], args.checkpoint)
    problems = jepa.synthetic_splits(0, args.n, 0, c.max_level, seed=1234)[1]
    batches = [problems[i:i + c.eval_batch_size] for i in range(0, len(problems), c.eval_batch_size)]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"device {args.device} | threads {torch.get_num_threads()} | problems {args.n} | "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'random init, ' + args.config}")

    def encode_all(cached):
        for side in (model.context, model.target):
            for e in side.values():
                if not cached:
                    e._pooled.clear()
                    e._tokens.clear()
        contexts = []
        with torch.no_grad():
            for exs in batches:
                s_x, ctx, mask = model.encode([ex["question"] for ex in exs], "text")
                model.encode_target([jepa.solution_text(ex) for ex in exs], "text")
                contexts.append({"ctx": ctx, "mask": mask, "s_x": s_x, "group": "text"})
        return contexts

    encode_all(cached=False)  # warm-up: weights in cache, kernels chosen
    sync()
    t0 = time.time()
    contexts = encode_all(cached=False)
    sync()
    rates = {"encode": args.n / (time.time() - t0)}
    search = jepa.LatentSearch(model, c, enc, eos, torch.Generator(args.device).manual_seed(0))
    misses = []
    for op in ("none", "graph_search", "denoise", "refine", "cluster"):
        sync()
        t0 = time.time()
        for b in contexts:
            with torch.no_grad():
                s0 = model.predict(b["ctx"], b["mask"], b["s_x"])
            if op == "none":
                search.decode(s0)
                continue
            _, score, score_in = getattr(search, op)(b, s0)
            if (score < score_in - 1e-6).any():
                misses.append(f"{op}: min(score - score_in) = {(score - score_in).min().item():.3g}")
        sync()
        rates[op] = args.n / (time.time() - t0)
    for name, rate in rates.items():
        print(f"{name:>12} | {rate:8.1f} problems/s")
    print("expected: every operation keeps or raises each row's verifier score; got: "
          + ("; ".join(misses) if misses else "no row lowered"))
    sys.exit(1 if misses else 0)


if __name__ == "__main__":
    main()
