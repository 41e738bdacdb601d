"""prep/prosqa.py and prep/check_prosqa.py: the generator's statistics against the real ProsQA valid
split (numbers copied below), exact templates, the OOD sets' defining properties, determinism, and a
checker that passes every generated sample and fails on each kind of broken one."""

import copy
import json
import os
import re
import subprocess
import sys
import urllib.error
from collections import Counter, deque

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from prep import check_prosqa, prosqa  # noqa: E402

# -----------------------------------------------------------------------------
# real numbers: Meta's prosqa_valid.json (300 samples), measured with prosqa.graph_stats and matching
# shared/reference/coconut.md §3.3

REAL_HOP_SHARES = {3: 124 / 300, 4: 133 / 300, 5: 36 / 300, 6: 7 / 300}
REAL_MEAN_NODES = 22.82
REAL_MEAN_EDGES = 36.26
REAL_MEAN_SHORTEST_PATHS = 1.61
REAL_SHARE_MULTI_PARENT = 0.453  # all nodes with >= 2 parents / all nodes
REAL_MEAN_PERSONS = 2.51  # source nodes; Algorithm 1 taken literally gives 4.6 (reference §3.4.2)

# the first sample of Meta's prosqa_valid.json, verbatim (MIT)
REAL_SAMPLE = {
    "question": "Every shumpus is a rempus. Every shumpus is a yimpus. Every terpus is a fompus. Every terpus is a gerpus. Every gerpus is a brimpus. Alex is a rempus. Every rorpus is a scrompus. Every rorpus is a yimpus. Every terpus is a brimpus. Every brimpus is a lempus. Tom is a terpus. Every shumpus is a timpus. Every yimpus is a boompus. Davis is a shumpus. Every gerpus is a lorpus. Davis is a fompus. Every shumpus is a boompus. Every shumpus is a rorpus. Every terpus is a lorpus. Every boompus is a timpus. Every fompus is a yerpus. Tom is a dumpus. Every rempus is a rorpus. Is Tom a lempus or scrompus?",  # noqa: E501
    "answer": "Tom is a lempus.",
    "steps": ["Tom is a terpus.", "Every terpus is a brimpus.", "Every brimpus is a lempus."],
    "idx_to_symbol": ["Davis", "Tom", "shumpus", "terpus", "Alex", "rempus", "fompus", "rorpus", "gerpus",
                      "lorpus", "yerpus", "yimpus", "boompus", "scrompus", "brimpus", "timpus", "lempus",
                      "dumpus"],
    "edges": [[0, 2], [1, 3], [2, 5], [4, 5], [3, 6], [0, 6], [5, 7], [2, 7], [3, 8], [8, 9], [3, 9], [6, 10],
              [7, 11], [2, 11], [2, 12], [11, 12], [7, 13], [8, 14], [3, 14], [12, 15], [2, 15], [14, 16],
              [1, 17]],
    "root": 1, "target": 16, "neg_target": 13,
}

N_STATS = 2000  # samples for the statistics tests: ~0.5 s to generate


@pytest.fixture(scope="module")
def full():
    return prosqa.generate_split(N_STATS, seed=0)


@pytest.fixture(scope="module")
def full_stats(full):
    return prosqa.graph_stats(full)


def children_of(sample):
    children = {}
    for u, v in sample["edges"]:
        children.setdefault(u, []).append(v)
    return children


def path_ids(sample):
    # node ids along the answer path, read back from the step sentences
    ids = {name: i for i, name in enumerate(sample["idx_to_symbol"])}
    return [sample["root"]] + [ids[step[:-1].split(" is a ")[1]] for step in sample["steps"]]


def n_shortest_paths(sample):
    # independent of prosqa.bfs: count shortest root -> target paths by BFS layers
    children, dist, count = children_of(sample), {sample["root"]: 0}, Counter({sample["root"]: 1})
    queue = deque([sample["root"]])
    while queue:
        u = queue.popleft()
        for v in children.get(u, ()):
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
            if dist[v] == dist[u] + 1:
                count[v] += count[u]
    return count[sample["target"]]

