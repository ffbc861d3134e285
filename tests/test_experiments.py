"""experiments.py: every experiment lists its runs (shared by name), single heads are distinct and outside the
random sets, and every report and figure is written from fabricated results, with tests that find a planted
effect and the full-model check that fails on an under-trained reference."""
from __future__ import annotations

import json

import numpy as np
import pytest

import experiments as ex
import stats
import run


def fabricate(runs, boost: dict | None = None, n: int = 120, seed: int = 0, val: dict | None = None) -> dict:
    """Finished results for every run: per-question truth/info/MC at a base rate, raised for the head kinds in
    `boost` (kind -> added probability), metrics computed from them, KL rising with alpha / tau."""
    rng = np.random.default_rng(seed)
    boost = boost or {}
    res = {}
    base_m = {k: {"value": 0.3, "ci95": [0.2, 0.4]} for k in run.METRICS}
    for rname, c in runs:
        p = 0.55 + boost.get(ex.kind(c.heads), 0.0)
        t, i = (rng.random(n) < p).astype(float), (rng.random(n) < 0.8).astype(float)
        mc1, mc2 = (rng.random(n) < p).astype(float), np.clip(rng.normal(p, 0.2, n), 0, 1)
        ts, is_ = np.clip(t * 0.8 + rng.random(n) * 0.2, 0, 1), np.clip(i * 0.8 + rng.random(n) * 0.2, 0, 1)
        knob = c.alpha if c.method == "iti" else c.tau
        kl = 0.02 * knob * (2 if c.heads == "probe16" else 1) + 0.01 * rng.random()
        m = {"truth": t.mean(), "info": i.mean(), "truth_info": t.mean() * i.mean(), "mc1": mc1.mean(), "pref_acc": mc1.mean(),
             "mc2": mc2.mean(), "mc3": mc2.mean(), "kl": kl, "ce": 3.0, "kl_qa": kl, "ce_qa": 3.0}
        label = "iti" if c.method == "iti" else "ipo"
        heads = [c.heads[7:]] if c.heads.startswith("single:") else ["1.2", "3.4"]
        vl = (val or {}).get(c.heads, 20.0 + (c.heads != "full"))
        ipo = {"lr": 1e-3, "steps": 100, "converged": c.head_seed != 2, "val_loss": vl}
        res[rname] = {"metrics": {"base": base_m, label: {k: {"value": float(v), "ci95": [v - 0.1, v + 0.1]}
                                                          for k, v in m.items()}},
                      "per_question": {label: {"qids": list(range(n)), "truth": t.tolist(), "info": i.tolist(),
                                               "mc1": mc1.tolist(), "mc2": mc2.tolist(),
                                               "truth_score": ts.tolist(), "info_score": is_.tolist(),
                                               "pref_acc": mc1.tolist()}},
                      "heads": heads, "ipo": ipo if label == "ipo" else None,
                      "probe_acc_of_heads": {} if c.heads == "full" else {h: 0.6 for h in heads}}
    return res


@pytest.mark.parametrize("size", list(ex.SIZES))
@pytest.mark.parametrize("name", list(ex.EXPERIMENTS))
def test_experiment_runs(name, size):
    s = ex.SIZES[size]
    runs = ex.experiment_runs(name, run.RunConfig(), s)
    assert len({r for r, _ in runs}) == len(runs) and all(c.lr_factors == list(s["lr_factors"]) for _, c in runs)
    ipo_runs = [c for _, c in runs if c.method == "ipo"]
    full = [c.full_model for _, c in runs]
    assert full == sorted(full)  # the full model last: it trains knowing the head sets' validation loss
    if ipo_runs:  # the full-model bound at every tau; key edits at each extra training seed
        assert {c.tau for c in ipo_runs if c.heads == "full"} == set(s["key_taus"] if name == "ipo-vs-iti" else s["taus"])
        assert {c.train_seed for c in ipo_runs if c.heads == "full"} == {None, *s["train_seeds"]}
    if name == "single-heads":
        singles = [(c.heads, c.tau) for c in ipo_runs if c.heads.startswith("single:")]
        assert len(singles) == len(set(singles)) == s["n_single"] * len(s["taus"])
        assert len({h for h, _ in singles}) == s["n_single"]


