"""prep/prontoqa.py on a generator-output file written here (the JSON layout of asaparov/prontoqa's
`--model-name json` mode): Meta's question/steps/answer rules, the 9000/200/rest split in file
order, errors that name the file and the entry, and no partial output."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from prep import prontoqa  # noqa: E402


def example(i):
    # a 0-shot entry: only test_example; odd and even chain lengths alternate
    cot = [f"Max is a wumpus{i}.", "Every wumpus is a yumpus.", "Max is a yumpus.", "Every yumpus is a zumpus.",
           "Max is a zumpus."][:5 - i % 2]
    return {"test_example": {
        "question": f"Every wumpus is a yumpus. Every yumpus is a zumpus. Max is a wumpus{i}.",
        "query": "True or false: Max is a zumpus.",
        "chain_of_thought": cot,
        "answer": "True" if i % 3 else "False",
    }}


def generator_output(n):
    # keys example1..exampleN in order, indent=1 like the generator's json.dump
    return json.dumps({f"example{i}": example(i) for i in range(1, n + 1)}, indent=1)


@pytest.fixture(scope="module")
def full_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pronto") / "5hop_0shot_random.json"
    path.write_text(generator_output(10000))
    return path


def test_convert_example_follows_metas_rules():
    odd = prontoqa.convert_example("example1", example(1), "f")   # 4 sentences
    even = prontoqa.convert_example("example2", example(2), "f")  # 5 sentences
    assert odd == {
        "question": "Every wumpus is a yumpus. Every yumpus is a zumpus. Max is a wumpus1. True or false: Max is a zumpus.",
        "steps": ["Max is a wumpus1. Every wumpus is a yumpus.", "Max is a yumpus. Every yumpus is a zumpus."],
        "answer": "True",
    }
    assert even["steps"] == ["Max is a wumpus2. Every wumpus is a yumpus.", "Max is a yumpus. Every yumpus is a zumpus.",
                             "Max is a zumpus."]
    assert prontoqa.convert_example("example3", example(3), "f")["answer"] == "False"


def test_split_in_file_order(full_file):
    splits = prontoqa.split(prontoqa.convert_file(str(full_file)))
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [9000, 200, 800]
    assert splits["train"][0]["question"].endswith("wumpus1. True or false: Max is a zumpus.")
    assert "wumpus9001." in splits["valid"][0]["question"]
    assert "wumpus9201." in splits["test"][0]["question"]
    assert "wumpus10000." in splits["test"][-1]["question"]


def test_cli_writes_three_files(full_file, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prep", "prontoqa.py"), "--input", str(full_file),
                        "--out_dir", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["prontoqa_test.json", "prontoqa_train.json", "prontoqa_valid.json"]
    assert len(json.loads((tmp_path / "prontoqa_valid.json").read_text())) == 200
    assert "prontoqa_test.json: 800 samples" in r.stdout


@pytest.mark.parametrize("corrupt,message", [
    (lambda d: d["example5"].pop("test_example"), "example #4: entry 'example5' has no test_example"),
    (lambda d: d["example7"]["test_example"].update(answer="Maybe"), "entry 'example7': answer 'Maybe'"),
    (lambda d: d["example2"]["test_example"].update(chain_of_thought=[]), "entry 'example2': chain_of_thought"),
    (lambda d: d["example3"]["test_example"].pop("query"), "entry 'example3': test_example.query"),
])
def test_malformed_entry_names_file_and_entry(tmp_path, corrupt, message):
    data = {f"example{i}": example(i) for i in range(1, 11)}
    corrupt(data)
    path = tmp_path / "5hop_0shot_random.json"
    path.write_text(json.dumps(data, indent=1))
    with pytest.raises(ValueError) as e:
        prontoqa.convert_file(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_cli_bad_input_writes_nothing(tmp_path):
    src, out = tmp_path / "in.json", tmp_path / "out"
    src.write_text(generator_output(10000)[:-50])  # truncated: not JSON
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prep", "prontoqa.py"), "--input", str(src),
                        "--out_dir", str(out)], capture_output=True, text=True)
    assert r.returncode != 0 and "in.json: not JSON" in r.stderr and "line" in r.stderr
    assert not out.exists()
    # too few examples for Meta's split is an error too, not a short test set
    src.write_text(generator_output(9200))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prep", "prontoqa.py"), "--input", str(src),
                        "--out_dir", str(out)], capture_output=True, text=True)
    assert r.returncode != 0 and "9200 examples" in r.stderr
    assert not out.exists()


def test_write_json_leaves_no_partial_file(tmp_path):
    with pytest.raises(TypeError):
        prontoqa.write_json(str(tmp_path / "prontoqa_train.json"), [{"question": "q"}, {"steps": {1}}])
    assert os.listdir(tmp_path) == []
