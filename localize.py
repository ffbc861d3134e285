"""localize.py: the paper's argument as a test of any localization claim.

    python run.py localize --heads probe16                           # TruthfulQA, against 8 random head sets
    python run.py localize --heads grad16 --null layer-matched       # heads picked by IPO gradient, same layers
    python run.py localize --heads 14.1,19.2 --null complement       # is anything outside these heads needed?
    python run.py localize --heads probe16 --pairs FILE.jsonl        # any behaviour as preference pairs
    python run.py localize --heads probe16 --train-seeds 2           # candidate and full model over 2 seeds

A localization claim backed by an edit means something only if optimal edits elsewhere do worse. The command
trains the optimal edit (run.py's IPO run: the same learning-rate rule, stopping rule and budget for every
edit) at the candidate heads, at N null head sets of the same size and over the full model, evaluates each, and
reports the candidate's rank among the nulls, whether it is better than them (stats.permutation_test), which
nulls and whether the full model are as good as it (stats.tost, Holm), a picture, and a verdict in words.

Nulls: "random" (uniform head sets of the candidate's size), "layer-matched" (in each of the candidate's layers,
as many other heads of that layer: a stronger null) and "complement" (every head but the candidate's: if it
does as well, the candidate is not necessary). The measure: Truth*Info on TruthfulQA, held-out preference
accuracy on a pairs file; preference margin, MC and KL on neutral text beside it.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import stats
from llama import write_file_atomic
from run import (JOBS_HELP, METRICS, Context, RunConfig, UserError, _pos_int, do_runs, log, meet_full_model_bounds,
                 shard_of, write_atomic, write_json)

NULLS = ("random", "layer-matched", "complement")
GRAD_PAIRS = 64  # training pairs whose IPO gradient ranks the heads for gradK


def head_str(heads) -> str:
    return ",".join(f"{l}.{h}" for l, h in sorted(heads))


def null_sets(cand: list[tuple[int, int]], kind: str, n: int, n_layers: int, n_heads: int, seed: int = 0
              ) -> list[list[tuple[int, int]]]:
    """The null head sets of a candidate: n uniform random sets of its size (randomK with head seeds 1..n, the
    experiments' random sets, so that the edits are shared with them; `seed` does not change them), n layer-matched sets (in each candidate
    layer as many other heads of that layer, drawn without replacement), or the single complement."""
    from experiments import random_set

    cs = set(cand)
    all_heads = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    if kind == "complement":
        rest = [x for x in all_heads if x not in cs]
        if not rest:
            raise UserError("--null complement: the candidate holds every head; its complement is empty")
        return [rest]
    out = []
    for i in range(n):
        rng = random.Random(f"null:{kind}:{seed}:{i}")
        if kind == "random":
            out.append(sorted(random_set(i + 1, n_layers, n_heads, k=len(cand))))
        elif kind == "layer-matched":
            s = []
            for l in sorted({l for l, _ in cand}):
                k = sum(1 for x in cand if x[0] == l)
                others = [(l, h) for h in range(n_heads) if (l, h) not in cs]
                if len(others) < k:
                    raise UserError(f"--null layer-matched: layer {l} has {k} candidate heads and only "
                                    f"{len(others)} other heads to match them")
                s += rng.sample(others, k)
            out.append(sorted(s))
        else:
            raise UserError(f"--null {kind!r}: expected one of {', '.join(NULLS)}")
    return out


def grad_heads(model, tokenizer, pairs, prompts, k: int, tau: float = 0.1, seed: int = 0, batch_size: int = 4
               ) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """gradK: the k heads whose b_h^l receives the largest IPO gradient at initialisation (eq. 4.3 with every
    head active, b = 0, a drawn as for training), summed over a few batches of training pairs. The first-order
    head importance of the edit itself. Returns (heads, score [L, H] = ||dL/db_h^l||)."""
    import ipo

    c = model.cfg
    edit = ipo.Rank1Edit.at_heads(c, torch.ones(c.n_layers, c.n_heads, dtype=torch.bool), seed=seed).to(model.device)
    data = ipo.encode_pairs(tokenizer, pairs, prompts)
    ref = ipo.pair_logprobs(model, data, None)  # [n, 2]: the edit is zero at b = 0, so the reference is the model
    for start in range(0, len(data), batch_size):
        loss, _ = ipo.ipo_step_loss(model, data, list(range(start, min(start + batch_size, len(data)))), ref, edit, tau)
        loss.backward()  # gradients accumulate in edit.b: [L, H*D]
    score = edit.b.grad.detach().float().cpu().view(c.n_layers, c.n_heads, c.head_dim).norm(dim=-1)  # [L, H]
    order = torch.argsort(score.flatten(), descending=True)[:k].tolist()
    return sorted((i // c.n_heads, i % c.n_heads) for i in order), score


def localize_runs(base: RunConfig, cand: list[tuple[int, int]], nulls: list[list[tuple[int, int]]], null: str,
                  cand_spec: str | None = None, train_seeds: int = 1) -> list[tuple[str, RunConfig]]:
    """(role, config) of every edit: the candidate, each null set, the full model; all IPO at base's settings.
    The candidate keeps its spec (cand_spec, e.g. probe16) and random nulls are randomK with their head seed, so
    that these are the very runs of an experiment with the same settings (runs are found by config.slug()).
    train_seeds > 1: the candidate and the full model also trained with training seeds base.seed + 1, ... (roles
    "candidate r1", "full r1", ...; the experiments' extra seeds of their key edits)."""
    b = replace(base, method="ipo")
    nul = [replace(b, heads=f"random{len(s)}", head_seed=i + 1) if null == "random" else replace(b, heads=head_str(s))
           for i, s in enumerate(nulls)]
    key = [("candidate", replace(b, heads=cand_spec or head_str(cand))), ("full", replace(b, heads="full"))]
    seeds = lambda role, c: [(f"{role} r{j}", replace(c, train_seed=base.seed + j)) for j in range(1, train_seeds)]
    return ([key[0]] + [(f"{null}-{i + 1}", c) for i, c in enumerate(nul)] + seeds(*key[0])  # the full model last:
            + [key[1]] + seeds(*key[1]))  # it trains knowing the head sets' validation loss (run.bound_before)


def role(name: str) -> str:
    """The edit a run belongs to ("candidate r1" -> "candidate"): its training seeds are averaged."""
    return name.split(" ")[0]


def _measure(res: dict) -> tuple[str, list[str], Callable]:
    """The verdict's measure: Truth*Info where the judges scored the run (TruthfulQA), else preference accuracy."""
    pq = res["per_question"]["ipo"]
    if "truth" in pq:
        return "truth_info", ["truth", "info"], stats.truth_info
    return "pref_acc", ["pref_acc"], stats.mean_of


def localize_report(runs, res: dict, d: Path, cand_spec: str, null: str, margin: float = stats.MARGIN,
                    extra: dict | None = None) -> dict:
    """Rank, tests, picture and verdict of a localize run from its finished runs. Returns the verdict dict (also
    in d/verdict.json; the report in d/report.md)."""
    d.mkdir(parents=True, exist_ok=True)
    key, chans, stat = _measure(res["candidate"])
    what = {"truth_info": "Truth*Info", "pref_acc": "held-out preference accuracy"}[key]
    per_run = {name: np.array([res[name]["per_question"]["ipo"][c] for c in chans], dtype=np.float64).T  # [N, C]
               for name, _ in runs}
    seeds = {}  # edit -> its runs (training seeds)
    for name, _ in runs:
        seeds.setdefault(role(name), []).append(name)
    x = {e: np.mean([per_run[n] for n in ns], 0) for e, ns in seeds.items()}  # [N, C], averaged over seeds
    val = {e: float(stat(x[e])) for e in x}
    # the training-seed variance of the measure (edits trained with several seeds), added to every TOST's variance
    seed_var, seed_df = stats.seed_variance([[float(stat(per_run[n])) for n in ns] for ns in seeds.values()])
    k = {e: len(ns) for e, ns in seeds.items()}
    se = lambda a, b: stats.se_with_seeds(x[a], x[b], stat, seed_var, k[a], k[b])[0]
    null_names = [e for e in seeds if e not in ("candidate", "full")]
    cand = val["candidate"]
    n_ge = sum(val[n] >= cand for n in null_names)
    arms = np.stack([x["candidate"][None]] + [x[n][None] for n in null_names])  # [1 + nulls, 1, N, C]
    perm = stats.permutation_test(arms, stats.localized_gap(stat), n_perm=10_000)
    two = stats.two_level_bootstrap(arms, stat, n_boot=10_000)  # null sets, then questions, resampled
    eq_nulls = [{"null": n, **stats.tost(val[n] - cand, se(n, "candidate"), margin)} for n in null_names]
    for e, p in zip(eq_nulls, stats.holm([e["p"] for e in eq_nulls])):
        e["p_holm"] = p
    eq_full = stats.tost(cand - val["full"], se("candidate", "full"), margin)
    n_eq = sum(e["p_holm"] < 0.05 for e in eq_nulls)
    n = len(null_names)
    conv = {name: (res[name].get("ipo") or {}).get("converged") for name, _ in runs}
    # the verdict, in words: beating these null sets (permutation) and a null set drawn like them (two levels)
    null_mean = float(np.mean([val[m] for m in null_names]))
    if perm["p"] < 0.05 and (two["p"] < 0.05 or n < 2):
        v = (f"The candidate ({cand_spec}) beats the {null} null: {what} {cand:.3f} against {n - n_ge} of {n} null "
             f"sets below it (paired permutation test over test questions, p = {perm['p']:.2g}"
             + (f"; two-level bootstrap over null sets and questions, p = {two['p']:.2g}" if n > 1 else "")
             + "). Optimal edits "
             "elsewhere do worse, so edit success here is evidence that these heads matter for the behaviour"
             + (" (and that the rest of the model cannot stand in for them)." if null == "complement" else
                f"; {n_eq} of {n} null sets are nonetheless shown as good within {margin:g}."))
    elif perm["p"] < 0.05:
        v = (f"The candidate ({cand_spec}) beats these {n} {null} head sets on average ({what} {cand:.3f} against "
             f"their mean {null_mean:.3f}; paired permutation test over test questions, p = {perm['p']:.2g}), but not "
             f"a {null} head set drawn like them: {n_ge} of {n} do as well or better, and with the spread between "
             f"sets counted (two-level bootstrap over null sets and questions) p = {two['p']:.2g}. Edit success at "
             "these heads is no evidence that they localize the behaviour (more null sets would sharpen this).")
    else:
        v = (f"{n_ge} of {n} {null} head sets do as well as the candidate ({cand_spec}) or better on {what} "
             f"({cand:.3f}; permutation p = {perm['p']:.2g}; {n_eq} of {n} shown equivalent within {margin:g}, "
             "TOST with Holm): edit success at these heads is no evidence that they localize the behaviour.")
    v += (f" Against the full model ({val['full']:.3f}) the candidate is "
          + ("shown as good" if eq_full["equivalent"] else "not shown as good")
          + f" within {margin:g} (difference {cand - val['full']:+.3f}, TOST p = {eq_full['p']:.2g}).")
    if k["candidate"] > 1:
        v += (f" The candidate's and the full model's values are means over {k['candidate']} training seeds ("
              + "; ".join(f"{e}: " + ", ".join(f"{stat(per_run[n]):.3f}" for n in seeds[e]) for e in ("candidate", "full"))
              + f"); the training-seed sd, {np.sqrt(seed_var):.3f}, is in every equivalence test.")
    if any(c is False for c in conv.values()):
        v += (" WARNING: " + ", ".join(k for k, c in conv.items() if c is False) + " did not converge: their "
              "figures understate what an edit there can do.")
    cols = [k for k in METRICS if k in res["candidate"]["metrics"]["ipo"] and k != key]
    lines = [f"# localize {cand_spec} against the {null} null", "", v, "",
             f"| edit | heads | train seed | {what} | " + " | ".join(cols) + " | converged |",
             "|---" * (5 + len(cols)) + "|"]
    for name, c in runs:
        m = res[name]["metrics"]["ipo"]
        hs = (f"{c.heads}, head seed {c.head_seed}" if c.heads.startswith("random") else c.heads if len(c.heads) < 60
              else f"{len(res[name]['heads'])} heads")
        lines.append(f"| {role(name)} | {hs} | {c.train_seed if c.train_seed is not None else c.seed} | "
                     f"{stat(per_run[name]):.3f} | " + " | ".join(f"{m[k_]['value']:.3f}" for k_ in cols)
                     + f" | {'yes' if conv[name] else '**NO**'} |")
    lines += ["", f"- Rank: {n_ge} of {n} null sets reach the candidate's {what} (point values).",
              f"- Better than the nulls: paired permutation test (unit: test question; labels of the candidate and the "
              f"{n} null edits permuted per question; {perm['n_perm']} permutations): gap {perm['stat']:+.3f}, "
              f"p = {perm['p']:.2g}.",
              f"- Better than a null set drawn like these: two-level bootstrap (the {n} null sets resampled, then the "
              f"test questions; {two['n_boot']} replicates): gap {two['stat']:+.3f}, 95% interval "
              f"[{two['ci95'][0]:+.3f}, {two['ci95'][1]:+.3f}], p = {two['p']:.2g}.",
              f"- As good as the candidate: TOST within {margin:g} (`--margin`) on the paired bootstrap over questions"
              + (f" plus the training-seed variance ({seed_df} df)" if seed_df else "") + ", "
              f"Holm across the {n} null sets: " + ", ".join(f"{e['null']} {e['diff']:+.3f} (p {e['p_holm']:.2g})"
                                                             for e in eq_nulls) + ".", ""]
    if extra:
        lines += [f"- {k}: {v_}" for k, v_ in extra.items()] + [""]
    pic = _picture(runs, res, val, {n: float(stat(per_run[n])) for n in per_run}, what, d, cand_spec, null)
    lines += [f"![null distribution]({pic.name})"] if pic else ["(matplotlib is not installed: no picture)"]
    out = {"candidate": cand_spec, "null": null, "measure": key, "values": val, "rank": n_ge, "n_null": n,
           "train_seeds": k, "seed_variance": {"var": seed_var, "df": seed_df},
           "permutation": perm, "two_level": two, "equivalent_nulls": eq_nulls, "vs_full": eq_full, "verdict": v,
           "converged": conv, **({"extra": extra} if extra else {})}
    write_json(d / "verdict.json", out)
    write_atomic(d / "report.md", "\n".join(lines) + "\n")
    return out


def _picture(runs, res, val, per_run, what, d: Path, cand_spec, null) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [n for n in val if n not in ("candidate", "full")]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].hist([val[n] for n in names], bins=max(5, len(names)), color="C0", alpha=0.7, label=f"{null} null sets")
    several = len(per_run) > len(val)
    ax[0].axvline(val["candidate"], c="C3", lw=2, label=f"candidate {cand_spec}" + (" (seed mean)" if several else ""))
    ax[0].axvline(val["full"], c="k", lw=2, ls="--", label="full model" + (" (seed mean)" if several else ""))
    ax[0].set(xlabel=what, ylabel="null sets", title="the candidate among the nulls")
    ax[0].legend(fontsize=7)
    for n, _ in runs:
        m = res[n]["metrics"]["ipo"]
        c = "C3" if role(n) == "candidate" else "k" if role(n) == "full" else "C0"
        ax[1].scatter(m["kl"]["value"], per_run[n], c=c, s=40 if c != "C0" else 20)
    ax[1].set(xlabel="KL on neutral text", ylabel=what,
              title="at what off-target cost" + (" (every training seed)" if several else ""))
    fig.tight_layout()
    path = d / "localize.png"
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