def distances(sample, source):
    children, dist = children_of(sample), {source: 0}
    queue = deque([source])
    while queue:
        u = queue.popleft()
        for v in children.get(u, ()):
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def selection_rules_hold(s):
    # reference §3.3, true for all 800 real samples: the target is a farthest leaf reachable from the
    # root only, the root's farthest such leaf is at least as far as the other person's, and the
    # negative is a leaf reachable from the other person only
    children, root = children_of(s), s["root"]
    reach = {p: distances(s, p) for p in (0, 1)}

    def exclusive_leaves(p):
        return [v for v in reach[p] if v != p and not children.get(v) and v not in reach[1 - p]]
    far = {p: max(reach[p][v] for v in exclusive_leaves(p)) for p in (0, 1)}
    return (s["target"] in exclusive_leaves(root) and reach[root][s["target"]] == far[root] >= far[1 - root]
            and s["neg_target"] in exclusive_leaves(1 - root))

# -----------------------------------------------------------------------------
# fidelity of the full variant


def test_vocabulary_is_the_real_one():
    assert len(prosqa.PERSONS) == len(set(prosqa.PERSONS)) == 17
    assert len(prosqa.CONCEPTS) == len(set(prosqa.CONCEPTS)) == 38
    # the checker keeps its own copy on purpose; the two must agree
    assert set(prosqa.PERSONS) == check_prosqa.PERSON_NAMES
    assert set(prosqa.CONCEPTS) == check_prosqa.CONCEPT_NAMES
    assert all(c.endswith("pus") and c.islower() for c in prosqa.CONCEPTS)


def test_graph_stats_on_a_hand_checked_real_sample():
    s = prosqa.graph_stats([REAL_SAMPLE])
    assert s["hop_shares"] == {3: 1.0}
    assert (s["mean_nodes"], s["mean_edges"], s["mean_persons"]) == (18, 23, 3)  # Davis, Tom, Alex
    # Tom -> terpus -> brimpus -> lempus is the only 3-hop path (via gerpus it takes 4)
    assert s["mean_shortest_paths"] == 1
    # nodes 5, 6, 7, 9, 11, 12, 14, 15 have two parents each
    assert s["share_multi_parent"] == pytest.approx(8 / 18)
    assert s["share_target_first"] == 1.0 and s["share_root_is_1"] == 1.0


def test_full_statistics_match_the_real_valid_split(full_stats):
    s = full_stats
    print(s)
    for hops, share in REAL_HOP_SHARES.items():
        assert abs(s["hop_shares"].get(hops, 0) - share) <= 0.05, (hops, s["hop_shares"])
    assert set(s["hop_shares"]) <= {3, 4, 5, 6}
    assert abs(s["mean_nodes"] - REAL_MEAN_NODES) <= 1.0
    assert s["max_nodes"] <= 28
    assert abs(s["mean_edges"] - REAL_MEAN_EDGES) <= 2.0
    # tolerance 0.15: with 2,000 samples the standard error of the mean is ~0.02, and the paper's
    # Table 2 itself gives 1.6; a tree-like generator would give ~1.0, a much denser one > 2
    assert abs(s["mean_shortest_paths"] - REAL_MEAN_SHORTEST_PATHS) <= 0.15
    assert abs(s["share_multi_parent"] - REAL_SHARE_MULTI_PARENT) <= 0.10
    assert abs(s["mean_persons"] - REAL_MEAN_PERSONS) <= 0.3


def test_option_order_is_a_fair_coin(full, full_stats):
    # 2,000 fair coin flips: sd 0.011, so +-0.05 is 4.5 sd
    assert abs(full_stats["share_target_first"] - 0.5) <= 0.05
    # and the independent reading from the question text agrees
    first = sum(re.search(r"Is \w+ a (\w+) or", s["question"]).group(1) == s["idx_to_symbol"][s["target"]]
                for s in full)
    assert first == round(full_stats["share_target_first"] * len(full))


