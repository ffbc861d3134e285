"""run.py: the command line. One run = split + heads + edit + metrics, written to runs/<name>/.

    python run.py --heads random16                    # IPO at 16 random heads vs the base model (default sizes)
    python run.py --heads probe16 --method both       # IPO and ITI at the 16 best-probed heads
    python run.py --heads random16 --paper            # the paper's full settings (all pairs, 2 epochs)
    python run.py audit runs/<name>/ipo/edit.safetensors   # where an edit enters, head by head
    python run.py experiment ipo-random --quick       # one of the paper's figures (experiments.py)
    python run.py localize --heads probe16            # a candidate head set against null sets (localize.py)
    python run.py --heads probe16 --pairs FILE.jsonl  # any behaviour as preference pairs (pairs.py)

Every step writes its result into the run directory before the next starts, so an interrupted run resumes
where it stopped when the same command is given again, and a finished run does no work.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from gguf import cache_dir
from llama import _fmt_s, interrupted_message, note_kept, write_file_atomic

ROOT = Path(__file__).resolve().parent


class UserError(Exception):
    """A mistake in the command line or the inputs: one line, exit status 2, no traceback."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_atomic(path: Path, text: str) -> Path:
    return write_file_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, obj) -> Path:
    return write_atomic(path, json.dumps(obj, indent=1, default=_json_default))


def _json_default(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v)}")


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class RunConfig:
    heads: str = "random16"
    method: str = "ipo"  # ipo | iti | both
    model: str = "smollm2-135m"
    data: str | None = None
    version: str = "v0"
    seed: int = 0  # the split, the probes and (unless train_seed) the IPO initialisation and pair order
    head_seed: int = 0  # which random head set randomK draws
    train_seed: int | None = None  # the IPO initialisation and pair order alone (None: seed); split, probes unchanged
    tau: float = 0.1
    lr: list[float] | None = None  # the learning-rate grid; None: lr_factors x the paper's rate for the head count
    lr_factors: list[float] = field(default_factory=lambda: [16.0])  # experiments at paper size: ipo.LR_FACTORS
    scale: float = 1.0  # LoRA scaling lora_alpha / r
    epochs: int = 1  # the step budget, in passes over the training pairs; the stopping rule usually ends sooner
    batch_size: int = 4
    max_pairs: int | None = 1200  # subsample of the ~6,560 training pairs (None: all)
    val_questions: int = 32  # the fixed validation subsample: every pair of this many validation questions
    eval_every: int = 10  # validate every this many steps
    patience: int = 4  # stop after this many validations without a gain of min_delta (relative)
    min_delta: float = 0.002
    probe_layout: str = "paper"  # probe examples: "paper" (x, y, x_random) or "iti" ("Q: x\nA: y"); pairs: "raw"
    pairs: str | None = None  # a preference-pairs file (pairs.py) instead of TruthfulQA
    pairs_format: str = "pairs"  # "pairs" (prompt/chosen/rejected JSONL) or "persona" (Anthropic's persona files)
    judge_model: str | None = None  # an external judge model directory (judge.ExternalJudge); None: editloc's
    alpha: float = 5.0  # ITI strength (ITI used 15 on 7B models; 15 breaks SmolLM2-135M, 5 does not)
    n_test: int | None = None  # None: every test question
    kl_text: str | None = None
    dtype: str = "auto"  # resolved to "bf16" or "fp32" before the run starts (llama.fast_dtype)
    device: str = "cpu"

    @property
    def full_model(self) -> bool:
        return self.heads == "full"

    def slug(self) -> str:
        h = self.heads.replace(":", "").replace(",", "+")
        if len(h) > 40:
            h = "heads-" + hashlib.sha1(h.encode()).hexdigest()[:8]
        hs = f"-h{self.head_seed}" if self.heads.startswith("random") else ""
        t = f"-t{self.tau:g}" if self.method != "iti" else ""
        r = f"-r{self.train_seed}" if self.train_seed is not None and self.method != "iti" else ""
        tag = lambda p: "-" + re.sub(r"[^A-Za-z0-9._-]", "", p)[:40]  # other data, another model: another name
        m = "" if self.model == RunConfig.model else tag(Path(self.model).name)
        pf = "" if not self.pairs else tag(Path(self.pairs).stem)
        return f"{self.method}-{h}{hs}-s{self.seed}{r}{t}{pf}{m}"

    def training_dict(self) -> dict:
        """The settings that change what a run computes (not where it writes)."""
        return asdict(self)


DTYPE_HELP = ("model dtype; auto (default): bf16 on a GPU, and on a CPU whichever of bf16 and fp32 runs its "
              "matmuls faster, measured once per machine; the run records the dtype used")
JOBS_HELP = ("runs at once, in that many worker processes sharing the cores (default 1); on a 2-core CPU --jobs 2 "
             "trains about 1.4x as fast as one process in bf16, 1.2x in fp32 (README, On one machine); a run's "
             "numbers depend on its thread count (each records it)")
PROBE_LAYOUT_TEXT = {"paper": "the paper's (x, y, x_random): question, answer, another random training question",
                 "iti": "ITI's (x, y): question and answer",
                 "raw": "the pairs file's prompt as written, then the chosen or rejected answer"}
PAPER = dict(epochs=2, max_pairs=None, n_test=None)  # the paper's settings (tau, lr by head count, batch 4)


def add_run_args(p: argparse.ArgumentParser) -> None:
    from ipo import LR_FACTORS

    d = RunConfig()
    grid = ",".join(f"{f:g}" for f in LR_FACTORS)
    p.add_argument("--heads", required=True, metavar="SPEC",
                   help="probeK | randomK | all | single:L.H | L.H,L.H,... | full (plain LoRA on every layer)")
    p.add_argument("--method", choices=("ipo", "iti", "both"), default=d.method)
    p.add_argument("--model", default=d.model, help="a model name (smollm2-135m), an HF directory or a .gguf file")
    p.add_argument("--data", default=None, help="TruthfulQA directory (default $TRUTHFULQA_DIR or ../shared/data/truthfulqa)")
    p.add_argument("--version", choices=("v0", "v1"), default=d.version)
    p.add_argument("--seed", type=_nonneg_int, default=d.seed, help="split, probe and IPO seed")
    p.add_argument("--head-seed", type=_nonneg_int, default=d.head_seed, help="seed of the randomK head set")
    p.add_argument("--train-seed", type=_nonneg_int, default=None,
                   help="seed of the IPO initialisation and pair order alone (default: --seed); the split, probes "
                        "and test questions stay those of --seed, so runs differing only here measure training noise")
    p.add_argument("--tau", type=_positive_list, default=[d.tau],
                   help="IPO tau, or a list (0.1,0.3,0.5: one run each, and the Truth-Info curve over them)")
    p.add_argument("--lr", type=_positive_list, default=None,
                   help="IPO learning rate, or a grid to select from by validation loss (default: --lr-factors)")
    p.add_argument("--lr-factors", type=_positive_list, default=d.lr_factors,
                   help="the learning-rate grid as multiples of the paper's rate for the head count (2e-3 one head, "
                        f"5e-4 sixteen, 1e-4 full; the full model also tries 4x the largest); default "
                        f"{d.lr_factors[0]:g}, the multiple the selection chose at every head count measured; "
                        f"experiments at --paper size select from {grid}")
    p.add_argument("--lora-scale", type=_positive, default=d.scale, help="LoRA scaling lora_alpha / r (default 1)")
    p.add_argument("--epochs", type=_pos_int, default=None,
                   help=f"IPO step budget in epochs (default {d.epochs}; paper 2); training stops sooner once converged")
    p.add_argument("--patience", type=_pos_int, default=d.patience,
                   help=f"validations without a {d.min_delta:g} relative gain before stopping (default {d.patience})")
    p.add_argument("--eval-every", type=_pos_int, default=d.eval_every,
                   help=f"steps between validations (default {d.eval_every})")
    p.add_argument("--val-questions", type=_pos_int, default=d.val_questions,
                   help=f"validation questions whose pairs the stopping rule reads (default {d.val_questions})")
    p.add_argument("--probe-layout", choices=("paper", "iti"), default=d.probe_layout,
                   help="probe examples: paper (question, answer, a random other question) or iti (question, answer)")
    p.add_argument("--pairs", default=None, metavar="FILE",
                   help="any behaviour: a JSONL of {prompt, chosen, rejected[, split]} lines instead of TruthfulQA "
                        "(measured by held-out preference accuracy, MC and KL; no judges; probes read prompt + answer)")
    p.add_argument("--pairs-format", choices=("pairs", "persona"), default=d.pairs_format,
                   help="persona: read Anthropic's persona files (../shared/data/persona) directly")
    p.add_argument("--judge-model", default=None, metavar="DIR",
                   help="judge Truth and Info with an external judge model: an HF Llama causal LM answering the "
                        "GPT-judge prompt with ' yes' / ' no' (e.g. the Llama-2-7B judges), or DIR with truth/ and "
                        "info/ subdirectories (default: editloc's judges, judge.py)")
    p.add_argument("--batch-size", type=_pos_int, default=d.batch_size)
    p.add_argument("--max-pairs", type=_pos_int_or_all, default=None,
                   help=f"training pairs used (default {d.max_pairs}; 'all' for every pair)")
    p.add_argument("--alpha", type=_finite, default=d.alpha, help="ITI strength alpha")
    p.add_argument("--n-test", type=_pos_int_or_all, default=None, help="test questions evaluated (default all)")
    p.add_argument("--kl-text", default=None, help="a text file (one text per line) for KL and CE")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default=d.dtype, help=DTYPE_HELP)
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    p.add_argument("--paper", action="store_true", help="the paper's full settings: all pairs, 2 epochs")
    p.add_argument("--out", default="runs", help="directory of runs (default runs/)")
    p.add_argument("--name", default=None, help="run name (default from method, heads and seeds)")


