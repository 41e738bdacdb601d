"""
ProsQA (Hao et al. 2024, "Training Large Language Models to Reason in a Continuous Latent Space",
arXiv 2412.06769, App. A.2): real splits, our own generator, and out-of-distribution sets.

A ProsQA sample is a random DAG of "is a" facts written as sentences, and a question "Is Tom a
lempus or scrompus?" whose answer needs a 3-6 hop search from the person to one of the options.

    python prep/prosqa.py --download --out_dir data/prosqa      # Meta's 17886/300/500 splits (online)
    python prep/prosqa.py --generate --out_dir data/prosqa_gen  # our generator, same format, offline
    python prep/prosqa.py --generate --variant small --out_dir data/prosqa_small  # CPU demo graphs
    python prep/prosqa.py --ood --out_dir data/prosqa_ood       # ood_{7hop,8hop,dag,dense}.json

Every file is one line of JSON, a list of objects with exactly the 8 fields of the real files:
question, answer, steps, idx_to_symbol, edges, root, target, neg_target. Expected counts and measured
statistics are in prep/README.md; prep/check_prosqa.py re-checks any file independently.

The generator is the paper's Algorithm 1 plus the rules inferred from the real files in
shared/reference/coconut.md §3.4 (N = 28 before pruning, parentless nodes join only through the
"all nodes" branch, target = farthest leaf exclusive to the entity, negative = uniform exclusive
leaf of the other person, hops 3-6 by rejection). It uses only `random.Random`, so a seed gives
byte-identical files on any machine and any numpy version.
"""

import argparse
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter, deque

from tqdm import tqdm

# -----------------------------------------------------------------------------
# vocabulary and sentence templates: exactly the real files' (reference §3.2-3.3)

PERSONS = ["Alex", "Bob", "Carol", "Davis", "Eva", "Fae", "Gabriel", "Jack", "Max", "Oliver",
           "Polly", "Rex", "Sally", "Sam", "Stella", "Tom", "Wren"]  # 17 person names
CONCEPTS = ["bompus", "boompus", "brimpus", "chorpus", "dumpus", "felpus", "fompus", "gerpus",
            "gorpus", "grimpus", "gwompus", "hilpus", "impus", "jelpus", "jompus", "kerpus",
            "lempus", "lorpus", "numpus", "quimpus", "rempus", "rompus", "rorpus", "scrompus",
            "shumpus", "sterpus", "storpus", "terpus", "timpus", "tumpus", "vumpus", "worpus",
            "wumpus", "yerpus", "yimpus", "yumpus", "zhorpus", "zumpus"]  # 38 concept names

def person_fact(person, concept):
    return f"{person} is a {concept}."  # the article is always "a", even before a vowel

def concept_fact(a, b):
    return f"Every {a} is a {b}."

def question_sentence(entity, option_a, option_b):
    return f"Is {entity} a {option_a} or {option_b}?"  # no article before the second option

# -----------------------------------------------------------------------------
# generator settings, one dict per variant (literals only)

VARIANTS = {
    # the paper's distribution; N = 28 is the inferred node count before pruning (reference §3.4.1)
    "full": dict(n_nodes=28, min_hops=3, max_hops=6),
    # labelled demo variant for `make demo`: graphs a tiny model can learn in a minute on CPU
    "small": dict(n_nodes=8, min_hops=2, max_hops=3),
}
mean_parents = 1.5      # k ~ Poisson(1.5) parents per new node (Algorithm 1)
p_only_0 = 0.35         # u <= 0.35: parents from groups 0 and 1 (cannot descend from node 1)
p_only_1 = 0.70         # 0.35 < u <= 0.7: parents from groups 0 and 2; else from all nodes
depth_weight = 1.5      # parent weight 1.5 * depth + 1 favours deep parents (longer chains)

# OOD sets (seed 003, step 1.5). Each changes one thing about the full variant; see prep/README.md.
OOD_KINDS = {
    # longer chains than training ever shows (max 6); with 36 nodes before pruning about 1% (7 hops)
    # and 0.2% (8 hops) of graphs qualify, against 0.3% and 0.01% with 28
    "7hop": dict(n_nodes=36, min_hops=7, max_hops=7),
    "8hop": dict(n_nodes=36, min_hops=8, max_hops=8),
    # ProsQA graphs are already DAGs, not trees (45% of nodes have >= 2 parents), so "DAG instead of
    # trees" is read as "many reconvergent paths": the target is reached by >= 4 distinct shortest
    # paths (4% of training questions, against 1.6 paths on average); everything else as in "full"
    "dag": dict(n_nodes=28, min_hops=3, max_hops=6, min_shortest_paths=4),
    # branching factor 5-8: the entity and every concept on the answer path get 5-8 children (2.8 on
    # average in the real valid split) through extra edges to later concepts that keep every selection rule
    "dense": dict(n_nodes=28, min_hops=3, max_hops=6, path_branching=(5, 8)),
}

