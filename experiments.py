"""experiments.py: the paper's five figures as commands, with the tests that carry their claims.

    python run.py experiment ipo-random                # Fig. 3: IPO at random 16-head sets vs probe16, full model
    python run.py experiment single-heads --quick      # Fig. 4 at a small size
    python run.py experiment mc --paper --shard 0/8    # one of 8 machines of a SLURM array (see README)

An experiment is a list of runs (run.py's `run`, shared between experiments by name, each resumable), then a
report: a table, the statistics of stats.py, and the figure(s) drawn as the paper draws them.

  Fig. 1 iti-localized-vs-random  ITI at probe16 vs random 16-head sets over alpha; "better than": a paired
                                  permutation test over test questions, pooled over random sets and alpha
  Fig. 2 ipo-vs-iti               Truth-Info curves of ITI (over alpha) and IPO (over tau) at probe16, full model
  Fig. 3 ipo-random               IPO at random 16-head sets; "as good as" the full model: TOST with a margin
  Fig. 4 single-heads             IPO at single heads (drawn without replacement, disjoint from the random sets)
  Fig. 5 mc                       MC over KL of probe16 vs random sets under IPO; "better than" on MC2
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import ipo
import stats
from llama import write_file_atomic
from run import (FULL_BOUND_TOL, JOBS_HELP, METRICS, PROBE_LAYOUT_TEXT, DTYPE_HELP, Context, RunConfig, UserError,
                 _pos_int, do_runs, log, meet_full_model_bounds, resolve_dtype, shard_of, write_atomic, write_json)

EXPERIMENTS = {
    "iti-localized-vs-random": "Fig. 1: ITI at probe16 vs random 16-head sets over an alpha sweep",
    "ipo-vs-iti": "Fig. 2: full-model IPO, IPO at probe16, ITI at probe16",
    "ipo-random": "Fig. 3: IPO at random 16-head sets vs probe16 and the full model",
    "single-heads": "Fig. 4: IPO at random single heads vs the full model",
    "mc": "Fig. 5: MC scores of probe-localized vs random heads under IPO",
}
# n_random: random 16-head sets (head seeds 1..n); n_single: single heads; alphas: ITI strengths; taus: IPO taus of
# every edit; key_taus: the taus of the key edits (full model, probe16) in Fig. 2, their IPO curves; train_seeds:
# the extra IPO training seeds of the key edits (seed variance); lr_factors: the learning-rate grid (multiples of
# the paper's rate); max_pairs, epochs: training pairs and step budget; n_test: test questions (None: all).
SIZES = {
    "quick": dict(n_random=4, n_single=6, alphas=(2.0, 5.0), taus=(0.1,), key_taus=(0.1,), train_seeds=(),
                  lr_factors=(16.0,), max_pairs=400, epochs=1, n_test=48),
    "default": dict(n_random=4, n_single=6, alphas=(2.0, 5.0, 10.0), taus=(0.1,), key_taus=(0.1, 0.5),
                    train_seeds=(1,), lr_factors=(16.0,), max_pairs=1200, epochs=1, n_test=None),
    "paper": dict(n_random=16, n_single=24, alphas=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0),
                  taus=(0.1, 0.2, 0.3, 0.4, 0.5), key_taus=(0.1, 0.2, 0.3, 0.4, 0.5), train_seeds=(1, 2),
                  lr_factors=(1.0, 4.0, 16.0), max_pairs=None, epochs=2, n_test=None),
}
SINGLE_SEED = 1234  # the draw of single heads (a fixed permutation of all heads, random-set heads skipped)


def kind(heads: str) -> str:
    """A run's head set as the figures group it: full, probe16, random16, single (or the spec itself)."""
    return "single" if heads.startswith("single:") else heads


def random_set(seed: int, n_layers: int, n_heads: int, k: int = 16) -> list[tuple[int, int]]:
    """The heads of randomK with head seed `seed` (as probe.parse_heads draws them)."""
    import probe

    return [tuple(x) for x in probe.parse_heads(f"random{k}", n_layers, n_heads, seed=seed).nonzero().tolist()]


