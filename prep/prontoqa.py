"""
ProntoQA (Saparov & He 2023) as the Coconut paper uses it (Hao et al. 2024, Table 1; Meta's
preprocessing/prontoqa.py): 5-hop, fictional ontology, converted to the kit's JSON, a list of
{"question", "steps", "answer"} in OUT_DIR/prontoqa_{train,valid,test}.json (9,000 / 200 / 800).

There is no file to download: the data comes from running the public generator (asaparov/prontoqa,
Apache-2.0) at commit f0145b867b3c106285ec9ea1941a3f6eb7c6162d on your own machine (needs numpy and
scipy); we do not vendor its code:

    python run_experiment.py --model-name json --model-size dummy --ordering random --num-trials 10000 \
        --few-shot-examples 0 --ontology fictional --min-hops 5 --max-hops 5 --hops-skip 1
    python prep/prontoqa.py --input 5hop_0shot_random.json --out_dir data/prontoqa

The generator writes one JSON object {"example1": {"test_example": {"question", "query",
"chain_of_thought", "answer"}}, "example2": ...}. Meta's rules, kept exactly, in file order:
question = question + " " + query; steps = the chain-of-thought sentences two at a time, joined by a
space (the last step may be one sentence); answer = "True" or "False". Split: the first 9,000 examples
are train, the next 200 valid, the rest test.
"""

import argparse
import json
import os
import tempfile

n_train = 9000  # Meta's split, in file order
n_valid = 200   # the remaining examples (800 of 10,000) are test

def convert_example(key, example, where):
    """One generator entry -> {"question", "steps", "answer"}; `where` names the file in errors."""
    test = example.get("test_example") if isinstance(example, dict) else None
    if not isinstance(test, dict):
        raise ValueError(f"{where}: entry {key!r} has no test_example object")
    for field, kind in [("question", str), ("query", str), ("chain_of_thought", list), ("answer", str)]:
        if not isinstance(test.get(field), kind):
            raise ValueError(f"{where}: entry {key!r}: test_example.{field} missing or not a {kind.__name__}")
    cot = test["chain_of_thought"]
    if not cot or not all(isinstance(s, str) for s in cot):
        raise ValueError(f"{where}: entry {key!r}: chain_of_thought is not a non-empty list of sentences")
    if test["answer"] not in ("True", "False"):
        raise ValueError(f"{where}: entry {key!r}: answer {test['answer']!r} is not 'True' or 'False'")
    return {
        "question": test["question"] + " " + test["query"],
        # two sentences per step, as in Meta's preprocessing (the last step may be a single sentence)
        "steps": [" ".join(cot[i:i + 2]) for i in range(0, len(cot), 2)],
        "answer": test["answer"],
    }

def convert_file(path):
    """All examples of the generator's output file, in file order (json keeps the key order)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not JSON: {e}")  # the message carries the line and column
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected one JSON object keyed 'example1', 'example2', ...")
    return [convert_example(key, example, f"{path}: example #{i}")
            for i, (key, example) in enumerate(data.items())]

def split(samples):
    if len(samples) <= n_train + n_valid:
        raise ValueError(f"{len(samples)} examples, need more than {n_train + n_valid} for Meta's split")
    return {"train": samples[:n_train],
            "valid": samples[n_train:n_train + n_valid],
            "test": samples[n_train + n_valid:]}

def write_json(path, obj):
    # temp file in the same folder, then an atomic rename: a crash never leaves a partial file
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="the generator's 5hop_0shot_random.json")
    parser.add_argument("--out_dir", required=True)
    args = parser.parse_args()
    try:
        splits = split(convert_file(args.input))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    for name, samples in splits.items():
        write_json(os.path.join(args.out_dir, f"prontoqa_{name}.json"), samples)
        n_steps = sum(len(s["steps"]) for s in samples) / len(samples)
        n_true = sum(s["answer"] == "True" for s in samples)
        print(f"prontoqa_{name}.json: {len(samples)} samples, {n_steps:.2f} steps each, {n_true} True")

if __name__ == "__main__":
    main()