# -----------------------------------------------------------------------------
# Algorithm 1: grow a DAG one node at a time

def poisson(rng, lam):
    # Knuth's method; fine for the small means used here
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k

def weighted_sample(rng, items, weights, k):
    # k distinct items, each draw proportional to the remaining weights (the data has no duplicate edges)
    items, weights, chosen = list(items), list(weights), []
    for _ in range(k):
        r = rng.random() * sum(weights)
        i = 0
        while i < len(items) - 1 and r >= weights[i]:
            r -= weights[i]
            i += 1
        chosen.append(items.pop(i))
        weights.pop(i)
    return chosen

def grow_graph(rng, n_nodes):
    """Returns parents[v] (in draw order) for v = 0..n_nodes-1, and the 2-bit family label of each node:
    bit 1 = descends from node 0, bit 2 = descends from node 1."""
    parents = [[], []]
    label = [1, 2]
    depth = [0, 0]  # longest distance from a source
    groups = {0: [], 1: [0], 2: [1], 3: []}
    for idx in range(2, n_nodes):
        k = poisson(rng, mean_parents)
        u = rng.random()
        if u <= p_only_0:
            candidates = groups[0] + groups[1]
        elif u <= p_only_1:
            candidates = groups[0] + groups[2]
        else:
            candidates = list(range(idx))
        k = min(k, len(candidates))
        chosen = weighted_sample(rng, candidates, [depth_weight * depth[c] + 1 for c in candidates], k)
        parents.append(chosen)
        label.append(0)
        for p in chosen:
            label[idx] |= label[p]
        depth.append(1 + max(depth[p] for p in chosen) if chosen else 0)
        # a parentless node (a future person) joins no group: it can only become a parent through
        # the "all nodes" branch (reference §3.4.2; else 4.6 persons per graph instead of 2.56)
        if chosen:
            groups[label[idx]].append(idx)
    return parents, label

# -----------------------------------------------------------------------------
# question selection (reference §3.4.3)

def bfs(children, source):
    # shortest distance and number of shortest paths from source to every reachable node
    dist, n_paths = {source: 0}, {source: 1}
    queue = deque([source])
    while queue:
        u = queue.popleft()
        for v in children[u]:
            if v not in dist:
                dist[v] = dist[u] + 1
                n_paths[v] = 0
                queue.append(v)
            if dist[v] == dist[u] + 1:
                n_paths[v] += n_paths[u]
    return dist, n_paths

def sample_shortest_path(rng, parents, dist, n_paths, target):
    # walk back from the target, picking each parent in proportion to its shortest-path count:
    # this draws uniformly among all shortest paths
    path = [target]
    while dist[path[-1]] > 0:
        v = path[-1]
        prev = [p for p in parents[v] if dist.get(p) == dist[v] - 1]
        r = rng.random() * n_paths[v]
        for p in prev:
            r -= n_paths[p]
            if r < 0:
                break
        path.append(p)
    return path[::-1]

def select_question(rng, parents, label, spec):
    """Picks (root, target, neg_target, path) on a grown graph, or None to reject it."""
    n = len(parents)
    children = [[] for _ in range(n)]
    for v in range(n):
        for p in parents[v]:
            children[p].append(v)
    # for each primary person: its exclusive leaves and the distance to the farthest one
    side = {}
    for primary in (0, 1):
        dist, n_paths = bfs(children, primary)
        # a leaf is a concept without children; the primary itself is no option even when childless
        leaves = [v for v in range(n) if parents[v] and not children[v] and label[v] == primary + 1]
        if not leaves:
            return None
        far = max(dist[v] for v in leaves)
        side[primary] = (dist, n_paths, leaves, far)
    far0, far1 = side[0][3], side[1][3]
    root = 0 if far0 > far1 else 1 if far1 > far0 else rng.randrange(2)
    dist, n_paths, leaves, far = side[root]
    if not spec["min_hops"] <= far <= spec["max_hops"]:
        return None
    target = rng.choice([v for v in leaves if dist[v] == far])
    neg_target = rng.choice(side[1 - root][2])
    if n_paths[target] < spec.get("min_shortest_paths", 1):
        return None
    path = sample_shortest_path(rng, parents, dist, n_paths, target)
    return root, target, neg_target, path

