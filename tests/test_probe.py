"""Probes: batched Newton fit against an independent optimiser, planted signal, activation collection, head sets."""
import json
import math

import pytest
import torch

import probe
import truthfulqa as tqa
from llama import Llama
from tiny import tiny_config, write_tiny


def planted(N=600, L=3, H=4, D=8, heads=((1, 2), (2, 0)), shift=4.0, seed=0):
    """Gaussian activations; the true/false label moves the planted heads along a random direction."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(N, generator=g) < 0.45).long()
    X = torch.randn(N, L, H, D, generator=g)
    for l, h in heads:
        u = torch.randn(D, generator=g)
        X[:, l, h] += (y.float() - 0.5)[:, None] * shift * u / u.norm()
    return X, y


def reference_fit(x, y, C=1.0):
    """One head by torch.optim.LBFGS in fp64 on C * sum logloss + 0.5 ||w||^2 (intercept unpenalised)."""
    x, y = x.double(), y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = x @ w + b
        f = C * (torch.nn.functional.softplus(z) - y * z).sum() + 0.5 * w @ w
        f.backward()
        return f

    for _ in range(5):
        opt.step(closure)
    return w.detach(), b.detach()


def test_fit_matches_independent_optimum():
    X, y = planted(N=300, shift=3.0)
    fits = {C: probe.fit_probes(X, y, C=C) for C in (1.0, 0.1)}  # C scales the data term; the fit follows it
    for C, (wC, bC) in fits.items():
        for l, h in [(0, 0), (1, 2), (2, 0), (2, 3)]:
            w_ref, b_ref = reference_fit(X[:, l, h], y, C)
            assert torch.allclose(wC[l, h].double(), w_ref, atol=2e-4), (C, l, h)
            assert abs(float(bC[l, h]) - float(b_ref)) < 2e-4, (C, l, h)
    w, b = fits[1.0]
    # head blocks of any size give the same fit
    w3, b3 = probe.fit_probes(X, y, chunk=5)
    assert torch.allclose(w3, w, atol=1e-5) and torch.allclose(b3, b, atol=1e-5)


def test_planted_signal_accuracy_and_ranking():
    X, y = planted()
    train, val = torch.arange(0, 400), torch.arange(400, 600)
    acc = probe.train_probes(X, y, train, val)
    assert acc.shape == (3, 4)
    assert acc[1, 2] > 0.9 and acc[2, 0] > 0.9
    others = acc.clone()
    others[1, 2] = others[2, 0] = 0.5
    assert others.max() < 0.68
    assert set(probe.rank_heads(acc)[:2]) == {(1, 2), (2, 0)}
    # the accuracy is what the returned weights give, computed directly
    acc2, w, b = probe.train_probes(X, y, train, val, return_weights=True)
    pred = ((X[val, 1, 2] @ w[1, 2] + b[1, 2]) > 0).long()
    assert float(acc2[1, 2]) == pytest.approx(float((pred == y[val]).float().mean()))
    with pytest.raises(ValueError, match="both 0 and 1"):
        probe.train_probes(X, torch.zeros_like(y), train, val)


class CharTok:
    """A character tokenizer for the tiny model (vocab 64)."""
    pad_id, eos_id = 0, 2

    def encode(self, s, bos=False):
        return [3 + ord(c) % 61 for c in s]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Llama.from_pretrained(write_tiny(tmp_path_factory.mktemp("tiny"), tiny_config()))


def examples(n_questions=7, paper=False):
    """Answers sharing beginnings; with `paper`, each text goes on with another question (x, y, x_random)."""
    out = []
    question = [f"question {q}?" + "x" * q for q in range(n_questions)]
    for q in range(n_questions):
        for j in range(1 + q % 4):
            for label in (0, 1):
                text = f"Q: {question[q]}\nA: {'ab' * (j + label)}c{q}"
                other = (q + 1 + 2 * j + label) % n_questions if paper else None
                out.append(tqa.ProbeExample(q, text if other is None else f"{text}\nQ: {question[other]}", label,
                                            other))
    return out


def test_collect_equals_plain_forward_and_caches(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITLOC_CACHE", str(tmp_path))
    ex = examples()
    X = probe.collect(tiny, CharTok(), ex, batch_size=3, cache_key="tiny/test")
    tok = CharTok()
    ref = torch.cat([tiny(torch.tensor([tok.encode(e.text)]), output="probe") for e in ex])  # [N, L, H, D]
    assert X.shape == ref.shape and torch.allclose(X, ref, atol=1e-5)
    assert (tmp_path / "activations" / "tiny_test.safetensors").exists()
    again = probe.collect(None, tok, ex, cache_key="tiny/test")  # from the cache: the model is never used
    assert torch.equal(again, X)
    ex[0] = tqa.ProbeExample(0, ex[0].text + "z", 0)  # other texts: recomputed, not stale
    X2 = probe.collect(tiny, tok, ex, batch_size=4, cache_key="tiny/test")
    assert torch.allclose(X2[0], tiny(torch.tensor([tok.encode(ex[0].text)]), output="probe")[0], atol=1e-5)


def test_collect_resumes_after_an_interrupt(tiny, tmp_path, monkeypatch):
    """Ctrl-C during the collection keeps the parts saved so far; the same call then goes on from them, and the
    result equals an uninterrupted collection's exactly; the parts are gone once the whole file is written."""
    import llama

    tok, ex = CharTok(), examples(n_questions=12, paper=True)
    whole = probe.collect(tiny, tok, ex, batch_size=2, progress=False)  # no cache: uninterrupted
    monkeypatch.setenv("EDITLOC_CACHE", str(tmp_path))
    monkeypatch.setattr(llama, "SAVE_EVERY_S", 0.0)  # a part after every block of questions
    save, calls = probe._save_part, []

    def save_then_interrupt(*a):
        calls.append(save(*a))
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(probe, "_save_part", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        probe.collect(tiny, tok, ex, batch_size=2, cache_key="tiny/resume", progress=False)
    parts = sorted((tmp_path / "activations").glob("tiny_resume.part-*"))
    assert len(parts) == 2 and "activations of" in llama.interrupted_message()
    monkeypatch.setattr(probe, "_save_part", save)
    computed = []
    forward = tiny.forward
    monkeypatch.setattr(tiny, "forward", lambda *a, **k: computed.append(k.get("output")) or forward(*a, **k))
    X = probe.collect(tiny, tok, ex, batch_size=2, cache_key="tiny/resume", progress=False)
    assert torch.equal(X, whole)
    n_blocks = len(set(e.qid for e in ex))  # at most: the saved blocks were not run again
    assert 0 < computed.count("hidden") < n_blocks
    assert not list((tmp_path / "activations").glob("tiny_resume.part-*"))
    assert (tmp_path / "activations" / "tiny_resume.safetensors").exists()
    assert "activations" not in llama.KEPT


def test_collect_paper_layout_reads_the_random_questions_last_token(tiny):
    """Texts going on past the answer ("...\\nA: y\\nQ: x_random"): still one plain forward per full text, read at
    its very last token (x_random's), with each question's "Q: ...\\nA:" run once as the shared prefix."""
    from llama import shared_prefix_len

    tok, ex, iti = CharTok(), examples(paper=True), examples()
    assert all(e.text.startswith(i.text + "\nQ: question ") for e, i in zip(ex, iti))
    for q in range(7):
        mine = [tok.encode(e.text) for e in ex if e.qid == q]
        assert shared_prefix_len(mine) >= len(f"Q: question {q}?" + "x" * q + "\nA:")
    X = probe.collect(tiny, tok, ex, batch_size=3, progress=False)  # [N, L, H, D]
    ref = torch.cat([tiny(torch.tensor([tok.encode(e.text)]), output="probe") for e in ex])
    assert X.shape == ref.shape and torch.allclose(X, ref, atol=1e-5)
    assert not torch.allclose(X, probe.collect(tiny, tok, iti, batch_size=3, progress=False), atol=1e-3)


def test_probe_heads_and_save(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITLOC_CACHE", str(tmp_path / "cache"))
    try:
        questions = tqa.load_questions()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    split = tqa.Split(seed=0, train=list(range(40)), val=list(range(40, 50)), test=list(range(50, 60)))
    res = probe.probe_heads(tiny, CharTok(), questions, split, model_name="tiny", version="v0", seed=1)
    assert res.meta["layout"] == "paper" and res.meta["seed"] == 1
    L, H = tiny.cfg.n_layers, tiny.cfg.n_heads
    assert res.acc.shape == (L, H) and len(res.qids) == res.X.shape[0] == len(res.y)
    ptrain = {res.qids[i] for i in res.train_idx.tolist()}
    pval = {res.qids[i] for i in res.val_idx.tolist()}
    assert not ptrain & pval and ptrain | pval == set(split.train) and len(ptrain) == 32
    assert len(res.train_idx) + len(res.val_idx) == len(res.qids)
    cached = sorted((tmp_path / "cache" / "activations").iterdir())
    assert len(cached) == 1
    # the cache key is the texts' digest: the layouts cache apart; ITI's texts do not depend on the seed, so
    # another seed reuses its file (with other probe-val questions); the paper's x_random does
    iti = probe.probe_heads(tiny, CharTok(), questions, split, model_name="tiny", version="v0", seed=1, layout="iti")
    assert iti.meta["layout"] == "iti" and iti.qids == res.qids and torch.equal(iti.y, res.y)
    assert not torch.equal(iti.X, res.X) and iti.meta["cache_key"] != res.meta["cache_key"]
    cached = sorted((tmp_path / "cache" / "activations").iterdir())
    assert len(cached) == 2
    res2 = probe.probe_heads(tiny, CharTok(), questions, split, model_name="tiny", version="v0", seed=2, layout="iti")
    assert sorted((tmp_path / "cache" / "activations").iterdir()) == cached and torch.equal(res2.X, iti.X)
    assert {res2.qids[i] for i in res2.val_idx.tolist()} != pval
    probe.probe_heads(tiny, CharTok(), questions, split, model_name="tiny", version="v0", seed=2)
    assert len(list((tmp_path / "cache" / "activations").iterdir())) == 3
    mask = probe.parse_heads("probe2", L, H, res.acc)
    out = res.save(tmp_path / "run", mask)
    d = json.loads((out / "probe_acc.json").read_text())
    assert torch.allclose(torch.tensor(d["acc"]), res.acc, atol=1e-6)
    chosen = [f"{l}.{h}" for l in range(L) for h in range(H) if mask[l, h]]  # row-major, by hand
    assert d["chosen"] == chosen and set(chosen) == set(d["ranking"][:2])
    ranked = [float(res.acc[int(l), int(h)]) for l, h in (s.split(".") for s in d["ranking"])]
    assert len(ranked) == L * H and ranked == sorted(ranked, reverse=True)
    assert d["split"] == split.to_dict() and d["meta"]["layout"] == "paper"
    assert d["probe_val_qids"] == probe.probe_split(split.train, 1)[1] == [2, 6, 7, 9, 15, 18, 19, 20]
    assert sorted(d["probe_train_qids"] + d["probe_val_qids"]) == split.train
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(out / "probe_acc.safetensors"))["acc"], res.acc.float())


