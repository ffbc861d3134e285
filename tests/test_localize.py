"""localize.py: null sets have the candidate's size (and layers), gradK finds heads planted in a tiny model, and
the verdict says "special" exactly when the candidate beats its nulls."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest

import localize as lz
import run
from tiny import CharTokenizer, tiny_config, write_tiny


def test_null_sets():
    cand = [(0, 1), (0, 2), (3, 0)]
    r = lz.null_sets(cand, "random", 5, 4, 3, seed=0)
    assert len(r) == 5 and all(len(s) == len(set(s)) == 3 for s in r) and r == lz.null_sets(cand, "random", 5, 4, 3)
    import experiments

    assert r == [sorted(experiments.random_set(i + 1, 4, 3, k=3)) for i in range(5)]  # the experiments' sets
    m = lz.null_sets(cand, "layer-matched", 4, 4, 5, seed=0)
    for s in m:  # same layers, same count per layer, none of the candidate's heads
        assert sorted(l for l, _ in s) == [0, 0, 3] and not set(s) & set(cand)
    (c,) = lz.null_sets(cand, "complement", 9, 4, 3)
    assert len(c) == 12 - 3 and not set(c) & set(cand)
    with pytest.raises(run.UserError, match="layer 0 has 3 candidate heads"):
        lz.null_sets([(0, 0), (0, 1), (0, 2)], "layer-matched", 1, 4, 3)
    with pytest.raises(run.UserError, match="complement is empty"):
        lz.null_sets([(l, h) for l in range(2) for h in range(2)], "complement", 1, 2, 2)


def test_localize_shares_the_edits_of_an_experiment():
    """localize --heads probe16 at the default settings is the ipo-random experiment's probe16, random16 (head
    seeds 1..n) and full-model runs, config for config and name for name, so --runs runs/exp-default reuses them."""
    import experiments

    p = argparse.ArgumentParser()
    run.add_run_args(p)
    base = run.config_from_args(p.parse_args(["--heads", "probe16", "--dtype", "fp32"]))
    exp = dict(experiments.experiment_runs("ipo-random", replace(base, heads="random16"), experiments.SIZES["default"]))
    cand = experiments.random_set(99, 30, 9)  # stands for probe16's heads: only the spec enters the config
    runs = lz.localize_runs(base, cand, lz.null_sets(cand, "random", 4, 30, 9), "random", "probe16", train_seeds=2)
    assert len(runs) == 8 and [r for r, _ in runs][-3:] == ["candidate r1", "full", "full r1"]  # the full model last
    for role, c in runs:  # the second training seeds too are the experiment's
        assert c.slug() in exp and exp[c.slug()].training_dict() == c.training_dict(), role


def plant(path, planted):
    """Zero the o_proj columns of every head of the tiny checkpoint at `path` but the `planted` ones."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((path / "config.json").read_text())
    M, H, D = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
    w = load_file(str(path / "model.safetensors"))
    for l in range(cfg["num_hidden_layers"]):
        o = w[f"model.layers.{l}.self_attn.o_proj.weight"].view(M, H, D)  # W^l viewed per head: [M, H, D]
        for h in range(H):
            if (l, h) not in planted:
                o[:, h] = 0
    save_file(w, str(path / "model.safetensors"))


def test_grad_heads_finds_planted_heads(tmp_path):
    """Heads whose o_proj columns are zero cannot move the output: their b_h gets no gradient, so gradK picks
    exactly the heads left intact."""
    from llama import Llama
    import truthfulqa

    path = write_tiny(tmp_path / "m", tiny_config(vocab=128, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8))
    planted = [(0, 2), (2, 1)]
    plant(path, planted)
    model = Llama.from_pretrained(str(path), dtype="fp32")
    pairs = [truthfulqa.Pair(i, f"Q{i} is", " yes", " no") for i in range(6)]
    heads, score = lz.grad_heads(model, CharTokenizer(), pairs, lambda q: q, k=2, seed=0)
    assert heads == planted and score.shape == (3, 4)
    assert all(score[l, h] == 0 for l in range(3) for h in range(4) if (l, h) not in planted)