def _number(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None


def _finite(s: str) -> float:
    v = _number(s)
    if not math.isfinite(v):  # nan or inf would also make the run's settings unequal to themselves
        raise argparse.ArgumentTypeError(f"{s!r}: expected a finite number")
    return v


def _positive(s: str) -> float:
    v = _number(s)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{s!r}: expected a finite number > 0")
    return v


def _positive_list(s: str) -> list[float]:
    parts = [x.strip() for x in s.split(",")]
    if not parts or any(not x for x in parts):
        raise argparse.ArgumentTypeError(f"{s!r}: expected a number > 0 or a comma-separated list of them")
    return [_positive(x) for x in parts]


def _pos_int(s: str) -> int:
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: expected an integer >= 1")
    return int(s)


def _nonneg_int(s: str) -> int:
    if not s.isdigit():
        raise argparse.ArgumentTypeError(f"{s!r}: expected an integer >= 0")
    return int(s)


def _pos_int_or_all(s: str):
    return "all" if s == "all" else _pos_int(s)


def resolve_dtype(dtype: str, device: str) -> str:
    """ "bf16" or "fp32": "auto" becomes the faster one on this machine (llama.fast_dtype)."""
    from llama import fast_dtype

    return fast_dtype(device) if dtype == "auto" else dtype


def config_from_args(a: argparse.Namespace) -> RunConfig:
    c = RunConfig(heads=a.heads.strip(), method=a.method, model=a.model, data=a.data, version=a.version,
                  seed=a.seed, head_seed=a.head_seed, train_seed=a.train_seed, tau=a.tau[0], lr=a.lr, lr_factors=a.lr_factors,
                  scale=a.lora_scale,
                  batch_size=a.batch_size, patience=a.patience, eval_every=a.eval_every,
                  val_questions=a.val_questions, probe_layout=a.probe_layout, alpha=a.alpha, kl_text=a.kl_text,
                  dtype=a.dtype, device=a.device, pairs=a.pairs, pairs_format=a.pairs_format,
                  judge_model=a.judge_model)
    if a.paper:
        c = replace(c, **PAPER)
    if a.epochs is not None:
        c.epochs = a.epochs
    if a.max_pairs is not None:
        c.max_pairs = None if a.max_pairs == "all" else a.max_pairs
    if a.n_test is not None:
        c.n_test = None if a.n_test == "all" else a.n_test
    if not re.fullmatch(r"(probe|random)\d+|all|full|single:\d+\.\d+|\d+\.\d+(,\d+\.\d+)*", c.heads):
        raise UserError(f"--heads {a.heads!r}: expected probeK, randomK, all, full, single:L.H or L.H,L.H,...")
    if (os.sep in c.model or c.model.endswith(".gguf")) and not Path(c.model).exists():
        raise UserError(f"--model {c.model}: no such file or directory; expected a model name ({RunConfig.model}), "
                        "an HF model directory or a .gguf file")
    if c.full_model and c.method != "ipo":
        raise UserError("--heads full is the plain LoRA on every layer: use it with --method ipo")
    if c.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    cache_dir()  # $EDITLOC_CACHE must be a directory
    c.dtype = resolve_dtype(c.dtype, c.device)
    if c.kl_text:
        read_kl_text(Path(c.kl_text))
    if c.judge_model and not (Path(c.judge_model) / "config.json").is_file() and not (
            Path(c.judge_model) / "truth" / "config.json").is_file():
        raise UserError(f"--judge-model {c.judge_model}: not an HF model directory (no config.json, nor truth/ "
                        "and info/ holding one)")
    if c.pairs:
        import pairs

        pairs.load_pairs(c.pairs, c.pairs_format, c.seed)  # a malformed file fails now, naming its line
        c.probe_layout = "raw"
    return c


def read_kl_text(path: Path) -> list[str]:
    """The texts of a KL/CE text file, one a line (blank lines skipped): UTF-8, at least one text."""
    if not path.is_file():
        raise UserError(f"--kl-text {path}: no such file")
    try:
        lines = [l.rstrip("\n") for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"--kl-text {path}: not UTF-8 text ({e})") from None
    if not lines:
        raise UserError(f"--kl-text {path}: the file has no text (expected one text per line)")
    return lines


# ----------------------------------------------------------------------------------------------------------
# The pieces of a run, shared by every run in one process (model, data, judges, probes)


class Context:
    """Loads each shared input once: the model, the data and split, the prompts, the probes, the judges."""

    def __init__(self, cfg: RunConfig):
        import truthfulqa
        from llama import Llama
        from tokenizer import Tokenizer

        self.cfg = cfg
        t = time.time()
        if cfg.pairs:  # any behaviour: questions, split and prompts from a pairs file (pairs.py)
            import pairs

            ps = pairs.load_pairs(cfg.pairs, cfg.pairs_format, cfg.seed)
            self.questions, self.split, self.prompts = ps.questions, ps.split, ps.prompts
            data = f"{ps.path} ({ps.n_pairs} pairs, {len(ps.questions)} prompts"
        else:
            self.questions = truthfulqa.load_questions(cfg.data, cfg.version)  # the data first: it reads in a second
            self.split = truthfulqa.make_split(self.questions, seed=cfg.seed)
            self.prompts = truthfulqa.load_prompts(cfg.data)
            for kind in ("truth", "info"):  # the judges' data, read (and the judges trained) only at evaluation
                truthfulqa.load_judge_lines(cfg.data, kind, "v0")
            data = f"TruthfulQA {cfg.version} ({len(self.questions)} questions"
        self.by_qid = {q.qid: q for q in self.questions}
        self.model = Llama.from_pretrained(cfg.model, dtype=cfg.dtype, device=cfg.device)
        self.tok = Tokenizer.from_pretrained(self.model.source)
        self.model_name = cfg.model if "/" not in cfg.model else Path(cfg.model).name
        self._probes = {}  # probe layout -> ProbeResult
        self._judges = None
        log(f"loaded {cfg.model} ({cfg.dtype}, {cfg.device}) and {data}: {len(self.split.train)} train / "
            f"{len(self.split.val)} val / {len(self.split.test)} test) in {time.time() - t:.1f}s")

    def key(self, cfg: RunConfig) -> tuple:
        """What the loaded pieces depend on: runs with the same key share one Context."""
        return (cfg.model, cfg.dtype, cfg.device, cfg.data, cfg.version, cfg.seed, cfg.pairs, cfg.pairs_format,
                cfg.judge_model)

    @property
    def judged(self) -> bool:
        """Whether answers are generated and judged (TruthfulQA) or the behaviour is measured without judges."""
        return not self.cfg.pairs

    @property
    def test(self) -> list:
        """The evaluated test questions (the first n_test of the split's test questions)."""
        return [self.by_qid[i] for i in self.split.test][:self.cfg.n_test]

    @property
    def probe(self):
        """The probe result on the training questions in the run's probe layout (activations cached on disk by
        probe.py)."""
        layout = self.cfg.probe_layout
        if layout not in self._probes:
            import probe

            self._probes[layout] = probe.probe_heads(self.model, self.tok, self.questions, self.split,
                                                     model_name=self.model_name, version=self.cfg.version,
                                                     seed=self.cfg.seed, device=self.cfg.device, layout=layout)
        return self._probes[layout]

    @property
    def judges(self):
        if self._judges is None and self.cfg.judge_model:
            import judge

            self._judges = tuple(judge.load_external_judges(self.cfg.judge_model, data=self.cfg.data,
                                                            device=self.cfg.device).values())
        if self._judges is None:
            import judge

            shared = dict(model=self.model, tokenizer=self.tok) if (
                self.cfg.model == judge.BACKBONE and self.cfg.device == "cpu") else {}
            self._judges = tuple(judge.load_judges(("truth", "info"), data=self.cfg.data, version="v0",
                                                   **shared).values())
            if self.cfg.version != "v0":  # the judges read the references of the questions this run asks
                for j in self._judges:
                    j.refs = {**(j.refs or {}), **judge.references(self.cfg.data, self.cfg.version)}
        return self._judges

    def kl_texts(self) -> list[str]:
        """The off-target text of KL and CE: --kl-text, or the neutral English text shipped with editloc."""
        import metrics

        return read_kl_text(Path(self.cfg.kl_text) if self.cfg.kl_text else metrics.NEUTRAL_TEXT)

    def qa_texts(self) -> list[str]:
        """The in-domain text of KL_qa and CE_qa: each test question with its best answer (a pairs file: each
        test prompt with its first chosen answer)."""
        import metrics

        return metrics.qa_texts(self.test) if self.judged else [q.question + q.best for q in self.test]

    def check_heads(self, cfg: RunConfig) -> None:
        """Fail now, before the probes run, when the head spec names no head set of this model."""
        import probe

        if not cfg.full_model:
            try:
                probe.check_heads(cfg.heads, self.model.cfg.n_layers, self.model.cfg.n_heads)
            except ValueError as e:
                raise UserError(str(e)) from None

    def mask(self, cfg: RunConfig) -> torch.Tensor | None:
        """The head mask [L, H] of the run (None for the full-model LoRA)."""
        import probe

        if cfg.full_model:
            return None
        c = self.model.cfg
        acc = self.probe.acc if probe.needs_probe(cfg.heads) else None
        try:
            return probe.parse_heads(cfg.heads, c.n_layers, c.n_heads, acc=acc, seed=cfg.head_seed)
        except ValueError as e:
            raise UserError(str(e)) from None


# ----------------------------------------------------------------------------------------------------------
# Evaluation


METRICS = ("truth", "info", "truth_info", "repetitive", "mc1", "mc2", "mc3", "pref_acc", "pref_margin", "kl", "ce", "kl_qa",
           "ce_qa")  # a pairs file's runs have no truth, info, truth_info (no judges)


def evaluate(ctx: Context, edit, label: str, parts: Path | None = None) -> dict:
    """Generation + judges, MC1/2/3 and KL/CE on the test questions with `edit` active (None: the base model).
    Returns the aggregate figures with 95% bootstrap intervals and every per-question value. Each of the
    pieces (a minute or more each) is kept in `parts` (JSON) as it is done, so that an interrupted evaluation
    resumes from there; the caller deletes `parts` once the whole evaluation is saved."""
    import metrics

    t0 = time.time()
    qs = ctx.test
    log(f"[{label}] evaluating on {len(qs)} test questions")
    have = json.loads(parts.read_text()) if parts is not None and parts.exists() else {}
    if have:
        log(f"[{label}] resuming: {', '.join(have)} saved by an interrupted evaluation")

    secs = {}  # the wall time of each piece computed now (a resumed evaluation: the pieces it computed)

    def piece(name: str, compute):
        if name not in have:  # stored as JSON and read back, so a resumed evaluation computes the same numbers
            t = time.time()
            have[name] = json.loads(json.dumps(compute(), default=_json_default))
            secs[name] = time.time() - t
            if parts is not None:
                write_json(parts, have)
                note_kept("evaluation", f"the {label} evaluation's {', '.join(have)} (in {parts})")
        return have[name]

    if ctx.judged:
        answers = piece("answers", lambda: metrics.generate_answers(ctx.model, ctx.tok, ctx.prompts, qs, edit=edit))
        ids = judge_ids(ctx)
        if have.get("truth_info", {}).get("judges", ids) != ids:  # saved before the judges changed: judged again
            del have["truth_info"]
        ti = piece("truth_info", lambda: {**metrics.truth_info(*ctx.judges, qs, answers), "judges": ids})
    if "pairs" not in have.get("pref", {"pairs": None}):  # saved by an older editloc, without the pair margins
        del have["pref"]
    mc = piece("mc", lambda: metrics.mc_scores(ctx.model, ctx.tok, ctx.prompts, qs, edit=edit))
    pref = piece("pref", lambda: metrics.preference(ctx.model, ctx.tok, ctx.prompts, qs, edit=edit))
    base_cache = cache_dir() / "evals"  # the base model's residuals on the KL texts, computed once per machine
    kl = piece("kl", lambda: metrics.kl_ce(ctx.model, ctx.tok, ctx.kl_texts(), edit=edit, every_position=True,
                                           base_cache=base_cache))  # off-target
    kl_qa = piece("kl_qa", lambda: metrics.kl_ce(ctx.model, ctx.tok, ctx.qa_texts(), edit=edit,
                                                 base_cache=base_cache))  # in-domain
    note_kept("evaluation", None)
    per = {"mc1": mc["per_question"]["mc1"], "mc2": mc["per_question"]["mc2"], "mc3": mc["per_question"]["mc3"],
           "pref_acc": pref["per_question"]["pref_acc"], "pref_margin": pref["per_question"]["pref_margin"],
           "kl": kl["per_text"]["kl"], "ce": kl["per_text"]["ce"], "kl_tokens": kl["per_text"]["tokens"],
           "kl_qa": kl_qa["per_text"]["kl"], "ce_qa": kl_qa["per_text"]["ce"], "kl_qa_tokens": kl_qa["per_text"]["tokens"]}
    figures = {k: {"value": float(np.mean(per[k])), "ci95": metrics.bootstrap_ci(per[k])}
               for k in ("mc1", "mc2", "mc3", "pref_margin")}
    figures["pref_acc"] = {"value": pref["pref_acc"], "ci95": metrics.bootstrap_ci(per["pref_acc"])}  # over pairs
    for k in ("kl", "ce"):  # token-weighted means, and intervals of the same (texts resampled)
        for sfx, r in (("", kl), ("_qa", kl_qa)):
            n = r["per_text"]["tokens"]
            figures[k + sfx] = {"value": r[k], "ci95": metrics.bootstrap_ci_ratio(
                [v * t for v, t in zip(r["per_text"][k], n)], n)}
    ev = {"label": label, "figures": figures, "per_question": per, "qids": [q.qid for q in qs], "generations": [],
          "n_test": len(qs), "kl_texts": len(kl["per_text"]["kl"]), "judges": [], "pairs": pref["pairs"]}
    if ctx.judged:
        apply_judges(ev, qs, answers, ti, judge_ids(ctx))
    ev["seconds"] = dt = time.time() - t0
    ev["piece_seconds"] = secs
    log(f"[{label}] " + " ".join(f"{k} {ev['figures'][k]['value']:.3f}" for k in METRICS if k in ev["figures"])
        + f" ({dt:.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in secs.items()) + ")")
    return ev


JUDGED = ("truth", "info", "truth_score", "info_score")  # what the judges give each answer


def judge_ids(ctx: Context) -> list:
    """Which judges score this context's answers: each one's data checksum and training time (an external
    judge: its path), and the rule beside its head (judge.VERBATIM) where it has one. Saved with every evaluation,
    so that answers judged by other judges are judged again."""
    return [[j.meta.get("data_sha256"), j.meta.get("created")] + ([j.rule] if getattr(j, "rule", None) else [])
            for j in ctx.judges] if ctx.judged else []


def apply_judges(ev: dict, qs: list, answers: list[str], ti: dict, ids: list) -> None:
    """Put the judges' verdicts (metrics.truth_info's `ti` on `answers`) into the evaluation `ev`: per-question
    values, Truth, Info, their mean scores, Truth*Info (eq. of the paper: product of the two means), the
    generations, and which judges gave them. Replaces any earlier verdicts."""
    import metrics

    judged = {k: ti["per_question"][k] for k in JUDGED}
    ev["per_question"] = {**judged, **{k: v for k, v in ev["per_question"].items() if k not in judged}}
    figs = {k: {"value": float(np.mean(v)), "ci95": metrics.bootstrap_ci(v)} for k, v in judged.items()}
    figs["truth_info"] = {"value": figs["truth"]["value"] * figs["info"]["value"],
                          "ci95": metrics.bootstrap_ci_product(judged["truth"], judged["info"])}
    ev["figures"] = {**figs, **{k: v for k, v in ev["figures"].items() if k not in figs}}
    ev["generations"] = [{"qid": q.qid, "question": q.question, "answer": a, **{k: judged[k][n] for k in JUDGED}}
                         for n, (q, a) in enumerate(zip(qs, answers))]
    ev["judges"] = ids
    add_repetition(ev)


def add_repetition(ev: dict) -> None:
    """The fraction of degenerate answers (metrics.repetitive), per question and overall, from ev's generations:
    beside Truth and Info, as a judge-free sign that they judge lines unlike any they were trained on."""
    import metrics

    r = [float(metrics.repetitive(g["answer"])) for g in ev["generations"]]
    ev["per_question"]["repetitive"] = r
    ev["figures"]["repetitive"] = {"value": float(np.mean(r)), "ci95": metrics.bootstrap_ci(r)}


def stale(ctx: Context, ev: dict) -> list[str]:
    """What a saved evaluation lacks against the current code and judges (empty: up to date)."""
    return ([k for k, bad in (("judges", ev.get("judges") != judge_ids(ctx)),
                              ("repetitive", "repetitive" not in ev["per_question"])) if bad] if ctx.judged else []
            ) + (["pairs"] if "pairs" not in ev else [])


def refresh(ctx: Context, ev: dict, edit) -> bool:
    """Bring a saved evaluation up to date without redoing it (see `stale`): answers judged by other judges than
    the current ones are judged again, the repetitive answers counted, and every test pair's preference margin
    (saved since 2026-11-30) computed with `edit`. True when `ev` changed."""
    import metrics

    todo = stale(ctx, ev)
    if "judges" in todo:
        rejudge(ctx, ev)  # counts the repetitive answers too
    elif "repetitive" in todo:
        add_repetition(ev)
    if "pairs" in todo:
        ev["pairs"] = metrics.preference(ctx.model, ctx.tok, ctx.prompts, [ctx.by_qid[q] for q in ev["qids"]],
                                         edit=edit)["pairs"]
    return bool(todo)


def rejudge(ctx: Context, ev: dict) -> dict:
    """An evaluation's saved answers judged again by the current judges (nothing else is recomputed)."""
    import metrics

    t = time.time()
    qs = [ctx.by_qid[q] for q in ev["qids"]]
    answers = [g["answer"] for g in ev["generations"]]
    apply_judges(ev, qs, answers, metrics.truth_info(*ctx.judges, qs, answers), judge_ids(ctx))
    log(f"[{ev['label']}] judged again by the current judges ({len(answers)} saved answers, {time.time() - t:.0f}s): "
        + " ".join(f"{k} {ev['figures'][k]['value']:.3f}" for k in ("truth", "info", "truth_info")))
    return ev


# part of the base evaluation's cache key (the judges are not: see base_eval); bumped when the numbers
# an unchanged model gives change (2: fp32 generation through oneDNN's kernel, llama.linear; 3: KL on the
# neutral text and KL_qa; 4: per-text token counts, token-weighted KL/CE intervals; 5: preference accuracy)
BASE_EVAL_VERSION = 5


def base_eval(ctx: Context) -> dict:
    """The base model's evaluation, cached across runs (keyed by everything it depends on but the judges: answers
    judged by other judges are judged again, as a run's are)."""
    key = hashlib.sha256(json.dumps([BASE_EVAL_VERSION, ctx.model.source, ctx.cfg.dtype, ctx.cfg.version,
                                     ctx.cfg.seed, [q.qid for q in ctx.test], ctx.prompts.layout_id, ctx.judged,
                                     ctx.cfg.judge_model,
                                     hashlib.sha256("\n".join(ctx.kl_texts()).encode()).hexdigest()],
                                    default=str).encode()).hexdigest()[:16]
    path = cache_dir() / "evals" / f"base-{key}.json"
    if path.exists():
        ev = json.loads(path.read_text())
        if refresh(ctx, ev, None):
            write_json(path, ev)
        return ev
    parts = path.with_suffix(".parts.json")
    ev = evaluate(ctx, None, "base", parts)
    write_json(path, ev)
    parts.unlink(missing_ok=True)
    return ev


# ----------------------------------------------------------------------------------------------------------
# One run


CHEAP_FILES = {"config.json", "split.json"}  # written before any costly step of a run


def check_run_dir(d: Path, cfg: RunConfig) -> bool:
    """Whether `d` holds work of this run to resume (True) or nothing yet (False). A directory whose run did
    some work (anything beyond config.json and split.json) with other settings is refused; one whose run never
    got that far is not claimed, and the new run takes it over."""
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        return False
    work = sorted(p.name for p in d.iterdir() if p.name not in CHEAP_FILES)
    try:
        old = {**asdict(RunConfig()), **json.loads(cfg_path.read_text())}  # settings added since: their defaults
    except (OSError, ValueError, TypeError) as e:
        if work:
            raise UserError(f"{cfg_path}: unreadable ({e}); choose another --name or --out") from None
        return False
    diff = sorted(k for k in old if old.get(k) != cfg.training_dict().get(k))
    if diff and work:
        raise UserError(f"{d}: holds a run with other settings (differs in {', '.join(diff)}); "
                        "choose another --name or --out")
    if diff:
        log(f"{d}: taking over the directory of a run that never started work (it differed in {', '.join(diff)})")
    return bool(work)


def check_lr_grid(d: Path, cfg: RunConfig, res: dict) -> None:
    """A finished IPO run must have been trained on the learning-rate grid the current rule gives its head count
    (ipo.lr_grid): a run trained on another grid is not the optimum the comparisons assume."""
    import ipo

    grid = ((res or {}).get("ipo") or {}).get("selection", {}).get("grid")
    if cfg.lr or not grid:
        return
    mask = None if cfg.full_model else torch.ones(len(res["heads"]), dtype=torch.bool)  # only the count matters
    want = sorted(ipo.lr_grid(mask, cfg.lr_factors))
    got = sorted(g["lr"] for g in grid if not g.get("below_grid") and g.get("patience_factor", 1) == 1)  # by the rule
    if len(want) != len(got) or not np.allclose(want, got, rtol=1e-6, atol=0):
        raise UserError(f"{d}: trained on the learning rates {', '.join(f'{x:g}' for x in got)}, but the current "
                        f"rule gives {', '.join(f'{x:g}' for x in want)} (ipo.lr_grid); move the directory away to "
                        "train this edit again")


def reselect(d: Path, cfg: RunConfig, meta: dict | None) -> bool:
    """An IPO edit selected before select_ipo's current rule, which would now train more (ipo.next_try: the rate
    kept is too fast, and a rate below the grid or a lower rate with more patience is still to try; the edit
    kept spent its step budget and is to go on under a larger one; or it is above the full-model bound in
    d/ipo/bound.json): its edit, evaluation and results are removed, the rates trained stay (ipo/lr*/), so that
    the run selects again and is evaluated again. True if so."""
    import ipo

    sel = (meta or {}).get("selection")
    bound = full_bound(d)
    nxt = ipo.next_try(sel, cfg.eval_every, bound) if sel else None
    if not nxt:
        return False
    log(f"{d}: {nxt.why}; selecting again (the rates trained are kept)")
    for p in (d / "results.json", d / "eval_ipo.json", d / "eval_ipo.parts.json", d / "ipo" / "edit.safetensors"):
        p.unlink(missing_ok=True)
    return True


FULL_BOUND_TOL = 0.01  # relative slack of the full-model bound (validation losses of stopped, not exact, optima)


def full_bound(d: Path) -> float | None:
    """The validation IPO loss the full-model edit of run directory d is to reach (full_model_bounds), if one was
    set."""
    p = d / "ipo" / "bound.json"
    return json.loads(p.read_text())["val_loss"] if p.exists() else None


def bound_key(c: RunConfig) -> tuple:
    """IPO runs with the same key minimise the same loss on the same validation pairs, so a full-model edit's
    validation loss is bounded by every head set's of its key (full_model_bounds)."""
    return c.tau, c.seed, c.val_questions, c.data, c.version, c.pairs, c.pairs_format, c.model, c.dtype


RUN_COST = {"iti": 1, "heads": 4, "full": 7}  # a run's rough relative time (README, Wall time of the five figures:
# in fp32 an ITI run about 3.5 minutes, an IPO edit at a head set 10-16, the full model 15-31)


def run_cost(c: RunConfig) -> int:
    """A run's estimated relative time (RUN_COST), for splitting runs over machines (shard_of)."""
    return RUN_COST["iti" if c.method == "iti" else "full" if c.full_model else "heads"]


def shard_of(runs: list[tuple[str, RunConfig]], n: int) -> list[int]:
    """Which of n shards (machines) does each run, so that the shards' estimated costs (run_cost) are about
    equal and each full-model IPO edit is trained where the head sets that bound it are (full_model_bounds):
    it then trains toward its bound at once, as unsharded, and where no group had to be split the last,
    unsharded command only draws the report.
    Units: a full-model edit with every IPO run of its bound_key, every other run alone. The units, the costliest
    first, each go to the shard with the least cost so far (the lowest index on a tie); a unit that would take it
    past its share (the total over n) is split into its runs, which then go the same way (its full model is then
    trained on by the last command). Depends on the runs alone: every machine of an array computes the same."""
    key = lambda c: bound_key(c) if c.method == "ipo" else None
    full = {key(c) for _, c in runs if c.method == "ipo" and c.full_model}
    units: dict = {}  # a full model's bound_key, or ("run", k) -> the run indices
    for k, (_, c) in enumerate(runs):
        units.setdefault(key(c) if key(c) in full else ("run", k), []).append(k)
    total = lambda u: sum(run_cost(runs[k][1]) for k in u)
    share = total(range(len(runs))) / n
    order = lambda us: sorted(us, key=lambda u: (-total(u), u[0]))  # the costliest first
    todo, load, out = order(units.values()), [0] * n, [-1] * len(runs)
    while todo:
        u = todo.pop(0)
        s = min(range(n), key=lambda s: (load[s], s))  # the least loaded shard
        if len(u) > 1 and load[s] + total(u) > share:  # it would overfill the shard: its runs go one by one
            todo = order(todo + [[k] for k in u])
            continue
        load[s] += total(u)
        for k in u:
            out[k] = s
    return out


def full_model_bounds(runs: list[tuple[str, RunConfig]], res: dict[str, dict]) -> dict[str, dict]:
    """The full-model edits, by name, that a restriction of them beats on the validation pairs (or would: those not
    trained yet, where a head set is), each with the bound it is to reach. The edit at a head set is a restriction
    of the plain rank-1 LoRA on every layer (eq. 4.3 is eq. 4.1 with b^l = W^l b'^l), so at the optimum the full
    model's IPO loss is at most any head set's at the same tau; runs of one seed share their validation pairs, so
    a full model whose best validation loss is above a head set's by more than FULL_BOUND_TOL stopped short of its
    optimum. Only validation pairs decide (the test pairs stay for experiments.full_model_check)."""
    val = lambda n: (res[n].get("ipo") or {}).get("val_loss") if n in res else None
    out = {}
    for n, f in runs:
        if f.method != "ipo" or not f.full_model:
            continue
        others = [(val(m), m) for m, c in runs if c.method == "ipo" and not c.full_model and val(m) is not None
                  and bound_key(c) == bound_key(f)]
        if others and (n not in res or val(n) > min(others)[0] * (1 + FULL_BOUND_TOL)):
            v, m = min(others)
            out[n] = {"val_loss": v * (1 + FULL_BOUND_TOL), "edit": m, "edit_val_loss": v, "tol": FULL_BOUND_TOL}
    return out


def bound_before(runs: list[tuple[str, RunConfig]], out_root: Path, name: str) -> None:
    """Before run `name` (in out_root/name) is done: when it is a full-model edit that a finished head set's
    validation loss bounds (full_model_bounds), write the bound where its training reads it (ipo/bound.json), so
    that it trains on toward it at once (no evaluation to do again). Experiments do the full model last for this."""
    c = dict(runs)[name]
    if c.method != "ipo" or not c.full_model:
        return
    res = {n: json.loads((out_root / n / "results.json").read_text()) for n, _ in runs
           if (out_root / n / "results.json").exists()}
    b = full_model_bounds(runs, res).get(name)
    if b:
        write_json(out_root / name / "ipo" / "bound.json", b)
        log(f"{name}: the full model is to reach {b['edit']}'s validation IPO loss {b['edit_val_loss']:.4f} (it "
            "bounds every head set)")


def meet_full_model_bounds(runs: list[tuple[str, RunConfig]], res: dict[str, dict], out_root: Path,
                           ctx: Context, sharded: bool = False) -> list[str]:
    """Train again every full-model edit above its bound (full_model_bounds) as select_ipo's rule says
    (ipo.next_try: each rate once more with more patience), evaluate it again, and update res. Returns the names
    of the runs trained again. sharded: only say so (one of several shards must not train what another may)."""
    import ipo

    done = []
    short = {n: b for n, b in full_model_bounds(runs, res).items() if n in res}  # the trained ones
    if sharded and short:
        log(f"the full model stopped short of a head set's validation loss in {', '.join(short)}: run this command "
            "once without --shard to train it on (what is drawn now has it as it is)")
        return done
    for n, b in short.items():
        c = dict(runs)[n]
        write_json(out_root / n / "ipo" / "bound.json", b)
        log(f"{n}: best validation IPO loss {res[n]['ipo']['val_loss']:.4f}, above {b['edit']}'s "
            f"{b['edit_val_loss']:.4f}: the full model stopped short of its optimum (it bounds every head set)")
        if ipo.next_try(res[n]["ipo"]["selection"], c.eval_every, b["val_loss"]):
            res[n] = run(c, out_root, n, ctx)  # selects again (reselect), training what next_try says
            done.append(n)
        else:
            log(f"{n}: every learning rate was trained with more patience already; left as it is")
    return done


def strip_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without these flags and their values (`--jobs 2` and `--jobs=2` alike)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x in flags:
            skip = True
        elif not x.startswith(tuple(f + "=" for f in flags)):
            out.append(x)
    return out


def do_runs(runs: list[tuple[str, RunConfig]], mine: list[tuple[str, RunConfig]], out_root: Path, ctx: Context,
            jobs: int = 1, command: list[str] | None = None) -> None:
    """Do the runs `mine` of a command's `runs`, each told its full-model bound first (`bound_before`): one after
    another here, or with jobs > 1 those not yet finished in that many worker processes sharing the cores
    (`_in_workers`, each `python run.py *command` with --only; the finished ones are brought up to date here, which
    costs next to nothing). command: the command as given, e.g. ["experiment", "mc", "--jobs", "2"]."""
    done = lambda name: (out_root / name / "results.json").exists()
    here = mine if jobs <= 1 else [r for r in mine if done(r[0])]
    rest = [r for r in mine if r not in here]
    if len(rest) == 1:  # one run gets every core
        here, rest = mine, []
    for k, (name, c) in enumerate(here):
        log(f"--- run {k + 1}/{len(here)}: {name}")
        bound_before(runs, out_root, name)
        run(c, out_root, name, ctx)
    if rest:
        worker = strip_flags(command, ("--jobs", "--shard", "--dtype", "--only")) + ["--dtype", ctx.cfg.dtype]
        _in_workers(rest, out_root, ctx, jobs, worker)


def _tail(path: Path, n: int = 2000) -> list[str]:
    """The last lines of a worker's log (progress meters rewrite their line with a carriage return)."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - n))
        text = f.read().decode(errors="replace")
    return [s.strip() for s in text.replace("\r", "\n").splitlines() if s.strip()]


def _in_workers(todo: list[tuple[str, RunConfig]], out_root: Path, ctx: Context, jobs: int, worker: list[str]) -> None:
    """The runs `todo` in `jobs` worker processes, each `python run.py *worker --only NAME` with cores/jobs threads
    (jobs at most the runs to do) and its output in out_root/logs/NAME.log. At these sizes a bf16 step is bounded
    by per-call overhead more than by its matmuls, so two one-thread processes train 1.4x as fast as one
    two-thread process; an fp32 step is mostly matmuls, 1.2x (README, On one machine). A full-model IPO run starts
    once the head-set runs of its bound_key (its tau) among `todo` are done, as it would one after another (its
    bound needs them), and before the runs still waiting (it is the longest). A failed worker stops the others as
    Ctrl-C does (each saves where it is), and nothing new starts."""
    import subprocess

    ctx.probe  # what every run reads, made here once rather than by each worker at the same time
    if ctx.judged:
        ctx.judges
    base_eval(ctx)
    jobs = min(jobs, len(todo))  # fewer runs than jobs: the cores go to the runs there are
    threads = max(1, torch.get_num_threads() // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    logs = out_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    n, todo, running, t0, shown = len(todo), list(todo), {}, time.time(), time.time()
    heads = [(name, bound_key(c)) for name, c in todo if c.method == "ipo" and not c.full_model]

    def ready(c: RunConfig) -> bool:
        return not (c.method == "ipo" and c.full_model) or all(
            (out_root / name / "results.json").exists() for name, key in heads if key == bound_key(c))

    log(f"{n} runs in {jobs} worker processes of {threads} thread(s) each; their output in {logs}/")
    try:
        while todo or running:
            while len(running) < jobs:
                pick = next((r for r in todo if r[1].full_model and ready(r[1])), None) or \
                    next((r for r in todo if ready(r[1])), None)
                if pick is None:
                    break
                todo.remove(pick)
                f = logs / f"{pick[0]}.log"
                with open(f, "a") as fh:
                    p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *worker, "--only", pick[0]],
                                         stdout=fh, stderr=subprocess.STDOUT, env=env)
                running[pick[0]] = (p, f, time.time())
                log(f"--- started {pick[0]} ({n - len(todo)}/{n}, {_fmt_s(time.time() - t0)} in)")
            if not running:
                raise UserError(f"runs {', '.join(name for name, _ in todo)} wait for runs that are not done")
            time.sleep(1.0)
            for name, (p, f, t) in list(running.items()):
                if p.poll() is None:
                    continue
                del running[name]
                if p.returncode != 0:
                    _stop(running)
                    raise UserError(f"run {name} failed (exit {p.returncode}); the end of {f}:\n  "
                                    + "\n  ".join(_tail(f)[-5:]))
                log(f"--- finished {name} in {_fmt_s(time.time() - t)} ({n - len(todo) - len(running)}/{n} done, "
                    f"{_fmt_s(time.time() - t0)} in)")
            if time.time() - shown >= 120 and running:
                shown = time.time()
                log(f"[{_fmt_s(shown - t0)}] running:\n" + "\n".join(
                    f"  {name}: {(_tail(f) or [''])[-1][:110]}" for name, (_, f, _) in running.items()))
    except KeyboardInterrupt:  # a Ctrl-C at the terminal reaches the workers too: they save where they are
        _stop(running, grace=5.0)
        raise


def _stop(running: dict, grace: float = 0.0) -> None:
    """Stop the workers as Ctrl-C does (each saves where it is), after `grace` seconds for one to stop by itself."""
    import signal
    import subprocess

    for p, _, _ in running.values():
        try:
            if grace > 0:
                p.wait(timeout=grace)
            elif p.poll() is None:
                p.send_signal(signal.SIGINT)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGINT)
    for p, _, _ in running.values():
        p.wait()


def run(cfg: RunConfig, out_root: Path, name: str | None = None, ctx: Context | None = None) -> dict:
    """Do (or resume) one run; returns its results.json content."""
    import ipo
    import iti
    import probe
    import truthfulqa

    d = out_root / (name or cfg.slug())
    done = d / "results.json"
    timings, prior = {}, None  # prior: the results of a finished run whose answers are judged again
    t_all = time.time()
    if check_run_dir(d, cfg):
        if done.exists():
            res = json.loads(done.read_text())
            check_lr_grid(d, cfg, res)
            reselect(d, cfg, res.get("ipo"))  # may remove results.json: the run then goes on as a resumed one
        if done.exists():
            evs = [json.loads(p.read_text()) for p in sorted(d.glob("eval_*.json")) if ".parts" not in p.name]
            if cfg.pairs and all("pairs" in ev for ev in evs):  # up to date, and nothing judged
                log(f"{d}: finished already (results.json); nothing to do")
                return res
            ctx = ctx if ctx is not None and ctx.key(ctx.cfg) == ctx.key(cfg) else Context(cfg)
            ctx.cfg = cfg
            if not any(stale(ctx, ev) for ev in evs):
                log(f"{d}: finished already (results.json); nothing to do")
                return res
            log(f"{d}: finished, but judged by other judges than the current ones or saved before some figures "
                "(per-pair margins, repetitive answers): bringing it up to date (the edit and every other figure are "
                "kept)")
            prior = res
        else:
            log(f"{d}: resuming")
    if out_root.exists() and not out_root.is_dir():
        raise UserError(f"--out {out_root}: not a directory")
    ctx = ctx if ctx is not None and ctx.key(ctx.cfg) == ctx.key(cfg) else Context(cfg)
    ctx.cfg = cfg  # the per-run settings (n_test, kl_text) the shared pieces read
    ctx.check_heads(cfg)
    # the inputs are valid and loaded: claim the run directory
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "config.json", cfg.training_dict())
    if cfg.max_pairs is not None or cfg.epochs != 2 or cfg.n_test is not None:
        log(f"settings: {cfg.epochs} epoch(s), {cfg.max_pairs or 'all'} training pairs, "
            f"{cfg.n_test or 'all'} test questions (subsampled for speed; --paper for the paper's full settings)")
    write_json(d / "split.json", ctx.split.to_dict())

    # heads -------------------------------------------------------------------------------------------------
    t = time.time()
    pr = ctx.probe
    mask = ctx.mask(cfg)
    heads = probe.head_list(mask) if mask is not None else ["all (plain LoRA on every layer's o_proj)"]
    if not (d / "probe" / "probe_acc.json").exists():
        pr.save(d / "probe", mask)
    log(f"heads ({cfg.heads}, head seed {cfg.head_seed}): {', '.join(heads)}")
    timings["probe_s"] = time.time() - t

    # edits -------------------------------------------------------------------------------------------------
    edits = {}
    if cfg.method in ("ipo", "both"):
        t = time.time()
        path = d / "ipo" / "edit.safetensors"
        if path.exists():
            check_lr_grid(d, cfg, {"ipo": _ipo_meta(d), "heads": probe.head_list(mask) if mask is not None else []})
            reselect(d, cfg, _ipo_meta(d))
        if path.exists():
            edits["ipo"] = ipo.Rank1Edit.load(path).to(ctx.model.device)
        else:
            rng = random.Random(cfg.seed)
            train = truthfulqa.preference_pairs(ctx.questions, ctx.split.train)
            if cfg.max_pairs is not None and cfg.max_pairs < len(train):
                train = rng.sample(train, cfg.max_pairs)
                log(f"IPO: training on {len(train)} of the pairs (seeded subsample)")
            # the stopping rule's fixed validation set: every pair of a seeded subsample of validation questions
            val_q = sorted(random.Random(cfg.seed).sample(ctx.split.val, min(cfg.val_questions, len(ctx.split.val))))
            val = truthfulqa.preference_pairs(ctx.questions, val_q)
            lrs = cfg.lr or ipo.lr_grid(mask, cfg.lr_factors)
            edits["ipo"], _ = ipo.select_ipo(ctx.model, ctx.tok, train, val, ctx.prompts, mask, lrs=lrs, tau=cfg.tau,
                                             epochs=cfg.epochs, batch_size=cfg.batch_size,
                                             seed=cfg.seed if cfg.train_seed is None else cfg.train_seed,
                                             scale=cfg.scale, stop=ipo.StopRule(cfg.eval_every, cfg.patience,
                                                                                cfg.min_delta),
                                             out_dir=d / "ipo", log=log, bound=full_bound(d),
                                             ref_dir=cache_dir() / "ipo-ref")  # shared by the runs on these pairs
        timings["ipo_s"] = time.time() - t
    if cfg.method in ("iti", "both"):
        path = d / "iti" / "edit.safetensors"
        if path.exists():
            edits["iti"] = iti.ITIEdit.load(path)
        else:
            edits["iti"] = iti.fit_iti(pr.X, pr.y, None, mask, seed=cfg.seed).with_alpha(cfg.alpha)
            path.parent.mkdir(parents=True, exist_ok=True)
            edits["iti"].save(path)

    # evaluation --------------------------------------------------------------------------------------------
    evals = {"base": base_eval(ctx)}
    for label, edit in edits.items():
        p = d / f"eval_{label}.json"
        if p.exists():
            evals[label] = json.loads(p.read_text())
            if refresh(ctx, evals[label], edit):  # judged by other judges, or saved before the pair margins
                write_json(p, evals[label])
        else:
            evals[label] = evaluate(ctx, edit, label, d / f"eval_{label}.parts.json")
            write_json(p, evals[label])
            (d / f"eval_{label}.parts.json").unlink(missing_ok=True)
        timings[f"eval_{label}_s"] = evals[label]["seconds"]

    # audit, results, report ----------------------------------------------------------------------------------
    audits = {label: audit_edit(ctx, edit) for label, edit in edits.items()}
    timings["total_s"] = time.time() - t_all
    vers = versions(ctx)
    if prior:  # a finished run judged again: its own times and versions stay, the re-judging's beside them
        timings = {**prior.get("timings", {}), "rejudge_s": timings["total_s"]}
        vers = {**prior.get("versions", {}), **{k: vers[k] for k in ("judges", "judge_models")}}
    results = {
        "config": cfg.training_dict(), "run_dir": str(d), "split": ctx.split.to_dict(),
        "heads": heads, "head_spec": cfg.heads, "head_seed": cfg.head_seed,
        "probe_acc_of_heads": {h: float(pr.acc[int(h.split(".")[0]), int(h.split(".")[1])]) for h in heads
                               if mask is not None},
        "metrics": {label: ev["figures"] for label, ev in evals.items()},
        "per_question": {label: {"qids": ev["qids"], **ev["per_question"]} for label, ev in evals.items()},
        "edits": {label: str(d / label / "edit.safetensors") for label in edits},
        "ipo": _ipo_meta(d) if "ipo" in edits else None,
        "audit": audits, "timings": timings, "versions": vers, "judges": judge_ids(ctx),
        "pairs": {label: ev["pairs"] for label, ev in evals.items()},  # every test pair's margin, base included
    }
    write_atomic(d / "generations.jsonl", "".join(json.dumps({"model": label, **g}) + "\n"
                                                  for label, ev in evals.items() for g in ev["generations"]))
    write_atomic(d / "report.md", report(results, d, pr.acc))
    write_json(done, results)
    log(summary(results))
    return results


def _ipo_meta(d: Path) -> dict | None:
    from safetensors import safe_open

    p = d / "ipo" / "edit.safetensors"
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["metrics"]) if "metrics" in meta else None


def versions(ctx: Context) -> dict:
    js = dict(zip(("truth", "info"), ctx.judges)) if ctx.judged else {}
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "model_source": ctx.model.source, "judges": {k: j.meta.get("validation") for k, j in js.items()},
            "judge_models": {k: j.meta.get("external") or f"editloc's {k} judge ({j.meta.get('backbone')})"
                             for k, j in js.items()},
            "threads": torch.get_num_threads(), "machine": platform.machine()}


def ipo_status(i: dict | None) -> str:
    """One line on an IPO edit's training: converged or not, steps, the chosen learning rate, validation."""
    import ipo

    if not i:
        return ""
    conv = "converged" if i.get("converged") else "NOT CONVERGED (step budget spent)"
    sel = i.get("selection", {})
    grid = ", ".join(f"{g['lr']:g}{ipo.patience_note(g)}: {g['val_loss']:.4f}"
                     f"{'' if g['converged'] else ' (not converged)'}"
                     for g in sel.get("grid", []))
    return (f"IPO {conv}: best validation loss {i['val_loss']:.4f} at step {i['best_step']} of {i['steps']} "
            f"(budget {i['budget']}), margin {i['val_margin']:+.3f}, preference accuracy {i['val_acc']:.3f}; "
            f"lr {i['lr']:g} chosen by validation loss from [{grid}], tau {i['tau']:g}, LoRA scale {i['scale']:g}")


def summary(res: dict) -> str:
    rows = [f"run {res['run_dir']}: heads {res['head_spec']} ({len(res['heads'])})"]
    for label, m in res["metrics"].items():
        rows.append(f"  {label:5s} " + "  ".join(f"{k} {m[k]['value']:.3f}" for k in METRICS if k in m))
    if res.get("ipo"):
        rows.append("  " + ipo_status(res["ipo"]))
    rows.append(f"  report: {res['run_dir']}/report.md   ({res['timings']['total_s']:.0f}s)")
    return "\n".join(rows)


def tau_summary(res: dict) -> str:
    """The runs of one head set over several taus: Truth, Info, Truth*Info each, and the best over tau."""
    if "truth_info" not in next(iter(res.values()))["metrics"]["ipo"]:  # a pairs file: preference accuracy
        return "tau curve (IPO): " + "; ".join(f"tau {t:g}: pref_acc {r['metrics']['ipo']['pref_acc']['value']:.3f}"
                                               for t, r in res.items())
    rows = ["tau curve (IPO): " + "; ".join(
        f"tau {t:g}: Truth {r['metrics']['ipo']['truth']['value']:.3f} Info {r['metrics']['ipo']['info']['value']:.3f} "
        f"Truth*Info {r['metrics']['ipo']['truth_info']['value']:.3f}"
        + ("" if r["ipo"]["converged"] else " (not converged)") for t, r in res.items())]
    best = max(res, key=lambda t: res[t]["metrics"]["ipo"]["truth_info"]["value"])
    rows.append(f"best Truth*Info over tau: {res[best]['metrics']['ipo']['truth_info']['value']:.3f} at tau {best:g}")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------
# Auditing an edit: where it enters, head by head


def head_contributions(edit, l: int, o: torch.Tensor, W: torch.Tensor) -> torch.Tensor | None:
    """The part of edit.delta(l, o, W) each head carries, coefficient * v_h: [B, T, H, M] (None where the edit
    has no per-head form, i.e. the plain LoRA whose b lives in model space). Sums over heads to the delta."""
    v = edit.head_vectors(l, W)  # [H, M]
    if v is None:
        return None
    c = torch.as_tensor(edit.coefficient(l, o), dtype=torch.float32, device=v.device)  # [B, T] or []
    return torch.broadcast_to((c[..., None, None] if c.dim() else c) * v, (*o.shape[:2], *v.shape))


def audit_edit(ctx: Context, edit, n_prompts: int = 32) -> dict:
    """For every layer and head the edit touches: the norm of its per-head vector (alpha*W_h theta_h for ITI,
    W_h b_h for IPO), the mean norm of the residual delta it adds on the test prompts, its share of the total,
    and a check that every head outside the mask contributes exactly zero."""
    from llama import Edit, pad_left

    model, tok = ctx.model, ctx.tok
    L, H = edit.mask.shape
    prompts = [ctx.prompts.generation(q.question) for q in ctx.test[:n_prompts]]
    ids, am = pad_left([tok.encode(p) for p in prompts], tok.pad_id or 0, model.device)
    newest = edit.positions == "newest"
    where = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)  # positions the edit acts on: [B, T]
    if newest:
        where[:, -1] = True
    else:
        where |= am.bool()
    sums = torch.zeros(L, H, dtype=torch.float64)  # sum over positions of ||per-head delta||
    layer_sums = torch.zeros(L, dtype=torch.float64)  # sum over positions of ||layer delta||
    outside = 0.0
    n = float(where.sum())

    class Recorder(Edit):
        positions = edit.positions

        def delta(self, l, o, W):
            d = edit.delta(l, o, W)
            if d is None:
                return None
            full = torch.broadcast_to(d, (o.shape[0], o.shape[1], W.shape[0])).float()
            layer_sums[l] += (full.norm(dim=-1) * where).sum().double()
            per = head_contributions(edit, l, o, W)  # [B, T, H, M]
            if per is not None:
                nonlocal outside
                norms = per.norm(dim=-1) * where[..., None]  # [B, T, H]
                sums[l] += norms.sum((0, 1)).double().cpu()
                off = ~edit.mask[l].to(norms.device)
                outside = max(outside, float(per[:, :, off].abs().max()) if off.any() else 0.0)
            return d

    with torch.inference_mode():
        model(ids, am, edit=Recorder(), edit_mask=where if newest else None)
    rows = []
    total = float(sums.sum()) if sums.any() else float(layer_sums.sum())
    for l in range(L):
        if float(layer_sums[l]) == 0 and not edit.mask[l].any():
            continue
        with torch.inference_mode():
            v = edit.head_vectors(l, model.layers[l].W_O)  # [H, M]: alpha W_h theta_h (ITI), W_h b_h (IPO)
        if v is None:  # b in model space (the plain LoRA): one row per layer
            rows.append({"where": f"{l}.*", "vector_norm": float(edit.b_eff()[l].detach().norm()),
                         "mean_delta_norm": float(layer_sums[l]) / n, "share": float(layer_sums[l]) / total})
            continue
        for h in range(H):
            if not edit.mask[l, h]:
                continue
            rows.append({"where": f"{l}.{h}", "vector_norm": float(v[h].norm()),
                         "mean_delta_norm": float(sums[l, h]) / n, "share": float(sums[l, h]) / total if total else 0.0})
    return {"rows": rows, "positions": "newest (last prompt token)" if newest else "all prompt positions",
            "n_prompts": len(prompts), "outside_mask_max_abs": outside,
            "layer_delta_norm": {str(l): float(layer_sums[l]) / n for l in range(L) if layer_sums[l] > 0}}