def test_single_heads_are_distinct_and_outside_the_random_sets():
    s = dict(ex.SIZES["paper"], n_single=60)
    exclude = {h for i in range(s["n_random"]) for h in ex.random_set(i + 1, 30, 9)}
    heads = ex.single_heads(60, 30, 9, exclude)
    assert len(set(heads)) == 60 and not set(heads) & exclude
    assert heads == ex.single_heads(60, 30, 9, exclude)  # seeded
    with pytest.raises(run.UserError):
        ex.single_heads(270 - len(exclude) + 1, 30, 9, exclude)


@pytest.mark.parametrize("name", list(ex.EXPERIMENTS))
def test_every_report_and_figure_from_fabricated_results(name, tmp_path):
    pytest.importorskip("matplotlib")
    runs = ex.experiment_runs(name, run.RunConfig(), ex.SIZES["default"])
    res = fabricate(runs, boost={"probe16": 0.3})
    text = ex.experiment_report(name, runs, res, tmp_path).read_text()
    table = json.loads((tmp_path / "table.json").read_text())
    assert "| base |" in text and all(f"| {r} |" in text for r, _ in runs) and "(x, y, x_random)" in text
    fig = {"iti-localized-vs-random": 1, "ipo-vs-iti": 2, "ipo-random": 3, "single-heads": 4, "mc": 5}[name]
    assert (tmp_path / f"fig{fig}.png").stat().st_size > 10_000 and f"fig{fig}.png" in text
    assert len(table["rows"]) == len(runs) and table["summary"].startswith(name)
    t = table["tests"]
    if name in ("iti-localized-vs-random", "ipo-random", "mc"):  # a planted 0.3 effect is found
        key = "better_mc2" if name == "mc" else "better_truth_info"
        assert t[key]["permutation"]["p"] < 0.01 and "Paired permutation test" in text and "t-test" in text
        if name != "mc":  # the conclusion on the judges' mean scores is reported beside it
            assert t["better_truth_info_score"]["permutation"]["p"] < 0.01 and "the same on mean judge scores" in text
    if name == "iti-localized-vs-random":  # matched cost along alpha
        assert t["matched_cost"]["targets"] and "At equal off-target cost" in text
    if name in ("ipo-vs-iti", "ipo-random", "single-heads"):
        assert t["equivalence"] and "As good as?" in text and all("p_holm" in e for e in t["equivalence"])
        assert "Without the judges" in text and all("p_holm" in e["mc2"] and "p_holm" in e["pref_acc"]
                                                    for e in t["equivalence"])
        assert t["seed_variance"]["df"] >= 2 and "## Seed variance" in text
        assert "## Full-model check" in text and "It holds for every edit." in text
    if name == "ipo-vs-iti":
        assert "Is IPO better than ITI" in text
    assert ("did NOT converge" in text) == any(c.head_seed == 2 and c.method == "ipo" for _, c in runs)


def test_equivalence_of_identical_edits_and_of_distant_ones(tmp_path):
    """Random sets that give the full model's answers are shown as good as it; sets 0.3 below are not."""
    runs = ex.experiment_runs("ipo-random", run.RunConfig(), dict(ex.SIZES["default"], train_seeds=()))
    res = fabricate(runs, n=400)
    full = next(r for r, c in runs if c.heads == "full" and c.tau == 0.1)
    for r, c in runs:
        if c.heads == "random16":
            res[r]["per_question"] = res[full]["per_question"]
    ex.experiment_report("ipo-random", runs, res, tmp_path / "same")
    eq = json.loads((tmp_path / "same" / "table.json").read_text())["tests"]["equivalence"]
    assert all(e["p_holm"] < 0.05 for e in eq if "random16" in e["edit"])
    res = fabricate(runs, boost={"random16": -0.3}, n=400)
    ex.experiment_report("ipo-random", runs, res, tmp_path / "far")
    eq = json.loads((tmp_path / "far" / "table.json").read_text())["tests"]["equivalence"]
    assert not any(e["p_holm"] < 0.05 for e in eq if "random16" in e["edit"])


