"""metrics.py on tiny random models, each checked against an independent computation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metrics
from llama import Edit, Llama
from tiny import CharTokenizer, tiny_config, write_tiny
from truthfulqa import Prompts, Question




class ConstEdit(Edit):
    """Adds a constant vector to the residual after layer `layer`."""

    def __init__(self, layer, vec, positions="all"):
        self.layer, self.vec, self.positions = layer, vec, positions

    def delta(self, l, o, W):
        return self.vec.to(o.dtype) if l == self.layer else None


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny(tmp_path_factory.mktemp("tiny") / "m", tiny_config(vocab=128, n_layers=3), seed=1)
    return Llama.from_pretrained(path, dtype="fp32")


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


PROMPTS = Prompts(instruction="Be true.", qa_primer="Q: Sky?\nA: Blue.", layout="{instruction}\n\n{qa_primer}\n\nQ: {question}\nA:",
                  judge_truth_layout="Q: {question}\nA: {answer}\nTrue:",
                  judge_info_layout="Q: {question}\nA: {answer}\nHelpful:")


def make_questions():
    return [Question(qid=0, question="Is ice cold?", best="Yes.", correct=["Yes.", "Yes, it is."], incorrect=["No."],
                     category="x", mc1={"Yes.": 1, "No.": 0, "Never": 0},
                     mc2={"Yes.": 1, "Yes, it is.": 1, "No.": 0, "Hot": 0}),
            Question(qid=1, question="Two plus two?", best="Four.", correct=["Four."], incorrect=["Five.", "3"],
                     category="y", mc1={"Four.": 1, "Five.": 0}, mc2={"Four.": 1, "4": 1, "Five.": 0, "3": 0})]


# ---- MC metrics on hand-made log-probabilities -------------------------------------------------------------

def test_mc_from_logprobs_known_values():
    mc1, mc2, mc3 = metrics.mc_from_logprobs([-1.0, -3.0], [-2.0, -4.0])
    assert mc1 == 1.0 and mc3 == 0.5
    e = math.exp
    assert mc2 == pytest.approx((e(-1) + e(-3)) / (e(-1) + e(-3) + e(-2) + e(-4)), rel=1e-12)
    # the best (first) true answer loses, another true answer wins: MC1 0, MC3 1/2
    assert metrics.mc_from_logprobs([-5.0, -1.0], [-2.0]) == pytest.approx((0.0, (e(-5) + e(-1)) / (e(-5) + e(-1) + e(-2)), 0.5))
    # ties count as losses (TruthfulQA's strict >)
    assert metrics.mc_from_logprobs([-2.0], [-2.0, -9.0])[0] == 0.0
    # very negative log-probabilities (long answers) stay finite: equal sums give MC2 = 1/2
    assert metrics.mc_from_logprobs([-2000.0], [-2000.0])[1] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.mc_from_logprobs([], [-1.0])


def full_logprob(model, ids_prompt, ids_answer, edit=None, newest=False):
    """Independent: one forward over prompt + answer, no shared-prefix keys/values."""
    ids = torch.tensor([ids_prompt + ids_answer])
    mask = None
    if newest:
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, len(ids_prompt) - 1:] = True
    lp = model(ids, edit=edit, edit_mask=mask).float().log_softmax(-1)[0]  # [T, V]
    return sum(lp[len(ids_prompt) + j - 1, t].item() for j, t in enumerate(ids_answer))


@pytest.mark.parametrize("max_tokens", [1, 512])  # each question in its own row; all packed into one
@pytest.mark.parametrize("which", ["none", "all", "newest"])
def test_mc_scores_match_full_forward(model, tok, which, max_tokens):
    torch.manual_seed(0)
    edit = None if which == "none" else ConstEdit(1, torch.randn(model.cfg.d_model), positions=which)
    qs = make_questions()
    assert len(qs) > 1
    got = metrics.mc_scores(model, tok, PROMPTS, qs, edit=edit, progress=False, max_tokens=max_tokens)
    for qi, q in enumerate(qs):
        prompt = tok.encode(PROMPTS.generation(q.question))

        def lp(a):
            with torch.no_grad():
                return full_logprob(model, prompt, tok.encode(" " + a), edit, newest=which == "newest")

        ref1 = metrics.mc_from_logprobs([lp(a) for a, y in q.mc1.items() if y], [lp(a) for a, y in q.mc1.items() if not y])
        ref2 = metrics.mc_from_logprobs([lp(a) for a, y in q.mc2.items() if y], [lp(a) for a, y in q.mc2.items() if not y])
        assert got["per_question"]["mc1"][qi] == ref1[0]
        assert got["per_question"]["mc2"][qi] == pytest.approx(ref2[1], abs=1e-5)
        assert got["per_question"]["mc3"][qi] == ref2[2]
    assert got["mc2"] == pytest.approx(np.mean(got["per_question"]["mc2"]))


def test_mc_edit_changes_scores(model, tok):
    qs = make_questions()
    base = metrics.mc_scores(model, tok, PROMPTS, qs, progress=False)
    edited = metrics.mc_scores(model, tok, PROMPTS, qs, edit=ConstEdit(0, 3 * torch.ones(model.cfg.d_model)),
                               progress=False)
    assert base["per_question"]["mc2"] != edited["per_question"]["mc2"]


# ---- KL and CE ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["all", "newest"])
def test_kl_with_cached_base_residuals_is_identical(model, tok, tmp_path, which, monkeypatch):
    """The base side of KL read from the cached final residuals gives the same numbers, bit for bit, as running the
    base model; the cache is written on first use, read after, and a changed model does not read it."""
    texts = metrics.qa_texts(make_questions()) + ["Some neutral text.", "More text, a little longer than that."]
    edit = ConstEdit(1, torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)), positions=which)
    want = metrics.kl_ce(model, tok, texts, edit=edit, progress=False, batch_size=2)
    first = metrics.kl_ce(model, tok, texts, edit=edit, progress=False, batch_size=2, base_cache=tmp_path)
    files = list(tmp_path.glob("kl-base-*.safetensors"))
    assert len(files) == 1 and first == want
    calls = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: calls.append(k.get("edit")) or forward(self, *a, **k))
    again = metrics.kl_ce(model, tok, texts, edit=edit, progress=False, batch_size=2, base_cache=tmp_path)
    assert again == want and all(e is edit for e in calls)  # only the edited side ran the model
    assert metrics.kl_ce(model, tok, texts, progress=False, batch_size=2, base_cache=tmp_path)["kl"] == 0.0
    with torch.no_grad():
        model.layers[0].w_up.weight[0, 0] += 1.0  # another model: another cache file
    try:
        metrics.kl_ce(model, tok, texts, edit=edit, progress=False, batch_size=2, base_cache=tmp_path)
        assert len(list(tmp_path.glob("kl-base-*.safetensors"))) == 2
    finally:
        with torch.no_grad():
            model.layers[0].w_up.weight[0, 0] -= 1.0


def test_kl_zero_for_zero_edit_positive_otherwise(model, tok):
    texts = metrics.qa_texts(make_questions()) + ["Some neutral text without an answer."]
    none = metrics.kl_ce(model, tok, texts, progress=False)
    zero = metrics.kl_ce(model, tok, texts, edit=ConstEdit(1, torch.zeros(model.cfg.d_model)), progress=False)
    assert zero["kl"] == 0.0 and zero["ce"] == pytest.approx(none["ce"])
    # CE against a plain forward of each text (no "A:" line: the whole text is scored)
    plain = ["Some neutral text without an answer.", "Another plain line of words."]
    nll = [torch.nn.functional.cross_entropy(model(torch.tensor([ids]))[0, :-1].float(), torch.tensor(ids[1:]),
                                             reduction="sum").item() for ids in map(tok.encode, plain)]
    n = sum(len(tok.encode(t)) - 1 for t in plain)
    assert metrics.kl_ce(model, tok, plain, progress=False)["ce"] == pytest.approx(sum(nll) / n, rel=1e-5)
    for positions in ("all", "newest"):
        r = metrics.kl_ce(model, tok, texts, edit=ConstEdit(1, torch.ones(model.cfg.d_model), positions), progress=False)
        assert r["kl"] > 1e-4 and all(k > 0 for k in r["per_text"]["kl"])


def test_kl_ce_match_independent_computation(model, tok):
    torch.manual_seed(1)
    edit = ConstEdit(2, torch.randn(model.cfg.d_model))
    texts = ["Q: Why?\nA: Because.", "Q: A much longer question here?\nA: An answer of some length."]
    got = metrics.kl_ce(model, tok, texts, edit=edit, batch_size=2, progress=False)
    kl_tot = ce_tot = n_tot = 0
    for i, t in enumerate(texts):
        ids = torch.tensor([tok.encode(t)])
        with torch.no_grad():
            base = model(ids).float().log_softmax(-1)[0, :-1]
            ed = model(ids, edit=edit).float().log_softmax(-1)[0, :-1]
        kl = F.kl_div(ed, base, log_target=True, reduction="sum").item()  # KL(base || edited), summed
        ce = F.cross_entropy(ed, ids[0, 1:], reduction="sum").item()
        n = ids.shape[1] - 1
        assert got["per_text"]["kl"][i] == pytest.approx(kl / n, rel=1e-4)
        assert got["per_text"]["ce"][i] == pytest.approx(ce / n, rel=1e-5)
        kl_tot, ce_tot, n_tot = kl_tot + kl, ce_tot + ce, n_tot + n
    assert got["kl"] == pytest.approx(kl_tot / n_tot, rel=1e-4) and got["ce"] == pytest.approx(ce_tot / n_tot, rel=1e-5)
    assert got["tokens"] == n_tot


def test_kl_newest_edit_acts_from_the_prompts_last_token(model, tok):
    """For a "newest" edit the positions before "...A:"'s last token are untouched: their KL is exactly 0."""
    text = "Q: Why?\nA: Because."
    edit = ConstEdit(0, torch.ones(model.cfg.d_model), "newest")
    got = metrics.kl_ce(model, tok, [text], edit=edit, progress=False)
    ids = torch.tensor([tok.encode(text)])
    start = len(tok.encode("Q: Why?\nA:")) - 1
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, start:] = True
    with torch.no_grad():
        base = model(ids).float().log_softmax(-1)[0, :-1]
        ed = model(ids, edit=edit, edit_mask=mask).float().log_softmax(-1)[0, :-1]
    kl = (base.exp() * (base - ed)).sum(-1)  # [T-1]
    assert kl[:start].abs().max().item() == 0.0 and kl[start:].min().item() > 0
    assert got["kl"] == pytest.approx(kl.mean().item(), rel=1e-4)