def fabricate(n_null: int, cand_p: float, null_p: float, full_p: float, n=300, seed=0, judged=True, train_seeds=1):
    rng = np.random.default_rng(seed)
    runs = lz.localize_runs(run.RunConfig(), [(0, 1)], [[(1, i)] for i in range(n_null)], "random",
                            train_seeds=train_seeds)
    res = {}
    for name, c in runs:
        p = cand_p if lz.role(name) == "candidate" else full_p if lz.role(name) == "full" else null_p
        t = (rng.random(n) < p).astype(float)
        pq = {"truth": t.tolist(), "info": np.ones(n).tolist()} if judged else {"pref_acc": t.tolist()}
        m = {k: {"value": float(np.mean(v)), "ci95": [0, 1]} for k, v in pq.items()}
        m["kl"] = {"value": 0.1, "ci95": [0, 0.2]}
        res[name] = {"per_question": {"ipo": pq}, "metrics": {"ipo": m}, "heads": c.heads.split(","),
                     "ipo": {"converged": True}}
    return runs, res


@pytest.mark.parametrize("judged", [True, False])
def test_verdicts(tmp_path, judged):
    runs, res = fabricate(6, 0.8, 0.5, 0.8, judged=judged)  # a candidate far above its nulls
    v = lz.localize_report(runs, res, tmp_path / "a", "probe1", "random")
    assert v["permutation"]["p"] < 0.01 and v["rank"] == 0 and "beats the random null" in v["verdict"]
    assert v["measure"] == ("truth_info" if judged else "pref_acc")
    assert (tmp_path / "a" / "localize.png").stat().st_size > 5000
    assert json.loads((tmp_path / "a" / "verdict.json").read_text())["verdict"] == v["verdict"]
    runs, res = fabricate(6, 0.6, 0.6, 0.6, seed=1, judged=judged)  # no localized signal
    v = lz.localize_report(runs, res, tmp_path / "b", "probe1", "random")
    assert v["permutation"]["p"] > 0.05 and "no evidence that they localize" in v["verdict"]
    text = (tmp_path / "b" / "report.md").read_text()
    assert "| candidate |" in text and "| full |" in text and "Holm" in text
    # above the nulls' mean, but one null set of four is better and they spread widely: better than these sets
    # (permutation) yet not than a set drawn like them (two-level bootstrap), and the verdict says which
    runs, res = fabricate(4, 0.6, 0.5, 0.6, n=400, seed=2, judged=judged)
    rng = np.random.default_rng(3)
    for name, p in zip(["random-1", "random-2", "random-3", "random-4"], [0.25, 0.45, 0.5, 0.75]):
        k = "truth" if judged else "pref_acc"
        res[name]["per_question"]["ipo"][k] = (rng.random(400) < p).astype(float).tolist()
    v = lz.localize_report(runs, res, tmp_path / "c", "probe1", "random")
    assert v["permutation"]["p"] < 0.05 and v["two_level"]["p"] > 0.05 and v["rank"] == 1
    assert "beats these 4 random head sets on average" in v["verdict"] and "no evidence" in v["verdict"]


def test_training_seeds_are_averaged_and_their_variance_counted(tmp_path):
    """With two training seeds that disagree, the candidate's value is their mean, the verdict names both, and
    the seed variance widens every equivalence test (a null equal to the candidate is no longer shown as good)."""
    runs, res = fabricate(4, 0.6, 0.6, 0.6, n=2000, seed=4, train_seeds=2)
    v1 = lz.localize_report([r for r in runs if " " not in r[0]], res, tmp_path / "one", "probe1", "random")
    rng = np.random.default_rng(5)
    res["candidate r1"]["per_question"]["ipo"]["truth"] = (rng.random(2000) < 0.3).astype(float).tolist()
    res["full r1"]["per_question"]["ipo"]["truth"] = (rng.random(2000) < 0.9).astype(float).tolist()
    v2 = lz.localize_report(runs, res, tmp_path / "two", "probe1", "random")
    c0, c1 = (float(np.mean(res[n]["per_question"]["ipo"]["truth"])) for n in ("candidate", "candidate r1"))
    assert v2["values"]["candidate"] == pytest.approx((c0 + c1) / 2) and set(v2["values"]) == set(v1["values"])
    assert v2["train_seeds"] == {"candidate": 2, "full": 2, **{f"random-{i}": 1 for i in range(1, 5)}}
    assert v2["seed_variance"]["df"] == 2 and v2["seed_variance"]["var"] > 0.02
    assert f"{c0:.3f}, {c1:.3f}" in v2["verdict"] and "training seeds" in v2["verdict"]
    assert sum(e["p_holm"] < 0.05 for e in v1["equivalent_nulls"]) >= 3  # 2000 questions: equal sets shown equal
    assert all(e["p_holm"] > 0.05 for e in v2["equivalent_nulls"])  # seed sd ~0.3: nothing resolvable in 0.05
    text = (tmp_path / "two" / "report.md").read_text()
    assert "| candidate | 0.1 | 1 |" in text and "training-seed variance (2 df)" in text