def test_templates_are_exact(full):
    fact = re.compile(r"(?:[A-Z][a-z]+|Every [a-z]+) is a [a-z]+\.")
    for s in full:
        *facts, question = re.split(r"(?<=\.) ", s["question"])
        assert all(fact.fullmatch(f) for f in facts)
        assert len(facts) == len(s["edges"])
        assert re.fullmatch(r"Is [A-Z][a-z]+ a [a-z]+ or [a-z]+\?", question)
        entity = s["idx_to_symbol"][s["root"]]
        assert s["answer"] == f"{entity} is a {s['idx_to_symbol'][s['target']]}."
        assert s["steps"][0].startswith(f"{entity} is a ")
        assert all(re.fullmatch(r"Every [a-z]+ is a [a-z]+\.", step) for step in s["steps"][1:])
        assert list(s) == ["question", "answer", "steps", "idx_to_symbol", "edges", "root", "target", "neg_target"]


def test_structure_rules(full):
    for s in full[:500]:
        names, edges = s["idx_to_symbol"], s["edges"]
        assert s["root"] in (0, 1)
        assert all(u < v for u, v in edges)
        assert [v for _, v in edges] == sorted(v for _, v in edges)  # sorted by child id, as in the real files
        assert len(set(map(tuple, edges))) == len(edges)
        sources = set(range(len(names))) - {v for _, v in edges}
        assert {names[i] for i in sources} == set(names) & set(prosqa.PERSONS)
        touched = {x for e in edges for x in e}
        assert touched == set(range(len(names)))  # no isolated nodes
        assert selection_rules_hold(s)


def test_selection_rules_hold_on_the_real_sample_and_can_fail():
    assert selection_rules_hold(REAL_SAMPLE)
    # dumpus (17) is Tom's exclusive leaf but 1 hop away, lempus 3; brimpus (14) is no leaf
    assert not selection_rules_hold(dict(REAL_SAMPLE, target=17))
    assert not selection_rules_hold(dict(REAL_SAMPLE, target=14))
    # lempus (16) is Tom's own leaf, so it cannot be the negative
    assert not selection_rules_hold(dict(REAL_SAMPLE, neg_target=16))


def test_checker_passes_every_generated_sample(full):
    problems = [(i, p) for i, s in enumerate(full) for p in check_prosqa.check_sample(s)]
    assert problems == []

# -----------------------------------------------------------------------------
# the small demo variant and the OOD sets


def test_small_variant():
    samples = prosqa.generate_split(500, seed=0, variant="small")
    stats = prosqa.graph_stats(samples)
    print(stats)
    assert set(stats["hop_shares"]) == {2, 3} and stats["hop_shares"][2] < 0.9
    assert stats["max_nodes"] <= 8 and stats["mean_nodes"] < 8
    assert all(check_prosqa.check_sample(s) == [] for s in samples)


@pytest.mark.parametrize("kind,n", [("7hop", 30), ("8hop", 15), ("dag", 100), ("dense", 100)])
def test_ood_sets(kind, n):
    samples = prosqa.generate_ood(kind, n, seed=0)
    assert len(samples) == n
    assert [p for s in samples for p in check_prosqa.check_sample(s)] == []
    assert all(s["steps"] for s in samples)
    assert all(selection_rules_hold(s) for s in samples)
    hops = {len(s["steps"]) for s in samples}
    if kind in ("7hop", "8hop"):
        assert hops == {int(kind[0])}
    else:
        assert hops <= {3, 4, 5, 6}
    if kind == "dag":
        assert min(n_shortest_paths(s) for s in samples) >= 4
    if kind == "dense":
        for s in samples:
            children = children_of(s)
            assert all(5 <= len(children[v]) <= 8 for v in path_ids(s)[:-1])