def test_kl_on_the_neutral_text_every_position(model, tok):
    """The shipped neutral text: a zero edit gives KL exactly 0; with every_position a "newest" edit (ITI) acts
    at every position even where a line reads "...A:" (off-target text, as ITI measures it)."""
    texts = [l for l in metrics.NEUTRAL_TEXT.read_text(encoding="utf-8").splitlines() if l.strip()]
    assert len(texts) == 200 and not any("\nA:" in t or t.startswith(("Q:", "A:")) for t in texts)
    zero = metrics.kl_ce(model, tok, texts[:8], edit=ConstEdit(1, torch.zeros(model.cfg.d_model), "newest"),
                         progress=False, every_position=True)
    assert zero["kl"] == 0.0 and all(k == 0.0 for k in zero["per_text"]["kl"])
    text = "Q: Why?\nA: Because."
    edit = ConstEdit(0, torch.ones(model.cfg.d_model), "newest")
    got = metrics.kl_ce(model, tok, [text], edit=edit, progress=False, every_position=True)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        base = model(ids).float().log_softmax(-1)[0, :-1]
        ed = model(ids, edit=edit, edit_mask=torch.ones_like(ids, dtype=torch.bool)).float().log_softmax(-1)[0, :-1]
    kl = (base.exp() * (base - ed)).sum(-1)  # [T-1]
    assert kl.min().item() > 0 and got["kl"] == pytest.approx(kl.mean().item(), rel=1e-4)


