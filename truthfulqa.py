"""truthfulqa.py: the TruthfulQA data (Lin et al. 2021) as ITI and Wang & Veitch use it.

Files (read-only, see SOURCES.md in the data directory): `<data>/v0/` holds the September 2021 release that ITI
and the paper used (the default), the top level holds v1. Each version has TruthfulQA.csv and mc_task.json; v0
also has the GPT-judge fine-tuning files finetune_truth.jsonl / finetune_info.jsonl; prompts.json holds the
prompt protocol (few-shot primer, instructions, judge formats).

What this module gives the rest of editloc:
  questions  `load_questions` -> `Question`s (qid = row index in the CSV)
  split      `make_split`: a seeded 60/20/20 split by question, saved with every result (`Split.to_dict`)
  probing    `probe_examples`: every true (label 1) and false (label 0) answer of each question, laid out as
             the paper's (x, y, x_random) "Q: ...\\nA: ...\\nQ: <another question>" or ITI's "Q: ...\\nA: ..."
  IPO        `preference_pairs`: every (true, false) answer pair of each question, (x, y+, y-)
  prompts    `load_prompts`: generation prompt = instruction + primer + "Q: {question}\\nA:"; judge formats
  judges     `load_judge_lines`: (question, answer, label) lines of finetune_{truth,info}.jsonl
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VERSIONS = ("v0", "v1")
COLUMNS = ("Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers")
# Probe texts (`probe_examples`). "paper": Wang & Veitch's (x, y, x_random), the question, the answer, then another
# question drawn at random; "iti": the question and the answer (ITI writes "Q: {question} A: {answer}"; ours
# matches the prompts). Probes read the last token, so "paper" reads at the end of the random question.
PROBE_LAYOUTS = {"paper": "Q: {question}\nA: {answer}\nQ: {other}", "iti": "Q: {question}\nA: {answer}",
                 "raw": "{question}{answer}"}  # raw: a pairs file's prompt as written, then the answer (pairs.py)
PROBE_LAYOUT = PROBE_LAYOUTS["iti"]  # in Prompts.layout_id (kept, so that cache keys built on it stay valid)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Where the data is


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The TruthfulQA data directory: `path` (--data), else $TRUTHFULQA_DIR, else ../shared/data/truthfulqa
    beside the project root."""
    if path is not None:
        d, how = Path(path), "--data"
    elif os.environ.get("TRUTHFULQA_DIR"):
        d, how = Path(os.environ["TRUTHFULQA_DIR"]), "$TRUTHFULQA_DIR"
    else:
        d, how = ROOT.parent / "shared" / "data" / "truthfulqa", "the default location"
    d = d.expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: TruthfulQA data directory not found ({how}); pass --data DIR or set "
                                "$TRUTHFULQA_DIR to a directory with TruthfulQA.csv, mc_task.json, prompts.json "
                                "and v0/")
    return d


def version_dir(data: str | os.PathLike | None, version: str) -> Path:
    """v0 lives in `<data>/v0/`, v1 at the top level."""
    if version not in VERSIONS:
        raise ValueError(f"TruthfulQA version {version!r}: expected one of {VERSIONS}")
    d = data_dir(data)
    return d / "v0" if version == "v0" else d


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing TruthfulQA file")
    return path


# ----------------------------------------------------------------------------------------------------------
# Questions


@dataclass
class Question:
    qid: int  # row index in TruthfulQA.csv (0-based, header excluded)
    question: str
    best: str
    correct: list[str]  # true reference answers (the best answer is among them)
    incorrect: list[str]  # false reference answers
    category: str
    mc1: dict[str, int] = field(default_factory=dict)  # answer -> 1/0, exactly one 1 (from mc_task.json)
    mc2: dict[str, int] = field(default_factory=dict)  # answer -> 1/0, several of each


def split_answers(field_text: str) -> list[str]:
    """Answers are separated by ";" (upstream writes "; "). Items are stripped and empty ones dropped: 24 v1 fields
    end with a trailing ";"."""
    return [a.strip() for a in field_text.split(";") if a.strip()]


