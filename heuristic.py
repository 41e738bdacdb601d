"""
Heuristic latent memory on top of Coconut (seed 000, "Heuristic Latent Memory"): a FAISS index of
continuous-thought latents, key/value projectors, and a nudge network whose output is added to each
thought before Coconut feeds it back. The Coconut model (coconut.py) stays frozen.

One nudged thought (continuous Coconut, eq. 1 of Hao et al. 2024, plus the nudge):
  h_t        the last-layer hidden state that Coconut feeds back as thought t
  q_t        = normalize(W_k h_t)                          key projector, key_dim
  hits       the top_k entries with cos(q_t, k_j) >= retrieval_threshold (FAISS inner product on
             L2-normalised keys is the cosine similarity)
  r_t        = sum_j softmax_j(cos_j / temperature) v_j    stored values, value_dim
  thought t  = h_t + clip(N([W_v h_t, r_t]))               N: the nudge MLP; h_t as is without a hit
             (clip: norm at most max_nudge_ratio |h_t|, so later thoughts stay near the states the
             memory holds; measured: unclipped nudges of 2.7 |h_t| left thought 2 without any hit)
A memory entry is one thought transition of a training example: key W_k h_t, value W_v h_{t+1} (the
state that thought led to), metadata (question id, thought, whether the frozen model answered the
question right). Entry ids are insertion positions 0..n-1. W_k and W_v are seeded random linear maps
saved with the memory and never trained: an entry keeps the key it was inserted with, so a projector
that moved during the pass would leave the early entries unreachable.

Binary nudge loss (train_mode=True): l0 and l1 are an example's teacher-forced answer losses without
and with the nudge. "The nudge moved the model toward the correct answer" is the event l1 < l0; its
logistic loss softplus(l1 - l0) = BCE(sigmoid(l0 - l1), 1) trains the nudge MLP through the frozen
model (log 2: no effect). Every training example also inserts its transitions into the index.
train_mode=False: weights and memory stay fixed and nothing is written to the index directory.

Launch (the seed's playbook; steps 1-2 are coconut.py configs/gsm_coconut.py and gsm_coconut_eval.py):
  3. python heuristic.py configs/heuristic_gsm_train.py       # fit memory + nudge net, live plot
     torchrun --standalone --nproc_per_node 4 heuristic.py configs/heuristic_gsm_train.py
  4. python heuristic.py configs/heuristic_gsm_eval.py        # frozen memory on the GSM8K test set
     torchrun --standalone --nproc_per_node 4 heuristic.py configs/heuristic_gsm_eval.py
  5. python heuristic.py configs/heuristic_gsm_eval.py --sweep=True   # thresholds: table + plot
  CPU, seconds: python heuristic.py configs/tiny_heuristic.py (after coconut.py configs/tiny_coconut.py)
Baseline: GSM8K Coconut 34.1% (paper Table 1), the plots' reference line. The seed reports no number
for the memory itself.
"""

import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from types import SimpleNamespace

# faiss-cpu brings its own OpenMP runtime next to torch's. With libgomp's default spin-wait, one
# pool's idle threads busy-spin after each parallel region and starve the other's: on 2 CPU cores at
# GPT-2 size a retrieval cost 33 ms instead of 1.4 ms. A short spin keeps both fast (a passive wait
# slows torch itself). libgomp reads this when it loads, so it precedes the imports below.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import faiss
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import coconut
import common

# -----------------------------------------------------------------------------
# config (defaults: the seed's GSM8K runs; configs/heuristic_*.py override)
# I/O
out_dir = "out/heuristic_gsm"      # results.jsonl, retrieval_metrics_*.json, metrics.jsonl, plots
name = "heuristic-gsm"             # run name (logs)
load_model_path = "out/gsm_coconut/ckpt_best.pt"  # a continuous Coconut checkpoint; its config gives model + curriculum
heuristic_memory = "configs/heuristic_memory_gsm.py"  # memory config file (the seed's args/gsm_heuristic.yaml); '' = off
train_mode = True                  # True: train the nudge net, insert latents (step 3); False: frozen memory (step 4)
sweep = False                      # evaluate every sweep_thresholds cutoff against the frozen memory (step 5)
sweep_thresholds = "0.5 0.6 0.7 0.8 0.9 0.95"  # space-separated cosine cutoffs
log_interval = 20                  # batches between log lines
save_interval = 0                  # examples between mid-pass saves of the memory; 0 = after each epoch only
plot_every = 64                    # examples between rewrites of the live-plot PNG
live_plot = True                   # also show the plot in a window when a display exists
baseline_accuracy = 0.341          # the plot's reference line (Coconut on GSM8K, paper Table 1)
rolling_window = 200               # examples in the plot's rolling accuracy
# data
train_path = "data/gsm8k/gsm_train.json"
val_path = "data/gsm8k/gsm_test.json"
tokenizer = ""                     # '' = the Coconut run's tokenizer
max_examples = 0                   # 0 = the whole split
eval_stage = -1                    # stage whose thought count every pass uses; -1 = the checkpoint's stage
eval_batch_size = 32               # generation batch; greedy answers do not depend on it
# heuristic memory (a heuristic_memory file sets these; the run config and command line override it)
index_dir = "data/index/gsm"       # index + metadata + nudge weights; created on demand
key_dim = 128                      # key projector output (the FAISS dimension)
value_dim = 256                    # value projector output
retrieval_threshold = 0.8          # minimum cosine similarity of a hit
top_k = 4                          # neighbours retrieved per thought
temperature = 0.1                  # softmax temperature over the hits' cosine similarities
max_nudge_ratio = 0.5              # the nudge's norm is clipped to this fraction of the thought's norm
nudge_hidden = 512                 # hidden width of the nudge MLP
index_type = "flat"                # flat (exact) | ivf | hnsw (approximate, for large memories)
ivf_nlist = 1024                   # IVF cells; the IVF is trained once 39 x nlist entries exist
ivf_nprobe = 32                    # IVF cells visited per query
hnsw_m = 32                        # HNSW neighbours per node
# optim (the nudge MLP only; Coconut is frozen)
num_epochs = 1                     # passes over the training split
batch_size = 16
learning_rate = 1e-3
weight_decay = 0.0
# system
seed = 0
device = "auto"                    # 'auto' = cuda if available, else cpu
bf16 = False                       # bf16 autocast on CUDA
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
MEMORY_KEYS = ("index_dir", "key_dim", "value_dim", "retrieval_threshold", "top_k", "temperature",
               "max_nudge_ratio", "nudge_hidden", "index_type", "ivf_nlist", "ivf_nprobe", "hnsw_m")