def test_kl_rejects_empty_input(model, tok):
    with pytest.raises(ValueError, match="no texts"):
        metrics.kl_ce(model, tok, [], progress=False)
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        metrics.kl_ce(model, tok, ["x"], progress=False)


# ---- generation, Truth/Info --------------------------------------------------------------------------------

def test_cut_answer():
    assert metrics.cut_answer(" Paris.\nQ: next question") == "Paris."
    assert metrics.cut_answer(" Paris.\n\nSomething else") == "Paris."
    assert metrics.cut_answer("   ") == ""


def test_generate_answers_match_model_generate(model, tok):
    qs = make_questions()
    got = metrics.generate_answers(model, tok, PROMPTS, qs, max_new_tokens=8, progress=False)
    for q, a in zip(qs, got):
        ids = tok.encode(PROMPTS.generation(q.question))
        new = model.generate_ids([ids], 8, eos_id=tok.eos_id)[0]
        assert a == metrics.cut_answer(tok.decode(new))


class FixedJudge:
    def __init__(self, scores):
        self.scores = scores

    def score(self, questions, answers, batch_size=32):
        assert len(questions) == len(answers)
        return torch.tensor([self.scores[a] for a in answers])


def test_truth_info_fractions_and_empty_answers(capsys):
    truth = FixedJudge({"a": 0.9, "b": 0.2, "": 0.5, "d": 0.49})
    info = FixedJudge({"a": 0.6, "b": 0.7, "": 0.1, "d": 0.8})
    r = metrics.truth_info(truth, info, ["q1", "q2", "q3", "q4"], ["a", "b", "", "d"])
    assert r["per_question"]["truth"] == [1.0, 0.0, 1.0, 0.0]  # threshold: >= 0.5
    assert r["truth"] == 0.5 and r["info"] == 0.75 and r["truth_info"] == 0.375
    assert r["truth_score"] == pytest.approx((0.9 + 0.2 + 0.5 + 0.49) / 4)
    assert r["n_empty"] == 1 and "1 of 4 answers are empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        metrics.truth_info(truth, info, ["q1", "q2"], ["a"])