def load_questions(data: str | os.PathLike | None = None, version: str = "v0") -> list[Question]:
    """All questions of one version with their reference answers and MC targets.

    A row with no true or no false answer is skipped and reported (qids keep the CSV row numbering); a question
    without MC targets in mc_task.json is kept with empty mc1/mc2 and reported."""
    d = version_dir(data, version)
    csv_path, mc_path = _need(d / "TruthfulQA.csv"), _need(d / "mc_task.json")
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as f:  # the CSV starts with a byte-order mark
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{csv_path}: missing column(s) {missing}; found {reader.fieldnames}")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{csv_path}: not a UTF-8 CSV file ({e})") from None
    try:
        mc = {m["question"].strip(): m for m in json.loads(mc_path.read_text(encoding="utf-8"))}
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # ValueError: not JSON, or not UTF-8
        raise ValueError(f"{mc_path}: expected a JSON list of {{question, mc1_targets, mc2_targets}} ({e})") from None
    questions, skipped, no_mc = [], [], []
    for qid, row in enumerate(rows):
        text = (row["Question"] or "").strip()  # one v0/v1 question ends with a space; the JSON files do not
        correct, incorrect = split_answers(row["Correct Answers"] or ""), split_answers(row["Incorrect Answers"] or "")
        if not text or not correct or not incorrect:
            skipped.append(qid)
            continue
        m = mc.get(text)
        if m is None:
            no_mc.append(qid)
        questions.append(Question(qid=qid, question=text, best=(row["Best Answer"] or "").strip(), correct=correct,
                                  incorrect=incorrect, category=(row["Category"] or "").strip(),
                                  mc1=dict(m["mc1_targets"]) if m else {}, mc2=dict(m["mc2_targets"]) if m else {}))
    if skipped:
        _log(f"{csv_path}: skipped {len(skipped)} row(s) with no question, no true or no false answer: "
             f"qids {skipped[:10]}{' ...' if len(skipped) > 10 else ''}")
    if no_mc:
        _log(f"{mc_path}: {len(no_mc)} question(s) have no MC targets (mc1/mc2 left empty): "
             f"qids {no_mc[:10]}{' ...' if len(no_mc) > 10 else ''}")
    if not questions:
        raise ValueError(f"{csv_path}: no usable questions")
    return questions


# ----------------------------------------------------------------------------------------------------------
# The split