def add_branching(rng, parents, root, target, neg_target, path, lo, hi):
    """OOD 'dense': give the entity and every concept on the answer path 5-8 children by adding edges
    to later concepts, keeping every selection rule true. Edits parents in place; False = reject."""
    n = len(parents)
    children = [[] for _ in range(n)]
    for v in range(n):
        for p in parents[v]:
            children[p].append(v)
    hops = len(path) - 1
    # the other person's reach never changes: no answer-path node descends from it (else the target
    # would), so new edges never add to it
    other_reach = bfs(children, 1 - root)[0]

    def still_valid():
        # re-check from the root: same hop count, negative unreachable, and no exclusive leaf of the
        # root (reachable from it, not from the other person) farther than the target
        dist, _ = bfs(children, root)
        if dist.get(target) != hops or neg_target in dist:
            return False
        return all(dist[v] <= hops for v in dist if parents[v] and not children[v] and v not in other_reach)

    for p in path[:-1]:
        want = rng.randint(lo, hi)
        candidates = [c for c in range(p + 1, n) if parents[c] and c not in children[p]]
        rng.shuffle(candidates)
        for c in candidates:  # edges keep u < v, so the graph stays acyclic and ids stay in order
            if len(children[p]) >= want:
                break
            children[p].append(c)
            parents[c].append(p)
            if not still_valid():
                children[p].pop()
                parents[c].pop()
        if not lo <= len(children[p]) <= hi:
            return False
    return True

# -----------------------------------------------------------------------------
# one sample: grow, select, prune, name, render

def make_sample(rng, spec):
    """One ProsQA sample (dict with the 8 real fields), or None when the graph is rejected."""
    parents, label = grow_graph(rng, spec["n_nodes"])
    picked = select_question(rng, parents, label, spec)
    if picked is None:
        return None
    root, target, neg_target, path = picked
    # the steps stay the path drawn above: still a shortest path, though no longer uniform among them
    if "path_branching" in spec and not add_branching(rng, parents, root, target, neg_target, path,
                                                      *spec["path_branching"]):
        return None
    # drop isolated nodes and renumber in generation order (reference §3.4.1); 0 and 1 stay 0 and 1
    has_child = set(p for ps in parents for p in ps)
    keep = [v for v in range(len(parents)) if parents[v] or v in has_child]
    new_id = {v: i for i, v in enumerate(keep)}
    edges = [[new_id[p], new_id[v]] for v in keep for p in parents[v]]  # sorted by child id
    is_person = [not parents[v] for v in keep]
    n_persons = sum(is_person)
    if n_persons > len(PERSONS) or len(keep) - n_persons > len(CONCEPTS):
        return None  # the real vocabulary is too small for this graph
    persons = iter(rng.sample(PERSONS, n_persons))
    concepts = iter(rng.sample(CONCEPTS, len(keep) - n_persons))
    names = [next(persons) if person else next(concepts) for person in is_person]
    # render: one sentence per edge in shuffled order, then the question with the options in random order
    facts = [(person_fact if is_person[u] else concept_fact)(names[u], names[v]) for u, v in edges]
    rng.shuffle(facts)
    entity, right, wrong = names[new_id[root]], names[new_id[target]], names[new_id[neg_target]]
    options = (right, wrong) if rng.random() < 0.5 else (wrong, right)
    steps = [person_fact(entity, names[new_id[path[1]]])]
    steps += [concept_fact(names[new_id[a]], names[new_id[b]]) for a, b in zip(path[1:], path[2:])]
    return {
        "question": " ".join(facts + [question_sentence(entity, *options)]),
        "answer": person_fact(entity, right),
        "steps": steps,
        "idx_to_symbol": names,
        "edges": edges,
        "root": new_id[root],
        "target": new_id[target],
        "neg_target": new_id[neg_target],
    }

def generate(n, rng, spec, exclude=(), desc=None):
    # draw samples until n are accepted; a question already seen (or in exclude) is skipped,
    # so splits generated with a shared exclude set never share a question
    seen = set(exclude)
    samples = []
    with tqdm(total=n, desc=desc, disable=desc is None, mininterval=1.0) as bar:
        while len(samples) < n:
            sample = make_sample(rng, spec)
            if sample is None or sample["question"] in seen:
                continue
            seen.add(sample["question"])
            samples.append(sample)
            bar.update(1)
    return samples

