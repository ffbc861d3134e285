"""pairs.py: any behaviour as preference pairs, read into the shapes editloc uses for TruthfulQA.

A pairs file is JSONL, one pair per line, the convention of the common preference-training libraries:

    {"prompt": "...", "chosen": "...", "rejected": "..."}            optional: "split": "train" | "val" | "test"

The prompt is used as written (a chat or QA template belongs in it). Each distinct prompt becomes one
truthfulqa.Question (its chosen answers as `correct`, its rejected ones as `incorrect`), so the split, probe
examples (chosen vs rejected, last token), ITI directions, IPO pairs and MC scores work unchanged. Without
"split" fields the prompts are split 60/20/20 under the seed (truthfulqa.make_split); with them, every line must
have one and a prompt may not appear in two splits.

`--pairs-format persona` reads Anthropic's model-written persona files (../shared/data/persona/) directly:
prompt "Human: {question}\\n\\nAssistant:" (the authors' layout), chosen the answer matching the behaviour.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import truthfulqa

FORMATS = ("pairs", "persona")
SPLITS = ("train", "val", "test")
MIN_PROMPTS = {"train": 2, "val": 1, "test": 1}  # the fewest distinct prompts each part of the split needs
PERSONA_LAYOUT = "Human: {question}\n\nAssistant:"


@dataclass
class RawPrompts:
    """The prompt protocol of a pairs file: the prompt as written. Mirrors truthfulqa.Prompts where editloc reads
    it (generation, prefix, layout_id)."""
    source: str  # the file's sha256, so caches keyed by the prompt layout do not mix files

    prefix = ""

    def generation(self, question: str) -> str:
        return question

    @property
    def layout_id(self) -> str:
        return "raw-" + self.source[:8]


@dataclass
class PairSet:
    questions: list  # truthfulqa.Question, one per distinct prompt
    split: truthfulqa.Split
    prompts: RawPrompts
    path: str
    n_pairs: int


def _answer(s: str) -> str:
    """An answer as it follows the prompt: a leading space unless it starts with whitespace (as
    ipo.encode_answer tokenises it), so probe texts read prompt + answer exactly like IPO's sequences."""
    return s if s[:1].isspace() else " " + s


def read_lines(path: str | os.PathLike, fmt: str = "pairs") -> list[dict]:
    """The pairs of a file as dicts {prompt, chosen, rejected, split (or None)}; a malformed line is a
    ValueError naming the file, the line number and what is wrong."""
    p = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"--pairs-format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not p.is_file():
        raise ValueError(f"--pairs {p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--pairs {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    need = ("prompt", "chosen", "rejected") if fmt == "pairs" else (
        "question", "answer_matching_behavior", "answer_not_matching_behavior")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--pairs {p}: line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise ValueError(f"--pairs {p}: line {n} is not a JSON object")
        missing = [k for k in need if not isinstance(d.get(k), str) or not d[k].strip()]
        if missing:
            raise ValueError(f"--pairs {p}: line {n} lacks a non-empty string {', '.join(repr(k) for k in missing)}")
        split = d.get("split")
        if split is not None and split not in SPLITS:
            raise ValueError(f"--pairs {p}: line {n} has split {split!r}; expected one of {', '.join(SPLITS)}")
        if fmt == "persona":
            d = {"prompt": PERSONA_LAYOUT.format(question=d["question"]), "chosen": d["answer_matching_behavior"],
                 "rejected": d["answer_not_matching_behavior"]}
        if d["chosen"].strip() == d["rejected"].strip():
            raise ValueError(f"--pairs {p}: line {n} has the same chosen and rejected answer")
        out.append({"prompt": d["prompt"], "chosen": _answer(d["chosen"]), "rejected": _answer(d["rejected"]),
                    "split": split})
    if not out:
        raise ValueError(f"--pairs {p}: the file holds no pairs")
    return out


def load_pairs(path: str | os.PathLike, fmt: str = "pairs", seed: int = 0) -> PairSet:
    """Read a pairs file into questions (one per prompt), a split and the raw prompt protocol."""
    p = Path(path)
    lines = read_lines(p, fmt)
    has_split = [d["split"] is not None for d in lines]
    if any(has_split) and not all(has_split):
        raise ValueError(f"--pairs {p}: {sum(has_split)} of {len(lines)} lines name a split; name it on every "
                         "line or on none (then prompts are split under --seed)")
    by_prompt: dict[str, truthfulqa.Question] = {}
    part: dict[str, str] = {}
    for n, d in enumerate(lines):
        q = by_prompt.get(d["prompt"])
        if q is None:
            q = by_prompt[d["prompt"]] = truthfulqa.Question(qid=len(by_prompt), question=d["prompt"],
                                                             best=d["chosen"], correct=[], incorrect=[],
                                                             category="pairs")
            part[d["prompt"]] = d["split"]
        elif part[d["prompt"]] != d["split"]:
            raise ValueError(f"--pairs {p}: the prompt {d['prompt'][:60]!r} is in both the {part[d['prompt']]} and "
                             f"the {d['split']} split; a prompt must stay in one")
        for key, ans in (("correct", d["chosen"]), ("incorrect", d["rejected"])):
            if ans not in getattr(q, key):
                getattr(q, key).append(ans)
    questions = list(by_prompt.values())
    for q in questions:  # MC targets: MC1 the first chosen answer against the rejected ones, MC2 all of them
        q.mc1 = {q.correct[0]: 1, **{a: 0 for a in q.incorrect}}
        q.mc2 = {**{a: 1 for a in q.correct}, **{a: 0 for a in q.incorrect}}
    if all(has_split):
        ids = {s: sorted(q.qid for q in questions if part[q.question] == s) for s in SPLITS}
        split = truthfulqa.Split(seed=seed, **ids)
    else:
        split = truthfulqa.make_split(questions, seed=seed)
    short = [f"{s} {len(getattr(split, s))} (needs {k})" for s, k in MIN_PROMPTS.items() if len(getattr(split, s)) < k]
    if short:
        raise ValueError(f"--pairs {p}: too few distinct prompts for the split: {', '.join(short)}; "
                         f"{len(questions)} prompts in all")
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    return PairSet(questions=questions, split=split, prompts=RawPrompts(source=f"{fmt}-{sha}"), path=str(p),
                   n_pairs=len(lines))