def test_ood_cli_writes_four_checked_files(tmp_path, capsys):
    subprocess.run([sys.executable, os.path.join(ROOT, "prep", "prosqa.py"), "--ood", "--n", "5",
                    "--out_dir", str(tmp_path)], check=True, capture_output=True)
    names = sorted(os.listdir(tmp_path))
    assert names == ["ood_7hop.json", "ood_8hop.json", "ood_dag.json", "ood_dense.json"]
    assert check_prosqa.main([str(tmp_path / name) for name in names]) == 0
    assert capsys.readouterr().out.count("PASS") == 4

# -----------------------------------------------------------------------------
# determinism and splits


def test_same_seed_same_samples_different_seed_different():
    a = json.dumps(prosqa.generate_split(200, seed=3))
    assert a == json.dumps(prosqa.generate_split(200, seed=3))
    assert a != json.dumps(prosqa.generate_split(200, seed=4))
    assert json.dumps(prosqa.generate_ood("dense", 20, seed=3)) == json.dumps(prosqa.generate_ood("dense", 20, seed=3))
    assert json.dumps(prosqa.generate_ood("dense", 20, seed=3)) != json.dumps(prosqa.generate_ood("dense", 20, seed=4))


def run_generate(out_dir, seed):
    subprocess.run([sys.executable, os.path.join(ROOT, "prep", "prosqa.py"), "--generate", "--out_dir", str(out_dir),
                    "--n_train", "300", "--n_valid", "50", "--n_test", "50", "--seed", str(seed)],
                   check=True, capture_output=True)
    return {name: (out_dir / name).read_bytes() for name in sorted(os.listdir(out_dir))}


def test_generate_cli_is_byte_identical_per_seed_and_splits_are_disjoint(tmp_path):
    a, b, c = run_generate(tmp_path / "a", 0), run_generate(tmp_path / "b", 0), run_generate(tmp_path / "c", 1)
    assert list(a) == ["prosqa_test.json", "prosqa_train.json", "prosqa_valid.json"]  # no temp files left
    assert a == b
    assert all(a[name] != c[name] for name in a)
    splits = {name: json.loads(raw) for name, raw in a.items()}
    assert [len(splits[f"prosqa_{s}.json"]) for s in ("train", "valid", "test")] == [300, 50, 50]
    questions = [{s["question"] for s in samples} for samples in splits.values()]
    assert sum(map(len, questions)) == len(set().union(*questions)) == 400
    # same layout as the real files: one line, default separators, no trailing newline
    raw = a["prosqa_valid.json"]
    assert raw == json.dumps(splits["prosqa_valid.json"]).encode() and b"\n" not in raw
    # the CLI's train split is generate_split's, so the importable function reproduces the file
    assert splits["prosqa_train.json"] == prosqa.generate_split(300, seed=0)

# -----------------------------------------------------------------------------
# the checker: passes the real sample, fails each kind of broken sample


def broken(**changes):
    s = copy.deepcopy(REAL_SAMPLE)
    s.update(changes)
    return s


def test_checker_passes_the_real_sample():
    assert check_prosqa.check_sample(REAL_SAMPLE) == []


@pytest.mark.parametrize("sample,expected", [
    # a step that is not a stated fact
    (broken(steps=["Tom is a terpus.", "Every terpus is a lempus."]), "not a stated fact"),
    # a chain of stated facts that is not the shortest (via gerpus: 4 hops instead of 3)
    (broken(steps=["Tom is a terpus.", "Every terpus is a gerpus.", "Every gerpus is a brimpus.",
                   "Every brimpus is a lempus."]), "shortest path is 3"),
    # a chain that ends at the wrong node
    (broken(steps=["Tom is a terpus.", "Every terpus is a brimpus."]), "not at target"),
    # the wrong answer
    (broken(answer="Tom is a scrompus."), "does not name the target"),
    # a name outside ProsQA's vocabulary
    (broken(question=REAL_SAMPLE["question"].replace("Davis", "Zed"),
            idx_to_symbol=["Zed"] + REAL_SAMPLE["idx_to_symbol"][1:]), "vocabulary"),
    # a sentence outside the templates
    (broken(question=REAL_SAMPLE["question"].replace("Every rorpus is a scrompus.", "Every rorpus is an scrompus.")),
     "template"),
    # facts in the text that differ from the edges field
    (broken(edges=REAL_SAMPLE["edges"][:-1]), "differ from the edges"),
    # options that are not {target, neg_target}
    (broken(question=REAL_SAMPLE["question"].replace("or scrompus?", "or dumpus?")), "options"),
])
def test_checker_fails_broken_samples(sample, expected):
    problems = check_prosqa.check_sample(sample)
    assert any(expected in p for p in problems), problems