# ---- bootstrap -----------------------------------------------------------------------------------------------

def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    v = rng.normal(1.0, 1.0, size=400)
    lo, hi = metrics.bootstrap_ci(v)
    se = v.std() / math.sqrt(len(v))
    assert lo < v.mean() < hi and (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert metrics.bootstrap_ci([0.3] * 10) == (pytest.approx(0.3), pytest.approx(0.3))
    a, b = rng.integers(0, 2, 300).astype(float), rng.integers(0, 2, 300).astype(float)
    lo, hi = metrics.bootstrap_ci_product(a, b)
    assert lo < a.mean() * b.mean() < hi
    # questions are resampled jointly: mean(a) * mean(1 - a) = p (1 - p) barely moves near p = 1/2, while
    # an independent b of the same mean moves the product as much as either factor
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(metrics.bootstrap_ci_product(a, 1 - a)) < 0.5 * width(metrics.bootstrap_ci_product(a, b))
    with pytest.raises(ValueError):
        metrics.bootstrap_ci([])


def test_repetitive_answers():
    assert metrics.repetitive("No no no no no no no no no no no no")
    assert metrics.repetitive("No question no no no no no no no no no no no no no no")
    assert not metrics.repetitive("No, watermelon seeds pass through your digestive system.")
    assert not metrics.repetitive("no no no")  # too short to call
    assert not metrics.repetitive("")