INDEX_TYPES = ("flat", "ivf", "hnsw")
IVF_POINTS_PER_CELL = 39           # FAISS warns when k-means gets fewer training points per centroid
HNSW_EF = (80, 128)                # efConstruction, efSearch: high recall at top_k <= 32
MANIFEST = "MANIFEST.json"

# -----------------------------------------------------------------------------
# model: Coconut with a hook on the fed-back thought, the projectors and the nudge MLP


class NudgedCoconut(coconut.Coconut):
    """Continuous Coconut whose fed-back thought passes through `on_thought(j, h, active) -> h'` when
    it is set (h: (B, C) state fed as thought j; active: (B,) rows that have a thought j).
    Coconut.hidden_states has no hook there, so this repeats its pass loop with that one call added;
    with on_thought None it runs Coconut's own code. generate() and forward() are inherited."""

    def __init__(self, gpt, latent_id):
        super().__init__(gpt, latent_id, "continuous")
        self.on_thought = None  # a plain callable, not a submodule: the state dict stays Coconut's

    def hidden_states(self, input_ids, position_ids, key_valid, n_latent, first_latent):
        n = int(n_latent.max()) if n_latent.numel() else 0
        if self.on_thought is None or n == 0:
            return super().hidden_states(input_ids, position_ids, key_valid, n_latent, first_latent)
        embeds = self.gpt.wte(input_ids)
        bounds = [0] + [first_latent + i for i in range(n)] + [input_ids.shape[1]]
        hs, past = [], None
        for i in range(n + 1):
            s, e = bounds[i], bounds[i + 1]
            x = embeds[:, s:e]
            if i > 0:  # column s holds thought i-1: the previous column's state, nudged
                active = n_latent >= i
                fed = self.on_thought(i - 1, hs[-1][:, -1], active)
                x = torch.cat([torch.where(active[:, None], fed, x[:, 0])[:, None], x[:, 1:]], dim=1)
            h, past = self.gpt(x, position_ids[:, s:e], coconut.attention_mask(key_valid[:, :e], s), past)
            hs.append(h)
        return torch.cat(hs, dim=1), past


class HeuristicNet(nn.Module):
    """Key and value projectors (fixed, see the docstring) and the nudge MLP (trained)."""

    def __init__(self, n_embd, key_dim, value_dim, nudge_hidden):
        super().__init__()
        self.key_proj = nn.Linear(n_embd, key_dim).requires_grad_(False)
        self.value_proj = nn.Linear(n_embd, value_dim).requires_grad_(False)
        self.nudge = nn.Sequential(nn.Linear(2 * value_dim, nudge_hidden), nn.GELU(),
                                   nn.Linear(nudge_hidden, n_embd))
        # a zero last layer: training starts from plain Coconut (nudge loss log 2), gradients still flow
        nn.init.zeros_(self.nudge[-1].weight)
        nn.init.zeros_(self.nudge[-1].bias)

    def key(self, h):
        return F.normalize(self.key_proj(h.float()), dim=-1)  # unit keys: inner product = cosine

    def value(self, h):
        return self.value_proj(h.float())


# -----------------------------------------------------------------------------
# memory: FAISS index, values and metadata; atomic persistence


