"""run.py: the command line parses every head spec and rejects bad input with exit status 2; a tiny end-to-end
run (tiny random model, a dozen questions) writes complete results and a report; rerunning does no work."""
from __future__ import annotations

import csv
import json
import shutil
import types
from dataclasses import replace

import numpy as np
import pytest
import torch

import ipo
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
    (["experiment", "ipo-random", "--shard", "-1/4"], "--shard '-1/4': expected i/n"),
    (["experiment", "ipo-random", "--quick", "--paper"], "choose one size"),
    (["experiment", "ipo-random", "--margin", "2"], "--margin"),
    (["localize", "--heads", "probe16", "--n", "0"], "--n 0"),
    (["localize", "--heads", "probe16", "--shard", "-1/4"], "--shard '-1/4'"),
    (["localize", "--heads", "full"], "localize trains IPO edits at a head set"),
    (["--heads", "random16", "--pairs", "/no/such.jsonl"], "--pairs /no/such.jsonl: no such file"),
    (["--heads", "random16", "--judge-model", "/no/such/dir"], "--judge-model /no/such/dir: not an HF model"),
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
    ("--alpha", "nan", "expected a finite number"), ("--alpha", "inf", "expected a finite number"),
    ("--head-seed", "-1", "integer >= 0"), ("--seed", "-3", "integer >= 0"),
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
    assert not list(d.glob("*.parts.json")) and not list((tmp_path / "cache").rglob("*.part*"))  # work in progress

    # the audit command reads a saved edit back and finds it where the run did
    capsys.readouterr()
    assert run.main(["audit", str(d / "ipo" / "edit.safetensors"), "--n-prompts", "3"]) == 0
    out = capsys.readouterr().out
    assert "exactly zero" in out and all(f"| {h} |" in out for h in res["heads"])

    # rerunning the finished run does no work
    def boom(*a, **k):
        raise AssertionError("a finished run was recomputed")

    import ipo
    import metrics

    monkeypatch.setattr(run, "evaluate", boom)
    monkeypatch.setattr(ipo, "select_ipo", boom)
    real_truth_info = metrics.truth_info
    monkeypatch.setattr(metrics, "truth_info", boom)
    assert run.main(argv) == 0

    # judges trained again (another training time, other heads): the saved answers are judged again, nothing
    # else is recomputed, and the figures are the new judges' verdicts on the same answers
    monkeypatch.setattr(metrics, "truth_info", real_truth_info)
    real_load = judge.load_judges

    def new_judges(kinds, **kw):
        js = real_load(kinds, **kw)
        for n, j in enumerate(js.values()):
            torch.manual_seed(n)
            with torch.no_grad():
                for p in j.head.parameters():
                    p.add_(0.5 * torch.randn_like(p))
            j.meta["created"] = "later"
        return js

    monkeypatch.setattr(judge, "load_judges", new_judges)
    edit_bytes = (d / "ipo" / "edit.safetensors").read_bytes()
    assert run.main(argv) == 0
    new = json.loads((d / "results.json").read_text())
    assert new["judges"] != res["judges"] and all(j[1] == "later" for j in new["judges"])
    assert (d / "ipo" / "edit.safetensors").read_bytes() == edit_bytes
    ctx = run.Context(run.RunConfig(heads="random2", model=str(tiny_model), data=str(data), dtype="fp32"))
    for label in ("ipo", "iti"):
        ev = json.loads((d / f"eval_{label}.json").read_text())
        qs = [ctx.by_qid[q] for q in ev["qids"]]
        want = metrics.truth_info(*ctx.judges, qs, [g["answer"] for g in ev["generations"]])
        assert ev["per_question"]["truth_score"] == pytest.approx(want["per_question"]["truth_score"], abs=1e-6)
        assert ev["per_question"]["truth_score"] != pytest.approx(res["per_question"][label]["truth_score"], abs=1e-4)
        assert new["metrics"][label]["truth_info"]["value"] == pytest.approx(want["truth_info"])
        assert new["per_question"][label]["mc2"] == res["per_question"][label]["mc2"]  # kept, not recomputed
        assert [g["answer"] for g in ev["generations"]] == [
            g["answer"] for g in map(json.loads, (d / "generations.jsonl").read_text().splitlines())
            if g["model"] == label]
    assert new["timings"]["total_s"] == res["timings"]["total_s"] and "rejudge_s" in new["timings"]
    base = json.loads(next((tmp_path / "cache" / "evals").glob("base-*.json")).read_text())  # judged again too
    assert base["judges"] == new["judges"] and new["metrics"]["base"] == base["figures"]
    monkeypatch.setattr(metrics, "truth_info", boom)
    assert run.main(argv) == 0  # now judged by the current judges: nothing to do

    # a run saved before the per-pair margins: they are computed with its edit, nothing else is
    for f in (d / "eval_iti.json", d / "results.json"):
        x = json.loads(f.read_text())
        x.pop("pairs")
        f.write_text(json.dumps(x))
    assert run.main(argv) == 0
    new = json.loads((d / "results.json").read_text())
    for label in ("base", "ipo", "iti"):  # each question's pair margins average to its saved pref_margin
        p, pq = new["pairs"][label], new["per_question"][label]
        for q, m in zip(pq["qids"], pq["pref_margin"]):
            assert np.mean([v for qq, v in zip(p["qid"], p["margin"]) if qq == q]) == pytest.approx(m, abs=1e-5)
    assert new["pairs"]["iti"] != new["pairs"]["base"]

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


