"""prep/gsm_icot.py on a few lines of each format written here: Meta's iCoT conversion rules, the
offline train set built from GSM8K train.jsonl, errors that name file and line, no partial output,
and the download path failing clearly offline."""

import json
import os
import subprocess
import sys
import urllib.error

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from prep import gsm_icot  # noqa: E402

# iCoT lines in the real format: double spaces inside questions, a trailing space before "||",
# a thousands comma in an answer, and an empty chain (" #### " right after "||")
VALID_TXT = (
    "John cuts his grass to 2 inches.  It grows .5 inches per month. How much?||<<4-2=2>> <<2/.5=4>> #### 300\n"
    "A shop sells 1,000 pens at $2 each. How much money? ||<<1000*2=2000>> #### 2,000\n"
    "Alan and Marcy handed out 150 tickets. How many did Alan hand out?|| #### 26\n"
)
TEST_TXT = "What is 3 plus 4?||<<3+4=7>> #### 7\n"

# GSM8K train.jsonl records: the second one is an iCoT valid question, the third has no annotation
TRAIN_JSONL = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "What is 3 plus 4?", "answer": "3+4 = <<3+4=7>>7\n#### 7"},
    {"question": "Alan and Marcy handed out 150 tickets. How many did Alan hand out?",
     "answer": "Let x be Alan's tickets: x + 5x - 6 = 150, so x = 26.\n#### 26"},
]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_convert_follows_metas_rules(tmp_path):
    samples = gsm_icot.convert_file(write(tmp_path / "valid.txt", VALID_TXT))
    assert samples == [
        {"question": "John cuts his grass to 2 inches.  It grows .5 inches per month. How much?",
         "steps": ["<<4-2=2>>", "<<2/.5=4>>"], "answer": "300"},
        # the question is not stripped; the comma stays in the answer
        {"question": "A shop sells 1,000 pens at $2 each. How much money? ",
         "steps": ["<<1000*2=2000>>"], "answer": "2,000"},
        # an empty chain becomes one empty step, as in Meta's code
        {"question": "Alan and Marcy handed out 150 tickets. How many did Alan hand out?",
         "steps": [""], "answer": "26"},
    ]


@pytest.mark.parametrize("bad_line,message", [
    ("What is 1 plus 1? <<1+1=2>> #### 2", "no '||'"),
    ("What is 1 plus 1?||<<1+1=2>> 2", "no '####'"),
    ("", "no '||'"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    path = write(tmp_path / "valid.txt", VALID_TXT.replace(VALID_TXT.split("\n")[1], bad_line))
    with pytest.raises(ValueError, match=f"valid.txt:2: {message}"):
        gsm_icot.convert_file(path)


def test_lfs_pointer_is_refused(tmp_path):
    path = write(tmp_path / "train.txt", "version https://git-lfs.github.com/spec/v1\noid sha256:0a3909a9\nsize 87805358\n")
    with pytest.raises(ValueError, match="Git LFS pointer"):
        gsm_icot.convert_file(path)


def test_offline_train_leaves_out_valid_questions(tmp_path):
    jsonl = write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in TRAIN_JSONL))
    valid = gsm_icot.convert_file(write(tmp_path / "valid.txt", VALID_TXT + TEST_TXT))
    train = gsm_icot.offline_train(jsonl, valid)
    assert train == [{"question": TRAIN_JSONL[0]["question"], "steps": ["<<48/2=24>>", "<<48+24=72>>"], "answer": "72"}]
    # with nothing held out, the record without annotations gets the empty chain like iCoT's
    train = gsm_icot.offline_train(jsonl, [])
    assert [s["steps"] for s in train] == [["<<48/2=24>>", "<<48+24=72>>"], ["<<3+4=7>>"], [""]]
    assert [s["answer"] for s in train] == ["72", "7", "26"]


def test_offline_train_malformed_record_names_file_and_line(tmp_path):
    lines = [json.dumps(TRAIN_JSONL[0]), json.dumps({"question": "no answer"}), json.dumps(TRAIN_JSONL[1])]
    jsonl = write(tmp_path / "train.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="train.jsonl:2: expected an object"):
        gsm_icot.offline_train(jsonl, [])
    jsonl = write(tmp_path / "train.jsonl", lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match="train.jsonl:2: not JSON"):
        gsm_icot.offline_train(jsonl, [])


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "prep", "gsm_icot.py"), *args],
                          capture_output=True, text=True)


def test_cli_local_dir_and_offline_train(tmp_path):
    src, out = tmp_path / "icot", tmp_path / "out"
    src.mkdir()
    write(src / "valid.txt", VALID_TXT)
    write(src / "test.txt", TEST_TXT)
    jsonl = write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in TRAIN_JSONL))
    r = run_cli("--local_dir", str(src), "--offline_train", jsonl, "--out_dir", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["gsm_test.json", "gsm_train.json", "gsm_valid.json"]
    assert len(json.loads((out / "gsm_valid.json").read_text())) == 3
    assert len(json.loads((out / "gsm_test.json").read_text())) == 1
    assert len(json.loads((out / "gsm_train.json").read_text())) == 2  # the valid question left out
    assert "train.txt: not found, skipped" in r.stdout
    assert "gsm_train.json: 2 samples (the real iCoT train has 385620)" in r.stdout


def test_cli_bad_line_writes_nothing(tmp_path):
    # valid converts fine, test has a bad line 1: no file at all may be written
    src, out = tmp_path / "icot", tmp_path / "out"
    src.mkdir()
    write(src / "valid.txt", VALID_TXT)
    write(src / "test.txt", "What is 3 plus 4? #### 7\n")
    r = run_cli("--local_dir", str(src), "--out_dir", str(out))
    assert r.returncode != 0
    assert "test.txt:1: no '||'" in r.stderr
    assert not out.exists() or os.listdir(out) == []


def test_cli_offline_train_needs_valid(tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    r = run_cli("--local_dir", str(src), "--offline_train", "x.jsonl", "--out_dir", str(tmp_path / "out"))
    assert r.returncode != 0 and "needs the iCoT valid split" in r.stderr


def test_download_offline_fails_clearly(monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(gsm_icot.urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit, match="(?s)could not download .*valid.txt.*--local_dir"):
        gsm_icot.download("valid")


def test_download_checks_the_hash(monkeypatch):
    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return VALID_TXT.encode()
    monkeypatch.setattr(gsm_icot.urllib.request, "urlopen", lambda url, timeout=None: Response())
    with pytest.raises(SystemExit, match="sha256 does not start with 04f9bddfe8ac4846"):
        gsm_icot.download("valid")
    # train has no recorded hash: its text comes back for conversion
    assert gsm_icot.download("train") == VALID_TXT


def test_write_json_leaves_no_partial_file(tmp_path):
    with pytest.raises(TypeError):
        gsm_icot.write_json(str(tmp_path / "gsm_valid.json"), [{"question": "q"}, {"steps": {1}}])
    assert os.listdir(tmp_path) == []