def test_checker_fails_a_reachable_negative():
    # add the fact "Every terpus is a rorpus." (terpus is on Tom's side): now scrompus is reachable
    s = broken(question=REAL_SAMPLE["question"].replace(" Is Tom", " Every terpus is a rorpus. Is Tom"),
               edges=REAL_SAMPLE["edges"] + [[3, 7]])
    assert any("neg_target scrompus is reachable" in p for p in check_prosqa.check_sample(s))


def test_checker_cli_exit_status(tmp_path, capsys):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps([REAL_SAMPLE]))
    bad.write_text(json.dumps([REAL_SAMPLE, broken(answer="Tom is a dumpus.")]))
    assert check_prosqa.main([str(good)]) == 0
    assert check_prosqa.main([str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" in out and "sample 1:" in out

# -----------------------------------------------------------------------------
# real splits: download failures leave nothing behind


class FakeResponse:
    def __init__(self, raw):
        self.raw = raw

    def read(self):
        return self.raw

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_offline_fails_clearly(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(prosqa.urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit, match="(?s)could not download .*prosqa_train.json.*Offline"):
        prosqa.download(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_download_with_wrong_counts_fails_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(prosqa.urllib.request, "urlopen",
                        lambda url, timeout=None: FakeResponse(json.dumps([REAL_SAMPLE] * 2).encode()))
    with pytest.raises(SystemExit, match="2 samples, expected 17886"):
        prosqa.download(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_download_checks_the_git_blob(tmp_path, monkeypatch):
    monkeypatch.setattr(prosqa, "REAL_COUNTS", {"valid": 300})
    monkeypatch.setattr(prosqa.urllib.request, "urlopen",
                        lambda url, timeout=None: FakeResponse(json.dumps([REAL_SAMPLE] * 300).encode()))
    with pytest.raises(SystemExit, match="expected 8df0c62fd6a6c55bfc31345181f505185c4efbd7"):
        prosqa.download(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_verify_split():
    assert prosqa.verify_split("valid", [REAL_SAMPLE] * 300) == []
    short = broken(steps=REAL_SAMPLE["steps"][:2])
    assert any("2 hops" in p for p in prosqa.verify_split("valid", [REAL_SAMPLE] * 299 + [short]))


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def crash(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(prosqa.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        prosqa.write_bytes(str(tmp_path / "prosqa_train.json"), prosqa.to_json([REAL_SAMPLE]))
    assert os.listdir(tmp_path) == []


def test_download_writes_metas_bytes_unchanged(tmp_path, monkeypatch):
    # byte-exact copy of what was served; the fake serves 2 samples, so lower the expected counts
    raw = {"train": json.dumps([REAL_SAMPLE] * 2).encode(), "valid": b"[" + json.dumps(REAL_SAMPLE, indent=1).encode() + b"]",
           "test": json.dumps([REAL_SAMPLE]).encode()}
    monkeypatch.setattr(prosqa, "REAL_COUNTS", {"train": 2, "valid": 1, "test": 1})
    monkeypatch.setattr(prosqa, "REAL_BLOBS", {})
    monkeypatch.setattr(prosqa.urllib.request, "urlopen",
                        lambda url, timeout=None: FakeResponse(raw[url.rsplit("_", 1)[1][:-5]]))
    prosqa.download(str(tmp_path))
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == \
        {f"prosqa_{split}.json": raw[split] for split in raw}