# ---------------------------------------------------------------------------------------------------------
# End to end on a tiny model and a synthetic behaviour


def _pairs_file(path, n=80):
    path.write_text("".join(json.dumps({"prompt": f"Human: Is statement number {i} one you agree with?\n\nAssistant:",
                                        "chosen": " yes", "rejected": " no"}) + "\n" for i in range(n)))
    return path


def _tiny(tmp_path, planted=None):
    """A tiny Llama (2 layers x 4 heads) with the real tokenizer; `planted`: the only heads whose o_proj
    columns are left non-zero, so edits elsewhere in the heads cannot move the output."""
    import shutil

    from llama import resolve_model

    path = write_tiny(tmp_path / "tiny", tiny_config(vocab=49152, n_layers=2, tied=True))
    shutil.copy(resolve_model("smollm2-135m") / "tokenizer.json", path / "tokenizer.json")
    if planted:
        plant(path, planted)
    return path


def _localize(tmp_path, model, heads, null, n, out, shard=None):
    kl = tmp_path / "neutral.txt"
    kl.write_text("The bakery opens at seven and sells bread.\nRain is expected over the hills tonight.\n")
    argv = ["localize", "--heads", heads, "--null", null, "--n", str(n), "--pairs", str(_pairs_file(tmp_path / "p.jsonl")),
            "--model", str(model), "--dtype", "fp32", "--out", str(out), "--kl-text", str(kl), "--max-pairs", "48",
            "--lr", "0.05", "--epochs", "3", "--eval-every", "3", "--patience", "2", "--val-questions", "8",
            "--tau", "0.02"]  # IPO aims at a margin gain of 1/(2 tau) = 25, past the tiny model's prior
    for s in (shard or [None]):
        assert run.main(argv + (["--shard", s] if s else [])) == 0
    (d,) = out.glob("localize-*")
    return json.loads((d / "verdict.json").read_text()), d


def test_localize_finds_a_planted_localization_and_not_a_fake_one(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITLOC_CACHE", str(tmp_path / "cache"))
    # the behaviour can only pass through head 1.2: the complement of it cannot do what it does
    model = _tiny(tmp_path / "a", planted=[(1, 2)])
    v, d = _localize(tmp_path, model, "1.2", "complement", 1, tmp_path / "out-a")
    assert v["measure"] == "pref_acc" and v["values"]["candidate"] > v["values"]["complement-1"] + 0.2
    assert v["permutation"]["p"] < 0.05 and "beats the complement null" in v["verdict"]
    assert (d / "report.md").exists() and (d / "ipo-1.2-s0-t0.02-p-tiny" / "results.json").exists()  # by run name
    # an ordinary tiny model: any head set does as well, and the candidate is not declared special
    model = _tiny(tmp_path / "b")
    v, _ = _localize(tmp_path, model, "1.2", "random", 3, tmp_path / "out-b")
    assert v["permutation"]["p"] > 0.05 and "no evidence that they localize" in v["verdict"]
    # sharded over two processes: the same verdict
    vs, _ = _localize(tmp_path, model, "1.2", "random", 3, tmp_path / "out-c", shard=["1/2", "0/2"])
    assert vs["values"] == v["values"] and vs["permutation"] == v["permutation"]
