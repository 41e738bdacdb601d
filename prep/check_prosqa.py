"""
Independent checker for ProsQA files, real or generated.

    python prep/check_prosqa.py data/prosqa/prosqa_valid.json data/prosqa_ood/ood_*.json

It shares no code with prep/prosqa.py on purpose: it parses the facts back out of the question text
with its own templates and vocabulary, runs a plain BFS over them (and over the `edges` field), and
checks per sample that
- the question is exactly "<fact> <fact> ... Is <Entity> a <X> or <Y>?" in the real templates, and
  uses only ProsQA's 17 person and 38 concept names;
- the stated facts are exactly the `edges` field (ids < each other in generation order, persons
  exactly the nodes without parents);
- the steps are a chain of stated facts from the entity to the target, as long as the shortest path;
- the negative option cannot be reached from the entity, and both options are leaves;
- the answer is "<Entity> is a <target>." and the options are {target, neg_target}.
All 300 samples of Meta's prosqa_valid.json pass. Exit status 1 if any sample of any file fails.
"""

import json
import re
import sys
from collections import Counter, deque

PERSON_NAMES = set("Alex Bob Carol Davis Eva Fae Gabriel Jack Max Oliver Polly Rex Sally Sam Stella "
                   "Tom Wren".split())
CONCEPT_NAMES = set("bompus boompus brimpus chorpus dumpus felpus fompus gerpus gorpus grimpus gwompus "
                    "hilpus impus jelpus jompus kerpus lempus lorpus numpus quimpus rempus rompus rorpus "
                    "scrompus shumpus sterpus storpus terpus timpus tumpus vumpus worpus wumpus yerpus "
                    "yimpus yumpus zhorpus zumpus".split())
FIELDS = {"question", "answer", "steps", "idx_to_symbol", "edges", "root", "target", "neg_target"}

PERSON_FACT = re.compile(r"([A-Z][a-z]+) is a ([a-z]+)\.")   # "Tom is a terpus."
CONCEPT_FACT = re.compile(r"Every ([a-z]+) is a ([a-z]+)\.")  # "Every terpus is a brimpus."
QUESTION = re.compile(r"Is ([A-Z][a-z]+) a ([a-z]+) or ([a-z]+)\?")  # the last sentence

def parse_fact(sentence):
    # (subject, object) of one fact sentence, or None when it is not in a template with real names:
    # a person subject only in the person template, concepts everywhere else
    m = PERSON_FACT.fullmatch(sentence)
    if m and m.group(1) in PERSON_NAMES and m.group(2) in CONCEPT_NAMES:
        return m.group(1), m.group(2)
    m = CONCEPT_FACT.fullmatch(sentence)
    if m and m.group(1) in CONCEPT_NAMES and m.group(2) in CONCEPT_NAMES:
        return m.group(1), m.group(2)
    return None

def distances(graph, source):
    # plain BFS: shortest number of hops from source to every reachable node
    dist = {source: 0}
    queue = deque([source])
    while queue:
        u = queue.popleft()
        for v in graph.get(u, ()):
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist

