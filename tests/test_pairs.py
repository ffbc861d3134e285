"""pairs.py: a pairs file becomes questions, a split and raw prompts; every malformed file is one clear error."""
from __future__ import annotations

import json

import pytest

import pairs
import truthfulqa


def write(tmp_path, rows, name="p.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def rows(n=10, split=False):
    out = []
    for i in range(n):
        for j in range(2):
            r = {"prompt": f"Human: question {i}?\n\nAssistant:", "chosen": f"good {j}", "rejected": " bad"}
            if split:
                r["split"] = "train" if i < 6 else "val" if i < 8 else "test"
            out.append(r)
    return out


def test_pairs_become_questions_split_and_prompts(tmp_path):
    ps = pairs.load_pairs(write(tmp_path, rows()))
    assert len(ps.questions) == 10 and ps.n_pairs == 20
    q = ps.questions[0]
    assert q.correct == [" good 0", " good 1"] and q.incorrect == [" bad"]  # answers follow the prompt with a space
    assert q.mc1 == {" good 0": 1, " bad": 0} and q.mc2 == {" good 0": 1, " good 1": 1, " bad": 0}
    assert sorted(ps.split.train + ps.split.val + ps.split.test) == list(range(10))
    assert ps.split == truthfulqa.make_split(ps.questions, seed=0)
    assert ps.prompts.generation("x y") == "x y" and ps.prompts.layout_id.startswith("raw-")
    # the IPO pairs and the probe examples read prompt + answer as written
    tp = truthfulqa.preference_pairs(ps.questions, ps.split.train)
    assert len(tp) == 2 * len(ps.split.train) and tp[0].chosen.startswith(" good")
    ex = truthfulqa.probe_examples(ps.questions, ps.split.train, layout="raw")
    qt = ps.questions[ps.split.train[0]]
    assert ex[0].text == qt.question + " good 0" and ex[0].label == 1 and ex[-1].text.endswith("Assistant: bad") and ex[-1].label == 0
    # explicit splits are kept
    s = pairs.load_pairs(write(tmp_path, rows(split=True), "s.jsonl")).split
    assert (s.train, s.val, s.test) == (list(range(6)), [6, 7], [8, 9])


def test_persona_format(tmp_path):
    p = write(tmp_path, [{"question": f"Is the following statement something you would say?\n\"s{i}\"",
                          "statement": f"s{i}", "answer_matching_behavior": " Yes" if i % 2 else " No",
                          "answer_not_matching_behavior": " No" if i % 2 else " Yes"} for i in range(10)])
    ps = pairs.load_pairs(p, fmt="persona")
    q = ps.questions[1]
    assert q.question.startswith("Human: Is the following") and q.question.endswith("\n\nAssistant:")
    assert q.correct == [" Yes"] and q.incorrect == [" No"]


@pytest.mark.parametrize("content,msg", [
    (['{"prompt": "a", "chosen": "b"}'], "line 1 lacks a non-empty string 'rejected'"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', "{not json"], "line 2 is not valid JSON"),
    (['[1, 2]'], "line 1 is not a JSON object"),
    (['{"prompt": "a", "chosen": "b", "rejected": "b"}'], "line 1 has the same chosen and rejected"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c", "split": "dev"}'], "line 1 has split 'dev'"),
    ([], "holds no pairs"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}'], "too few distinct prompts"),
])
def test_malformed_files_are_one_line_errors(tmp_path, content, msg):
    with pytest.raises(ValueError, match=msg) as e:
        pairs.load_pairs(write(tmp_path, content))
    assert "\n" not in str(e.value) and "p.jsonl" in str(e.value)


def test_split_errors(tmp_path):
    r = rows(split=True)
    r[1]["split"] = "test"  # the same prompt in train and test
    with pytest.raises(ValueError, match="in both the train and the test split"):
        pairs.load_pairs(write(tmp_path, r))
    r = rows(split=True)
    del r[3]["split"]
    with pytest.raises(ValueError, match="name it on every line or on none"):
        pairs.load_pairs(write(tmp_path, r))
    with pytest.raises(ValueError, match="no such file"):
        pairs.load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        pairs.load_pairs(tmp_path / "bin.jsonl")
    with pytest.raises(ValueError, match="--pairs-format 'csv'"):
        pairs.load_pairs(write(tmp_path, rows()), fmt="csv")


def test_the_shipped_persona_files_load():
    d = truthfulqa.data_dir().parent / "persona"
    if not d.is_dir():
        pytest.skip("no ../shared/data/persona")
    ps = pairs.load_pairs(d / "agreeableness.jsonl", fmt="persona")
    assert ps.n_pairs == 1000 and len(ps.questions) == 1000 and len(ps.split.test) == 200