def cmd_localize(argv: list[str]) -> int:
    from run import add_run_args, config_from_args

    p = argparse.ArgumentParser(prog="run.py localize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--null", choices=NULLS, default="random", help="the null head sets (default random)")
    p.add_argument("--n", type=int, default=8, help="null sets (default 8; complement: always 1)")
    p.add_argument("--train-seeds", type=int, default=1, metavar="K",
                   help="train the candidate and the full model with K training seeds and average each over them "
                        "(default 1); the seed variance enters the equivalence tests. A verdict one seed can flip "
                        "needs K >= 2")
    p.add_argument("--shard", default="0/1",
                   help="i/n: do only shard i of n, the edits split by their estimated cost "
                        "(run.shard_of; default 0/1)")
    p.add_argument("--margin", type=float, default=stats.MARGIN, help=f"equivalence margin (default {stats.MARGIN:g})")
    p.add_argument("--jobs", type=_pos_int, default=1, help=JOBS_HELP)
    p.add_argument("--only", default=None, metavar="RUN", help="do only this edit (by run name; no verdict)")
    p.add_argument("--runs", default=None, metavar="DIR",
                   help="where the edits are kept, each under its run name (default: the report's directory); an "
                        "experiment's directory (runs/exp-default) shares the edits it trained with the same settings")
    argv, given = list(argv), list(argv)
    m = re.fullmatch(r"grad(\d+)", _flag(argv, "--heads") or "")
    if m:  # gradK is resolved below, once the model is loaded; the run parser sees a placeholder
        argv[argv.index("--heads") + 1] = "random" + m.group(1)
    from experiments import glue_dash_values

    a = p.parse_args(glue_dash_values(argv, ("--shard",)))
    if not 1 <= a.n <= 1000:
        raise UserError(f"--n {a.n}: expected between 1 and 1000 null sets")
    if not 1 <= a.train_seeds <= 20:
        raise UserError(f"--train-seeds {a.train_seeds}: expected between 1 and 20 training seeds")
    if not 0 < a.margin < 1:
        raise UserError(f"--margin {a.margin}: expected a difference between 0 and 1, e.g. 0.05")
    try:
        si, sn = (int(x) for x in a.shard.split("/"))
        assert 0 <= si < sn
    except (ValueError, AssertionError):
        raise UserError(f"--shard {a.shard!r}: expected i/n with 0 <= i < n, e.g. 0/4") from None
    if a.method != "ipo" or a.heads == "full":
        raise UserError("localize trains IPO edits at a head set: give --heads a head set and no --method")
    base = config_from_args(a)
    ctx = Context(base)
    c = ctx.model.cfg
    extra = {}
    if m:
        import truthfulqa

        k = int(m.group(1))
        pairs = random.Random(base.seed).sample(truthfulqa.preference_pairs(ctx.questions, ctx.split.train),
                                                GRAD_PAIRS)
        cand, score = grad_heads(ctx.model, ctx.tok, pairs, ctx.prompts, k, tau=base.tau, seed=base.seed)
        spec = f"grad{k}"
        probe_top = set(map(tuple, ctx.mask(replace(base, heads=f"probe{k}")).nonzero().tolist()))
        extra["gradK"] = (f"{spec} = the {k} heads of largest IPO gradient at initialisation ({GRAD_PAIRS} training "
                          f"pairs): {head_str(cand)}; {len(probe_top & set(cand))} of them are among probe{k}")
    else:
        spec = a.heads
        cand = [tuple(x) for x in ctx.mask(base).nonzero().tolist()]
    nulls = null_sets(cand, a.null, a.n, c.n_layers, c.n_heads, base.seed)
    runs = localize_runs(base, cand, nulls, a.null, None if m else spec, a.train_seeds)
    tag = re.sub(r"[^A-Za-z0-9.+-]", "", spec.replace(",", "+"))[:40]
    model_tag = "" if base.model == RunConfig.model else "-" + re.sub(r"[^A-Za-z0-9._-]", "", Path(base.model).name)[:40]
    pairs_tag = "" if not base.pairs else "-" + re.sub(r"[^A-Za-z0-9._-]", "", Path(base.pairs).stem)[:40]
    seeds_tag = f"-k{a.train_seeds}" if a.train_seeds > 1 else ""
    out = Path(a.out) / f"localize-{tag}-{a.null}-s{base.seed}{seeds_tag}{pairs_tag}{model_tag}"
    keep = Path(a.runs) if a.runs else out
    edits = [(rc.slug(), rc) for _, rc in runs]  # by run name
    if a.only is not None:
        one = [r for r in edits if r[0] == a.only]
        if not one:
            raise UserError(f"--only {a.only!r}: not one of this command's edits: {', '.join(r for r, _ in edits)}")
        do_runs(edits, one, keep, ctx)
        return 0
    mine = [r for r, s in zip(edits, shard_of(edits, sn)) if s == si]
    log(f"localize {spec} ({len(cand)} heads: {head_str(cand)}) against {len(nulls)} {a.null} null set(s) and the full "
        f"model: {len(runs)} edits, shard {si}/{sn} does {len(mine)}")
    do_runs(edits, mine, keep, ctx, a.jobs, ["localize"] + given)
    done = {name: json.loads((keep / rc.slug() / "results.json").read_text()) for name, rc in runs
            if (keep / rc.slug() / "results.json").exists()}
    if len(done) < len(runs):
        log(f"{len(done)}/{len(runs)} edits finished; the verdict is drawn once every shard is done")
        return 0
    by_dir = {rc.slug(): name for name, rc in runs}
    res = {d: done[name] for d, name in by_dir.items()}
    meet_full_model_bounds([(rc.slug(), rc) for _, rc in runs], res, keep, ctx, sharded=sn > 1)
    done = {name: res[d] for d, name in by_dir.items()}
    v = localize_report(runs, done, out, spec, a.null, a.margin, extra)
    log(f"localize: {out / 'report.md'}\n{v['verdict']}")
    return 0


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None