def _fsync_dir(path):  # makes renames and new files inside `path` durable
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _write_file(path, data):
    """Write bytes and fsync them; returns their sha256 (recorded in the manifest)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _to_bytes(save, obj):
    buf = io.BytesIO()
    save(buf, obj)
    return buf.getvalue()


def check_index_dir(index_dir, create):
    """Train mode creates a missing index directory and says so; eval mode reports it."""
    if os.path.exists(index_dir) and not os.path.isdir(index_dir):
        raise NotADirectoryError(f"index_dir {index_dir} exists and is not a directory")
    if not os.path.exists(index_dir):
        if not create:
            raise FileNotFoundError(f"no heuristic memory at {index_dir}: the directory does not exist. Build one "
                                    "with train_mode=True (python heuristic.py configs/heuristic_gsm_train.py)")
        os.makedirs(index_dir)
        common.print0(f"memory: created index directory {index_dir}")
    if not os.access(index_dir, os.R_OK | os.X_OK | (os.W_OK if create else 0)):
        raise PermissionError(f"index_dir {index_dir} is not {'writable' if create else 'readable'} by this user")


class LatentMemory:
    """Unit keys in a FAISS inner-product index (cosine), with the entries' values and question ids
    as tensors on `device` (the nudge gathers values there) and a CPU copy of the keys (to train an
    IVF and to save). FAISS's GPU index is used when FAISS sees a GPU and device is CUDA; HNSW has
    no GPU version and stays on the CPU."""

    def __init__(self, key_dim, value_dim, n_embd, index_type="flat", ivf_nlist=1024, ivf_nprobe=32,
                 hnsw_m=32, device="cpu"):
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type={index_type!r}; allowed: {', '.join(INDEX_TYPES)}")
        self.dims = {"key_dim": key_dim, "value_dim": value_dim, "n_embd": n_embd}
        self.index_type, self.ivf_nlist, self.ivf_nprobe, self.hnsw_m = index_type, ivf_nlist, ivf_nprobe, hnsw_m
        self.device = torch.device(device)
        # untested here (CI has faiss-cpu): faiss-gpu's index when it sees a GPU
        self.gpu = faiss.get_num_gpus() > 0 and self.device.type == "cuda" and index_type != "hnsw"
        self.n, self.meta, self.seen = 0, [], set()
        self.per_question = 0  # most entries of one question (its thoughts): how far exclusion must look
        self._keys = torch.empty(0, key_dim)
        self._values = torch.empty(0, value_dim, device=device)
        self._qids = torch.empty(0, dtype=torch.long, device=device)
        self.index = self._build_index(np.empty((0, key_dim), dtype="float32"))

    keys = property(lambda self: self._keys[: self.n])        # (n, K) on the CPU
    values = property(lambda self: self._values[: self.n])    # (n, V)
    qids = property(lambda self: self._qids[: self.n])        # (n,)

    def __len__(self):
        return self.n

    def _ivf_ready(self, n):
        return self.index_type == "ivf" and n >= IVF_POINTS_PER_CELL * self.ivf_nlist

    def _placed(self, index):
        """Search-time settings, and the GPU copy when there is one."""
        if self.index_type == "hnsw":
            index.hnsw.efSearch = HNSW_EF[1]
        elif isinstance(index, faiss.IndexIVF):
            index.nprobe = self.ivf_nprobe
        if self.gpu:
            self._gpu_res = getattr(self, "_gpu_res", None) or faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_res, self.device.index or 0, index)
        return index

    def _build_index(self, keys):
        """An index over keys (n, K). IVF needs k-means training data, so an IVF memory searches
        exactly (flat) until it holds IVF_POINTS_PER_CELL x nlist entries."""
        d = self.dims["key_dim"]
        if self.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF[0]
        elif self._ivf_ready(len(keys)):
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, self.ivf_nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(keys)
        else:
            index = faiss.IndexFlatIP(d)
        index = self._placed(index)
        if len(keys):
            index.add(keys)
        return index

    def _append(self, keys, values, meta):
        """Tensors, metadata and question ids of new entries; the index is the caller's business."""
        m = len(meta)
        if self.n + m > len(self._keys):  # capacity doubling: amortised O(1) per entry
            cap = max(2 * len(self._keys), self.n + m, 1024)
            grow = lambda t: torch.cat([t[: self.n], t.new_empty(cap - self.n, *t.shape[1:])])
            self._keys, self._values, self._qids = grow(self._keys), grow(self._values), grow(self._qids)
        self._keys[self.n: self.n + m] = torch.as_tensor(keys, dtype=torch.float32)
        self._values[self.n: self.n + m] = torch.as_tensor(values, dtype=torch.float32).to(self.device)
        self._qids[self.n: self.n + m] = torch.tensor([x["qid"] for x in meta])
        self.n += m
        self.meta += meta
        self.seen.update((x["split"], x["qid"]) for x in meta)
        self.per_question = max(self.per_question, *Counter(x["qid"] for x in meta).values())

    def add(self, keys, values, meta):
        """Append entries: keys (m, K) unit rows, values (m, V), meta dicts with 'split' and 'qid'.
        Entries of a question already stored are skipped, so a restarted pass, a later epoch or
        DDP's padded duplicates never store a question twice. Returns the number added."""
        fresh = [i for i, x in enumerate(meta) if (x["split"], x["qid"]) not in self.seen]
        if not fresh:
            return 0
        keys = np.ascontiguousarray(torch.as_tensor(keys, dtype=torch.float32)[fresh].cpu().numpy())
        n_before = self.n
        self._append(keys, torch.as_tensor(values)[fresh], [dict(meta[i], id=self.n + j) for j, i in enumerate(fresh)])
        if self._ivf_ready(self.n) and not self._ivf_ready(n_before):
            self.index = self._build_index(self.keys.numpy())  # enough data now to train the IVF
        else:
            self.index.add(keys)
        return len(fresh)

    def search(self, q, k):
        """FAISS top-k of unit queries q (B, K): similarities (B, k) and ids (B, k) (-1: none), best
        first, on q's device; k is capped at the memory size."""
        k = min(k, self.n)
        if k == 0:
            return q.new_zeros(len(q), 0), torch.zeros(len(q), 0, dtype=torch.long, device=q.device)
        sims, ids = self.index.search(np.ascontiguousarray(q.detach().float().cpu().numpy()), k)
        return torch.from_numpy(sims).to(q.device), torch.from_numpy(ids).to(q.device)

    def index_bytes(self):
        return faiss.serialize_index(faiss.index_gpu_to_cpu(self.index) if self.gpu else self.index).tobytes()

    def fingerprint(self):
        """sha256 of index, values and metadata: equal on all ranks when DDP kept them in sync."""
        parts = (self.index_bytes(), self.values.cpu().numpy().tobytes(), json.dumps(self.meta).encode())
        return hashlib.sha256(b"".join(parts)).hexdigest()

    def save(self, index_dir, extra):
        """Write index, keys, values, metadata and `extra` (nudge weights, optimizer, progress) as one
        generation: the files go to a fresh temp directory and are fsync'd, the directory is renamed
        to gen_<n>, then MANIFEST.json (naming it, with every file's sha256) is atomically replaced.
        A crash at any point leaves the previous manifest and its generation loadable; the next save
        removes what a crashed one left."""
        check_index_dir(index_dir, create=True)
        manifest_path = os.path.join(index_dir, MANIFEST)
        used = [int(e[4:]) for e in os.listdir(index_dir) if e.startswith("gen_")]  # a crashed save's too
        if os.path.exists(manifest_path):
            used.append(json.load(open(manifest_path))["generation"])
        generation = max(used, default=0) + 1
        files = {"index.faiss": self.index_bytes(),
                 "keys.npy": _to_bytes(np.save, self.keys.numpy()),
                 "values.npy": _to_bytes(np.save, self.values.cpu().numpy()),
                 "meta.json": json.dumps(self.meta).encode(),
                 "nudge.pt": _to_bytes(lambda f, obj: torch.save(obj, f), extra)}
        final = os.path.join(index_dir, f"gen_{generation:06d}")
        tmp = tempfile.mkdtemp(prefix=".tmp_gen_", dir=index_dir)
        try:
            sha = {name: _write_file(os.path.join(tmp, name), data) for name, data in files.items()}
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(index_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        common.write_json({"generation": generation, "dir": os.path.basename(final), "n": self.n,
                           "index_type": self.index_type, **self.dims, "sha256": sha}, manifest_path)
        _fsync_dir(index_dir)
        for entry in os.listdir(index_dir):  # older generations and crashed saves
            if entry.startswith(("gen_", ".tmp_gen_")) and entry != os.path.basename(final):
                shutil.rmtree(os.path.join(index_dir, entry), ignore_errors=True)

    @classmethod
    def load(cls, index_dir, key_dim, value_dim, n_embd, device="cpu", **index_options):
        """The generation MANIFEST.json names, as (memory, extra). The saved index type wins over
        index_options' (whose search settings apply). Checks the dimensions against this run's,
        every file against the manifest's sha256, and that index and metadata agree."""
        check_index_dir(index_dir, create=False)
        manifest_path = os.path.join(index_dir, MANIFEST)
        if not os.path.exists(manifest_path):
            raise FileNotFoundError(f"{index_dir} holds no heuristic memory ({MANIFEST} missing). Build one "
                                    "with train_mode=True (python heuristic.py configs/heuristic_gsm_train.py)")
        man = json.load(open(manifest_path))
        want = {"key_dim": key_dim, "value_dim": value_dim, "n_embd": n_embd}
        got = {k: man[k] for k in want}
        if got != want:
            raise ValueError(f"the memory in {index_dir} was built with {got}; this run has {want}. "
                             "Use a memory built with these dimensions, or another index_dir")
        gen = os.path.join(index_dir, man["dir"])
        for name, sha in man["sha256"].items():
            path = os.path.join(gen, name)
            if not os.path.exists(path) or _sha256_file(path) != sha:
                raise ValueError(f"{path} is missing or does not match {manifest_path}: the memory is corrupt")
        index = faiss.read_index(os.path.join(gen, "index.faiss"))
        keys, values = np.load(os.path.join(gen, "keys.npy")), np.load(os.path.join(gen, "values.npy"))
        meta = json.load(open(os.path.join(gen, "meta.json")))
        sizes = {"manifest": man["n"], "index": index.ntotal, "keys": len(keys), "values": len(values),
                 "metadata": len(meta)}
        if len(set(sizes.values())) != 1 or index.d != key_dim or [x["id"] for x in meta] != list(range(len(meta))):
            raise ValueError(f"{gen}: index and metadata disagree (entries {sizes}, index dimension {index.d}; "
                             "metadata ids must be 0..n-1)")
        memory = cls(key_dim, value_dim, n_embd, device=device, **{**index_options, "index_type": man["index_type"]})
        memory._append(keys, values, meta)
        memory.index = memory._placed(index)
        return memory, common.load_checkpoint(os.path.join(gen, "nudge.pt"))


# -----------------------------------------------------------------------------
# retrieval: the on_thought hook, per-example records, metrics


class Retriever:
    """Set as NudgedCoconut.on_thought: queries the memory with each thought's state, mixes the hits'
    values and adds the nudge. `trace` keeps one dict per thought for the logs; `exclude` (B,) holds
    the batch's question ids in train mode, so an example never retrieves its own entries."""

    def __init__(self, net, memory, threshold, top_k, temperature, max_nudge_ratio):
        self.net, self.memory = net, memory
        self.threshold, self.top_k, self.temperature, self.max_ratio = threshold, top_k, temperature, max_nudge_ratio
        self.start(None)

    def start(self, exclude):
        self.exclude, self.trace = exclude, []

    def __call__(self, j, h, active):
        q = self.net.key(h)                                                          # (B, K)
        wider = self.memory.per_question if self.exclude is not None else 0  # room for the excluded entries
        sims, ids = self.memory.search(q, self.top_k + wider)                       # (B, k) each
        eligible = ids >= 0
        if self.exclude is not None:
            eligible &= self.memory.qids[ids.clamp_min(0)] != self.exclude[:, None]
        hit = eligible & (sims >= self.threshold) & active[:, None]
        hit &= hit.cumsum(1) <= self.top_k                                           # FAISS sorts best first
        weights = torch.softmax((sims / self.temperature).masked_fill(~hit, -1e9), dim=1)
        mixed = (weights[..., None] * self.memory.values[ids.clamp_min(0)]).sum(1)  # (B, V)
        nudge = self.net.nudge(torch.cat([self.net.value(h), mixed], -1)) * hit.any(1, keepdim=True)  # (B, C)
        limit = self.max_ratio * h.detach().float().norm(dim=-1, keepdim=True)
        nudge = nudge * (limit / nudge.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        top1 = torch.full((len(q),), float("nan"))  # best eligible neighbour, for the mean-similarity log
        if sims.shape[1]:
            best = sims.gather(1, eligible.float().argmax(1, keepdim=True))[:, 0]
            top1 = torch.where(eligible.any(1), best, top1.to(best.device)).cpu()
        self.trace.append({"active": active.cpu(), "ids": ids.masked_fill(~hit, -1).cpu(), "sims": sims.cpu(),
                           "top1": top1, "nudge_norm": nudge.detach().norm(dim=-1).cpu(),
                           "state_norm": h.detach().float().norm(dim=-1).cpu()})
        return h + nudge.to(h.dtype)


def retrieval_record(trace, b, full):
    """Row b's retrieval, thought by thought. `full` adds the hits' ids and similarities
    (results.jsonl); train mode keeps only the per-thought numbers the metrics need."""
    steps = [t for t in trace if t["active"][b]]
    hits = [[(int(i), round(float(s), 4)) for i, s in zip(t["ids"][b], t["sims"][b]) if i >= 0] for t in steps]
    rec = {"nudged": any(hits), "hits_per_thought": [len(x) for x in hits],
           "top1_similarity": [None if t["top1"][b].isnan() else round(float(t["top1"][b]), 4) for t in steps],
           "nudge_norm": [float(t["nudge_norm"][b]) for t in steps],
           "state_norm": [float(t["state_norm"][b]) for t in steps]}
    if full:
        rec.update(retrieved_ids=[[i for i, _ in x] for x in hits], similarities=[[s for _, s in x] for x in hits])
    return rec


def summarize(records):
    """Accuracy with and without the memory, and retrieval statistics, over per-example records."""
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    acc, base = mean([r["correct"] for r in records]), mean([r["correct_without_memory"] for r in records])
    thoughts = [(k, r) for r in records for k in range(len(r.get("hits_per_thought", [])))]
    hit = [(k, r) for k, r in thoughts if r["hits_per_thought"][k]]
    top1 = [r["top1_similarity"][k] for k, r in thoughts if r["top1_similarity"][k] is not None]
    return {"n": len(records), "accuracy": acc, "accuracy_without_memory": base, "lift": acc - base,
            "hit_rate": len(hit) / len(thoughts) if thoughts else 0.0,                 # thoughts with >= 1 hit
            "nudged_fraction": mean([bool(r.get("nudged")) for r in records]),       # examples with >= 1 hit
            "mean_similarity": mean(top1),                                             # best neighbour per thought
            "mean_nudge_norm": mean([r["nudge_norm"][k] for k, r in hit]),
            "mean_relative_nudge_norm": mean([r["nudge_norm"][k] / max(r["state_norm"][k], 1e-12) for k, r in hit]),
            "accuracy_with_hit": mean([r["correct"] for r in records if r.get("nudged")]),
            "accuracy_without_hit": mean([r["correct"] for r in records if not r.get("nudged")]),
            "nudge_loss": mean([r["nudge_loss"] for r in records if r.get("nudge_loss") is not None])}


# -----------------------------------------------------------------------------
# data and losses


def answer_losses(model, batch):
    """Per row: the mean cross-entropy of the supervised tokens (the answer and any steps left at
    this stage), whether greedy decoding would reproduce them exactly (every label the argmax, EOS
    included), and the thought states (B, n+1, C): s_j fed as thought j, s_n the last thought's output."""
    h, _ = model.hidden_states(batch["input_ids"], batch["position_ids"], batch["key_valid"],
                               batch["n_latent"], batch["first_latent"])
    target = batch["labels"][:, 1:]
    supervised = target != -100
    logits = model.gpt.lm_head(h[:, :-1][supervised]).float()
    row, B = supervised.nonzero()[:, 0], len(target)
    ce = F.cross_entropy(logits, target[supervised], reduction="none")
    loss = ce.new_zeros(B).index_add(0, row, ce) / supervised.sum(1).clamp_min(1)
    wrong = ce.new_zeros(B).index_add(0, row, (logits.argmax(-1) != target[supervised]).float())
    fl, n = batch["first_latent"], int(batch["n_latent"].max())
    return loss, wrong == 0, h[:, fl - 1: fl + n]


def shard_batches(tokenized, epoch, c, cc, stage, ids, rank, world_size):
    """This rank's (question ids, collated batch) list for one epoch: a seed + epoch shuffle, the
    same on every rank, padded to a multiple of the world size (like DistributedSampler), sharded."""
    order = np.random.default_rng(c.seed * 100003 + epoch).permutation(len(tokenized)).tolist()
    order += order[: (-len(order)) % world_size]
    mine = order[rank::world_size]
    samples = {i: coconut.build_sample(tokenized[i], stage, cc, ids) for i in mine}
    for i in mine:
        coconut.check_length(samples[i][0], i, c.train_path, cc)
    return [(mine[j:j + c.batch_size], coconut.collate([samples[i] for i in mine[j:j + c.batch_size]], ids["eos"]))
            for j in range(0, len(mine), c.batch_size)]


def gather(obj, world_size):
    """Every rank's obj, in rank order, on every rank. Also the sync point: with dist.barrier() one
    rank of the 2-process CPU test aborted at exit now and then ("terminate called without an active
    exception", 5 of ~170 runs, under load; cf. pytorch/gloo#155); coconut.py's collectives never did."""
    if world_size == 1:
        return [obj]
    parts = [None] * world_size
    dist.all_gather_object(parts, obj)
    return parts


# -----------------------------------------------------------------------------
# live plot


class LivePlot:
    """Rolling accuracy with and without the memory against the baseline line, and the running
    binary nudge loss. Rewrites `path` every `every` examples (Agg: works headless, over ssh and in
    CI); with `show` and a display it also refreshes a window (not exercised in CI)."""

    def __init__(self, path, title, baseline, window, every, show):
        import matplotlib
        self.show = show and bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
        if not self.show:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        self.plt, self.path, self.title = plt, path, title
        self.baseline, self.window, self.every, self.next = baseline, window, every, every
        self.fig, (self.ax_acc, self.ax_loss) = plt.subplots(1, 2, figsize=(11, 3.8))
        self.correct, self.base, self.loss = [], [], []
        if self.show:
            plt.ion()

    def add(self, records):
        for r in records:
            self.correct.append(r["correct"])
            self.base.append(r["correct_without_memory"])
            if r.get("nudge_loss") is not None:
                self.loss.append(r["nudge_loss"])
        if len(self.correct) >= self.next:
            self.draw()
            self.next = (len(self.correct) // self.every + 1) * self.every

    def draw(self):
        w = max(1, min(self.window, len(self.correct)))
        rolling = lambda xs: np.convolve(np.asarray(xs, dtype=float), np.ones(w) / w, "valid")
        a, b = self.ax_acc, self.ax_loss
        a.clear()
        if self.correct:
            a.plot(np.arange(w, len(self.correct) + 1), rolling(self.correct), label="with memory")
            a.plot(np.arange(w, len(self.base) + 1), rolling(self.base), "--", label="without memory")
        a.axhline(self.baseline, color="gray", ls=":", label=f"baseline {100 * self.baseline:.1f}%")
        a.set(xlabel="examples", ylabel=f"rolling accuracy ({w} examples)", ylim=(0, 1), title=self.title)
        a.legend(loc="lower right", fontsize=8)
        b.clear()
        if self.loss:
            b.plot(np.arange(1, len(self.loss) + 1), np.cumsum(self.loss) / np.arange(1, len(self.loss) + 1))
        b.axhline(np.log(2), color="gray", ls=":", label="log 2: no effect")
        b.set(xlabel="examples", ylabel="running binary nudge loss")
        b.legend(loc="upper right", fontsize=8)
        self.fig.tight_layout()
        self.fig.savefig(self.path + ".tmp.png", dpi=90)
        os.replace(self.path + ".tmp.png", self.path)  # a viewer never reads a half-written PNG
        if self.show:
            self.plt.pause(0.001)

    def close(self):
        self.draw()
        self.plt.close(self.fig)


# -----------------------------------------------------------------------------
# train mode (step 3), evaluation (step 4), threshold sweep (step 5)


def sync_grads(net, world_size):
    """Average the nudge MLP's gradients over ranks; a missing one counts as zero, so every rank
    steps alike. (DDP's wrapper does not allow the several forwards per step: one per thought.)"""
    for p in net.nudge.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if world_size > 1:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def train(model, net, memory, optimizer, progress, tokenized, c, cc, stage, ids, device, rank, world_size, master):
    """Every example trains the nudge MLP (binary nudge loss) and inserts its thought transitions;
    memory and weights are saved after each epoch and every save_interval examples."""
    retriever = Retriever(net, memory, c.retrieval_threshold, c.top_k, c.temperature, c.max_nudge_ratio)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=c.bf16 and "cuda" in str(device))
    split = os.path.basename(c.train_path)
    plot = LivePlot(os.path.join(c.out_dir, "live_train.png"), f"{c.name} (train)", c.baseline_accuracy,
                    c.rolling_window, c.plot_every, c.live_plot) if master else None

    def save(epoch, batch):
        if master:
            progress = {"epoch": epoch, "batch": batch, "batch_size": c.batch_size, "world_size": world_size}
            memory.save(c.index_dir, {"net": net.state_dict(), "optimizer": optimizer.state_dict(), "progress": progress})
        gather(None, world_size)  # wait for the save; see gather() on dist.barrier

    summary = None  # stays None when the memory has done all its epochs already
    for epoch in range(progress["epoch"], c.num_epochs):
        batches = shard_batches(tokenized, epoch, c, cc, stage, ids, rank, world_size)
        same_layout = (progress["batch_size"], progress["world_size"]) == (c.batch_size, world_size)
        skip = progress["batch"] if epoch == progress["epoch"] and same_layout else 0  # continue after a crash
        records, t0, since_save = [], time.time(), 0
        for b in tqdm(range(skip, len(batches)), desc=f"train epoch {epoch + 1}/{c.num_epochs}",
                      disable=not master, leave=False):
            qids, batch = batches[b]
            batch = coconut.to_device(batch, device)
            model.on_thought = None
            with torch.no_grad(), autocast:
                l0, ok0, states = answer_losses(model, batch)
            retriever.start(torch.tensor(qids, device=device))
            model.on_thought = retriever
            with autocast:
                l1, ok1, _ = answer_losses(model, batch)
            model.on_thought = None
            nudge_loss = F.softplus(l1 - l0)  # BCE(sigmoid(l0 - l1), 1): did the nudge help?
            optimizer.zero_grad(set_to_none=True)
            if nudge_loss.requires_grad:  # False when nothing in the batch was hit
                nudge_loss.mean().backward()
            sync_grads(net, world_size)
            optimizer.step()

            with torch.no_grad():  # this batch's transitions s_j -> s_j+1, from every rank
                valid = torch.arange(states.shape[1] - 1, device=device) < batch["n_latent"][:, None]  # (B, n)
                keys, values = net.key(states[:, :-1])[valid], net.value(states[:, 1:])[valid]
                meta = [{"split": split, "qid": qids[i], "thought": j, "correct": bool(ok0[i])}
                        for i, j in valid.nonzero().tolist()]
            for part in gather((keys.cpu(), values.cpu(), meta), world_size):
                memory.add(*part)

            new = [{"qid": q, "correct": bool(ok1[i]), "correct_without_memory": bool(ok0[i]),
                    "nudge_loss": float(nudge_loss[i].detach()), **retrieval_record(retriever.trace, i, full=False)}
                   for i, q in enumerate(qids)]
            records += new
            since_save += len(new) * world_size
            if plot:
                plot.add(new)
            if ((b + 1) % c.log_interval == 0 or b + 1 == len(batches)) and master:
                s = summarize(records[-c.log_interval * c.batch_size:])
                tqdm.write(f"train epoch {epoch + 1} | batch {b + 1} | nudge loss {s['nudge_loss']:.4f} | hit rate "
                           f"{s['hit_rate']:.3f} | acc {s['accuracy']:.4f} (no memory {s['accuracy_without_memory']:.4f})"
                           f" | memory {len(memory)} | dt {(time.time() - t0) * 1000 / c.log_interval:.0f}ms")
                with open(os.path.join(c.out_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"kind": "train", "epoch": epoch + 1, "batch": b + 1, "memory": len(memory), **s}) + "\n")
                t0 = time.time()
            if c.save_interval and since_save >= c.save_interval and b + 1 < len(batches):
                save(epoch, b + 1)
                since_save = 0
        save(epoch + 1, 0)
        summary = summarize([r for part in gather(records, world_size) for r in part])
        summary.update(epoch=epoch + 1, memory_entries=len(memory), retrieval_threshold=c.retrieval_threshold)
        if master:  # the seed's retrieval_metrics_epoch_*.json, next to the run's other outputs
            common.write_json(summary, os.path.join(c.out_dir, f"retrieval_metrics_epoch_{epoch + 1}.json"))
            common.print0(f"epoch {epoch + 1} | hit rate {summary['hit_rate']:.3f} | mean similarity "
                          f"{summary['mean_similarity'] or 0:.3f} | accuracy {summary['accuracy']:.4f} vs "
                          f"{summary['accuracy_without_memory']:.4f} without memory | nudge loss "
                          f"{summary['nudge_loss']:.4f} | {len(memory)} entries saved to {c.index_dir}")
    if plot:
        plot.close()
    return summary


@torch.no_grad()
def evaluate(model, retriever, examples, tokenized, c, cc, stage, ids, enc, device, rank, world_size,
             cache=None, plot=None):
    """Greedy answers of this rank's shard with the memory (retriever; None: Coconut alone) and
    without it, and the teacher-forced binary nudge loss. The without-memory half does not depend on
    the threshold, so `cache` keeps it across a sweep. Records are gathered on every rank, sorted by
    question id. Nothing is written to the memory."""
    mine = list(range(rank, len(examples), world_size))
    prompts = {i: coconut.eval_prompt(tokenized[i], stage, cc, ids) for i in mine}
    groups = {}
    for i in mine:  # one thought count per batch, so every row's thoughts share columns
        groups.setdefault(prompts[i][1], []).append(i)
    cache = {} if cache is None else cache
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=c.bf16 and "cuda" in str(device))
    decode = lambda row: enc.decode(row[: row.index(ids["eos"])] if ids["eos"] in row else row)
    records = []
    for k, idx in sorted(groups.items()):
        for j in range(0, len(idx), c.eval_batch_size):
            chunk = idx[j:j + c.eval_batch_size]
            prompt = coconut.to_device(coconut.collate_prompts([prompts[i][0] for i in chunk], k, ids["eos"]), device)
            forced = coconut.to_device(coconut.collate([coconut.build_sample(tokenized[i], stage, cc, ids)
                                                        for i in chunk], ids["eos"]), device)
            if any(i not in cache for i in chunk):
                model.on_thought = None
                with autocast:
                    out = model.generate(**prompt, max_new_tokens=cc.max_new_tokens, eos_id=ids["eos"])
                    l0 = answer_losses(model, forced)[0]
                cache.update((i, (decode(row), loss)) for i, row, loss in zip(chunk, out.tolist(), l0.tolist()))
            if retriever is not None:
                retriever.start(None)
                model.on_thought = retriever
                with autocast:
                    out = model.generate(**prompt, max_new_tokens=cc.max_new_tokens, eos_id=ids["eos"]).tolist()
                    trace = retriever.trace
                    retriever.start(None)  # the teacher-forced pass keeps its own trace
                    l1 = answer_losses(model, forced)[0].tolist()
                model.on_thought = None
            new = []
            for b, i in enumerate(chunk):
                gold = examples[i]["answer"].replace(",", "").strip()
                text0, l0 = cache[i]
                text = decode(out[b]) if retriever is not None else text0
                pred, pred0 = coconut.parse_answer(text), coconut.parse_answer(text0)
                rec = {"qid": i, "answer": examples[i]["answer"], "pred": pred, "correct": pred == gold,
                       "pred_without_memory": pred0, "correct_without_memory": pred0 == gold, "output": text}
                if retriever is not None:
                    rec.update(nudge_loss=float(F.softplus(torch.tensor(l1[b] - l0))),
                               **retrieval_record(trace, b, full=True))
                new.append(rec)
            records += new
            if plot:
                plot.add(new)
    records = sorted((r for part in gather(records, world_size) for r in part), key=lambda r: r["qid"])
    return summarize(records), records


