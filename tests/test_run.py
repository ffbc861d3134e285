"""run.py: the command line parses every head spec and rejects bad input with exit status 2; a tiny end-to-end
run (tiny random model, a dozen questions) writes complete results and a report; rerunning does no work."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

import run
import truthfulqa
from tiny import tiny_config, write_tiny


@pytest.mark.parametrize("spec", ["probe16", "probe3", "random16", "random1", "all", "full", "single:3.4",
                                  "1.2,3.4,29.8"])
def test_cli_parses_head_specs(spec):
    p = run.argparse.ArgumentParser()
    run.add_run_args(p)
    cfg = run.config_from_args(p.parse_args(["--heads", spec]))
    assert cfg.heads == spec


def test_every_spec_becomes_a_mask():
    acc = torch.rand(30, 9)
    import probe

    for spec, n in [("probe16", 16), ("random16", 16), ("all", 270), ("single:3.4", 1), ("1.2,3.4,29.8", 3)]:
        assert int(probe.parse_heads(spec, 30, 9, acc=acc).sum()) == n
    with pytest.raises(ValueError, match="out of range"):
        probe.parse_heads("30.0", 30, 9)


@pytest.mark.parametrize("argv, msg", [
    (["--heads", "bogus"], "--heads 'bogus'"),
    (["--heads", "full", "--method", "iti"], "--heads full"),
    (["--heads", "random16", "--kl-text", "/no/such/file"], "--kl-text"),
    (["audit", "/no/such/edit.safetensors"], "no such edit file"),
    (["experiment", "ipo-random", "--shard", "3/2"], "--shard"),
])
def test_user_errors_are_one_line_exit_2(argv, msg, capsys):
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("flag, value, expected", [
    ("--tau", "-1", "expected a finite number > 0"), ("--tau", "0.1,0", "expected a finite number > 0"),
    ("--tau", "0.1,,0.3", "comma-separated list"), ("--lr", "", "comma-separated list"),
    ("--lr", "1e-3,nan", "expected a finite number > 0"), ("--patience", "0", "integer >= 1"),
    ("--eval-every", "0", "integer >= 1"), ("--lora-scale", "0", "> 0"),
])
def test_bad_flag_value_exits_2(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as e:
        run.main(["--heads", "random16", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and expected in err


# ---------------------------------------------------------------------------------------------------------
# A tiny end-to-end run


def tiny_data(tmp_path, n=12):
    """A data directory with the first n v0 questions (and everything else the run reads)."""
    src = truthfulqa.data_dir()
    d = tmp_path / "data"
    (d / "v0").mkdir(parents=True)
    shutil.copy(src / "prompts.json", d / "prompts.json")
    with open(src / "v0" / "TruthfulQA.csv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    with open(d / "v0" / "TruthfulQA.csv", "w", encoding="utf-8-sig", newline="") as f:
        csv.writer(f).writerows(rows[:n + 1])
    keep = {r[2].strip() for r in rows[1:n + 1]}
    mc = [m for m in json.loads((src / "v0" / "mc_task.json").read_text()) if m["question"].strip() in keep]
    (d / "v0" / "mc_task.json").write_text(json.dumps(mc))
    for kind in ("truth", "info"):  # the judges' data (the tests stub the judges, but a run checks it is there)
        lines = (src / "v0" / f"finetune_{kind}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        (d / "v0" / f"finetune_{kind}.jsonl").write_text("".join(lines[:20]), encoding="utf-8")
    return d


@pytest.fixture
def tiny_model(tmp_path):
    """A tiny random Llama with the real tokenizer (its vocabulary), so real prompts run through it."""
    from llama import resolve_model

    path = write_tiny(tmp_path / "tiny", tiny_config(vocab=49152, n_layers=2, tied=True))
    shutil.copy(resolve_model("smollm2-135m") / "tokenizer.json", path / "tokenizer.json")
    return path


@pytest.fixture
def stub_judges(monkeypatch):
    """Untrained judge heads on the run's own (tiny) model: the real scoring code, no 20-minute training."""
    import judge

    def load(kind, *, data=None, version="v0", model=None, tokenizer=None, **kw):
        yes, no = judge.yes_no_ids(tokenizer)
        head = judge.JudgeHead(model, 0, model.cfg.n_layers, yes, no)
        return judge.Judge(kind, head, model, tokenizer, {"layout": judge.judge_layout(kind, data),
                                                          "data_sha256": "stub", "validation": {}})

    monkeypatch.setattr(judge, "load_judges", lambda kinds, **kw: {kind: load(kind, **kw) for kind in kinds})


