"""
GSM8K in the Implicit-CoT ("iCoT") format of Deng et al., as the Coconut paper uses it (Hao et al.
2024, Table 1; Meta's preprocessing/gsm_icot.{bash,py}), converted to the kit's JSON: a list of
{"question", "steps", "answer"}, written to OUT_DIR/gsm_{split}.json.

    python prep/gsm_icot.py --download --out_dir data/gsm8k                 # 385,620 / 500 / 1,319 (online)
    python prep/gsm_icot.py --local_dir ../shared/data/gsm8k_icot --out_dir data/gsm8k   # valid + test
    python prep/gsm_icot.py --local_dir ../shared/data/gsm8k_icot \
        --offline_train ../shared/data/gsm8k/train.jsonl --out_dir data/gsm8k  # + a small offline train

An iCoT line is `question||<<a*b=c>> <<c-d=e>> #### answer`. Meta's rules, kept exactly:
question = text before the first `||` (not stripped); steps = text after it and before the first `##`,
stripped, split on single spaces (an empty chain gives steps [""]); answer = text after the last `##`,
stripped (thousands commas stay; they are removed only when scoring).

The augmented iCoT train file (~385k lines, 87.8 MB) is Git LFS and has no offline copy. The offline
train set is GSM8K's own train split with its `<<...>>` calculator annotations as the steps and the
number after `####` as the answer, minus the 500 questions of the iCoT valid split (all 500 come from
GSM8K train): 6,973 samples, ~55x smaller than the real one. It is for smoke runs, not for numbers.
"""

import argparse
import hashlib
import json
import os
import re
import tempfile
import urllib.error
import urllib.request

# -----------------------------------------------------------------------------
# sources: da03/Internalize_CoT_Step_by_Step at the commit Meta's gsm_icot.bash pins

COMMIT = "e06a32ee5e4cd117171daeb4755d2a97ece62761"
URLS = {
    # train.txt is a Git LFS file: raw.githubusercontent.com would return the 133-byte pointer
    "train": f"https://media.githubusercontent.com/media/da03/Internalize_CoT_Step_by_Step/{COMMIT}/data/gsm8k/train.txt",
    "valid": f"https://raw.githubusercontent.com/da03/Internalize_CoT_Step_by_Step/{COMMIT}/data/gsm8k/valid.txt",
    "test": f"https://raw.githubusercontent.com/da03/Internalize_CoT_Step_by_Step/{COMMIT}/data/gsm8k/test.txt",
}
EXPECTED_LINES = {"train": 385620, "valid": 500, "test": 1319}  # paper Table 3
# sha256 prefixes of the valid/test files (shared/data/README.md); train's was never recorded
SHA256_PREFIX = {"valid": "04f9bddfe8ac4846", "test": "e464efa2713fbcf4"}

# -----------------------------------------------------------------------------
# conversion

def convert_line(line, where):
    """One iCoT line -> {"question", "steps", "answer"}; `where` ("file:line") names it in errors."""
    if "||" not in line:
        raise ValueError(f"{where}: no '||' between question and chain of thought")
    question, rest = line.split("||", 1)
    if "##" not in rest:
        raise ValueError(f"{where}: no '####' before the answer")
    answer = line.split("##")[-1].strip()
    if not question.strip() or not answer:
        raise ValueError(f"{where}: empty question or answer")
    return {
        "question": question,
        "steps": rest.split("##")[0].strip().split(" "),  # an empty chain gives [""], as in Meta's code
        "answer": answer,
    }

def convert_text(text, name):
    if text.startswith("version https://git-lfs"):
        raise ValueError(f"{name}: a Git LFS pointer, not the data (fetch it with git lfs or --download)")
    # split on "\n" only, like Meta's readlines(); str.splitlines would also split on \x0b, \u2028, ...
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [convert_line(line, f"{name}:{i + 1}") for i, line in enumerate(lines)]

def convert_file(path):
    with open(path, encoding="utf-8") as f:
        return convert_text(f.read(), path)

def gsm8k_to_icot_line(record, where):
    """A GSM8K train record {"question", "answer"} as an iCoT line: its calculator annotations in order,
    then the final number. Checked: for the 500 iCoT valid questions this gives their iCoT lines' steps
    and answers exactly."""
    if not isinstance(record, dict) or not isinstance(record.get("question"), str) or \
            not isinstance(record.get("answer"), str) or "####" not in record["answer"]:
        raise ValueError(f"{where}: expected an object with a question and an answer ending in '#### <number>'")
    steps = re.findall(r"<<.*?>>", record["answer"])
    return f"{record['question']}||{' '.join(steps)} #### {record['answer'].split('####')[-1].strip()}"

def offline_train(jsonl_path, valid):
    # GSM8K train minus the questions of the iCoT valid split, converted with the same rules
    held_out = {s["question"] for s in valid}
    samples = []
    with open(jsonl_path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            where = f"{jsonl_path}:{i + 1}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not JSON: {e}")
            icot_line = gsm8k_to_icot_line(record, where)
            if record["question"] not in held_out:
                samples.append(convert_line(icot_line, where))
    return samples

# -----------------------------------------------------------------------------
# IO

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

def download(split, timeout=120):
    url = URLS[split]
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            raw = r.read()
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"error: could not download {url}: {e}\n"
                         f"Offline? Use --local_dir with copies of the .txt files "
                         f"(and --offline_train for a small train set).")
    if split in SHA256_PREFIX and not hashlib.sha256(raw).hexdigest().startswith(SHA256_PREFIX[split]):
        raise SystemExit(f"error: {url}: sha256 does not start with {SHA256_PREFIX[split]}")
    return raw.decode("utf-8")

def report(split, samples):
    n_steps = sum(len(s["steps"]) for s in samples if s["steps"] != [""])
    n_empty = sum(s["steps"] == [""] for s in samples)
    expected = EXPECTED_LINES[split]
    note = "" if len(samples) == expected else f" (the real iCoT {split} has {expected})"
    print(f"gsm_{split}.json: {len(samples)} samples{note}, {n_steps / len(samples):.2f} steps per sample, "
          f"{n_empty} with an empty chain")

# -----------------------------------------------------------------------------

def convert_all(args):
    # convert everything first and write at the end, so a bad line leaves no output at all
    outputs = {}
    if args.download:
        for split in URLS:
            outputs[split] = convert_text(download(split), URLS[split])  # valid/test already hash-checked
    else:
        for split in URLS:
            path = os.path.join(args.local_dir, f"{split}.txt")
            if os.path.exists(path):
                outputs[split] = convert_file(path)
            else:
                print(f"{path}: not found, skipped")
    if args.offline_train:
        if "valid" not in outputs:
            raise SystemExit("error: --offline_train needs the iCoT valid split, to leave its questions out")
        if "train" in outputs:
            raise SystemExit("error: the real iCoT train split is present; --offline_train would overwrite it")
        outputs["train"] = offline_train(args.offline_train, outputs["valid"])
    return outputs

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--download", action="store_true", help="fetch train/valid/test (needs internet)")
    source.add_argument("--local_dir", help="folder with local copies of {train,valid,test}.txt")
    parser.add_argument("--offline_train", help="GSM8K train.jsonl: build gsm_train.json from it (needs the valid split)")
    parser.add_argument("--out_dir", required=True)
    args = parser.parse_args()

    try:
        outputs = convert_all(args)
    except ValueError as e:  # a malformed record: its file and line are in the message
        raise SystemExit(f"error: {e}")
    for split, samples in outputs.items():
        write_json(os.path.join(args.out_dir, f"gsm_{split}.json"), samples)
        report(split, samples)

if __name__ == "__main__":
    main()