def run_sweep(model, retriever, examples, tokenized, c, cc, stage, ids, enc, device, rank, world_size, master):
    """Every cutoff in sweep_thresholds against the frozen memory; sweep.json, sweep.md (table) and
    sweep.png (accuracy, hit rate, lift per threshold), the best cutoff marked."""
    thresholds = [float(t) for t in c.sweep_thresholds.replace(",", " ").split()]
    cache, rows = {}, []
    for t in thresholds:
        retriever.threshold = t
        s, _ = evaluate(model, retriever, examples, tokenized, c, cc, stage, ids, enc, device, rank, world_size, cache)
        rows.append({"threshold": t, **s})
        common.print0(f"sweep | threshold {t:.3f} | accuracy {s['accuracy']:.4f} | without memory "
                      f"{s['accuracy_without_memory']:.4f} | lift {s['lift']:+.4f} | hit rate {s['hit_rate']:.3f}")
    best = max(rows, key=lambda r: (r["accuracy"], r["threshold"]))  # ties: the stricter cutoff, fewer nudges
    if not master:
        return rows, best
    fmt = lambda x: "-" if x is None else f"{x:.4f}"
    table = ["| threshold | accuracy | without memory | lift | hit rate | nudged examples | mean similarity |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['threshold']:.3f}{' **best**' if r is best else ''} | {r['accuracy']:.4f} | "
              f"{r['accuracy_without_memory']:.4f} | {r['lift']:+.4f} | {r['hit_rate']:.3f} | "
              f"{r['nudged_fraction']:.3f} | {fmt(r['mean_similarity'])} |" for r in rows]
    print("\n".join(table), flush=True)
    common.write_json({"config": vars(c), "rows": rows, "best": best}, os.path.join(c.out_dir, "sweep.json"))
    with open(os.path.join(c.out_dir, "sweep.md"), "w") as f:
        f.write(f"# {c.name}: retrieval threshold sweep ({rows[0]['n']} examples)\n\n" + "\n".join(table) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [r["threshold"] for r in rows]
    for key, marker, label in (("accuracy", "o", "accuracy"), ("hit_rate", "s", "hit rate"), ("lift", "^", "lift")):
        ax.plot(x, [r[key] for r in rows], marker=marker, label=label)
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(best["threshold"], color="red", ls="--", label=f"best cutoff {best['threshold']:.2f}")
    ax.set(xlabel="retrieval threshold (cosine)", title=c.name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(c.out_dir, "sweep.png"), dpi=100)
    plt.close(fig)
    return rows, best


# -----------------------------------------------------------------------------


def load_coconut(c, device):
    """The frozen Coconut of load_model_path, built from its run's own config (model shape,
    tokenizer, curriculum), and the stage whose thought count this run uses."""
    ckpt = common.load_checkpoint(c.load_model_path)
    cc = SimpleNamespace(**ckpt["config"])
    if (cc.method, cc.feedback_mode) != ("coconut", "continuous"):
        raise ValueError(f"{c.load_model_path}: method {cc.method}, feedback_mode {cc.feedback_mode}; the memory "
                         "nudges fed-back thoughts, so it needs a continuous Coconut checkpoint")
    enc, ids = coconut.get_tokenizer(c.tokenizer or cc.tokenizer)
    model = NudgedCoconut(coconut.build_model(cc, ids, enc.n_vocab - 3).gpt, ids["latent"])
    common.load_state_dict_checked(model, ckpt["model"], source=c.load_model_path)
    model.requires_grad_(False).eval().to(device)  # frozen, no dropout: l0 and l1 differ by the nudge only
    stage = c.eval_stage if c.eval_stage >= 0 else (ckpt["epoch"] - 1) // cc.epochs_per_stage
    if stage == 0:
        raise ValueError("stage 0 has no thoughts to nudge: set eval_stage >= 1")
    return model, cc, stage, enc, ids


def main(argv):
    defaults = {k: globals()[k] for k in config_keys}
    config = common.parse_config(defaults, argv)
    if config["heuristic_memory"]:
        path = config["heuristic_memory"]
        if not os.path.exists(path):  # a repo-relative path works from any directory
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"heuristic_memory file not found: {config['heuristic_memory']}")
        common.parse_config({k: defaults[k] for k in MEMORY_KEYS}, [path])  # it may set memory knobs only
        config = common.parse_config(defaults, [path] + argv)  # memory file < run config < command line
    c = SimpleNamespace(**config)
    if c.index_type not in INDEX_TYPES:
        raise ValueError(f"index_type={c.index_type!r}; allowed: {', '.join(INDEX_TYPES)}")
    if (c.train_mode or c.sweep) and not c.heuristic_memory:
        raise ValueError("train_mode and sweep need a memory: set heuristic_memory to a memory config file")
    if c.train_mode and c.sweep:
        raise ValueError("sweep evaluates a frozen memory: set train_mode=False")
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, dev = common.setup_ddp(c.device)
    master_process = ddp_rank == 0
    try:
        run(c, config, ddp_rank, ddp_world_size, dev, master_process)
    finally:
        common.teardown_ddp()