def test_parse_heads():
    L, H = 30, 9
    acc = torch.rand(L, H, generator=torch.Generator().manual_seed(0))
    assert probe.parse_heads("all", L, H).all()
    top = probe.parse_heads("probe16", L, H, acc)
    assert int(top.sum()) == 16 and float(acc[top].min()) >= float(acc[~top].max())
    r = probe.parse_heads("random16", L, H, seed=3)
    assert int(r.sum()) == 16 and torch.equal(r, probe.parse_heads("random16", L, H, seed=3))
    assert not torch.equal(r, probe.parse_heads("random16", L, H, seed=4))
    assert probe.head_list(probe.parse_heads("single:29.8", L, H)) == ["29.8"]
    assert probe.head_list(probe.parse_heads("12.3, 0.0", L, H)) == ["0.0", "12.3"]
    assert probe.needs_probe("probe16") and not probe.needs_probe("random16")
    for bad, msg in [("probe16", "needs probe accuracies"), ("random0", "between 1 and 270"),
                     ("random271", "between 1 and 270"), ("single:30.0", "out of range"), ("3.9", "out of range"),
                     ("1.2,x", "expected"), ("top16", "expected"), ("", "expected"), ("single:3", "not a head"),
                     ("12.3, 0.0,12.3", "12.3 given more than once")]:
        with pytest.raises(ValueError, match=msg):
            probe.parse_heads(bad, L, H)
    with pytest.raises(ValueError, match="shape"):
        probe.parse_heads("probe4", L, H, torch.rand(3, 3))
    # ranking ties: lower layer, then lower head first
    tied = torch.tensor([[0.5, 0.7, 0.7], [0.7, 0.2, 0.5]])
    assert probe.rank_heads(tied) == [(0, 1), (0, 2), (1, 0), (0, 0), (1, 2), (1, 1)]