def audit_table(a: dict) -> str:
    lines = [f"Positions: {a['positions']}, {a['n_prompts']} test prompts. "
             f"Heads outside the mask: max |contribution| = {a['outside_mask_max_abs']:.1e}"
             + (" (exactly zero)" if a["outside_mask_max_abs"] == 0 else " (NOT ZERO)"), "",
             "| where (L.H) | per-head vector norm | mean residual delta norm | share |", "|---|---|---|---|"]
    for r in a["rows"]:
        lines.append(f"| {r['where']} | {r['vector_norm']:.4f} | {r['mean_delta_norm']:.4f} | {r['share']:.1%} |")
    return "\n".join(lines)


def load_any_edit(path: str):
    """An ITI or IPO edit file, told apart by its metadata."""
    import ipo
    import iti
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such edit file")
    try:
        with safe_open(str(p), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format", "")
    except Exception as e:  # safetensors has its own error types
        raise UserError(f"{p}: not a safetensors edit file ({e})") from None
    if fmt == "editloc.Rank1Edit":
        return ipo.Rank1Edit.load(p)
    if fmt == iti.FORMAT:
        return iti.ITIEdit.load(p)
    raise UserError(f"{p}: metadata format {fmt!r}, expected an ITI or IPO edit from editloc")


def cmd_audit(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run.py audit", description="Where an edit enters the network, head by head.")
    p.add_argument("edit", help="an edit.safetensors (ITI or IPO)")
    p.add_argument("--model", default=None, help="model (default: the one in the run's config.json, or smollm2-135m)")
    p.add_argument("--data", default=None)
    p.add_argument("--n-prompts", type=_pos_int, default=32)
    a = p.parse_args(argv)
    edit = load_any_edit(a.edit)
    run_cfg = Path(a.edit).resolve().parent.parent / "config.json"
    cfg = RunConfig(**json.loads(run_cfg.read_text())) if run_cfg.exists() else RunConfig()
    cfg = replace(cfg, model=a.model or cfg.model, data=a.data or cfg.data)
    ctx = Context(cfg)
    if tuple(edit.mask.shape) != (ctx.model.cfg.n_layers, ctx.model.cfg.n_heads):
        raise UserError(f"{a.edit}: an edit for {tuple(edit.mask.shape)} heads, the model has "
                        f"{(ctx.model.cfg.n_layers, ctx.model.cfg.n_heads)}")
    if hasattr(edit, "to"):
        edit.to(ctx.model.device)
    print(f"{a.edit}: {type(edit).__name__}, {len(edit.heads)} heads")
    print(audit_table(audit_edit(ctx, edit, a.n_prompts)))
    return 0


# ----------------------------------------------------------------------------------------------------------
# The report


def _fmt(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def report(res: dict, d: Path, acc: torch.Tensor) -> str:
    cfg = res["config"]
    out = [f"# editloc run `{d.name}`", "",
           f"Model `{cfg['model']}` ({cfg['dtype']}), "
           + (f"pairs file `{cfg['pairs']}` ({cfg.get('pairs_format')})" if cfg.get("pairs") else
              f"TruthfulQA {cfg['version']}") + f", split seed {cfg['seed']} "
           f"({len(res['split']['train'])} train / {len(res['split']['val'])} val / {len(res['split']['test'])} "
           f"test questions; {len(res['per_question']['base']['qids'])} evaluated).", "",
           f"Heads (`{res['head_spec']}`, head seed {res['head_seed']}): {', '.join(res['heads'])}", "",
           f"Probe examples: {PROBE_LAYOUT_TEXT[cfg.get('probe_layout', 'iti')]}, read at the last token.", ""]
    if res["probe_acc_of_heads"]:
        a = list(res["probe_acc_of_heads"].values())
        out += [f"Probe validation accuracy of these heads: mean {np.mean(a):.3f} (all heads: mean "
                f"{float(acc.mean()):.3f}, max {float(acc.max()):.3f}).", ""]
    keys = [k for k in METRICS if all(k in m for m in res["metrics"].values())]
    out += ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, m in res["metrics"].items():
        mark = " (NOT CONVERGED)" if label == "ipo" and not (res.get("ipo") or {}).get("converged", True) else ""
        out.append(f"| {label}{mark} | " + " | ".join(_fmt(m[k]) for k in keys) + " |")
    out += ["", "Truth, Info: fractions of test answers the judges call true / informative; MC1-3 from TruthfulQA's "
            "multiple-choice targets (a pairs file: chosen against rejected answers); pref_acc, pref_margin: the "
            "fraction of held-out (chosen, rejected) pairs whose chosen answer has the higher per-token log-prob, "
            "and the mean difference (no judge); KL: mean per-token KL(base || edited) on neutral text (the edit acting at "
            "every position; `--kl-text` or editloc's neutral.txt), CE the edited model's cross-entropy there "
            "(nats/token); KL_qa, CE_qa: the same on the test questions with their best answers (in-domain). "
            "Intervals: 95% bootstrap over questions (texts for KL, CE).", ""]
    if res.get("ipo"):
        i = res["ipo"]
        r = i["rule"]
        out += [ipo_status(i) + ".", "",
                f"{i['n_train']} training pairs, batch {i['batch_size']}, budget {i['epochs']} epoch(s); "
                f"{i['n_val']} validation pairs read every {r['every']} steps; stopping rule: no gain of "
                f"{r['min_delta']:g} (relative) on the best validation loss for {r['patience']} validations in a "
                f"row; the edit kept is the best checkpoint by validation loss.", ""]
    pics = pictures(res, d)
    out += pics + [""]
    for label, a in res["audit"].items():
        out += [f"## Audit of the {label} edit", "", audit_table(a), ""]
    t = res["timings"]
    out += ["## Timings", "", ", ".join(f"{k} {v:.0f}s" for k, v in t.items()), ""]
    return "\n".join(out)


def pictures(res: dict, d: Path) -> list[str]:
    import ipo

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["Pictures need matplotlib (`pip install -e .[plots]`); it is not installed, so none were drawn."]
    lines = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    x, y = ("info", "truth") if "truth" in res["metrics"]["base"] else ("pref_margin", "pref_acc")  # pairs: no judges
    for label, m in res["metrics"].items():
        ax[0].scatter(m[x]["value"], m[y]["value"], label=label, s=60)
        ax[1].scatter(m["kl"]["value"], m["mc2"]["value"], label=label, s=60)
    ax[0].set(xlabel=x.capitalize() if x == "info" else x, ylabel=y.capitalize() if y == "truth" else y,
              title=f"{y} vs {x}")
    ax[1].set(xlabel="KL(base || edited)", ylabel="MC2", title="MC vs KL")
    for a in ax:
        a.legend()
    fig.tight_layout()
    write_file_atomic(d / "metrics.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    lines.append("![Truth vs Info, MC vs KL](metrics.png)")
    grid = ((res.get("ipo") or {}).get("selection") or {}).get("grid")
    if grid:  # the validation curve of every learning rate tried, the kept checkpoint marked
        fig, ax = plt.subplots(figsize=(6, 4))
        for g in grid:
            st, vl = zip(*g["curve"])
            ax.plot(st, vl, marker=".", label=f"lr {g['lr']:g}{ipo.patience_note(g)}" + ("" if g["converged"] else
                                                                                   " (not converged)"))
            ax.scatter([g["best_step"]], [g["val_loss"]], s=80, facecolors="none", edgecolors="k")
        ax.set(xlabel="training step", ylabel="validation IPO loss",
               title=f"IPO validation curves (chosen lr {res['ipo']['lr']:g}; circles: kept checkpoints)")
        ax.legend()
        fig.tight_layout()
        write_file_atomic(d / "ipo_curve.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
        lines.append("![IPO validation curves](ipo_curve.png)")
    if (d / "probe" / "heatmap.png").exists():  # drawn with the probe results (probe.ProbeResult.save)
        lines.append("![probe accuracy with the chosen heads](probe/heatmap.png)")
    return lines


# ----------------------------------------------------------------------------------------------------------
# Entry point


def cmd_run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    a = p.parse_args(argv)
    cfg = config_from_args(a)
    if len(a.tau) == 1:
        run(cfg, Path(a.out), a.name)
        return 0
    if cfg.method == "iti":
        raise UserError("--tau with several values: tau is IPO's; use it with --method ipo or both")
    ctx, res = Context(cfg), {}
    for tau in a.tau:
        res[tau] = run(replace(cfg, tau=tau), Path(a.out), f"{a.name}-t{tau:g}" if a.name else None, ctx)
    log(tau_summary(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "audit":
            return cmd_audit(argv[1:])
        if argv and argv[0] == "localize":
            import localize

            return localize.cmd_localize(argv[1:])
        if argv and argv[0] == "experiment":
            import experiments

            return experiments.cmd_experiment(argv[1:])
        if argv and argv[0] == "bench":
            import bench

            bench.main(argv[1:])
            return 0
        return cmd_run(argv)
    except KeyboardInterrupt:
        log("\n" + interrupted_message())
        return 130
    except (UserError, ValueError, FileNotFoundError) as e:
        if os.environ.get("EDITLOC_DEBUG"):
            raise
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if os.environ.get("EDITLOC_DEBUG"):
            raise
        print(f"run.py: error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"run.py: error: {e}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":  # main as run.main: experiments.py and localize.py raise run's UserError, not __main__'s
    import run as _run

    sys.exit(_run.main())