def run(c, config, ddp_rank, ddp_world_size, device, master_process):
    common.set_seed(c.seed)
    model, cc, stage, enc, ids = load_coconut(c, device)
    path = c.train_path if c.train_mode else c.val_path
    examples = coconut.load_examples(path)
    if c.max_examples:
        examples = examples[: c.max_examples]
    tokenized = coconut.tokenize_examples(examples, enc, ids["eos"])
    if master_process:
        os.makedirs(c.out_dir, exist_ok=True)
        common.print0(json.dumps(config, indent=1))
        with open(os.path.join(c.out_dir, "source_heuristic.py"), "w") as f:
            f.write(open(__file__).read())  # the exact code of this run
    n_embd = model.gpt.cfg.n_embd
    common.print0(f"coconut {c.load_model_path}: n_embd {n_embd}, stage {stage} "
                  f"({coconut.n_thoughts(stage, 0, cc)} thoughts) | {len(examples)} examples from {path}")
    net = HeuristicNet(n_embd, c.key_dim, c.value_dim, c.nudge_hidden).to(device)  # seeded: same on every rank
    options = {"index_type": c.index_type, "ivf_nlist": c.ivf_nlist, "ivf_nprobe": c.ivf_nprobe, "hnsw_m": c.hnsw_m}
    load = lambda: LatentMemory.load(c.index_dir, c.key_dim, c.value_dim, n_embd, device, **options)
    results, memory = {"name": c.name, "train_mode": c.train_mode, "sweep": c.sweep, "stage": stage}, None
    if c.train_mode:
        if master_process:
            check_index_dir(c.index_dir, create=True)
        gather(None, ddp_world_size)  # the other ranks read it only once it exists
        optimizer = torch.optim.AdamW(net.nudge.parameters(), lr=c.learning_rate, weight_decay=c.weight_decay)
        progress = {"epoch": 0, "batch": 0, "batch_size": c.batch_size, "world_size": ddp_world_size}
        if os.path.exists(os.path.join(c.index_dir, MANIFEST)):  # continue it: same questions are not re-added
            memory, extra = load()
            common.load_state_dict_checked(net, extra["net"], source=c.index_dir)
            optimizer.load_state_dict(extra["optimizer"])
            progress = extra["progress"]
            common.print0(f"memory: continuing {c.index_dir} ({len(memory)} entries, {progress})")
        else:
            memory = LatentMemory(c.key_dim, c.value_dim, n_embd, device=device, **options)
        results["final"] = train(model, net, memory, optimizer, progress, tokenized, c, cc, stage, ids, device,
                                 ddp_rank, ddp_world_size, master_process)
        results["memory_sha256_per_rank"] = gather(memory.fingerprint(), ddp_world_size)
        results["net_sha256_per_rank"] = common.replica_fingerprints(net)
    else:
        retriever = None
        if c.heuristic_memory:
            memory, extra = load()
            common.load_state_dict_checked(net, extra["net"], source=c.index_dir)
            retriever = Retriever(net, memory, c.retrieval_threshold, c.top_k, c.temperature, c.max_nudge_ratio)
            common.print0(f"memory: {c.index_dir}, {len(memory)} entries, {memory.index_type} index"
                          f"{' on GPU' if memory.gpu else ''}; frozen")
        if c.sweep:
            results["sweep_rows"], results["best"] = run_sweep(model, retriever, examples, tokenized, c, cc, stage,
                                                               ids, enc, device, ddp_rank, ddp_world_size, master_process)
        else:
            plot = LivePlot(os.path.join(c.out_dir, "live_eval.png"), f"{c.name} (eval)", c.baseline_accuracy,
                            c.rolling_window, c.plot_every, c.live_plot) if master_process else None
            summary, records = evaluate(model, retriever, examples, tokenized, c, cc, stage, ids, enc, device,
                                        ddp_rank, ddp_world_size, plot=plot)
            results["final"] = summary
            if master_process:
                plot.close()
                with open(os.path.join(c.out_dir, "results.jsonl"), "w") as f:  # one line per question
                    f.writelines(json.dumps(r) + "\n" for r in records)
                common.write_json(summary, os.path.join(c.out_dir, "retrieval_metrics_eval.json"))
                common.print0(f"eval | accuracy {summary['accuracy']:.4f} | without memory "
                              f"{summary['accuracy_without_memory']:.4f} | lift {summary['lift']:+.4f} | "
                              f"hit rate {summary['hit_rate']:.3f} | {summary['n']} examples")
    if memory is not None:
        results["memory_entries"] = len(memory)
    if master_process:
        common.write_json({**results, "config": config}, os.path.join(c.out_dir, "results.json"))


if __name__ == "__main__":
    main(sys.argv[1:])