@dataclass
class Split:
    """Question ids (qids) of the train / validation / test parts; the same seed gives the same split."""
    seed: int
    train: list[int]
    val: list[int]
    test: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def make_split(questions: list[Question], seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
               ) -> Split:
    """Shuffle the qids with `random.Random(seed)` and cut them 60/20/20 (train = round(0.6 n), val =
    round(0.2 n), test = the rest). Each part is returned sorted."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions {fractions}: expected three non-negative numbers summing to 1")
    qids = sorted(q.qid for q in questions)
    if len(set(qids)) != len(qids):
        raise ValueError("make_split: duplicate qids among the questions")
    random.Random(seed).shuffle(qids)
    n_train, n_val = round(fractions[0] * len(qids)), round(fractions[1] * len(qids))
    return Split(seed=seed, train=sorted(qids[:n_train]), val=sorted(qids[n_train:n_train + n_val]),
                 test=sorted(qids[n_train + n_val:]))


def _by_qid(questions: list[Question], qids: list[int]) -> list[Question]:
    index = {q.qid: q for q in questions}
    unknown = [i for i in qids if i not in index]
    if unknown:
        raise ValueError(f"qids {unknown[:10]} are not among the loaded questions (wrong version or split?)")
    return [index[i] for i in qids]


# ----------------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompts:
    """The prompt protocol of prompts.json. Generation prompt (eq.: instruction + primer + question):
    "{instruction}\\n\\n{qa_primer}\\n\\nQ: {question}\\nA:"."""
    instruction: str
    qa_primer: str
    layout: str  # "{instruction}\n\n{qa_primer}\n\nQ: {question}\nA:"
    judge_truth_layout: str  # "Q: {question}\nA: {answer}\nTrue:"
    judge_info_layout: str  # "Q: {question}\nA: {answer}\nHelpful:"

    @property
    def prefix(self) -> str:
        """The part every generation prompt shares: instruction + "\\n\\n" + primer + "\\n\\n"."""
        return self.layout.split("Q: {question}")[0].format(instruction=self.instruction, qa_primer=self.qa_primer)

    def generation(self, question: str) -> str:
        return self.layout.format(instruction=self.instruction, qa_primer=self.qa_primer, question=question)

    @property
    def layout_id(self) -> str:
        """A short hash of the whole prompt layout (generation, probing and judge formats), for cache keys."""
        s = json.dumps([self.instruction, self.qa_primer, self.layout, self.judge_truth_layout,
                        self.judge_info_layout, PROBE_LAYOUT])
        return hashlib.sha1(s.encode()).hexdigest()[:8]


def load_prompts(data: str | os.PathLike | None = None, instruction: str = "default") -> Prompts:
    """Read prompts.json; `instruction` is "default" (Ouyang et al. 2022, ends in 'reply "I have no comment"
    unless ...') or "informative" (the same without that clause)."""
    path = _need(data_dir(data) / "prompts.json")
    try:
        p = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    keys = ["qa_primer", f"instruction_{instruction}", "generation_prompt_layout", "judge_prompt_truth",
            "judge_prompt_info"]
    if f"instruction_{instruction}" not in p:
        choices = sorted(k[len("instruction_"):] for k in p if k.startswith("instruction_"))
        raise ValueError(f"{path}: no instruction {instruction!r}; expected one of {choices}")
    missing = [k for k in keys if k not in p]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")

    def unescape(s: str) -> str:  # the layouts are stored with written-out "\n"
        return s.replace("\\n", "\n")

    pr = Prompts(instruction=p[f"instruction_{instruction}"], qa_primer=p["qa_primer"],
                 layout=unescape(p["generation_prompt_layout"]), judge_truth_layout=unescape(p["judge_prompt_truth"]),
                 judge_info_layout=unescape(p["judge_prompt_info"]))
    if not pr.layout.endswith("Q: {question}\nA:") or "{instruction}" not in pr.layout:
        raise ValueError(f"{path}: generation_prompt_layout {pr.layout!r}: expected "
                         "'{instruction}...{qa_primer}...Q: {question}\\nA:'")
    return pr


# ----------------------------------------------------------------------------------------------------------
# Probe examples and preference pairs


@dataclass
class ProbeExample:
    """One probe text; probes read the last token's head outputs o_h^l. text is PROBE_LAYOUTS[layout]: "paper"
    "Q: {question}\\nA: {answer}\\nQ: {other}" (other_qid: the random question), "iti" "Q: {question}\\nA: {answer}"."""
    qid: int
    text: str
    label: int  # 1 true answer, 0 false answer
    other_qid: int | None = None  # "paper": the qid of the random question after the answer; "iti": None


def probe_examples(questions: list[Question], qids: list[int], layout: str = "paper", seed: int = 0
                   ) -> list[ProbeExample]:
    """Every true and every false reference answer of each question in `qids` (in that order), as ITI's
    tqa_gen datasets do, laid out as PROBE_LAYOUTS[layout].

    "paper" appends x_random: a question drawn uniformly from the other questions of `qids` (never one outside
    them, so nothing leaks in from another part of the split), for the j-th example of question qid by
    random.Random(f"probe-other:{seed}:{qid}:{j}") from the sorted other qids: deterministic under `seed` and
    independent of the order of `qids`."""
    if layout not in PROBE_LAYOUTS:
        raise ValueError(f"probe layout {layout!r}: expected one of {sorted(PROBE_LAYOUTS)}")
    qs = _by_qid(questions, qids)
    pool = sorted(set(qids))  # the candidates for x_random
    if layout == "paper" and len(pool) < 2:
        raise ValueError(f"probe layout 'paper' needs at least 2 questions to draw x_random from, got qids {pool}")
    index = {q.qid: q for q in qs}
    out = []
    for q in qs:
        others = [i for i in pool if i != q.qid]
        answers = [(1, a) for a in q.correct] + [(0, a) for a in q.incorrect]
        for j, (label, a) in enumerate(answers):
            other = random.Random(f"probe-other:{seed}:{q.qid}:{j}").choice(others) if layout == "paper" else None
            text = PROBE_LAYOUTS[layout].format(question=q.question, answer=a,
                                                other=index[other].question if other is not None else "")
            out.append(ProbeExample(qid=q.qid, text=text, label=label, other_qid=other))
    return out


@dataclass
class Pair:
    qid: int
    question: str
    chosen: str  # y+, a true answer
    rejected: str  # y-, a false answer


def preference_pairs(questions: list[Question], qids: list[int]) -> list[Pair]:
    """Every (true, false) answer pair of each question: the IPO data (x, y+, y-). v0 with the default split
    (seed 0) gives 6,560-odd training pairs, the paper's count."""
    qs = _by_qid(questions, qids)
    pairs = [Pair(q.qid, q.question, c, r) for q in qs for c in q.correct for r in q.incorrect]
    _log(f"preference pairs: {len(pairs)} from {len(qs)} questions")
    return pairs


# ----------------------------------------------------------------------------------------------------------
# GPT-judge fine-tuning lines


def load_judge_lines(data: str | os.PathLike | None = None, kind: str = "truth", version: str = "v0"
                     ) -> list[tuple[str, str, int]]:
    """(question, answer, label) of each line of finetune_{kind}.jsonl, label 1 for " yes". Duplicates and the
    few conflicting duplicates are kept as released; the judge merges them."""
    if kind not in ("truth", "info"):
        raise ValueError(f"judge kind {kind!r}: expected 'truth' or 'info'")
    path = version_dir(data, version) / f"finetune_{kind}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing judge file (only v0 ships finetune_*.jsonl; use version='v0')")
    end = "\nTrue:" if kind == "truth" else "\nHelpful:"
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            prompt, completion = d["prompt"], d["completion"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected {{\"prompt\", \"completion\"}} JSON ({e!r})") from None
        k = prompt.find("\nA:")
        if (not prompt.startswith("Q: ") or k < 0 or not prompt.endswith(end)
                or completion.strip() not in ("yes", "no")):
            raise ValueError(f"{path}:{n}: expected prompt 'Q: ...\\nA: ...{end!r}' and completion ' yes'/' no'")
        question = prompt[3:k].strip()
        answer = prompt[k + 3:len(prompt) - len(end)].strip()
        out.append((question, answer, int(completion.strip() == "yes")))
    return out