def generate_split(n, seed, variant="full", split="train", exclude=(), desc=None):
    """n samples of one split. The rng is keyed by (variant, split, seed), so a split's samples do not
    depend on the other splits' sizes and seed 1 is not seed 0 shifted by one split."""
    rng = random.Random(f"prosqa/{variant}/{split}/{seed}")
    return generate(n, rng, VARIANTS[variant], exclude, desc)

def generate_ood(kind, n, seed, desc=None):
    """n samples of one OOD kind: '7hop', '8hop', 'dag' or 'dense'."""
    rng = random.Random(f"prosqa-ood/{kind}/{seed}")
    return generate(n, rng, OOD_KINDS[kind], (), desc)

# -----------------------------------------------------------------------------
# statistics (compare with the table in reference §3.3)

def graph_stats(samples):
    """Structure statistics of a list of ProsQA samples, computed from `edges` alone."""
    hops, n_nodes, n_edges, n_paths, n_persons, longest = [], [], [], [], [], []
    path_branching = []     # children of each node on the answer path, target excluded
    in_degrees = Counter()  # in-degree of every node, persons included (0)
    n_both = []             # nodes that descend from both primaries
    root_is_1 = target_first = 0
    for s in samples:
        n = len(s["idx_to_symbol"])
        children, indeg = [[] for _ in range(n)], [0] * n
        for u, v in s["edges"]:
            children[u].append(v)
            indeg[v] += 1
        dist, paths = bfs(children, s["root"])
        hops.append(len(s["steps"]))
        n_nodes.append(n)
        n_edges.append(len(s["edges"]))
        n_paths.append(paths[s["target"]])
        n_persons.append(indeg.count(0))
        in_degrees.update(indeg)
        n_both.append(len(set(bfs(children, 0)[0]) & set(bfs(children, 1)[0])))
        # longest path out of the root: edges go from lower to higher ids, so one pass in id order
        longest_to = {s["root"]: 0}
        for u in range(n):
            for v in children[u] if u in longest_to else ():
                longest_to[v] = max(longest_to.get(v, 0), longest_to[u] + 1)
        longest.append(max(longest_to.values()))
        ids = {name: i for i, name in enumerate(s["idx_to_symbol"])}
        path = [s["root"]] + [ids[step[:-1].split(" is a ")[1]] for step in s["steps"]]
        path_branching += [len(children[v]) for v in path[:-1]]
        root_is_1 += s["root"] == 1
        target_first += s["question"].rsplit("Is ", 1)[1].split(" a ", 1)[1].startswith(
            s["idx_to_symbol"][s["target"]] + " or ")
    m = len(samples)
    n_all = sum(in_degrees.values())
    n_non_source = n_all - in_degrees[0]
    return {
        "n": m,
        "hop_shares": {h: c / m for h, c in sorted(Counter(hops).items())},
        "mean_hops": sum(hops) / m,
        "mean_nodes": sum(n_nodes) / m,
        "max_nodes": max(n_nodes),
        "mean_edges": sum(n_edges) / m,
        "mean_persons": sum(n_persons) / m,
        "mean_shortest_paths": sum(n_paths) / m,
        "share_multi_parent": sum(c for d, c in in_degrees.items() if d >= 2) / n_all,
        "share_multi_parent_non_source": sum(c for d, c in in_degrees.items() if d >= 2) / n_non_source,
        "mean_both_family_nodes": sum(n_both) / m,
        "mean_longest_path_from_root": sum(longest) / m,
        "mean_path_branching": sum(path_branching) / len(path_branching),
        "share_root_is_1": root_is_1 / m,
        "share_target_first": target_first / m,
    }

def print_stats(name, stats):
    hop = " ".join(f"{h}:{share:.3f}" for h, share in stats["hop_shares"].items())
    print(f"{name}: n {stats['n']} | hops {hop} | nodes {stats['mean_nodes']:.2f} (max {stats['max_nodes']})"
          f" | edges {stats['mean_edges']:.2f} | persons {stats['mean_persons']:.2f}"
          f" | shortest paths {stats['mean_shortest_paths']:.2f} | path branching {stats['mean_path_branching']:.2f}"
          f" | >=2 parents {stats['share_multi_parent']:.3f} (non-source {stats['share_multi_parent_non_source']:.3f})"
          f" | target first {stats['share_target_first']:.3f}")

# -----------------------------------------------------------------------------
# file IO

def write_bytes(path, raw):
    # temp file in the same folder, then an atomic rename: a crash never leaves a partial file
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