def single_heads(n: int, n_layers: int, n_heads: int, exclude: set, seed: int = SINGLE_SEED) -> list[tuple[int, int]]:
    """n distinct heads, drawn without replacement from the heads not in `exclude` (a fixed permutation of all
    heads under `seed`, excluded heads skipped)."""
    order = torch.randperm(n_layers * n_heads, generator=torch.Generator().manual_seed(seed)).tolist()
    pool = [(i // n_heads, i % n_heads) for i in order if (i // n_heads, i % n_heads) not in exclude]
    if len(pool) < n:
        raise UserError(f"single heads: {n} asked for, but only {len(pool)} heads lie outside the random sets")
    return pool[:n]


def experiment_runs(name: str, base: RunConfig, size: dict, dims: tuple[int, int] = (30, 9)
                    ) -> list[tuple[str, RunConfig]]:
    """The runs an experiment needs, as (run name, config), in the order they are done: the key edits (full
    model, probe16) at the first tau, the other edits, the key edits' extra training seeds, their other taus (in
    Fig. 2, whose curves they are, with every seed too, for the seed variance at each tau); the full model's
    last, so that each trains knowing the validation loss the head sets reached (run.bound_before).
    Runs are shared between experiments by name. dims: (layers, heads) of the model, for the single heads."""
    if name not in EXPERIMENTS:
        raise UserError(f"experiment {name!r}: expected one of {', '.join(EXPERIMENTS)}")
    b = replace(base, max_pairs=size["max_pairs"], epochs=size["epochs"], n_test=size["n_test"],
                lr_factors=list(size["lr_factors"]))
    rand = [replace(b, heads="random16", head_seed=i + 1) for i in range(size["n_random"])]
    full, probe16 = replace(b, heads="full", method="ipo"), replace(b, heads="probe16", method="ipo")
    taus, key_taus = tuple(size["taus"]), tuple(size["key_taus"])
    seeds = [base.seed + k for k in size["train_seeds"]]

    def ipo_runs(cs, ts):
        return [(c.slug(), c) for c in (replace(c, tau=t) for t in ts for c in cs)]

    def key_runs(cs, others, curves=False):  # curves: the key edits at every key tau too (Fig. 2), each seed
        more = [t for t in (key_taus if curves else taus) if t != taus[0]]
        reseeded = [replace(c, train_seed=s) for s in seeds for c in cs]
        return (ipo_runs(cs, taus[:1]) + ipo_runs(others, taus) + ipo_runs(reseeded, taus[:1])
                + ipo_runs(cs, more) + (ipo_runs(reseeded, more) if curves else []))

    def iti_runs(cs):
        return [(f"{c.slug()}-a{alpha:g}", replace(c, alpha=alpha)) for c in cs for alpha in size["alphas"]]

    def full_last(rs):
        return [r for r in rs if not r[1].full_model] + [r for r in rs if r[1].full_model]

    if name == "iti-localized-vs-random":
        return iti_runs([replace(c, method="iti") for c in [probe16] + rand])
    if name == "ipo-vs-iti":
        return full_last(key_runs([full, probe16], [], curves=True) + iti_runs([replace(probe16, method="iti")]))
    if name in ("ipo-random", "mc"):
        return full_last(key_runs([full, probe16], rand))
    # single-heads: without replacement, none in the random sets of this size
    L, H = dims
    exclude = {h for i in range(size["n_random"]) for h in random_set(i + 1, L, H)}
    singles = [replace(b, heads=f"single:{l}.{h}") for l, h in single_heads(size["n_single"], L, H, exclude)]
    return full_last(key_runs([full, probe16], singles))


def glue_dash_values(argv: list[str], flags) -> list[str]:
    """`--shard -1/4` as `--shard=-1/4`, so that argparse hands the value to the range check (which names the
    flag and what it expects) instead of reading it as an unknown option."""
    out = list(argv)
    for k in range(len(out) - 1):
        if out[k] in flags and out[k + 1].startswith("-"):
            out[k:k + 2] = [f"{out[k]}={out[k + 1]}", ""]
    return [x for x in out if x != ""]


def cmd_experiment(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run.py experiment", description="Reproduce one of the paper's figures.")
    p.add_argument("name", choices=list(EXPERIMENTS), help="; ".join(f"{k}: {v}" for k, v in EXPERIMENTS.items()))
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test of the whole experiment)")
    p.add_argument("--paper", action="store_true", help="the paper's sizes (for a GPU or a SLURM array)")
    p.add_argument("--shard", default="0/1",
                   help="i/n: do only shard i of n, the runs split by their estimated cost, each full model with the "
                        "head sets that bound it where the shares allow (run.shard_of; default 0/1)")
    p.add_argument("--partial", action="store_true",
                   help="do no runs; draw the report from the runs finished so far (marked PARTIAL, the missing "
                        "runs named)")
    p.add_argument("--margin", type=float, default=stats.MARGIN,
                   help=f"equivalence margin in Truth*Info of 'as good as' (default {stats.MARGIN:g})")
    p.add_argument("--jobs", type=_pos_int, default=1, help=JOBS_HELP)
    p.add_argument("--only", default=None, metavar="RUN", help="do only this run of the experiment (by name; no report)")
    p.add_argument("--model", default=RunConfig.model)
    p.add_argument("--data", default=None)
    p.add_argument("--pairs", default=None, metavar="FILE",
                   help="any behaviour as preference pairs (see run.py --pairs): the measure is the held-out "
                        "preference accuracy in Truth*Info's place")
    p.add_argument("--pairs-format", choices=("pairs", "persona"), default="pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help=DTYPE_HELP)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default="runs")
    a = p.parse_args(glue_dash_values(argv, ("--shard",)))
    try:
        i, n = (int(x) for x in a.shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise UserError(f"--shard {a.shard!r}: expected i/n with 0 <= i < n, e.g. 0/4") from None
    if not 0 < a.margin < 1:
        raise UserError(f"--margin {a.margin}: expected a Truth*Info difference between 0 and 1, e.g. 0.05")
    if a.quick and a.paper:
        raise UserError("--quick and --paper: choose one size")
    size_name = "quick" if a.quick else "paper" if a.paper else "default"
    size = SIZES[size_name]
    if a.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    base = RunConfig(model=a.model, data=a.data, seed=a.seed, dtype=resolve_dtype(a.dtype, a.device), device=a.device,
                     pairs=a.pairs, pairs_format=a.pairs_format, probe_layout="raw" if a.pairs else "paper")
    if a.pairs:
        import pairs

        pairs.load_pairs(a.pairs, a.pairs_format, a.seed)  # a malformed file fails now, naming its line
    ctx = Context(base)
    runs = experiment_runs(a.name, base, size, (ctx.model.cfg.n_layers, ctx.model.cfg.n_heads))
    out = Path(a.out) / f"exp-{size_name}"
    if a.only is not None:
        mine = [r for r in runs if r[0] == a.only]
        if not mine:
            raise UserError(f"--only {a.only!r}: not a run of {a.name} ({size_name}); its runs: "
                            + ", ".join(r for r, _ in runs))
        do_runs(runs, mine, out, ctx)
        return 0
    mine = [] if a.partial else [r for r, s in zip(runs, shard_of(runs, n)) if s == i]
    log(f"experiment {a.name} ({size_name}): {len(runs)} runs, shard {i}/{n} does {len(mine)}")
    do_runs(runs, mine, out, ctx, a.jobs, ["experiment"] + argv)
    finished = {r: json.loads((out / r / "results.json").read_text())
                for r, _ in runs if (out / r / "results.json").exists()}
    missing = [r for r, _ in runs if r not in finished]
    if missing and not (a.partial and finished):
        log(f"{len(finished)}/{len(runs)} runs finished; the figure is drawn once every shard is done "
            "(--partial draws it from the finished ones)")
        return 0
    if not missing:
        meet_full_model_bounds(runs, finished, out, ctx, sharded=n > 1 or a.partial)
    path = experiment_report(a.name, [(r, c) for r, c in runs if r in finished], finished, out / a.name,
                             margin=a.margin, missing=missing)
    log(f"experiment {a.name}: {path}")
    table = json.loads((path.parent / "table.json").read_text())
    log(table["summary"])
    if table["not_converged"]:
        log(f"WARNING: {len(table['not_converged'])} IPO edit(s) did not converge: {', '.join(table['not_converged'])}")
    if table["full_model_check"]:
        log("WARNING: the full-model check FAILED (the full model must bound every localized edit's IPO loss; "
            "its reference is under-trained):\n  " + "\n  ".join(table["full_model_check"]))
    return 0



# ----------------------------------------------------------------------------------------------------------
# The report: rows, tests, figures

CHANNELS = ("truth", "info", "mc1", "mc2", "truth_score", "info_score", "pref_acc")  # per-question values the
# tests resample (pref_acc: NaN for runs evaluated before it existed)
JUDGE_FREE = ("mc2", "pref_acc")  # the measures that need no judge
TI, TI_SCORE = [0, 1], [4, 5]  # Truth*Info from the judges' verdicts (>= 0.5), and from their mean scores
N_PERM = 10_000


def heldout_ipo_loss(res: dict, label: str, tau: float) -> np.ndarray | None:
    """[N] per test question (in the run's order), the mean IPO loss (eq. 3.3, ipo.ipo_loss) of the edit over the
    question's test preference pairs, the base model as reference: the objective on data neither training nor the
    stopping rule saw. None for a run saved before the per-pair margins."""
    import ipo

    p = res.get("pairs") or {}
    if label not in p or "base" not in p:
        return None
    e, b = p[label], p["base"]
    if e["qid"] != b["qid"]:
        raise UserError(f"{res.get('run_dir')}: the edit's and the base model's test pairs differ")
    by_q: dict[int, list[int]] = {}
    for j, q in enumerate(e["qid"]):
        by_q.setdefault(q, []).append(j)
    m_e, m_b = torch.tensor(e["margin"], dtype=torch.float64), torch.tensor(b["margin"], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    return np.array([float(ipo.ipo_loss(m_e[by_q[q]], zero, m_b[by_q[q]], zero, tau)) if q in by_q else np.nan
                     for q in res["per_question"][label]["qids"]])  # margins are chosen - rejected: h = m_e - m_b


def full_model_check(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """The full model bounds every localized edit: the reparameterised edit at a head set (eq. 4.3) is a
    restriction of the plain rank-1 LoRA on every layer (eq. 4.1, b^l = W^l b'^l), so at the optimum the full
    model's IPO loss is at most any head set's at the same tau. Tested on the held-out IPO loss of the test pairs,
    paired over test questions (one-sided: is the full model's loss higher? Holm across the head sets); the
    validation loss, the minimum over the stopping rule's validations, favours an edit validated more often,
    and is the check (with FULL_BOUND_TOL slack) only for runs saved without the per-pair margins.
    Returns (one line per violation: an under-trained reference, whose comparisons are not fair; every
    comparison as a dict)."""
    comps = []
    for f in (r for r in rows if r["heads"] == "full" and r["method"] == "ipo"):
        for r in rows:
            if r["heads"] == "full" or r["method"] != "ipo" or r["tau"] != f["tau"]:
                continue
            c = {"full": f["run"], "edit": r["run"], "tau": f["tau"], "val_full": f["val_loss"], "val_edit": r["val_loss"]}
            if f["heldout_loss"] is not None and r["heldout_loss"] is not None:
                d = f["heldout_loss"] - r["heldout_loss"]  # [N] per question
                d = d[~np.isnan(d)]
                se = float(np.std(d, ddof=1) / np.sqrt(len(d)))
                c.update(heldout_full=float(np.nanmean(f["heldout_loss"])), heldout_edit=float(np.nanmean(r["heldout_loss"])),
                         diff=float(d.mean()), ci95=[float(d.mean() - 1.96 * se), float(d.mean() + 1.96 * se)],
                         p=float(0.5 * math.erfc(d.mean() / se / math.sqrt(2))) if se > 0 else float(d.mean() <= 0))
            comps.append(c)
    tested = [c for c in comps if "p" in c]
    for c, p in zip(tested, stats.holm([c["p"] for c in tested])):
        c["p_holm"] = p
    bad = []
    for c in comps:
        if "p_holm" in c and c["p_holm"] < 0.05:
            bad.append(f"tau {c['tau']:g}: the full model's held-out IPO loss {c['heldout_full']:.3f} exceeds "
                       f"{c['edit']}'s {c['heldout_edit']:.3f} (difference {c['diff']:+.3f}, 95% interval "
                       f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}], p = {c['p_holm']:.2g} with Holm)")
        elif "p" not in c and None not in (c["val_full"], c["val_edit"]) and \
                c["val_full"] > c["val_edit"] * (1 + FULL_BOUND_TOL):
            bad.append(f"tau {c['tau']:g}: the full model's validation IPO loss {c['val_full']:.4f} exceeds "
                       f"{c['edit']}'s {c['val_edit']:.4f}")
    return bad, comps


def table_rows(runs, res: dict) -> list[dict]:
    """One row per run: its settings, convergence record, figures and per-question values q [N, 7] (CHANNELS)."""
    rows, qids = [], None
    for rname, c in runs:
        r = res[rname]
        label = "iti" if c.method == "iti" else "ipo"
        m, i, pq = r["metrics"][label], r.get("ipo") or {}, r["per_question"][label]
        if qids is None:
            qids = pq["qids"]
        elif pq["qids"] != qids:
            raise UserError(f"{rname}: evaluated on other test questions than {runs[0][0]}; runs of one experiment "
                            "must share the split and --n-test")
        if "truth" not in pq:  # a pairs file (no judges): its measure, preference accuracy, takes Truth*Info's place
            pq = {**pq, "truth": pq["pref_acc"], "info": [1.0] * len(pq["pref_acc"]), "truth_score": pq["pref_acc"],
                  "info_score": [1.0] * len(pq["pref_acc"])}
            m = {**m, "truth": m["pref_acc"], "truth_info": m["pref_acc"], "info": {"value": 1.0, "ci95": [1.0, 1.0]}}
        rows.append({"run": rname, "heads": c.heads, "kind": kind(c.heads), "head": ",".join(r["heads"]),
                     "head_seed": c.head_seed, "train_seed": c.seed if c.train_seed is None else c.train_seed,
                     "primary": c.train_seed is None, "method": c.method,
                     "alpha": c.alpha if c.method == "iti" else None, "tau": c.tau if c.method == "ipo" else None,
                     "knob": c.alpha if c.method == "iti" else c.tau, "lr": i.get("lr"), "steps": i.get("steps"),
                     "converged": i.get("converged") if label == "ipo" else None, "val_loss": i.get("val_loss"),
                     "bound": (i.get("selection") or {}).get("bound"),  # the full model trained on to reach it
                     "at_warmup": label == "ipo" and "best_step" in i and "rule" in i and ipo.too_fast(
                         i, i["rule"]["every"]),  # kept its first checkpoint after the warm-up
                     "heldout_loss": heldout_ipo_loss(r, label, c.tau) if c.method == "ipo" else None,
                     **{k: m[k]["value"] for k in METRICS if k in m}, "ci": {k: m[k]["ci95"] for k in METRICS if k in m},
                     "probe_acc": float(np.mean(list(r["probe_acc_of_heads"].values())))
                     if r["probe_acc_of_heads"] else None,
                     "q": np.array([pq.get(k, [np.nan] * len(pq["qids"])) for k in CHANNELS],
                                   dtype=np.float64).T})  # [N, 7]
    return rows


def _edit(r: dict) -> tuple:
    """An edit location: (method, heads, head seed)."""
    return (r["method"], r["heads"], r["head_seed"])


def _label(r: dict) -> str:
    k = r["kind"]
    return (f"{r['method'].upper()} " + (f"random16 #{r['head_seed']}" if k == "random16" else
                                         r["heads"][7:] if k == "single" else k))


def _arms(rows, loc: tuple, others: list[tuple], knobs, cols) -> np.ndarray | None:
    """Per-question values [A, K, N, C] of the localized edit (arm 0) and the other edits at the knobs (alphas or
    taus) they all have, each averaged over the edit's training seeds (one seed's luck is not the edit's); None
    if an arm lacks a knob."""
    by: dict[tuple, list] = {}
    for r in rows:
        by.setdefault((_edit(r), r["knob"]), []).append(r["q"][:, cols])
    try:
        return np.stack([np.stack([np.mean(by[(e, k)], 0) for k in knobs]) for e in [loc] + others])
    except KeyError:
        return None


def _seed_groups(rows, key: str = "truth_info") -> list[list[float]]:
    """The statistic of each edit (and knob) trained with several seeds, one list per configuration."""
    g: dict[tuple, list] = {}
    for r in rows:
        if r["method"] == "ipo":
            g.setdefault((_edit(r), r["knob"]), []).append(r[key])
    return [v for v in g.values() if len(v) >= 2]


def _seed_var(rows, knob, key: str = "truth_info") -> float:
    """The training-seed variance of `key` for the IPO edits at `knob` (tau): pooled over the edits trained with
    several seeds at that tau, or over every tau when none is (it differs by tau: edits degenerate at small tau)."""
    v, df = stats.seed_variance(_seed_groups([r for r in rows if r["knob"] == knob], key))
    return v if df else stats.seed_variance(_seed_groups(rows, key))[0]


def _mean_over_seeds(rows, e: tuple, knob) -> tuple[np.ndarray, int]:
    """Per-question values [N, 4] of edit e at knob averaged over its training seeds, and the number of seeds."""
    qs = [r["q"] for r in rows if _edit(r) == e and r["knob"] == knob]
    return np.mean(qs, 0), len(qs)


def equivalence(rows, e: tuple, ref: tuple, knob, margin: float, seed_var: float, cols=TI,
                stat=stats.truth_info) -> dict:
    """TOST of Truth*Info (or `stat` of the columns `cols`) of edit e against the reference edit at the same
    knob: paired bootstrap over questions of the difference (each side averaged over its seeds), its variance
    plus the training-seed variance of the two means (seed_var / k_e + seed_var / k_ref)."""
    a, ka = _mean_over_seeds(rows, e, knob)
    b, kb = _mean_over_seeds(rows, ref, knob)
    diff = float(stat(a[:, cols]) - stat(b[:, cols]))
    se, se_q = stats.se_with_seeds(a[:, cols], b[:, cols], stat, seed_var, ka, kb)
    return {**stats.tost(diff, se, margin), "se_questions": se_q, "seeds": [ka, kb], "knob": knob}


def better_than(rows, loc: tuple, others: list[tuple], knobs, key: str = "truth_info") -> dict | None:
    """"loc beats the others": the paired permutation test (questions; arms permuted per question, pooled over
    the other edits and the knobs: better than these edits), the two-level bootstrap (the other edits, then the
    questions: better than another edit drawn) and the paper's kind of t-test over (edit, knob) pairs."""
    if key in ("truth_info", "truth_info_score"):
        cols, stat = (TI if key == "truth_info" else TI_SCORE), stats.truth_info
    else:
        cols, stat = [CHANNELS.index(key)], stats.mean_of
    x = _arms(rows, loc, others, knobs, cols)
    if x is None or len(others) == 0:
        return None
    perm = stats.permutation_test(x, stats.localized_gap(stat), n_perm=N_PERM)
    two = stats.two_level_bootstrap(x, stat, n_boot=N_PERM)
    s = stat(x)  # [A, K]
    d = (s[0][None, :] - s[1:]).ravel()  # localized minus each other edit, per knob
    seeds = max(sum(1 for r in rows if _edit(r) == loc and r["knob"] == k) for k in knobs)
    return {"key": key, "knobs": list(knobs), "n_other": len(others), "n_questions": x.shape[2], "seeds": seeds,
            "localized": s[0].tolist(), "others_mean": s[1:].mean(0).tolist(), "others_min": s[1:].min(0).tolist(),
            "others_max": s[1:].max(0).tolist(), "permutation": perm, "two_level": two, "t_test": stats.t_test(d)}


def matched_cost(rows, loc: tuple, others: list[tuple], n_points: int = 5) -> dict | None:
    """Truth*Info at equal off-target cost: every edit's curve (over alpha or tau) interpolated to KL values
    inside all curves' ranges, per question, then the permutation test pooled over those KL values."""
    curves = {}
    for e in [loc] + others:
        rs = sorted((r for r in rows if _edit(r) == e and r["primary"]), key=lambda r: r["kl"])
        if len(rs) < 2:
            return None
        curves[e] = rs
    lo = max(c[0]["kl"] for c in curves.values())
    hi = min(c[-1]["kl"] for c in curves.values())
    if not lo < hi:
        return {"targets": [], "note": f"the curves share no KL range (highest start {lo:.4f}, lowest end {hi:.4f})"}
    targets = np.linspace(lo, hi, n_points).tolist()
    x = np.stack([np.stack([stats.at_cost([r["kl"] for r in curves[e]], np.stack([r["q"][:, :2] for r in curves[e]]), t)
                            for t in targets]) for e in [loc] + others])  # [A, T, N, 2]
    s = stats.truth_info(x)  # [A, T]
    return {"targets": targets, "localized": s[0].tolist(), "others_mean": s[1:].mean(0).tolist(),
            "permutation": stats.permutation_test(x, stats.localized_gap(stats.truth_info), n_perm=N_PERM)}


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def _better_text(b: dict, what: str, knob_name: str) -> list[str]:
    pm, tl, tt = b["permutation"], b["two_level"], b["t_test"]
    out = [f"| {knob_name} | {what}: localized | others mean | others min | others max |", "|---|---|---|---|---|"]
    out += [f"| {k:g} | {l:.3f} | {m:.3f} | {lo:.3f} | {hi:.3f} |" for k, l, m, lo, hi in
            zip(b["knobs"], b["localized"], b["others_mean"], b["others_min"], b["others_max"])]
    if b.get("seeds", 1) > 1:
        out += ["", f"Each edit's per-question values are averaged over its training seeds (the localized edit: "
                    f"{b['seeds']} seeds; see Seed variance)."]
    out += ["", f"- **Paired permutation test** (unit: test question, {b['n_questions']} of them; per question the "
            f"labels of the localized edit and the {b['n_other']} other edits are permuted, all {knob_name}s "
            f"together; statistic: mean over {knob_name} of localized minus the others' mean {what}; one-sided; "
            f"{pm['n_perm']} permutations): gap {pm['stat']:+.3f}, **p = {_fmt_p(pm['p'])}**. It asks whether the "
            f"localized edit beats *these* {b['n_other']} edits; the spread between them is not in it.",
            f"- **Two-level bootstrap** (the {b['n_other']} other edits resampled, then the test questions; one-sided; "
            f"{tl['n_boot']} replicates): does it beat *another edit drawn like them*? gap {tl['stat']:+.3f}, 95% "
            f"interval [{tl['ci95'][0]:+.3f}, {tl['ci95'][1]:+.3f}], **p = {_fmt_p(tl['p'])}** (with few other "
            f"edits their spread is under-estimated, so this p is if anything too small).",
            f"- The paper's kind of test (one-sample t-test of the {tt['n']} localized-minus-other differences over "
            f"(edit, {knob_name}) pairs, each pair counted as independent although they share the test questions): "
            f"t = {tt['t']:.2f}, df {tt['df']}, p = {_fmt_p(tt['p'])}."]
    return out


def _equiv_table(tests: list[dict], margin: float) -> list[str]:
    out = ["| edit | vs | at | difference | 90% interval | SE (questions) | SE (all) | smallest margin shown | "
           "p (TOST) | p (Holm) | as good as? | on mean scores |", "|---" * 12 + "|"]
    for t in tests:
        out.append(f"| {t['edit']} | {t['ref']} | {t['at']} | {t['diff']:+.3f} | [{t['ci90'][0]:+.3f}, "
                   f"{t['ci90'][1]:+.3f}] | {t['se_questions']:.3f} | {t['se']:.3f} | {t['min_margin']:.3f} | "
                   f"{_fmt_p(t['p'])} | {_fmt_p(t['p_holm'])} | {'**yes**' if t['p_holm'] < 0.05 else 'not shown'} | "
                   f"{t['on_scores']['diff']:+.3f}, {'yes' if t['on_scores']['p_holm'] < 0.05 else 'not shown'} |")
    out += ["", f"Two one-sided tests (TOST) of |difference in Truth*Info| < {margin:g} (`--margin`): the difference "
            "is paired over the test questions (bootstrap standard error) with the training-seed variance added "
            "(see Seed variance), normal approximation; Holm's correction across the rows. 'Smallest margin "
            "shown': the margin at which this data would just declare equivalence (unadjusted). 'On mean scores': the "
            "difference and verdict with Truth*Info from the judges' mean scores instead of their 0/1 verdicts.", ""]
    return out


def experiment_report(name: str, runs, res: dict, d: Path, margin: float = stats.MARGIN, missing=()) -> Path:
    """The report of one experiment from its finished runs: every edit's row (convergence, figures), the tests
    the figure's claim needs, the full-model check, and the figure(s) (with matplotlib)."""
    d.mkdir(parents=True, exist_ok=True)
    rows = table_rows(runs, res)
    metrics = [k for k in METRICS if all(k in r for r in rows)]
    base = dict(next(iter(res.values()))["metrics"]["base"])
    judged = "truth" in base
    if not judged:  # a pairs file: preference accuracy in Truth*Info's place (table_rows)
        base.update(truth=base["pref_acc"], truth_info=base["pref_acc"], info={"value": 1.0, "ci95": [1.0, 1.0]})
        metrics = [k for k in metrics if k not in ("truth", "info", "truth_info")]
    n_q = rows[0]["q"].shape[0]
    lines = [f"# {name}: {EXPERIMENTS[name]}", ""] + ([
        f"**PARTIAL**: drawn from the {len(runs)} runs finished so far; {len(missing)} not yet: {', '.join(missing)}.",
        ""] if missing else []) + [
             f"{len(runs)} runs, {n_q} test questions, model `{runs[0][1].model}` in {runs[0][1].dtype} (the dtype "
             "changes the numbers slightly). Probe examples (for probe16 and the probe accuracies): "
             f"{PROBE_LAYOUT_TEXT[runs[0][1].probe_layout]}, read at the last token. Every IPO edit: the learning "
             "rate of lowest validation loss from its grid, trained until the validation loss levelled off (see "
             "the run reports).", "",
             "| run | heads | tau / alpha | train seed | converged | lr | val loss | " + " | ".join(metrics) + " |",
             "|---" * (7 + len(metrics)) + "|",
             "| base | - | - | - | - | - | - | " + " | ".join(f"{base[k]['value']:.3f}" for k in metrics) + " |"]
    for r in rows:
        conv = "-" if r["converged"] is None else "yes" if r["converged"] else "**NO**"
        knob = f"tau {r['tau']:g}" if r["method"] == "ipo" else f"alpha {r['alpha']:g}"
        lines.append(f"| {r['run']} | {r['heads']} | {knob} | {r['train_seed'] if r['method'] == 'ipo' else '-'} | "
                     f"{conv} | " + (f"{r['lr']:g}" if r["lr"] else "-") + " | "
                     + (f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-") + " | "
                     + " | ".join(f"{r[k]:.3f}" for k in metrics) + " |")
    lines += ["", "95% intervals (bootstrap over questions; texts for KL, CE) are in the run reports and table.json.", ""]
    unconverged = [r["run"] for r in rows if r["converged"] is False]
    if unconverged:
        lines += [f"**{len(unconverged)} IPO edit(s) did NOT converge** (step budget spent before the stopping rule "
                  f"fired): {', '.join(unconverged)}. Their figures understate what an edit there can do.", ""]
    early = [r["run"] for r in rows if r.get("at_warmup")]
    if early:
        lines += [f"**{len(early)} IPO edit(s) kept their first checkpoint after the warm-up** (every rate tried "
                  f"stopped early; the edit is hardly trained and may be far from the optimum another seed reaches): "
                  f"{', '.join(early)}. Compare their validation loss with the same edit's other seeds.", ""]

    # seed variance of the key edits (the same edit and tau, several training seeds)
    groups = _seed_groups(rows)
    seed_var, seed_df = stats.seed_variance(groups)
    by_tau = {k: stats.seed_variance(_seed_groups([r for r in rows if r["knob"] == k]))
              for k in sorted({r["knob"] for r in rows if r["method"] == "ipo"})}
    by_tau = {k: v for k, v in by_tau.items() if v[1]}
    tests: dict = {"seed_variance": {"var": seed_var, "df": seed_df, "groups": groups,
                                     "by_tau": {f"{k:g}": {"var": v, "df": df} for k, (v, df) in by_tau.items()}}}
    if groups:
        lines += ["## Seed variance", "", "Truth*Info of the edits trained with several seeds (same split, test "
                  "questions and learning rate; the initialisation and pair order differ): "
                  + "; ".join(f"{_label(r)} tau {r['tau']:g}: " + ", ".join(
                      f"{x['truth_info']:.3f}" for x in rows if _edit(x) == _edit(r) and x["knob"] == r["knob"])
                      for r in rows if r["primary"] and any(
                          _edit(x) == _edit(r) and x["knob"] == r["knob"] and not x["primary"] for x in rows)),
                  "", "Pooled seed standard deviation " + "; ".join(
                      f"at tau {k:g}: {np.sqrt(v):.3f} ({df} df)" for k, (v, df) in by_tau.items())
                  + ". The equivalence tests below add the one of their tau (pooled over every tau where a tau "
                  "has no seeds) to the question-bootstrap variance of every difference. With it, the key "
                  "edits' Truth*Info (mean over seeds, 95% interval over questions and seeds):", "",
                  "| edit | tau | seeds | Truth*Info | 95% interval |", "|---|---|---|---|---|"]
        for r in rows:
            if r["primary"] and r["method"] == "ipo" and r["kind"] in ("full", "probe16"):
                q, k = _mean_over_seeds(rows, _edit(r), r["knob"])
                v = float(stats.truth_info(q[:, :2]))
                half = 1.96 * stats.se_with_seeds(q[:, :2], None, stats.truth_info, _seed_var(rows, r["knob"]), k)[0]
                tests.setdefault("key_intervals", []).append({"edit": _label(r), "tau": r["tau"], "seeds": k,
                                                              "value": v, "ci95": [v - half, v + half]})
                lines.append(f"| {_label(r)} | {r['tau']:g} | {k} | {v:.3f} | [{v - half:.3f}, {v + half:.3f}] |")
        lines.append("")
    else:
        lines += ["No edit here was trained with several seeds, so the tests hold the edits fixed (question "
                  "resampling only).", ""]

    prim = [r for r in rows if r["primary"]]
    edits = list(dict.fromkeys(_edit(r) for r in prim))
    knobs = lambda e: sorted({r["knob"] for r in prim if _edit(r) == e})
    loc_ipo, loc_iti, full = ("ipo", "probe16", 0), ("iti", "probe16", 0), ("ipo", "full", 0)
    rand = lambda m: [e for e in edits if e[0] == m and e[1] == "random16"]
    summary = []
    if name in ("iti-localized-vs-random", "ipo-random", "mc"):
        m, loc = ("iti", loc_iti) if name.startswith("iti") else ("ipo", loc_ipo)
        ks = sorted(set(knobs(loc)).intersection(*[knobs(e) for e in rand(m)]))  # the knobs every edit has
        knob_name = "alpha" if m == "iti" else "tau"
        keys = ("truth_info", "mc2") if name != "mc" else ("mc2", "mc1")
        for key in keys:
            b = better_than(rows, loc, rand(m), ks, key)
            if b is None:
                continue
            tests[f"better_{key}"] = b
            what = {"truth_info": "Truth*Info", "mc2": "MC2", "mc1": "MC1"}[key]
            lines += [f"## Is probe16 better than random 16-head sets? ({what}, {m.upper()}, equal {knob_name})", ""]
            lines += _better_text(b, what, knob_name) + [""]
            summary.append(f"{what}: probe16 {np.mean(b['localized']):.3f} vs random mean "
                           f"{np.mean(b['others_mean']):.3f}, permutation p = {_fmt_p(b['permutation']['p'])}, "
                           f"two-level bootstrap p = {_fmt_p(b['two_level']['p'])}")
            if key == "truth_info":  # the same test on the judges' mean scores (issue: robust conclusions)
                bs = better_than(rows, loc, rand(m), ks, "truth_info_score")
                tests["better_truth_info_score"] = bs
                same = (bs["permutation"]["p"] < 0.05) == (b["permutation"]["p"] < 0.05)
                lines += [f"- On the judges' mean scores instead of their verdicts (mean truth score x mean info "
                          f"score): gap {bs['permutation']['stat']:+.3f}, p = {_fmt_p(bs['permutation']['p'])}: "
                          + ("the same conclusion at 0.05." if same else "**a different conclusion at 0.05**."), ""]
                summary.append("the same on mean judge scores" if same else "NOT the same on mean judge scores")
        mcost = matched_cost(rows, loc, rand(m))
        tests["matched_cost"] = mcost
        lines += ["## At equal off-target cost (Truth*Info against KL on neutral text)", ""]
        if mcost is None:
            lines += [f"Needs at least two {knob_name}s per edit (a curve to interpolate along); this size has "
                      f"{len(ks)}.", ""]
        elif not mcost["targets"]:
            lines += [mcost["note"] + ".", ""]
        else:
            pm = mcost["permutation"]
            lines += ["| KL | probe16 | random mean |", "|---|---|---|"]
            lines += [f"| {t:.4f} | {l:.3f} | {o:.3f} |" for t, l, o in
                      zip(mcost["targets"], mcost["localized"], mcost["others_mean"])]
            lines += ["", f"Each edit's per-question Truth and Info interpolated linearly along its {knob_name} "
                      "curve to the same KL; the permutation test as above, pooled over these KL values: gap "
                      f"{pm['stat']:+.3f}, **p = {_fmt_p(pm['p'])}**.", ""]
            summary.append(f"at equal KL: gap {pm['stat']:+.3f}, p = {_fmt_p(pm['p'])}")
    eq = []
    if name in ("ipo-vs-iti", "ipo-random", "single-heads") and full in edits:
        cands = [loc_ipo] + (rand("ipo") if name == "ipo-random" else
                             [e for e in edits if e[0] == "ipo" and kind(e[1]) == "single"])
        refs = [full] + ([loc_ipo] if name == "single-heads" else [])
        for ref in refs:
            for e in cands:
                if e == ref or e not in edits:
                    continue
                for k in (knobs(e) if name == "ipo-vs-iti" else knobs(e)[:1]):
                    if k in knobs(ref):
                        sv = _seed_var(rows, k)
                        t = equivalence(rows, e, ref, k, margin, sv)
                        t["on_scores"] = equivalence(rows, e, ref, k, margin, sv, TI_SCORE)
                        for key in JUDGE_FREE:  # the same question without the judges
                            c = [CHANNELS.index(key)]
                            if not np.isnan(_mean_over_seeds(rows, e, k)[0][:, c]).any():
                                t[key] = equivalence(rows, e, ref, k, margin, _seed_var(rows, k, key) if all(
                                    key in r for r in rows) else 0.0, c, stats.mean_of)
                        eq.append({**t, "edit": _label(next(r for r in prim if _edit(r) == e)),
                                   "ref": _label(next(r for r in prim if _edit(r) == ref)), "at": f"tau {k:g}",
                                   "edit_key": list(e), "ref_key": list(ref)})
        for t, p, ps in zip(eq, stats.holm([t["p"] for t in eq]), stats.holm([t["on_scores"]["p"] for t in eq])):
            t["p_holm"], t["on_scores"]["p_holm"] = p, ps
        for key in JUDGE_FREE:
            tk = [t for t in eq if key in t]
            for t, p in zip(tk, stats.holm([t[key]["p"] for t in tk])):
                t[key]["p_holm"] = p
        tests["equivalence"] = eq
        if eq:
            lines += [f"## As good as? (equivalence within {margin:g} Truth*Info)", ""] + _equiv_table(eq, margin)
            jf = [t for t in eq if all(k in t for k in JUDGE_FREE)]
            if jf:
                lines += [f"Without the judges: TOST within {margin:g} on MC2 and on the held-out preference "
                          "accuracy (`pref_acc`), the same way (Holm within each measure):", "",
                          "| edit | vs | at | MC2 difference | 90% interval | as good as? | pref_acc difference | "
                          "90% interval | as good as? |", "|---" * 9 + "|"]
                for t in jf:
                    lines.append(f"| {t['edit']} | {t['ref']} | {t['at']} | " + " | ".join(
                        f"{t[k]['diff']:+.3f} | [{t[k]['ci90'][0]:+.3f}, {t[k]['ci90'][1]:+.3f}] | "
                        + ("**yes**" if t[k]["p_holm"] < 0.05 else "not shown") for k in JUDGE_FREE) + " |")
                lines.append("")
                for ref in dict.fromkeys(t["ref"] for t in jf):
                    tt = [t for t in jf if t["ref"] == ref]
                    summary.append("judge-free: " + ", ".join(
                        f"{sum(t[k]['p_holm'] < 0.05 for t in tt)}/{len(tt)} as good as {ref} on {k}"
                        for k in JUDGE_FREE))
            for ref in dict.fromkeys(t["ref"] for t in eq):
                tt = [t for t in eq if t["ref"] == ref]
                k, ks_ = sum(t["p_holm"] < 0.05 for t in tt), sum(t["on_scores"]["p_holm"] < 0.05 for t in tt)
                summary.append(f"{k}/{len(tt)} shown as good as {ref} (margin {margin:g}; smallest margin shown "
                               f"{min(t['min_margin'] for t in tt):.3f}; on mean judge scores {ks_}/{len(tt)})")
            same = all((t["p_holm"] < 0.05) == (t["on_scores"]["p_holm"] < 0.05) for t in eq)
            lines += ["On the judges' mean scores instead of their verdicts the equivalence tests conclude "
                      + ("the same for every row." if same else "differently for: " + ", ".join(
                          f"{t['edit']} vs {t['ref']}" for t in eq
                          if (t["p_holm"] < 0.05) != (t["on_scores"]["p_holm"] < 0.05)) + "."), ""]
    if name == "ipo-vs-iti" and loc_iti in edits and loc_ipo in edits:
        # IPO (at each tau) against ITI at its best alpha: a swap test per question (two arms)
        best_a = max((r for r in prim if _edit(r) == loc_iti), key=lambda r: r["truth_info"])["knob"]
        x = np.stack([np.stack([r["q"][:, :2] for r in sorted(prim, key=lambda r: r["knob"]) if _edit(r) == loc_ipo]),
                      np.stack([r["q"][:, :2] for r in prim if _edit(r) == loc_iti and r["knob"] == best_a]
                               * len(knobs(loc_ipo)))])
        pm = stats.permutation_test(x, stats.localized_gap(stats.truth_info), n_perm=N_PERM)
        tests["ipo_vs_iti"] = {"best_alpha": best_a, "permutation": pm}
        lines += ["## Is IPO better than ITI at probe16?", "",
                  f"IPO at probe16 (mean over tau) against ITI at its best alpha ({best_a:g}, chosen on the test "
                  f"questions, which favours ITI): Truth*Info gap {pm['stat']:+.3f}, paired permutation (swap per "
                  f"question) **p = {_fmt_p(pm['p'])}**.", ""]
        summary.append(f"IPO - ITI at probe16: {pm['stat']:+.3f}, p = {_fmt_p(pm['p'])}")

    check, comps = full_model_check(rows)
    if comps:
        lines += ["## Full-model check", "",
                  "The edit at a head set is a restriction of the plain rank-1 LoRA on every layer, so at the "
                  "optimum the full model's IPO loss is at most every head set's at the same tau. Tested on the "
                  "held-out IPO loss of the test questions' preference pairs (the base model as reference), paired "
                  "over test questions, one-sided, Holm across the edits; the validation loss (the best of the "
                  "stopping rule's validations, which favours an edit validated more often) beside it. "
                  + ("It holds for every edit." if not check else
                     f"**FAILED** ({len(check)}): the full-model reference is under-trained, so no edit here may be "
                     "read as 'as good as the full model'.\n\n" + "\n".join(f"- {x}" for x in check)), ""]
        on = [r for r in rows if r["bound"] is not None]
        if on:
            lines += ["Full-model edits given a head set's validation loss as a bound (run.full_model_bounds; while "
                      f"above it, its learning rates trained again with {ipo.PATIENCE_UP}x the patience, the lowest "
                      "first, until none was left): " + "; ".join(
                          f"{r['run']} (best validation loss {r['val_loss']:.3f}, bound {r['bound']:.3f}: "
                          + ("met" if r["val_loss"] <= r["bound"] else "still above") + ")" for r in on) + ".", ""]
        lines += ["| full | edit | tau | val loss full / edit | held-out IPO loss full / edit | full - edit [95%] | "
                  "p (Holm) |", "|---" * 7 + "|"]
        for c in comps:
            val = " / ".join("-" if v is None else f"{v:.3f}" for v in (c["val_full"], c["val_edit"]))
            lines.append(f"| {c['full']} | {c['edit']} | {c['tau']:g} | {val} | " + (
                f"{c['heldout_full']:.3f} / {c['heldout_edit']:.3f} | {c['diff']:+.3f} [{c['ci95'][0]:+.3f}, "
                f"{c['ci95'][1]:+.3f}] | {c['p_holm']:.2g} |" if "p" in c else "- | - | - |"))
        lines.append("")
    pics = figures(name, rows, tests, d, margin, {k: v["value"] for k, v in base.items()}, judged)
    lines += [f"![{p.stem}]({p.name})" for p in pics] or ["(matplotlib is not installed: no pictures)"]
    summary_line = (f"{name}: " + ("PARTIAL (" + f"{len(runs)} of {len(runs) + len(missing)} runs); " if missing else "")
                    + ("; ".join(summary) if summary else "no test applies at this size"))
    write_json(d / "table.json", {"rows": [{k: v for k, v in r.items() if k not in ("q", "heldout_loss")}
                                           for r in rows],
                                  "base": {k: base[k]["value"] for k in metrics}, "tests": tests,
                                  "margin": margin, "full_model_check": check, "full_model_comparisons": comps,
                                  "not_converged": unconverged,
                                  "summary": summary_line})
    text = "\n".join(lines + ["", "Summary: " + summary_line]) + "\n"
    write_atomic(d / "report.md", text if judged else for_pairs(text))
    return d / "report.md"


def for_pairs(text: str) -> str:
    """A report or figure text of an experiment on a pairs file: its measure is the held-out preference accuracy
    where TruthfulQA's is Truth*Info (and there are no judges, so no Info)."""
    for a, b in ((r"Truth\*Info", "preference accuracy"), (r"Truth-Info trade-off", "preference accuracy"),
                 (r"Truth vs Info", "preference accuracy"), (r"\bTruth\b", "preference accuracy"),
                 (r"\bInfo\b", "(no judge)")):
        text = re.sub(a, b, text)
    return text


def _color(r: dict) -> str:
    return {"probe16": "C3", "full": "k", "random16": "C0", "single": "C2"}.get(r["kind"], "C4")


def _curves(rows, method: str | None = None):
    """Each edit's primary curve over its knob (alpha or tau), as (edit, rows sorted by knob)."""
    out: dict[tuple, list] = {}
    for r in rows:
        if r["primary"] and (method is None or r["method"] == method):
            out.setdefault(_edit(r), []).append(r)
    return [(e, sorted(rs, key=lambda r: r["knob"])) for e, rs in out.items()]


def _plot_curves(ax, rows, x: str, y: str, method: str | None = None, label_once=True):
    seen = set()
    for e, rs in _curves(rows, method):
        r0 = rs[0]
        lab = _label(r0) if r0["kind"] in ("probe16", "full") else (
            f"{r0['method'].upper()} {r0['kind']}" if r0["kind"] not in seen else None)
        seen.add(r0["kind"])
        ax.plot([r[x] for r in rs], [r[y] for r in rs], "--" if r0["method"] == "iti" else "-", marker="o", ms=4,
                c=_color(r0), lw=2 if r0["kind"] in ("probe16", "full") else 1, alpha=1 if r0["kind"] != "random16"
                else 0.6, label=lab, mfc="none" if any(r["converged"] is False for r in rs) else _color(r0))
    extra = [r for r in rows if not r["primary"] and (method is None or r["method"] == method)]
    for k, r in enumerate(extra):  # the key edits' other training seeds, beside their curves
        ax.scatter([r[x]], [r[y]], marker="x", c=_color(r), label="other training seeds" if k == 0 else None)


def figures(name: str, rows: list[dict], tests: dict, d: Path, margin: float, base: dict, judged: bool = True
            ) -> list[Path]:
    """The experiment's figure as the paper draws it (one picture per figure); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig_no = {"iti-localized-vs-random": 1, "ipo-vs-iti": 2, "ipo-random": 3, "single-heads": 4, "mc": 5}[name]
    hollow = " (hollow markers: not converged)" if any(r["converged"] is False for r in rows) else ""
    if fig_no == 1:
        fig, ax = plt.subplots(1, 4, figsize=(20, 4.5))
        _plot_curves(ax[0], rows, "alpha", "truth_info")
        ax[0].set(xlabel="alpha", ylabel="Truth*Info", title="Truth*Info over alpha")
        _plot_curves(ax[1], rows, "info", "truth")
        ax[1].set(xlabel="Info", ylabel="Truth", title="Truth vs Info (along alpha)")
        _plot_curves(ax[2], rows, "kl", "mc2")
        ax[2].set(xlabel="KL on neutral text", ylabel="MC2", title="MC vs KL")
        _plot_curves(ax[3], rows, "kl", "truth_info")
        ax[3].set(xlabel="KL on neutral text", ylabel="Truth*Info", title="at equal off-target cost")
        b = tests.get("better_truth_info")
        sub = f"; probe16 > random: permutation p = {_fmt_p(b['permutation']['p'])}" if b else ""
        fig.suptitle(f"Fig. 1: ITI at probe16 (red) vs random 16-head sets (blue){sub}")
    elif fig_no == 2:
        fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
        for a, (x, y, t) in zip(ax, (("info", "truth", "Truth-Info trade-off"),
                                     ("kl", "truth_info", "Truth*Info against KL"))):
            _plot_curves(a, rows, x, y)
            a.scatter([base.get(x, 0.0)], [base[y]], marker="*", s=150, c="grey", label="base", zorder=3)
            a.set(xlabel={"info": "Info", "kl": "KL on neutral text"}[x], ylabel={"truth": "Truth"}.get(y, "Truth*Info"),
                  title=t)
        fig.suptitle("Fig. 2: ITI over alpha (dashed) and IPO over tau (solid) at probe16 (red), full-model IPO "
                     "(black)" + hollow)
    elif fig_no in (3, 4):
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        if fig_no == 3:
            _plot_curves(ax[0], rows, "info", "truth", "ipo")
            ax[0].scatter([base["info"]], [base["truth"]], marker="*", s=150, c="grey", label="base")
            ax[0].set(xlabel="Info", ylabel="Truth", title="Truth vs Info (IPO over tau)")
        else:  # single heads: probe accuracy against Truth*Info
            s = [r for r in rows if r["primary"] and r["kind"] == "single"]
            ax[0].scatter([r["probe_acc"] for r in s], [r["truth_info"] for r in s], c="C2")
            for r in s:
                ax[0].annotate(r["heads"][7:], (r["probe_acc"], r["truth_info"]), fontsize=7)
            ax[0].set(xlabel="probe accuracy of the head", ylabel="Truth*Info", title="single heads")
        # Truth*Info of every edit at the first tau (with its 95% interval) against the full model's band
        t0 = min(r["tau"] for r in rows if r["method"] == "ipo")
        es = [r for r in rows if r["primary"] and r["method"] == "ipo" and r["tau"] == t0]
        es.sort(key=lambda r: ({"full": 0, "probe16": 1}.get(r["kind"], 2), r["truth_info"]))
        full = next((r for r in es if r["kind"] == "full"), None)
        if full:
            ax[1].axhspan(full["truth_info"] - margin, full["truth_info"] + margin, color="k", alpha=0.1,
                          label=f"full model +- {margin:g} (equivalence margin)")
            ax[1].axhline(full["truth_info"], c="k", lw=1)
        for k, r in enumerate(es):
            lo, hi = r["ci"]["truth_info"]
            ax[1].errorbar([k], [r["truth_info"]], yerr=[[r["truth_info"] - lo], [hi - r["truth_info"]]], fmt="o",
                           c=_color(r), mfc="none" if r["converged"] is False else _color(r))
            extra = [x for x in rows if not x["primary"] and _edit(x) == _edit(r) and x["tau"] == t0]
            ax[1].scatter([k + 0.25] * len(extra), [x["truth_info"] for x in extra], marker="x", c=_color(r),
                          label="other training seeds" if extra and not any(
                              "seeds" in h for h in ax[1].get_legend_handles_labels()[1]) else None)
        eqd = {(t["edit"], t["ref"]): t for t in tests.get("equivalence", [])}
        ax[1].set_xticks(range(len(es)), [_label(r)[4:] + (" *" if eqd.get((_label(r), "IPO full"), {}).get(
            "p_holm", 1) < 0.05 else "") for r in es], rotation=60, ha="right", fontsize=7)
        ax[1].set(ylabel="Truth*Info", title=f"IPO at tau {t0:g} (95% intervals; *: shown as good as the full model)")
        ax[1].legend(fontsize=7)
        fig.suptitle(("Fig. 3: IPO at random 16-head sets (blue), probe16 (red), full model (black)" if fig_no == 3
                      else "Fig. 4: IPO at single heads (green), probe16 (red), full model (black)") + hollow)
    else:
        fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
        for a, y in zip(ax, ("mc2", "mc1")):
            for r in rows:
                if r["primary"]:
                    a.scatter(r["kl"], r[y], c=_color(r), s=30)
            a.scatter([base["kl"]], [base[y]], marker="*", s=150, c="grey")
            a.set(xlabel="KL on neutral text", ylabel=y.upper(), title=f"{y.upper()} vs KL")
        b = tests.get("better_mc2")
        sub = f"; probe16 > random on MC2: permutation p = {_fmt_p(b['permutation']['p'])}" if b else ""
        fig.suptitle(f"Fig. 5: IPO at probe16 (red), random 16-head sets (blue), full model (black){sub}")
    for a in np.atleast_1d(ax):
        if a.get_legend_handles_labels()[0] and not a.get_legend():
            a.legend(fontsize=7)
        if not judged:  # a pairs file: its measure's name on the axes
            a.set(xlabel=for_pairs(a.get_xlabel()), ylabel=for_pairs(a.get_ylabel()), title=for_pairs(a.get_title()))
    if not judged and fig._suptitle is not None:
        fig.suptitle(for_pairs(fig._suptitle.get_text()))
    fig.tight_layout()
    path = d / f"fig{fig_no}.png"
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return [path]