# ---------------------------------------------------------------------------------------------------------
# Bad input fails in seconds, before any model work, with one line; no run directory is left behind


def one_line_error(argv, capsys, *msgs):
    """run.main(argv) exits 2 with one error line (the last on stderr, after any progress lines) holding every one
    of msgs, and no traceback."""
    capsys.readouterr()
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [l for l in err if "error" in l]
    assert errors == err[-1:] and all(m in err[-1] for m in msgs) and "Traceback" not in "".join(err), err
    return err[-1]


@pytest.fixture
def no_model_work(monkeypatch):
    """Any probe collection or training fails the test: the errors must come before them."""
    import ipo
    import probe

    def boom(*a, **k):
        raise AssertionError("model work started before the inputs were checked")

    for mod, name in ((probe, "collect"), (ipo, "select_ipo"), (run, "evaluate")):
        monkeypatch.setattr(mod, name, boom)


@pytest.mark.parametrize("spec, msg", [
    ("random999", "K=999 must be between 1 and 8"), ("probe0", "K=0 must be between 1 and 8"),
    ("probe9", "K=9 must be between 1 and 8"), ("2.0", "head 2.0 out of range"), ("1.4", "head 1.4 out of range"),
    ("single:5.1", "out of range"), ("0.0,1.1,0.0", "0.0 given more than once"),
])
def test_head_specs_checked_against_the_model_before_the_probes(spec, msg, tmp_path, tiny_model, no_model_work,
                                                                 monkeypatch, capsys):
    monkeypatch.setenv("EDITLOC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    one_line_error(["--heads", spec, "--model", str(tiny_model), "--data", str(tiny_data(tmp_path)), "--dtype",
                    "fp32", "--out", str(out)], capsys, f"--heads {spec!r}", msg)
    assert not out.exists()


def test_failed_start_claims_no_run_directory(tmp_path, tiny_model, monkeypatch, capsys):
    """--model /nonexistent fails before the run directory exists; a directory whose run never started work
    (config.json, split.json only) does not block the corrected command, and is not "resumed"."""
    monkeypatch.setenv("EDITLOC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    one_line_error(["--heads", "random2", "--model", str(tmp_path / "nonexistent"), "--out", str(out), "--name", "t",
                    "--dtype", "fp32"], capsys, "nonexistent")
    assert not out.exists()
    d = out / "t"
    d.mkdir(parents=True)  # left by an older editloc that wrote config.json first
    (d / "config.json").write_text(json.dumps(run.asdict(run.RunConfig(model="/nonexistent"))))
    (d / "split.json").write_text("{}")
    cfg = run.RunConfig(model=str(tiny_model), dtype="fp32")
    assert run.check_run_dir(d, cfg) is False
    assert "taking over" in capsys.readouterr().err
    (d / "config.json").write_text(json.dumps(run.asdict(cfg)))
    assert run.check_run_dir(d, cfg) is False  # same settings, nothing done: not "resuming" either
    (d / "probe").mkdir()  # work was done: other settings are refused, the same ones resume
    assert run.check_run_dir(d, cfg) is True
    with pytest.raises(run.UserError, match="differs in model"):
        run.check_run_dir(d, run.RunConfig(model="/other", dtype="fp32"))