def check_sample(sample):
    """Problems of one sample, as short messages; an empty list means it passes."""
    if not isinstance(sample, dict) or set(sample) != FIELDS:
        return [f"fields are {sorted(sample) if isinstance(sample, dict) else type(sample).__name__}, "
                f"expected {sorted(FIELDS)}"]
    q, names, edges = sample["question"], sample["idx_to_symbol"], sample["edges"]
    problems = []
    if not (isinstance(names, list) and all(isinstance(x, str) for x in names) and len(set(names)) == len(names)):
        return ["idx_to_symbol is not a list of distinct names"]
    if not (isinstance(edges, list) and all(isinstance(e, list) and len(e) == 2 and
                                            all(isinstance(i, int) and 0 <= i < len(names) for i in e) for e in edges)):
        return ["edges is not a list of [u, v] node ids"]
    ids = [sample["root"], sample["target"], sample["neg_target"]]
    if not all(isinstance(i, int) and 0 <= i < len(names) for i in ids):
        return [f"root/target/neg_target {ids} are not node ids"]
    if not (isinstance(sample["steps"], list) and all(isinstance(x, str) for x in sample["steps"])):
        return ["steps is not a list of strings"]
    if not (isinstance(q, str) and isinstance(sample["answer"], str)):
        return ["question or answer is not a string"]
    entity, target, neg = (names[i] for i in ids)

    # vocabulary: only the real names
    foreign = [x for x in names if x not in PERSON_NAMES | CONCEPT_NAMES]
    if foreign:
        problems.append(f"names outside ProsQA's vocabulary: {foreign}")

    # question text: facts joined by single spaces, then the question sentence
    if "\n" in q or "  " in q or q != q.strip():
        problems.append("question has a newline, a double space or outer whitespace")
    body, _, last = q.rpartition(" Is ")
    m = QUESTION.fullmatch("Is " + last)
    if not m:
        return problems + [f"question sentence does not match 'Is <Entity> a <X> or <Y>?': {last!r}"]
    if m.group(1) != entity:
        problems.append(f"question asks about {m.group(1)}, root is {entity}")
    if {m.group(2), m.group(3)} != {target, neg} or target == neg:
        problems.append(f"options {m.group(2)}/{m.group(3)} are not target {target} and neg_target {neg}")
    text_facts = []
    for sentence in re.split(r"(?<=\.) ", body):  # each fact ends with "." and one space follows it
        fact = parse_fact(sentence)
        if fact is None:
            problems.append(f"sentence not in a ProsQA template with ProsQA names: {sentence!r}")
        else:
            text_facts.append(fact)

    # the stated facts must be exactly the edges field
    edge_facts = [(names[u], names[v]) for u, v in edges]
    if Counter(text_facts) != Counter(edge_facts):
        problems.append("facts in the question differ from the edges field")
    if len(set(edge_facts)) != len(edge_facts):
        problems.append("duplicate edges")
    if any(u >= v for u, v in edges):
        problems.append("an edge u -> v with u >= v (ids must follow generation order)")
    has_parent = {v for _, v in edges}
    sources = {names[i] for i in range(len(names)) if i not in has_parent}
    if sources != {x for x in names if x in PERSON_NAMES}:
        problems.append("the nodes without parents are not exactly the persons")

    # BFS from the entity, over the facts as stated and over the edges field
    stated = {}
    for a, b in text_facts:
        stated.setdefault(a, []).append(b)
    by_id = {}
    for u, v in edges:
        by_id.setdefault(u, []).append(v)
    dist_text, dist_ids = distances(stated, entity), distances(by_id, sample["root"])
    if target not in dist_text or sample["target"] not in dist_ids:
        problems.append(f"target {target} is not reachable from {entity}")
    if neg in dist_text or sample["neg_target"] in dist_ids:
        problems.append(f"neg_target {neg} is reachable from {entity}")
    if stated.get(target) or stated.get(neg):
        problems.append("an option is not a leaf")
    if not any(neg in distances(stated, p) for p in sources - {entity}):
        problems.append(f"neg_target {neg} descends from no other person")

    # steps: a chain of stated facts from the entity to the target, of shortest length
    steps, chain, stated_facts = sample["steps"], [entity], set(text_facts)
    for i, step in enumerate(steps):
        fact = parse_fact(step)
        template = PERSON_FACT if i == 0 else CONCEPT_FACT  # only the first step names the person
        if fact is None or not template.fullmatch(step):
            problems.append(f"step {i} not in the template for its position: {step!r}")
            break
        if fact[0] != chain[-1]:
            problems.append(f"step {i} starts from {fact[0]}, the chain is at {chain[-1]}")
            break
        if fact not in stated_facts:
            problems.append(f"step {i} is not a stated fact: {step!r}")
            break
        chain.append(fact[1])
    else:
        if chain[-1] != target:
            problems.append(f"steps end at {chain[-1]}, not at target {target}")
        elif target in dist_text and len(steps) != dist_text[target]:
            problems.append(f"{len(steps)} steps, shortest path is {dist_text[target]}")
        if sample["target"] in dist_ids and dist_ids[sample["target"]] != dist_text.get(target):
            problems.append("shortest paths over the text and over the edges field differ")

    if sample["answer"] != f"{entity} is a {target}.":
        problems.append(f"answer {sample['answer']!r} does not name the target {target}")
    return problems

def check_file(path):
    """(number of samples, list of 'sample i: problem' messages) for one JSON file."""
    try:
        with open(path) as f:
            samples = json.load(f)
    except (OSError, ValueError) as e:
        return 0, [f"cannot read: {e}"]
    if not isinstance(samples, list):
        return 0, ["not a JSON list"]
    problems = [f"sample {i}: {p}" for i, s in enumerate(samples) for p in check_sample(s)]
    return len(samples), problems

def main(paths):
    failed = False
    for path in paths:
        n, problems = check_file(path)
        bad = len({p.split(":")[0] for p in problems if p.startswith("sample ")})
        status = "FAIL" if problems else "PASS"
        print(f"{status} {path}: {n} samples, {n - bad if n else 0} pass, {len(problems)} problems")
        for p in problems[:10]:
            print(f"  {p}")
        failed |= bool(problems)
    return 1 if failed or not paths else 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