def test_full_model_check_fails_on_an_undertrained_reference(tmp_path):
    """A full-model edit whose validation loss is above a head set's (beyond the 1% slack) fails the check,
    loudly in the report and table.json."""
    size = dict(ex.SIZES["quick"], n_random=1, taus=(0.1, 0.5), key_taus=(0.1, 0.5))
    runs = ex.experiment_runs("ipo-random", run.RunConfig(), size)
    res = fabricate(runs)
    for r, c in runs:  # at tau 0.1 the full model loses to probe16
        res[r]["ipo"]["val_loss"] = {"full": 19.0, "probe16": 18.0, "random16": 20.0}[c.heads] if c.tau == 0.1 \
            else 0.9 + 0.1 * (c.heads != "full")
    text = ex.experiment_report("ipo-random", runs, res, tmp_path / "x").read_text()
    check = json.loads((tmp_path / "x" / "table.json").read_text())["full_model_check"]
    assert "**FAILED** (1)" in text and len(check) == 1 and "tau 0.1" in check[0] and "probe16" in check[0]
    for r, c in runs:  # within the slack (1% of 0.9 > 0.0089) it holds
        res[r]["ipo"]["val_loss"] = {"full": 0.9089, "probe16": 0.9, "random16": 0.95}[c.heads]
    ex.experiment_report("ipo-random", runs, res, tmp_path / "y")
    assert json.loads((tmp_path / "y" / "table.json").read_text())["full_model_check"] == []


def test_runs_on_other_test_questions_are_refused(tmp_path):
    runs = ex.experiment_runs("mc", run.RunConfig(), ex.SIZES["quick"])
    res = fabricate(runs)
    res[runs[1][0]]["per_question"]["ipo"]["qids"] = list(range(1, 121))
    with pytest.raises(run.UserError, match="other test questions"):
        ex.experiment_report("mc", runs, res, tmp_path)


@pytest.mark.parametrize("name", list(ex.EXPERIMENTS))
def test_reports_of_a_pairs_file(name, tmp_path):
    """On a pairs file (no judges) the measure is the held-out preference accuracy, named so in text and figures."""
    pytest.importorskip("matplotlib")
    runs = ex.experiment_runs(name, run.RunConfig(pairs="p.jsonl", probe_layout="raw"), ex.SIZES["default"])
    res = fabricate(runs, boost={"probe16": 0.3})
    for r in res.values():
        for part in ("metrics", "per_question"):
            for label, d in r[part].items():
                if "truth" in d:
                    d["pref_acc"], d["pref_margin"] = d.pop("truth"), d["mc2"]
                for k in ("info", "truth_info", "truth_score", "info_score"):
                    d.pop(k, None)
    text = ex.experiment_report(name, runs, res, tmp_path).read_text()
    assert "preference accuracy" in text and "Truth*Info" not in text and "pref_acc" in text
    if name in ("iti-localized-vs-random", "ipo-random"):
        assert json.loads((tmp_path / "table.json").read_text())["tests"]["better_truth_info"]["permutation"]["p"] < 0.01


def test_partial_report_names_the_missing_runs(tmp_path):
    runs = ex.experiment_runs("ipo-random", run.RunConfig(), ex.SIZES["default"])
    res = fabricate(runs)
    have = [(r, c) for r, c in runs if "-r1-" not in r]  # the seed runs not yet done
    text = ex.experiment_report("ipo-random", have, res, tmp_path, missing=[r for r, _ in runs if "-r1-" in r]).read_text()
    assert "**PARTIAL**" in text and "ipo-full-s0-r1-t0.1" in text and "No edit here was trained with several seeds" in text
    assert json.loads((tmp_path / "table.json").read_text())["summary"].startswith("ipo-random: PARTIAL (6 of 8 runs)")