def test_damaged_model_files_are_one_line(tmp_path, tiny_model, no_model_work, monkeypatch, capsys):
    monkeypatch.setenv("EDITLOC_CACHE", str(tmp_path / "cache"))
    data = str(tiny_data(tmp_path))
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    argv = ["--heads", "random2", "--model", str(bad), "--data", data, "--dtype", "fp32", "--out", str(tmp_path / "r")]
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])  # truncated
    one_line_error(argv, capsys, "model.safetensors", "not a readable safetensors file")
    cfg = json.loads((tiny_model / "config.json").read_text())
    for text, msg in [("[1, 2]", "expected a JSON object"), ("{", "cannot read a config.json"),
                      (json.dumps({**cfg, "num_hidden_layers": None}), "num_hidden_layers is None"),
                      (json.dumps({**cfg, "hidden_size": "wide"}), "hidden_size is 'wide'"),
                      (json.dumps({**cfg, "rope_parameters": [1]}), "rope_parameters")]:
        (bad / "config.json").write_text(text)
        one_line_error(argv, capsys, "config.json", msg)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file")
    one_line_error([*argv[:2], "--model", str(fake), *argv[4:]], capsys, "model.gguf", "not a GGUF file")
    assert not (tmp_path / "r").exists()


def test_bad_data_and_settings_are_one_line(tmp_path, tiny_model, no_model_work, monkeypatch, capsys):
    monkeypatch.setenv("EDITLOC_CACHE", str(tmp_path / "cache"))
    data = tiny_data(tmp_path)
    argv = ["--heads", "random2", "--model", str(tiny_model), "--data", str(data), "--dtype", "fp32",
            "--out", str(tmp_path / "r")]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    one_line_error(argv + ["--kl-text", str(empty)], capsys, "--kl-text", "has no text")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    one_line_error(argv + ["--kl-text", str(latin)], capsys, "--kl-text", "not UTF-8")
    (tmp_path / "cachefile").write_text("")
    monkeypatch.setenv("EDITLOC_CACHE", str(tmp_path / "cachefile"))
    one_line_error(argv, capsys, "$EDITLOC_CACHE", "not a directory")
    monkeypatch.setenv("EDITLOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(argv + ["--device", "cuda"], capsys, "--device cuda")
    one_line_error(["experiment", "ipo-random", "--device", "cuda"], capsys, "--device cuda")
    csv_path = data / "v0" / "TruthfulQA.csv"
    csv_path.write_bytes(csv_path.read_bytes() + "caf\xe9".encode("latin-1"))
    one_line_error(argv, capsys, "TruthfulQA.csv", "not a UTF-8 CSV file")
    assert not (tmp_path / "r").exists()


def test_edit_files_without_tensors_are_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    import iti

    for fmt in ("editloc.Rank1Edit", iti.FORMAT):
        p = tmp_path / f"{fmt}.safetensors"
        save_file({"x": torch.zeros(2)}, str(p), metadata={"format": fmt, "heads": "[]", "alpha": "1.0",
                                                           "config": "{}"})
        one_line_error(["audit", str(p)], capsys, str(p))


def test_interrupt_says_what_was_kept(monkeypatch, capsys):
    """Ctrl-C: exit 130, no traceback, and the line names what the unfinished long steps kept."""
    import judge
    import llama

    def interrupted(*a, **k):
        llama.note_kept("activations", "activations of 64 of 128 examples (in /cache/activations)")
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "cmd_run", interrupted)
    assert run.main(["--heads", "random2"]) == 130
    err = capsys.readouterr().err
    assert "activations of 64 of 128 examples" in err and "run the same command again" in err
    assert "Traceback" not in err
    monkeypatch.setattr(judge, "load_judges", interrupted)
    assert judge.main(["train"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    llama.note_kept("activations", None)


def test_evaluation_resumes_piece_by_piece(tmp_path, monkeypatch):
    """An evaluation interrupted after some of its pieces keeps them; the next call computes only the rest
    and gives the same result as an uninterrupted evaluation."""
    import types

    import metrics

    qs = [types.SimpleNamespace(qid=i, question=f"q{i}") for i in range(4)]
    calls = []

    def piece(name, value):
        def f(*a, **k):
            calls.append(name)
            if name == stop_at[0]:
                raise KeyboardInterrupt
            return value
        return f

    kl = {"kl": 0.5, "ce": 2.0, "tokens": 8, "per_text": {"kl": [0.25, 0.75], "ce": [1.0, 3.0], "tokens": [4, 4]}}
    per = {"truth": [1.0, 0.0, 1.0, 1.0], "info": [1.0] * 4, "truth_score": [0.9, 0.1, 0.8, 0.7],
           "info_score": [0.6] * 4}
    monkeypatch.setattr(metrics, "generate_answers", piece("answers", ["a", "b", "c", "d"]))
    monkeypatch.setattr(metrics, "truth_info", piece("truth_info", {"per_question": per}))
    monkeypatch.setattr(metrics, "mc_scores", piece("mc", {"per_question": {"mc1": [1.0, 0.0, 0.0, 1.0],
                                                                            "mc2": [0.5] * 4, "mc3": [0.25] * 4}}))
    monkeypatch.setattr(metrics, "preference", piece("pref", {"pref_acc": 0.5, "pref_margin": 0.1, "per_question": {
        "pref_acc": [1.0, 0.0, 1.0, 0.0], "pref_margin": [0.3, -0.1, 0.2, 0.0]},
        "pairs": {"qid": [0, 1, 2, 3], "margin": [0.3, -0.1, 0.2, 0.0]}}))
    monkeypatch.setattr(metrics, "kl_ce", piece("kl", kl))
    judges = tuple(types.SimpleNamespace(meta={"data_sha256": k, "created": "first"}) for k in ("truth", "info"))
    ctx = types.SimpleNamespace(test=qs, model=None, tok=None, prompts=None, judges=judges, judged=True,
                                kl_texts=lambda: ["x"], qa_texts=lambda: ["y"])
    stop_at = [None]
    whole = run.evaluate(ctx, None, "ipo")
    parts = tmp_path / "eval_ipo.parts.json"
    stop_at[0], calls[:] = "mc", []
    with pytest.raises(KeyboardInterrupt):
        run.evaluate(ctx, None, "ipo", parts)
    assert calls == ["answers", "truth_info", "mc"] and list(json.loads(parts.read_text())) == ["answers", "truth_info"]
    from llama import interrupted_message
    assert "the ipo evaluation's answers, truth_info" in interrupted_message()
    stop_at[0], calls[:] = None, []
    again = run.evaluate(ctx, None, "ipo", parts)
    assert calls == ["mc", "pref", "kl", "kl"]  # kl_ce twice: the neutral text and the questions
    timing = ("seconds", "piece_seconds")
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
    assert list(whole["piece_seconds"]) == ["answers", "truth_info", "mc", "pref", "kl", "kl_qa"]
    assert list(again["piece_seconds"]) == ["mc", "pref", "kl", "kl_qa"]  # the pieces this call computed
    assert again["judges"] == [["truth", "first"], ["info", "first"]]
    # interrupted after the judging, then the judges are trained again: the saved verdicts are not reused
    parts.unlink()
    stop_at[0], calls[:] = "mc", []
    with pytest.raises(KeyboardInterrupt):
        run.evaluate(ctx, None, "ipo", parts)
    judges[0].meta["created"] = "later"
    stop_at[0], calls[:] = None, []
    again = run.evaluate(ctx, None, "ipo", parts)
    assert calls == ["truth_info", "mc", "pref", "kl", "kl"] and again["judges"][0] == ["truth", "later"]


def test_tiny_run_with_an_external_judge(tmp_path, tiny_model, monkeypatch):
    """--judge-model DIR judges Truth and Info with that model; results.json names it."""
    monkeypatch.setenv("EDITLOC_CACHE", str(tmp_path / "cache"))
    data = tiny_data(tmp_path)
    kl_text = tmp_path / "neutral.txt"
    kl_text.write_text("The bakery opens at seven and sells bread.\n")
    argv = ["--heads", "random2", "--method", "iti", "--model", str(tiny_model), "--data", str(data), "--dtype", "fp32",
            "--out", str(tmp_path / "runs"), "--name", "x", "--kl-text", str(kl_text), "--judge-model", str(tiny_model)]
    assert run.main(argv) == 0
    res = json.loads((tmp_path / "runs" / "x" / "results.json").read_text())
    assert res["versions"]["judge_models"] == {"truth": str(tiny_model), "info": str(tiny_model)}
    assert 0 <= res["metrics"]["iti"]["truth_score"]["value"] <= 1


def test_a_run_trained_on_another_learning_rate_grid_is_refused(tmp_path):
    """A finished (or trained, then interrupted) full-model run from before the full model's grid went one step
    further is not the optimum the comparisons assume: refused with one line, not reused."""
    cfg = run.RunConfig(heads="full")
    old = {"heads": [], "ipo": {"selection": {"grid": [{"lr": 1.6e-3}]}}}
    with pytest.raises(run.UserError, match="trained on the learning rates 0.0016, but the current rule gives "
                                             "0.0016, 0.0064"):
        run.check_lr_grid(tmp_path, cfg, old)
    run.check_lr_grid(tmp_path, cfg, {"heads": [], "ipo": {"selection": {"grid": [{"lr": 6.4e-3}, {"lr": 1.6e-3}]}}})
    heads16 = {"heads": [f"0.{i}" for i in range(16)], "ipo": {"selection": {"grid": [{"lr": 8e-3}]}}}
    run.check_lr_grid(tmp_path, run.RunConfig(heads="random16"), heads16)  # a head set: the grid as it was
    run.check_lr_grid(tmp_path, run.RunConfig(heads="full", lr=[1e-3]), old)  # rates given by hand: not checked
    run.check_lr_grid(tmp_path, cfg, {"heads": [], "ipo": None})  # nothing trained


def test_a_run_whose_rate_was_too_fast_is_selected_again(tmp_path):
    """A finished run whose kept rate is the lowest tried and peaked at the end of the warm-up (selected before
    select_ipo tried lower rates): its edit, evaluation and results go, the rates trained stay; other runs stay."""
    cfg = run.RunConfig(heads="probe16", tau=0.5)
    d = tmp_path / "r"
    (d / "ipo" / "lr0.008").mkdir(parents=True)
    files = [d / "results.json", d / "eval_ipo.json", d / "eval_iti.json", d / "ipo" / "edit.safetensors",
             d / "ipo" / "lr0.008" / "ckpt.pt"]
    for f in files:
        f.write_text("x")
    def sel(best, below=0):  # the grid's rate 8e-3, then `below` rates 4x lower; the lowest kept, best at `best`
        lrs = [8e-3 / 4 ** k for k in range(below + 1)]
        return {"selection": {"chosen_lr": lrs[-1], "grid": [{"lr": lr, "best_step": best if lr == lrs[-1] else 20,
                                                              "below_grid": k > 0} for k, lr in enumerate(lrs)]}}

    assert not run.reselect(d, cfg, sel(150)) and all(f.exists() for f in files)  # not too fast
    assert not run.reselect(d, cfg, sel(20, below=2)) and all(f.exists() for f in files)  # lower rates: all tried
    assert run.reselect(d, cfg, sel(20, below=1)) and not files[0].exists()  # one more to try
    for f in files:
        f.write_text("x")
    assert not run.reselect(d, cfg, None) and not run.reselect(d, cfg, {"selection": {}})
    assert run.reselect(d, cfg, sel(30))  # best one validation after the 20-step warm-up
    assert [f.exists() for f in files] == [False, False, True, False, True]
    # the rate kept (6.4e-3) is not the lowest, and the lower one (1.6e-3) stopped on a plateau: selected again, to
    # train 1.6e-3 with more patience; once that is done (its patience_factor > 1), nothing more
    grid = [{"lr": 1.6e-3, "best_step": 40, "converged": True, "below_grid": False},
            {"lr": 6.4e-3, "best_step": 20, "converged": True, "below_grid": False}]
    for f in files:
        f.write_text("x")
    assert run.reselect(d, cfg, {"selection": {"chosen_lr": 6.4e-3, "chosen": 1, "grid": grid}})
    assert not files[0].exists() and files[-1].exists()
    for f in files:
        f.write_text("x")
    again = grid + [{**grid[0], "patience_factor": ipo.PATIENCE_UP}]
    assert not run.reselect(d, cfg, {"selection": {"chosen_lr": 6.4e-3, "chosen": 1, "grid": again}})
    assert ipo.patience_note(again[-1]) == " (4x patience)" and ipo.patience_note(grid[0]) == ""  # told apart in the report
    # the edit kept spent its step budget (not converged): selected again, to go on under a larger budget, once
    for f in files:
        f.write_text("x")
    cut = again[:-1] + [{**again[-1], "best_step": 300, "converged": False}]
    assert run.reselect(d, cfg, {"selection": {"chosen_lr": 1.6e-3, "chosen": 2, "grid": cut}})
    assert not files[0].exists() and files[-1].exists()
    for f in files:
        f.write_text("x")
    cut[-1]["budget_factor"] = ipo.BUDGET_UP
    assert not run.reselect(d, cfg, {"selection": {"chosen_lr": 1.6e-3, "chosen": 2, "grid": cut}})
    assert ipo.patience_note(cut[-1]) == f" ({ipo.PATIENCE_UP}x patience, {ipo.BUDGET_UP}x budget)"
    # a rate trained again with more patience is not a rate of the grid
    run.check_lr_grid(d, cfg, {"heads": ["1.1"], "ipo": {"selection": {"grid": [
        {"lr": lr, "below_grid": False, "patience_factor": f} for lr, f in
        [(x, 1) for x in ipo.lr_grid(torch.ones(1, dtype=torch.bool), cfg.lr_factors)]
        + [(ipo.lr_grid(torch.ones(1, dtype=torch.bool), cfg.lr_factors)[0], ipo.PATIENCE_UP)]]}}})


def test_the_verbatim_rule_is_part_of_the_judges_identity():
    """A truth judge with the verbatim-reference rule has another identity than the same head without it, so an
    evaluation its head alone judged is stale (judged again when the run is next read); an info judge has none."""
    from types import SimpleNamespace

    import judge

    def j(kind, verdicts):
        return SimpleNamespace(meta={"data_sha256": "abc", "created": "then"},
                               rule=judge.VERBATIM if verdicts and kind == "truth" else None)

    ctx = SimpleNamespace(judged=True, judges=[j("truth", {"q": {}}), j("info", {"q": {}})])
    old = SimpleNamespace(judged=True, judges=[j("truth", None), j("info", None)])
    assert run.judge_ids(ctx) == [["abc", "then", judge.VERBATIM], ["abc", "then"]]
    ev = {"judges": run.judge_ids(old), "per_question": {"repetitive": []}, "pairs": []}
    assert run.stale(ctx, ev) == ["judges"] and run.stale(old, ev) == []


def test_a_full_model_short_of_a_head_sets_validation_loss_is_trained_on(tmp_path, tiny_model, stub_judges,
                                                                          monkeypatch, capsys):
    """run.full_model_bounds / meet_full_model_bounds: a full-model edit whose best validation loss is above a head
    set's (same tau and validation pairs; beyond FULL_BOUND_TOL) is trained again with more patience and evaluated
    again, its bound kept; once every rate was, it is left as it is; a shard only says so."""
    monkeypatch.setenv("EDITLOC_CACHE", str(tmp_path / "cache"))
    import judge

    monkeypatch.setattr(judge, "BACKBONE", str(tiny_model))
    kl_text = tmp_path / "neutral.txt"
    kl_text.write_text("The bakery opens at seven and sells bread.\n")
    base = run.RunConfig(model=str(tiny_model), data=str(tiny_data(tmp_path)), max_pairs=8, dtype="fp32",
                         kl_text=str(kl_text), lr=[0.3], epochs=30, eval_every=2, patience=1, n_test=3)
    runs = [("full", replace(base, heads="full")), ("heads", replace(base, heads="random2")),
            ("heads-t0.3", replace(base, heads="random2", tau=0.3))]
    out, ctx = tmp_path / "runs", run.Context(base)
    res = {n: run.run(c, out, n, ctx) for n, c in runs}
    v = res["full"]["ipo"]["val_loss"]
    res["heads-t0.3"]["ipo"]["val_loss"] = v / 10  # another tau: no bound
    res["heads"]["ipo"]["val_loss"] = v / (1 + run.FULL_BOUND_TOL / 2)  # within the slack: no bound
    assert run.full_model_bounds(runs, res) == {}
    res["heads-bf16"] = {"ipo": {"val_loss": v / 10}}  # another dtype: other losses, no bound
    assert run.full_model_bounds(runs + [("heads-bf16", replace(base, heads="random2", dtype="bf16"))], res) == {}
    res["heads"]["ipo"]["val_loss"] = v / 2
    b = run.full_model_bounds(runs, res)
    assert list(b) == ["full"] and b["full"]["val_loss"] == pytest.approx(v / 2 * (1 + run.FULL_BOUND_TOL))
    assert run.meet_full_model_bounds(runs, res, out, ctx, sharded=True) == []  # a shard trains nothing
    assert "without --shard" in capsys.readouterr().err and not (out / "full" / "ipo" / "bound.json").exists()

    patient = lambda sel: {g["lr"] for g in sel["grid"] if g["patience_factor"] > 1}
    before = res["full"]["ipo"]["selection"]
    assert patient(before) != {g["lr"] for g in before["grid"]}  # a rate not yet trained with more patience
    assert run.meet_full_model_bounds(runs, res, out, ctx) == ["full"]
    sel = res["full"]["ipo"]["selection"]  # the bound is out of reach: every rate trained on with more patience
    assert patient(sel) == {g["lr"] for g in sel["grid"]} and ipo.next_try(sel, 2, sel["bound"]) is None
    assert sel["bound"] == b["full"]["val_loss"] and run.full_bound(out / "full") == sel["bound"]
    assert json.loads((out / "full" / "results.json").read_text())["ipo"]["selection"]["bound"] == sel["bound"]
    assert "(the full-model bound)" in capsys.readouterr().err and (out / "full" / "eval_ipo.json").exists()

    # a full model not trained yet is given the bound before it trains (run.bound_before): it trains on toward it
    # at once, and is evaluated once
    runs2 = runs + [("full-b", runs[0][1])]
    on_disk = json.loads((out / "heads" / "results.json").read_text())
    on_disk["ipo"]["val_loss"] = v / 2
    (out / "heads" / "results.json").write_text(json.dumps(on_disk))
    run.bound_before(runs2, out, "heads")  # not a full model
    assert not (out / "heads" / "ipo" / "bound.json").exists()
    run.bound_before(runs2, out, "full-b")
    assert run.full_bound(out / "full-b") == pytest.approx(v / 2 * (1 + run.FULL_BOUND_TOL))
    evals, real_evaluate = [], run.evaluate
    monkeypatch.setattr(run, "evaluate", lambda ctx, edit, label, *a: evals.append(label) or real_evaluate(
        ctx, edit, label, *a))
    r = run.run(runs[0][1], out, "full-b", ctx)["ipo"]["selection"]
    assert evals == ["ipo"] and r["bound"] == run.full_bound(out / "full-b")
    assert patient(r) == {g["lr"] for g in r["grid"]}

    def boom(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(ipo, "select_ipo", boom)
    res["heads"]["ipo"]["val_loss"] = min(res["full"]["ipo"]["val_loss"], v) / 2  # still above: every rate was tried
    assert run.meet_full_model_bounds(runs, res, out, ctx) == []
    assert "left as it is" in capsys.readouterr().err


@pytest.mark.parametrize("name,n", [("ipo-vs-iti", 2), ("ipo-random", 2), ("ipo-random", 4), ("single-heads", 8)])
def test_shards_balance_cost_and_keep_full_models_with_their_bounds(name, n):
    """Every run in exactly one shard; the shards' estimated costs within one run's cost of each other; Fig. 2
    over two machines keeps each full model with all the head sets that bound it (its tau), where every n-th run
    (the old rule) did not; a group larger than a shard's share is split."""
    import experiments

    runs = experiments.experiment_runs(name, run.RunConfig(), experiments.SIZES["default"], (30, 9))
    sh = run.shard_of(runs, n)
    assert len(sh) == len(runs) and set(sh) <= set(range(n))  # each run given one shard (-1: none)
    load = [sum(run.run_cost(c) for (_, c), s in zip(runs, sh) if s == i) for i in range(n)]
    assert max(load) - min(load) <= max(run.RUN_COST.values()), load
    apart = lambda sh: [f for (f, c), s in zip(runs, sh) if c.full_model for (_, d), t in zip(runs, sh)
                        if d.method == "ipo" and run.bound_key(d) == run.bound_key(c) and t != s]
    if name == "ipo-vs-iti":  # two taus, two machines: each tau's edits on one
        assert not apart(sh) and apart([k % n for k in range(len(runs))])
    else:  # one tau: its group is more than a share of the whole, so split
        assert apart(sh)
    assert run.shard_of(runs, 1) == [0] * len(runs)
    assert run.shard_of([], 2) == []
    few = run.shard_of(runs[:2], 5)  # more shards than runs: each run a shard of its own, some have none
    assert len(few) == 2 and len(set(few)) == 2 and set(few) <= set(range(5))


def test_strip_flags_removes_flags_and_their_values():
    argv = ["experiment", "mc", "--jobs", "2", "--shard=0/2", "--dtype", "auto", "--out", "x"]
    assert run.strip_flags(argv, ("--jobs", "--shard", "--dtype")) == ["experiment", "mc", "--out", "x"]


def test_jobs_start_a_full_model_once_its_head_sets_are_done(tmp_path, monkeypatch):
    """do_runs with jobs: never more than `jobs` workers; a full-model IPO run waits for this command's head-set
    runs at its tau (its bound needs them) and goes first once ready; each worker is this command with --only NAME,
    one thread, no --jobs; a failed worker stops the rest, naming its log."""
    import subprocess

    events, alive = [], {}

    class Worker:  # a worker that finishes on its third poll (tenth: ok, ok2, slow), writing its results
        def __init__(self, argv, stdout, stderr, env):
            self.name, self.polls, self.returncode = argv[argv.index("--only") + 1], 0, None
            assert "--jobs" not in argv and env["OMP_NUM_THREADS"] == "1" and argv[2:4] == ["experiment", "mc"]
            events.append(("start", self.name, sorted(alive)))
            alive[self.name] = self

        def poll(self):
            self.polls += 1
            if self.polls < (10 if self.name in ("ok", "ok2", "slow") else 3):
                return None
            self.returncode = 1 if self.name == "bad" else 0
            if self.returncode == 0:
                (tmp_path / self.name).mkdir(exist_ok=True)
                (tmp_path / self.name / "results.json").write_text("{}")
            alive.pop(self.name, None)
            return self.returncode

        def wait(self, timeout=None):
            if timeout is not None and self.name == "slow":
                raise subprocess.TimeoutExpired("worker", timeout)
            while self.poll() is None:
                pass

        def send_signal(self, sig):
            events.append(("signal", self.name, sig))

    monkeypatch.setattr(subprocess, "Popen", Worker)
    monkeypatch.setattr(run.time, "sleep", lambda s: None)
    monkeypatch.setattr(run, "base_eval", lambda ctx: None)
    monkeypatch.setattr(run.torch, "get_num_threads", lambda: 2)
    ctx = types.SimpleNamespace(probe=None, judged=False, cfg=types.SimpleNamespace(dtype="bf16"))
    b = run.RunConfig(method="ipo")
    runs = [("h1", replace(b, heads="random16", tau=0.1)), ("h2", replace(b, heads="random16", tau=0.1)),
            ("h5", replace(b, heads="random16", tau=0.5)), ("iti", replace(b, heads="probe16", method="iti")),
            ("f1", replace(b, heads="full", tau=0.1)), ("f5", replace(b, heads="full", tau=0.5))]
    run.do_runs(runs, runs, tmp_path, ctx, jobs=2, command=["experiment", "mc", "--jobs", "2"])
    started = [e[1] for e in events]
    assert sorted(started) == sorted(n for n, _ in runs) and all(len(e[2]) < 2 for e in events)
    at = lambda n: started.index(n)
    assert at("f1") > max(at("h1"), at("h2")) and at("f5") > at("h5")
    assert at("f1") < at("iti")  # once ready, the full model goes before the runs left
    alive_at = {e[1]: e[2] for e in events}  # the workers running when each started
    assert not {"h1", "h2"} & set(alive_at["f1"]) and "h5" not in alive_at["f5"]  # its tau's head sets were done

    here = []  # finished runs, and a single run left, are done in this process (no worker)
    monkeypatch.setattr(run, "bound_before", lambda runs_, out, name: None)
    monkeypatch.setattr(run, "run", lambda c, out, name, ctx_: here.append(name))
    events.clear()
    run.do_runs(runs, runs + [("one", b)], tmp_path, ctx, jobs=2, command=["experiment", "mc", "--jobs", "2"])
    assert events == [] and here == [n for n, _ in runs] + ["one"]

    with pytest.raises(run.UserError, match=r"run bad failed \(exit 1\); the end of .*bad\.log"):
        run.do_runs(runs, [("bad", b), ("ok", b), ("late", b)], tmp_path, ctx, jobs=2, command=["experiment", "mc", "--jobs", "2"])
    assert [e[1] for e in events] == ["bad", "ok", "ok"] and events[2][0] == "signal" and not alive  # the other
    # worker stopped as by Ctrl-C (it saves where it is), nothing new begun

    events.clear()  # Ctrl-C: a worker that has not stopped by itself after the grace time gets it sent
    monkeypatch.setattr(run.time, "sleep", lambda s: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run.do_runs(runs, [("slow", b), ("ok2", b)], tmp_path, ctx, jobs=2, command=["experiment", "mc", "--jobs", "2"])
    import signal
    assert ("signal", "slow", signal.SIGINT) in events and ("signal", "ok2", signal.SIGINT) not in events


def test_user_errors_from_the_command_line_are_one_line():
    """`python run.py experiment ...` as a script: an error raised by experiments.py (which imports run) is the
    same UserError main catches, so it is one line with exit status 2, not a traceback."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, str(run.ROOT / "run.py"), "experiment", "ipo-random", "--shard", "3/2"],
                       capture_output=True, text=True, cwd=run.ROOT)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "run.py: error: --shard '3/2': expected i/n with 0 <= i < n, e.g. 0/4"]


def test_jobs_fewer_runs_than_jobs_share_all_the_cores(tmp_path, monkeypatch):
    """With fewer runs left than --jobs, each worker gets cores / (runs left) threads, not cores / jobs."""
    import subprocess

    threads = []

    class Worker:  # finishes at once, writing its results
        def __init__(self, argv, stdout, stderr, env):
            threads.append(env["OMP_NUM_THREADS"])
            self.name, self.returncode = argv[argv.index("--only") + 1], None

        def poll(self):
            (tmp_path / self.name).mkdir(exist_ok=True)
            (tmp_path / self.name / "results.json").write_text("{}")
            self.returncode = 0
            return 0

    monkeypatch.setattr(subprocess, "Popen", Worker)
    monkeypatch.setattr(run.time, "sleep", lambda s: None)
    monkeypatch.setattr(run, "base_eval", lambda ctx: None)
    monkeypatch.setattr(run.torch, "get_num_threads", lambda: 4)
    ctx = types.SimpleNamespace(probe=None, judged=False, cfg=types.SimpleNamespace(dtype="fp32"))
    b = run.RunConfig(method="iti", heads="probe16")
    runs = [("a", b), ("b", b)]
    run.do_runs(runs, runs, tmp_path, ctx, jobs=4, command=["experiment", "mc", "--jobs", "4"])
    assert threads == ["2", "2"]