def test_compare_rankings():
    acc = torch.rand(30, 9, generator=torch.Generator().manual_seed(0))
    same = probe.compare_rankings(acc, acc.clone())
    assert same["k"] == same["overlap"] == 16 and same["spearman"] == pytest.approx(1.0)
    assert same["shared"] == probe.head_list(probe.parse_heads("probe16", 30, 9, acc)) and same["mean_abs_diff"] == 0
    # reversed rankings, by hand: rho = -1, no common top-4 head, all 12 in the top 12
    a = torch.arange(12.0).reshape(3, 4) / 12
    b = a.flip(0, 1)
    rev = probe.compare_rankings(a, b, k=4)
    assert rev["spearman"] == pytest.approx(-1.0) and rev["overlap"] == 0 and rev["shared"] == []
    assert rev["mean_abs_diff"] == pytest.approx(float((a - b).abs().mean()))
    assert probe.compare_rankings(a, b, k=12)["overlap"] == 12
    # ties share their mean rank: a ranks (1.5, 1.5, 3, 4), b (1, 2, 3, 4); rho = 4.5 / sqrt(4.5 * 5)
    assert probe._average_ranks(torch.tensor([3.0, 1, 3, 2, 3])).tolist() == [4, 1, 4, 2, 4]
    tied = probe.compare_rankings(torch.tensor([[0.5, 0.5], [0.7, 0.9]]), torch.tensor([[0.1, 0.2], [0.3, 0.4]]), k=2)
    assert tied["spearman"] == pytest.approx(0.9 ** 0.5) and tied["mean_abs_diff"] == pytest.approx(0.4)
    assert tied["overlap"] == 2 and tied["shared"] == ["1.0", "1.1"]
    assert math.isnan(probe.compare_rankings(torch.full((2, 2), 0.5), a[:2, :2], k=1)["spearman"])  # constant
    with pytest.raises(ValueError, match="one shape"):
        probe.compare_rankings(a, a[:2])
    with pytest.raises(ValueError, match="k=13 must be between 1 and 12"):
        probe.compare_rankings(a, b, k=13)


def test_heatmap_without_matplotlib(tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    assert probe.heatmap(torch.rand(3, 4), None, tmp_path / "h.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().err and not (tmp_path / "h.png").exists()


def test_collect_real_model_fp32():
    """The shared-prefix batching on the real tokenizer and model: equal to one plain forward per text."""
    from tokenizer import Tokenizer

    model, tok = Llama.from_pretrained("smollm2-135m"), Tokenizer.from_pretrained("smollm2-135m")
    try:
        questions = tqa.load_questions()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ex = tqa.probe_examples(questions, [0, 1, 2, 3])
    X = probe.collect(model, tok, ex, batch_size=8)
    ref = torch.cat([model(torch.tensor([tok.encode(e.text)]), output="probe") for e in ex])
    assert X.shape == (len(ex), 30, 9, 64) and torch.allclose(X, ref, atol=1e-4)