def _with_pairs(res: dict, runs, h_mean: dict, tau_of: dict, n_pairs: int = 3, seed: int = 1) -> dict:
    """Give each fabricated run per-pair test margins: the base model's at random, the edit's the base's plus a
    gain h ~ N(h_mean[heads], 1) per pair (the IPO loss per pair is (h - 1 / (2 tau))^2)."""
    rng = np.random.default_rng(seed)
    for r, c in runs:
        qids = res[r]["per_question"]["ipo"]["qids"]
        q = [x for x in qids for _ in range(n_pairs)]
        base = rng.normal(0, 1, len(q))
        gain = rng.normal(h_mean[c.heads], 1, len(q))
        res[r]["pairs"] = {"base": {"qid": q, "margin": base.tolist()}, "ipo": {"qid": q, "margin": (base + gain).tolist()}}
    return res


def test_heldout_ipo_loss_is_the_ipo_loss_of_each_questions_test_pairs():
    qids = [7, 3]
    r = {"per_question": {"ipo": {"qids": qids}},
         "pairs": {"base": {"qid": [3, 7, 7, 3], "margin": [0.5, -1.0, 0.0, 2.0]},
                   "ipo": {"qid": [3, 7, 7, 3], "margin": [4.0, 2.0, 6.0, 2.5]}}}
    got = ex.heldout_ipo_loss(r, "ipo", tau=0.1)  # 1 / (2 tau) = 5; h = edit - base per pair
    want = [np.mean([(3.0 - 5) ** 2, (6.0 - 5) ** 2]), np.mean([(3.5 - 5) ** 2, (0.5 - 5) ** 2])]
    assert got == pytest.approx(want)
    assert ex.heldout_ipo_loss({"per_question": r["per_question"]}, "ipo", 0.1) is None  # saved before the margins


def test_full_model_check_tests_the_heldout_loss_not_the_validation_minimum(tmp_path):
    """With per-pair margins the check is a paired test of the held-out IPO loss: a full model worse on held-out
    pairs fails although its validation minimum is the lowest, and one as good passes although its validation
    minimum is not."""
    size = dict(ex.SIZES["quick"], n_random=2, train_seeds=())
    runs = ex.experiment_runs("ipo-random", run.RunConfig(), size)
    val = {"full": 18.0, "probe16": 20.0, "random16": 20.0}
    res = _with_pairs(fabricate(runs, val=val), runs, {"full": 3.0, "probe16": 4.5, "random16": 4.5}, {})
    text = ex.experiment_report("ipo-random", runs, res, tmp_path / "x").read_text()
    t = json.loads((tmp_path / "x" / "table.json").read_text())
    assert len(t["full_model_check"]) == 3 and "held-out IPO loss" in t["full_model_check"][0]
    assert "**FAILED** (3)" in text and all(c["p_holm"] < 0.05 and c["diff"] > 0 for c in t["full_model_comparisons"])
    val = {"full": 25.0, "probe16": 20.0, "random16": 20.0}
    res = _with_pairs(fabricate(runs, val=val), runs, {"full": 5.0, "probe16": 4.0, "random16": 4.0}, {})
    text = ex.experiment_report("ipo-random", runs, res, tmp_path / "y").read_text()
    t = json.loads((tmp_path / "y" / "table.json").read_text())
    assert t["full_model_check"] == [] and "It holds for every edit." in text
    assert all(c["diff"] < 0 for c in t["full_model_comparisons"]) and "| 25.000 / 20.000 |" in text
    assert "as a bound" not in text
    for r, c in runs:  # the full model given a head set's validation loss as a bound (run.full_model_bounds)
        if c.heads == "full":
            res[r]["ipo"]["selection"] = {"bound": 20.2}
    text = ex.experiment_report("ipo-random", runs, res, tmp_path / "y").read_text()
    assert "given a head set's validation loss as a bound" in text and "(best validation loss 25.000, bound 20.200: " \
        "still above)" in text
    for r, c in runs:
        if c.heads == "full":
            res[r]["ipo"]["selection"] = {"bound": 26.0}
    assert "bound 26.000: met)" in ex.experiment_report("ipo-random", runs, res, tmp_path / "y").read_text()