def test_tiny_end_to_end_run_and_resume(tmp_path, tiny_model, stub_judges, monkeypatch, capsys):
    monkeypatch.setenv("EDITLOC_CACHE", str(tmp_path / "cache"))
    data = tiny_data(tmp_path)
    import judge

    monkeypatch.setattr(judge, "BACKBONE", str(tiny_model))  # Context.judges then shares the run's model
    kl_text = tmp_path / "neutral.txt"
    kl_text.write_text("The bakery opens at seven and sells bread.\nRain is expected over the hills tonight.\n")
    argv = ["--heads", "random2", "--method", "both", "--model", str(tiny_model), "--data", str(data), "--max-pairs", "8",
            "--dtype", "fp32", "--out", str(tmp_path / "runs"), "--name", "t", "--kl-text", str(kl_text),
            "--lr", "0.01,0.3", "--epochs", "6", "--eval-every", "2", "--patience", "2"]
    assert run.main(argv) == 0
    d = tmp_path / "runs" / "t"
    res = json.loads((d / "results.json").read_text())
    assert set(res["metrics"]) == {"base", "ipo", "iti"}
    for label, m in res["metrics"].items():
        for k in run.METRICS:
            lo, hi = m[k]["ci95"]
            assert lo <= m[k]["value"] + 1e-9 and m[k]["value"] <= hi + 1e-9, (label, k)
        assert len(res["per_question"][label]["truth"]) == len(res["split"]["test"])
    assert res["metrics"]["base"]["kl"]["value"] == 0.0
    assert len(res["heads"]) == 2 and res["split"]["seed"] == 0
    for label in ("ipo", "iti"):
        a = res["audit"][label]
        assert a["outside_mask_max_abs"] == 0.0
        assert {r["where"] for r in a["rows"]} == set(res["heads"])
        assert abs(sum(r["share"] for r in a["rows"]) - 1) < 1e-6
    gens = [json.loads(l) for l in (d / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 3 * len(res["split"]["test"])
    i = res["ipo"]
    assert i["selection"]["chosen_lr"] == i["lr"] and [g["lr"] for g in i["selection"]["grid"]] == [0.01, 0.3]
    assert i["val_loss"] == min(g["val_loss"] for g in i["selection"]["grid"]) < i["curve"][0]["val_loss"]
    assert i["curve"][0]["step"] == 0 and all(r["step"] % 2 == 0 or r["step"] == i["budget"] for r in i["curve"])
    report = (d / "report.md").read_text()
    assert "| base |" in report and "| ipo" in report and "Audit of the ipo edit" in report
    assert ("IPO converged" if i["converged"] else "IPO NOT CONVERGED") in report
    assert "(NOT CONVERGED)" in report or i["converged"]
    assert "the paper's (x, y, x_random)" in report
    import importlib.util

    if importlib.util.find_spec("matplotlib"):  # the validation curves of both learning rates, drawn
        assert (d / "ipo_curve.png").stat().st_size > 1000 and "ipo_curve.png" in report
    for f in ("config.json", "split.json", "ipo/edit.safetensors", "iti/edit.safetensors", "probe/probe_acc.json"):
        assert (d / f).exists(), f

    # the audit command reads a saved edit back and finds it where the run did
    capsys.readouterr()
    assert run.main(["audit", str(d / "ipo" / "edit.safetensors"), "--n-prompts", "3"]) == 0
    out = capsys.readouterr().out
    assert "exactly zero" in out and all(f"| {h} |" in out for h in res["heads"])

    # rerunning the finished run does no work
    def boom(*a, **k):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(run, "evaluate", boom)
    monkeypatch.setattr(run, "Context", boom)
    assert run.main(argv) == 0

    # the same name with other settings is refused
    assert run.main(argv + ["--tau", "0.3"]) == 2


def test_tau_list_runs_one_run_per_tau(tmp_path, monkeypatch, capsys):
    """--tau 0.1,0.5 does one run per tau (named by it) on one shared context, then the curve over tau."""
    calls = []

    def fake_run(cfg, out, name, ctx=None):
        calls.append((cfg.tau, name, ctx))
        m = {k: {"value": cfg.tau, "ci95": [0, 1]} for k in run.METRICS}
        return {"metrics": {"ipo": m}, "ipo": {"converged": cfg.tau < 0.3}}

    monkeypatch.setattr(run, "run", fake_run)
    monkeypatch.setattr(run, "Context", lambda cfg: "ctx")
    assert run.main(["--heads", "random16", "--tau", "0.1,0.5", "--name", "x", "--dtype", "fp32"]) == 0
    assert calls == [(0.1, "x-t0.1", "ctx"), (0.5, "x-t0.5", "ctx")]
    err = capsys.readouterr().err
    assert "tau 0.5: Truth 0.500" in err and "(not converged)" in err and "best Truth*Info over tau: 0.500 at tau 0.5" in err
    assert run.RunConfig(tau=0.3).slug().endswith("-t0.3") and "-t" not in run.RunConfig(method="iti").slug()