def to_json(samples):
    # the real files' layout: one line, ", " and ": " separators, no trailing newline
    return json.dumps(samples).encode()

# -----------------------------------------------------------------------------
# the real splits (Meta's files, MIT), pinned to the commit the reference was written from

REAL_URL = "https://raw.githubusercontent.com/facebookresearch/coconut/27273cb8cca4bb763c041a63b036d0c3b7cbbb48/data/prosqa_{split}.json"
REAL_COUNTS = {"train": 17886, "valid": 300, "test": 500}
# git blob ids of the files in that commit (reference §7); train's is not recorded anywhere we can check
REAL_BLOBS = {"valid": "8df0c62fd6a6c55bfc31345181f505185c4efbd7",
              "test": "73ff837a94b1f10e604a6d31a4c2fa6c131b687f"}
FIELDS = ["question", "answer", "steps", "idx_to_symbol", "edges", "root", "target", "neg_target"]

def verify_split(split, samples):
    """Problems (empty list = OK) of a real split against the published counts: size, fields, hops 3-6."""
    problems = []
    if len(samples) != REAL_COUNTS[split]:
        problems.append(f"prosqa_{split}.json: {len(samples)} samples, expected {REAL_COUNTS[split]}")
    for i, s in enumerate(samples):
        if not isinstance(s, dict) or sorted(s) != sorted(FIELDS):
            problems.append(f"prosqa_{split}.json: sample {i} does not have exactly the fields {FIELDS}")
        elif not 3 <= len(s["steps"]) <= 6:
            problems.append(f"prosqa_{split}.json: sample {i} has {len(s['steps'])} hops, expected 3-6")
    return problems

def download(out_dir, url=REAL_URL, timeout=60):
    # fetch all three splits into memory and check them before writing any, so a failure leaves nothing
    fetched = {}
    for split in REAL_COUNTS:
        src = url.format(split=split)
        try:
            with urllib.request.urlopen(src, timeout=timeout) as r:
                raw = r.read()
        except (urllib.error.URLError, OSError) as e:
            raise SystemExit(f"error: could not download {src}: {e}\n"
                             f"Offline? Copy prosqa_{{train,valid,test}}.json into {out_dir} by hand, "
                             f"or generate our own splits with --generate.")
        blob = hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest()
        if split in REAL_BLOBS and blob != REAL_BLOBS[split]:
            raise SystemExit(f"error: {src}: git blob {blob}, expected {REAL_BLOBS[split]}")
        try:
            samples = json.loads(raw)
        except ValueError as e:
            raise SystemExit(f"error: {src} is not JSON: {e}")
        problems = verify_split(split, samples)
        if problems:
            raise SystemExit("error: " + "\n".join(problems[:10]))
        fetched[split] = raw
    for split, raw in fetched.items():
        path = os.path.join(out_dir, f"prosqa_{split}.json")
        write_bytes(path, raw)  # Meta's bytes, unchanged
        print(f"{path}: {REAL_COUNTS[split]} samples, hops 3-6")

# -----------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--download", action="store_true", help="fetch Meta's real splits (needs internet)")
    mode.add_argument("--generate", action="store_true", help="generate train/valid/test with our generator")
    mode.add_argument("--ood", action="store_true", help="generate the four OOD test sets")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--variant", default="full", choices=sorted(VARIANTS))
    parser.add_argument("--n_train", type=int, default=17886)
    parser.add_argument("--n_valid", type=int, default=300)
    parser.add_argument("--n_test", type=int, default=500)
    parser.add_argument("--n", type=int, default=1000, help="samples per OOD set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.download:
        download(args.out_dir)
        return
    t0 = time.time()
    if args.generate:
        # one shared set of questions across splits, so no question appears in two splits
        seen = set()
        outputs = {}
        for split, n in [("train", args.n_train), ("valid", args.n_valid), ("test", args.n_test)]:
            outputs[f"prosqa_{split}.json"] = generate_split(n, args.seed, args.variant, split, seen, desc=split)
            seen.update(s["question"] for s in outputs[f"prosqa_{split}.json"])
    else:
        outputs = {f"ood_{kind}.json": generate_ood(kind, args.n, args.seed, desc=kind) for kind in OOD_KINDS}
    # write only after everything is generated
    for name, samples in outputs.items():
        write_bytes(os.path.join(args.out_dir, name), to_json(samples))
        print_stats(os.path.join(args.out_dir, name), graph_stats(samples))
    print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)

if __name__ == "__main__":
    main()