def test_better_than_averages_each_edit_over_its_training_seeds():
    """probe16 trained with two seeds enters "better than" as the mean of the two, not as its first seed."""
    size = dict(ex.SIZES["quick"], n_random=3, train_seeds=(1,))
    runs = ex.experiment_runs("ipo-random", run.RunConfig(), size)
    res = fabricate(runs)
    rows = ex.table_rows(runs, res)
    loc, others = ("ipo", "probe16", 0), [("ipo", "random16", i) for i in (1, 2, 3)]
    b = ex.better_than(rows, loc, others, [0.1])
    p16 = [r for r in rows if r["heads"] == "probe16"]
    assert len(p16) == 2 and b["seeds"] == 2
    want = stats.truth_info(np.mean([r["q"][:, ex.TI] for r in p16], 0))
    assert b["localized"][0] == pytest.approx(float(want))
    assert b["localized"][0] != pytest.approx(p16[0]["truth_info"])


def test_seed_variance_is_taken_at_each_tau(tmp_path):
    """Fig. 2 trains the key edits with every seed at every tau; seeds that disagree at tau 0.1 (degenerate
    edits) and agree at tau 0.5 give each tau its own seed variance: the tau-0.5 equivalence test resolves a
    margin the tau-0.1 variance would hide."""
    runs = ex.experiment_runs("ipo-vs-iti", run.RunConfig(), ex.SIZES["default"])
    assert {(c.heads, c.tau, c.train_seed) for _, c in runs if c.method == "ipo"} == {
        (h, t, s) for h in ("full", "probe16") for t in (0.1, 0.5) for s in (None, 1)}
    res = fabricate(runs, n=2000)
    ref = {c.tau: res[r]["per_question"]["ipo"] for r, c in runs if c.method == "ipo" and c.heads == "full"
           and c.train_seed is None}
    for r, c in runs:
        if c.method == "ipo":  # every edit answers as the full model's seed 0, but at tau 0.1 seed 1 says all true
            pq = dict(ref[c.tau])
            if c.tau == 0.1 and c.train_seed == 1:
                pq["truth"] = [1.0] * len(pq["truth"])
            res[r]["per_question"] = {"ipo": pq}
            m = res[r]["metrics"]["ipo"]
            for k in ("truth", "info"):
                m[k]["value"] = float(np.mean(pq[k]))
            m["truth_info"]["value"] = m["truth"]["value"] * m["info"]["value"]
    ex.experiment_report("ipo-vs-iti", runs, res, tmp_path)
    t = json.loads((tmp_path / "table.json").read_text())["tests"]
    by = t["seed_variance"]["by_tau"]
    assert by["0.1"]["df"] == 2 and by["0.1"]["var"] > 0.01 and by["0.5"] == {"var": 0.0, "df": 2}
    eq = {e["at"]: e for e in t["equivalence"]}
    assert eq["tau 0.5"]["p_holm"] < 0.05 and eq["tau 0.1"]["p_holm"] > 0.05
    assert eq["tau 0.5"]["min_margin"] < 0.02 < 0.1 < eq["tau 0.1"]["min_margin"]


def test_an_edit_kept_at_the_warm_up_is_flagged(tmp_path):
    """An IPO edit whose kept checkpoint is the first after the warm-up (a stopping rule that gave up on a noisy
    plateau) is named in the report; one kept later is not."""
    runs = ex.experiment_runs("ipo-random", run.RunConfig(), dict(ex.SIZES["quick"], n_random=1, train_seeds=()))
    res = fabricate(runs)
    for r, c in runs:
        res[r]["ipo"].update(best_step=20 if c.heads == "probe16" else 170, warmup=20,
                             rule={"every": 10, "patience": 4, "min_delta": 0.002})
    text = ex.experiment_report("ipo-random", runs, res, tmp_path).read_text()
    flagged = text.split("kept their first checkpoint after the warm-up")[1].split("\n")[0]
    assert "1 IPO edit(s)" in text and "ipo-probe16" in flagged and "full" not in flagged and "random" not in flagged
