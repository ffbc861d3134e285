"""Tests for ipo.py: the rank-1 edits (eq. 4.1-4.3), the IPO loss, answer log-probs and the training loop."""
from __future__ import annotations

import math
import os
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F

import ipo
from llama import Llama
from tiny import tiny_config, write_tiny

Pair = namedtuple("Pair", "qid question chosen rejected")


class CharTokenizer:
    """A stand-in tokenizer for the tiny models: one token per character (ids 3..63)."""
    eos_id, pad_id, bos_id = 2, 0, 1

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return [3 + ord(c) % 61 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i - 3 + 32) for i in ids)


class Prompts:
    prefix = "Be true.\n\nQ: sky?\nA: blue\n\n"

    def generation(self, question: str) -> str:
        return self.prefix + f"Q: {question}\nA:"


PAIRS = [Pair(i, q, c, r) for i, (q, c, r) in enumerate([
    ("cats?", "meow", "woof woof"), ("sun?", "hot", "cold"), ("one+one?", "two", "three"),
    ("ice?", "cold", "hot"), ("grass?", "green", "red"), ("fire?", "hot!", "wet"),
    ("sea?", "salty", "sweet"), ("snow?", "white", "black")])]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny(tmp_path_factory.mktemp("tiny"), tiny_config(n_layers=3, n_heads=4, n_kv_heads=2), seed=1)
    return Llama.from_pretrained(path)


def random_edit(model, mask=None, seed=0):
    edit = ipo.Rank1Edit.full(model.cfg) if mask is None else ipo.Rank1Edit.at_heads(model.cfg, mask)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        edit.b.copy_(torch.randn(edit.b.shape, generator=g) * 0.5)
    return edit


def some_mask(cfg):
    mask = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = True  # layer 1 holds no chosen head
    return mask


def naive_logprob(model, prompt, answer, edit, average):
    """log p(answer | prompt) from one plain full forward of prompt + answer."""
    ids = torch.tensor([prompt + answer])
    logp = F.log_softmax(model(ids, edit=edit).float(), -1)[0]  # [T, V]
    lp = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(answer))
    return lp / len(answer) if average else lp


# ----------------------------------------------------------------------------------------------------------


def test_ipo_loss_by_hand():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -1.5])
    # tau = 0.5: 1/(2 tau) = 1; h = (0.5 + 0.5, 0 - 0.5) = (1, -0.5); loss = ((1-1)^2 + (-1.5)^2) / 2
    assert ipo.ipo_loss(pc, pr, rc, rr, 0.5).item() == pytest.approx(1.125)
    # tau = 0.1: 1/(2 tau) = 5; ((1-5)^2 + (-5.5)^2) / 2 = (16 + 30.25) / 2
    assert ipo.ipo_loss(pc, pr, rc, rr, 0.1).item() == pytest.approx(23.125)
    for tau in (0.0, -0.1):
        with pytest.raises(ValueError, match="tau"):
            ipo.ipo_loss(pc, pr, rc, rr, tau)


def test_schedule_and_default_learning_rates():
    lrs = [ipo.lr_at(s, 1e-3, warmup=4) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # 4 warm-up steps, then constant
    assert lrs[4:] == pytest.approx([1e-3] * 16) and ipo.lr_at(0, 1e-3, warmup=0) == 1e-3
    def first(n):
        mask = torch.zeros(30, 9, dtype=torch.bool)
        mask.view(-1)[:n] = True
        return mask

    assert ipo.default_lr(None) == 1e-4 and ipo.default_lr(first(1)) == 2e-3
    assert ipo.default_lr(first(2)) == ipo.default_lr(first(16)) == 5e-4
    assert ipo.default_lr(first(17)) == ipo.default_lr(first(270)) == 1e-4
    assert ipo.lr_grid(first(1)) == [2e-3 * f for f in ipo.LR_FACTORS] and ipo.lr_grid(None)[0] == 1e-4
    assert ipo.lr_grid(None, (16.0,)) == [1.6e-3, 1.6e-3 * ipo.FULL_EXTRA]  # the full model goes one step further


def test_delta_follows_eq_4_1_and_4_3(model):
    cfg = model.cfg
    L, H, D, M = cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.d_model
    o = torch.randn(2, 5, H, D)
    mask = some_mask(cfg)
    rep, lora = random_edit(model, mask), random_edit(model)
    for l in range(L):
        W = model.layers[l].W_O  # [M, H, D]
        s = torch.einsum("bthd,hd->bt", o, rep.a[l].detach().view(H, D))  # <a^l, o^l>
        b = rep.b[l].detach().view(H, D) * mask[l][:, None]  # b_h^l, zero outside the heads
        want = s[..., None] * sum(W[:, h, :] @ b[h] for h in range(H))  # sum_h W_h b_h^l, eq. 4.3
        got = rep.delta(l, o, W)
        if mask[l].any():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert got is None
        s = torch.einsum("bthd,hd->bt", o, lora.a[l].detach().view(H, D))
        torch.testing.assert_close(lora.delta(l, o, W), s[..., None] * lora.b[l].detach(), rtol=1e-5, atol=1e-6)
    assert lora.b.shape == (L, M) and rep.b.shape == (L, H * D) and rep.layers == [0, 2]
    assert rep.a[1].abs().sum() == 0 and (rep.a[0].abs() <= 1 / math.sqrt(H * D)).all()


def test_zero_b_leaves_model_bit_identical(model):
    ids = torch.randint(3, 64, (2, 9))
    base = model(ids)
    for edit in (ipo.Rank1Edit.full(model.cfg, seed=3), ipo.Rank1Edit.at_heads(model.cfg, some_mask(model.cfg))):
        assert edit.a.abs().sum() > 0 and edit.b.abs().sum() == 0
        assert torch.equal(model(ids, edit=edit), base)


def test_answer_logprobs_match_plain_forward(model):
    tok, prompts = CharTokenizer(), Prompts()
    data = ipo.encode_pairs(tok, PAIRS[:5], prompts)
    texts = [prompts.generation(p.question) for p in PAIRS[:5]]  # one token per character: the common text prefix
    assert len(data.prefix) == len(os.path.commonprefix(texts)) >= 30
    kv_edit = random_edit(model, some_mask(model.cfg))
    for edit in (None, kv_edit, random_edit(model)):
        for average in (True, False):
            kv = ipo.prefix_cache(model, data.prefix, edit)
            got = ipo.answer_logprobs(model, *data.batch(range(5)), prefix_kv=kv, edit=edit, average=average)
            want = [naive_logprob(model, data.prefix + data.prompts[i], y, edit, average)
                    for i in range(5) for y in (data.chosen[i], data.rejected[i])]
            torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)
    # no prefix, ragged answer lists, one-token answers
    prompts_ = [[5, 6, 7], [8]]
    answers = [[[9], [10, 11, 12]], [[13, 14]]]
    got = ipo.answer_logprobs(model, prompts_, answers, edit=kv_edit, average=False)
    want = [naive_logprob(model, p, y, kv_edit, False) for p, ys in zip(prompts_, answers) for y in ys]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)


class AddAtNewest(ipo.Edit):
    """An ITI-like edit: adds a fixed vector at layer 1 on the newest positions only."""
    positions = "newest"

    def __init__(self, M):
        self.v = torch.linspace(-1, 1, M)

    def delta(self, l, o, W):
        return self.v if l == 1 else None


def test_answer_logprobs_with_a_newest_edit_match_masked_forward(model):
    """A "newest" edit acts on the last prompt position and the answer positions (as in generation)."""
    edit = AddAtNewest(model.cfg.d_model)
    prefix, prompts_, answers = [4, 5, 6, 7], [[8, 9], [10]], [[[11, 12, 13], [14]], [[15, 16]]]
    got = ipo.answer_logprobs(model, prompts_, answers, prefix_kv=ipo.prefix_cache(model, prefix, edit), edit=edit)
    want = []
    for x, ys in zip(prompts_, answers):
        for y in ys:
            ids = torch.tensor([prefix + x + y])
            emask = torch.zeros_like(ids, dtype=torch.bool)
            emask[0, len(prefix + x) - 1:] = True
            logp = F.log_softmax(model(ids, edit=edit, edit_mask=emask).float(), -1)[0]
            want.append(sum(logp[len(prefix + x) - 1 + j, t] for j, t in enumerate(y)) / len(y))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)
    plain = ipo.answer_logprobs(model, prompts_, answers, prefix_kv=ipo.prefix_cache(model, prefix))
    assert (got - plain).abs().min() > 1e-3  # the edit matters at every answer


def test_pair_logprobs_dedupe_and_rows_match_per_pair(model, monkeypatch):
    data = ipo.encode_pairs(CharTokenizer(), PAIRS + [Pair(9, "cats?", "meow", "moo")], Prompts())
    edit = random_edit(model)
    calls, scored = [], []
    packed = ipo.answer_logprobs

    def counting(model_, prompts_, answers, **kw):
        calls.append(len(prompts_)), scored.extend(y for ys in answers for y in ys)
        return packed(model_, prompts_, answers, **kw)

    monkeypatch.setattr(ipo, "answer_logprobs", counting)
    got = ipo.pair_logprobs(model, data, edit, max_tokens=20)
    monkeypatch.undo()
    assert len(calls) > 1 and sum(calls) == 8  # several rows; each of the 8 distinct prompts once
    assert len(scored) == 2 * len(data) - 1  # "cats?" -> "meow" appears in two pairs and is scored once
    kv = ipo.prefix_cache(model, data.prefix, edit)
    with torch.no_grad():
        want = torch.stack([ipo.answer_logprobs(model, *data.batch([i]), prefix_kv=kv, edit=edit)
                            for i in range(len(data))])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_pass_resumes_after_an_interrupt(model, tmp_path, monkeypatch):
    """Ctrl-C midway through the reference log-probs keeps the prompts done (saved as it goes); the same call
    then scores only the rest, and equals an uninterrupted pass exactly. The part is removed at the end."""
    import llama

    pairs = [Pair(i, f"Question number {i} about a rather long topic?", f"yes {i}", f"no {i}") for i in range(40)]
    data = ipo.encode_pairs(CharTokenizer(), pairs, Prompts())  # several rows of 512 tokens
    whole = ipo.pair_logprobs(model, data)
    monkeypatch.setattr(llama, "SAVE_EVERY_S", 0.0)
    packed, calls = ipo.answer_logprobs, []

    def interrupted(model_, prompts_, answers, **kw):
        calls.append(len(prompts_))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return packed(model_, prompts_, answers, **kw)

    monkeypatch.setattr(ipo, "answer_logprobs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ipo.reference_logprobs(model, {"train": data}, True, tmp_path)
    part, = tmp_path.glob("ref_logprobs-*.train.partial.safetensors")
    assert part.exists() and "reference log-probs of" in llama.interrupted_message()
    done_before = sum(calls[:2])
    calls.clear()
    monkeypatch.setattr(ipo, "answer_logprobs", lambda *a, **kw: calls.append(len(a[1])) or packed(*a, **kw))
    ref = ipo.reference_logprobs(model, {"train": data}, True, tmp_path)
    assert sum(calls) == 40 - done_before  # only the prompts not yet done
    assert torch.equal(ref["train"], whole) and not part.exists()
    assert "reference log-probs" not in llama.interrupted_message()
    part.write_text("damaged")  # a damaged part is done again, not trusted
    assert torch.equal(ipo.pair_logprobs(model, data, partial=(part, "k")), whole)


def test_reference_logprobs_are_shared_by_the_same_pairs_and_threads(model, tmp_path, monkeypatch):
    """One file per (model, pairs, thread count) in ref_dir: a second training on the same pairs computes
    nothing; other pairs, or another thread count (bf16 sums in another order), get their own."""
    data = ipo.encode_pairs(CharTokenizer(), PAIRS, Prompts())
    first = ipo.reference_logprobs(model, {"train": data}, True, tmp_path)
    calls = []
    real = ipo.pair_logprobs
    monkeypatch.setattr(ipo, "pair_logprobs", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    again = ipo.reference_logprobs(model, {"train": data}, True, tmp_path)
    assert calls == [] and torch.equal(again["train"], first["train"]) and len(list(tmp_path.iterdir())) == 1
    ipo.reference_logprobs(model, {"train": data.subset(range(3))}, True, tmp_path)
    assert calls == [1] and len(list(tmp_path.iterdir())) == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    ipo.reference_logprobs(model, {"train": data}, True, tmp_path)
    assert calls == [1, 1] and len(list(tmp_path.iterdir())) == 3


def test_b_gradients_outside_heads_are_exactly_zero(model):
    mask = some_mask(model.cfg)
    edit = random_edit(model, mask)
    data = ipo.encode_pairs(CharTokenizer(), PAIRS[:3], Prompts())
    kv = ipo.prefix_cache(model, data.prefix, edit)
    ipo.answer_logprobs(model, *data.batch(range(3)), prefix_kv=kv, edit=edit).sum().backward()
    inside = edit.b_mask.bool()
    assert (edit.b.grad[~inside] == 0).all()
    assert (edit.b.grad[inside] != 0).float().mean() > 0.9
    assert (edit.a.grad[1] == 0).all() and (edit.a.grad[[0, 2]] != 0).any()  # layer 1 holds no head


def test_save_load_and_merge_export_equal_the_live_edit(model, tmp_path):
    ids = torch.randint(3, 64, (2, 11))
    for edit in (random_edit(model, some_mask(model.cfg)), random_edit(model)):
        live = model(ids, edit=edit)
        assert not torch.allclose(live, model(ids), atol=1e-3)  # the edit does something
        torch.testing.assert_close(edit.merge_into(model)(ids), live, rtol=1e-4, atol=1e-4)
        out = ipo.export(model, edit, tmp_path / f"merged-{edit.kind}")
        torch.testing.assert_close(Llama.from_pretrained(out)(ids), live, rtol=1e-4, atol=1e-4)
        edit.save(tmp_path / "e.safetensors", {"metrics": {"x": 1}})
        back = ipo.Rank1Edit.load(tmp_path / "e.safetensors")
        assert back.kind == edit.kind and back.heads == edit.heads and back.meta["metrics"] == {"x": 1}
        assert torch.equal(model(ids, edit=back), live)
    assert torch.equal(Llama.from_pretrained(model.source)(ids), model(ids))  # the base was not touched


def test_training_lowers_loss_and_raises_accuracy(model, tmp_path):
    tok, prompts = CharTokenizer(), Prompts()
    mask = some_mask(model.cfg)
    data = ipo.encode_pairs(tok, PAIRS, prompts)
    ref = ipo.pair_logprobs(model, data)
    lines = []
    edit, m = ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, mask, tau=0.5, lr=0.1, epochs=8, warmup=2,
                            batch_size=4, out_dir=tmp_path, log=lines.append, stop=ipo.StopRule(every=2, patience=50))
    before = ipo.evaluate_pairs(model, data, ref, ipo.Rank1Edit.at_heads(model.cfg, mask), 0.5)
    after = ipo.evaluate_pairs(model, data, ref, edit, 0.5)
    assert before["loss"] == pytest.approx(1.0, abs=1e-4) and abs(before["margin"]) < 1e-4  # identity at start
    assert after["loss"] < 0.5 * before["loss"] and after["acc"] >= 0.875 and after["margin"] > 0.4
    assert m["steps"] == 16 and m["done"] and len(m["curve"]) == 9 and "val_acc" in m  # step 0 and every 2 steps
    assert m["curve"][-1]["train_loss"] < m["curve"][1]["train_loss"]
    assert m["stop"] == "budget" and not m["converged"]  # still improving when the budget ran out
    assert any("NOT CONVERGED" in l for l in lines)
    saved = ipo.Rank1Edit.load(tmp_path / "edit.safetensors")
    assert torch.equal(saved.b, edit.b_eff().detach()) and saved.meta["metrics"]["steps"] == 16
    assert len(list(tmp_path.glob("ref_logprobs-*.safetensors"))) == 1


def scripted_validation(monkeypatch, losses):
    """Make evaluate_pairs return the given validation losses in turn (the rule reads nothing else)."""
    it = iter(losses)
    monkeypatch.setattr(ipo, "evaluate_pairs", lambda *a, **k: {"loss": next(it), "acc": 0.5, "margin": 0.1})


def test_stopping_rule_on_scripted_validation_curves(model, tmp_path, monkeypatch):
    """The rule stops `patience` validations after the last real gain and never while the loss still falls."""
    tok, prompts = CharTokenizer(), Prompts()
    kw = dict(tau=0.5, lr=1e-3, epochs=20, batch_size=4, log=lambda s: None,  # budget: 20 epochs x 2 steps
              stop=ipo.StopRule(every=2, patience=3, min_delta=0.01))
    # falls, then levels off (gains below 1% of the best) from the 4th validation on: stops 3 validations later
    scripted_validation(monkeypatch, [0.9, 0.8, 0.7, 0.699, 0.6995, 0.698, 0.5])
    _, m = ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, out_dir=tmp_path / "a", **kw)
    assert m["converged"] and m["stop"] == "converged" and m["steps"] == 12 and m["best_step"] == 6
    assert m["val_loss"] == 0.7 and [r["val_loss"] for r in m["curve"]][1:] == [0.9, 0.8, 0.7, 0.699, 0.6995, 0.698]
    # a slow start (no gain over the zero edit's 1.0 for 5 validations) is no plateau: patience starts at the first gain
    scripted_validation(monkeypatch, [1.0, 0.999, 0.995, 0.995, 0.999, 0.9, 0.9, 0.9, 0.9, 0.5])
    _, m = ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, out_dir=tmp_path / "c", **{**kw, "tau": 0.5})
    assert m["converged"] and m["best_step"] == 12 and m["steps"] == 18
    # still falling by more than 1% at every validation: runs to the budget, recorded as not converged
    scripted_validation(monkeypatch, [0.99 ** (2 * i) for i in range(1, 21)])
    _, m = ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, out_dir=tmp_path / "b", **kw)
    assert not m["converged"] and m["stop"] == "budget" and m["steps"] == m["budget"] == 40
    assert m["best_step"] == 40


def test_stopping_rule_keeps_the_best_checkpoint(model, tmp_path):
    """A real run whose validation loss levels off (a large learning rate overfits 6 pairs; half the validation
    pairs are among them): it stops before its budget, and the edit returned and saved is the one at the best
    validation, not the last state."""
    tok, prompts = CharTokenizer(), Prompts()
    mask = some_mask(model.cfg)
    val = PAIRS[4:]
    edit, m = ipo.train_ipo(model, tok, PAIRS[:6], val, prompts, mask, tau=0.5, lr=0.3, epochs=100, batch_size=3,
                            warmup=0, out_dir=tmp_path, log=lambda s: None, stop=ipo.StopRule(every=2, patience=4))
    assert m["converged"] and m["steps"] < m["budget"] and m["steps"] == m["best_step"] + 4 * 2
    losses = {r["step"]: r["val_loss"] for r in m["curve"]}
    assert min(losses.values()) >= m["val_loss"] * (1 - 0.002) and losses[m["best_step"]] == m["val_loss"]
    data = ipo.encode_pairs(tok, PAIRS[:6] + val, prompts).subset(range(6, 10))
    ref = ipo.pair_logprobs(model, data)
    assert ipo.evaluate_pairs(model, data, ref, edit, 0.5)["loss"] == pytest.approx(m["val_loss"], rel=1e-5)
    last = ipo.Rank1Edit.at_heads(model.cfg, mask)
    last.load_state(torch.load(tmp_path / "ckpt.pt", weights_only=True)["edit"])
    assert not torch.equal(last.b, edit.b)  # the last state is not the one kept
    assert torch.equal(ipo.Rank1Edit.load(tmp_path / "edit.safetensors").b, edit.b_eff().detach())


def test_select_ipo_keeps_the_lowest_validation_loss(model, tmp_path):
    tok, prompts = CharTokenizer(), Prompts()
    edit, m = ipo.select_ipo(model, tok, PAIRS, PAIRS[:3], prompts, some_mask(model.cfg), lrs=[1e-4, 0.05],
                             tau=0.5, epochs=3, batch_size=4, warmup=1, out_dir=tmp_path, log=lambda s: None,
                             stop=ipo.StopRule(every=2, patience=2))
    grid = m["selection"]["grid"]
    assert [g["lr"] for g in grid] == [1e-4, 0.05] and m["selection"]["chosen_lr"] == m["lr"]
    assert m["val_loss"] == min(g["val_loss"] for g in grid) and m["lr"] == 0.05
    assert len(list(tmp_path.glob("ref_logprobs-*"))) == 1 and not list(tmp_path.glob("lr0.05/ref_logprobs-*"))
    saved = ipo.Rank1Edit.load(tmp_path / "edit.safetensors")
    assert torch.equal(saved.b, edit.b_eff().detach()) and saved.meta["metrics"]["selection"]["chosen_lr"] == 0.05


def test_lora_scale_multiplies_the_delta_and_merges_exactly(model, tmp_path):
    mask = some_mask(model.cfg)
    ids = torch.randint(3, 64, (2, 7))
    for kind_mask in (None, mask):
        one = random_edit(model, kind_mask)
        s = (ipo.Rank1Edit.full(model.cfg, scale=8.0) if kind_mask is None
             else ipo.Rank1Edit.at_heads(model.cfg, kind_mask, scale=8.0))
        s.load_state(one.state())
        o = torch.randn(2, 7, model.cfg.n_heads, model.cfg.head_dim)
        W = model.layers[0].W_O
        torch.testing.assert_close(s.delta(0, o, W), 8.0 * one.delta(0, o, W))
        with torch.no_grad():
            torch.testing.assert_close(s.merge_into(model)(ids), model(ids, edit=s), rtol=1e-4, atol=1e-4)
        back = ipo.Rank1Edit.load(s.save(tmp_path / "s.safetensors"))
        assert back.scale == 8.0 and torch.equal(model(ids, edit=back), model(ids, edit=s))


def test_resume_equals_uninterrupted_run(model, tmp_path):
    tok, prompts = CharTokenizer(), Prompts()
    kw = dict(tau=0.2, lr=1e-2, epochs=2, batch_size=3, log=lambda s: None, stop=ipo.StopRule(every=2))
    full, m_full = ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, out_dir=tmp_path / "a", **kw)
    part, m_part = ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, out_dir=tmp_path / "b",
                                 max_steps=4, ckpt_every=2, **kw)
    assert m_part["steps"] == 4 and not m_part["done"]
    logs = []
    kw["log"] = logs.append
    rest, m_rest = ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, out_dir=tmp_path / "b", **kw)
    assert "resuming" in logs[0] and m_rest["steps"] == m_full["steps"] == 6
    assert not torch.equal(part.b, full.b)
    assert torch.equal(rest.a, full.a) and torch.equal(rest.b, full.b)
    assert m_rest["curve"] == m_full["curve"]
    with pytest.raises(ValueError, match="different run"):
        ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, out_dir=tmp_path / "b", **{**kw, "tau": 0.3})


def test_a_run_whose_budget_ran_out_goes_on_under_a_larger_one(model, tmp_path):
    """A run stopped by its step budget (the stopping rule never fired), called again with more epochs, goes on from
    its last state and ends exactly where a run given the larger budget from the start ends; called again with the
    smaller budget, it is that longer training; a converged run is the same under any larger budget."""
    tok, prompts = CharTokenizer(), Prompts()
    kw = dict(tau=0.2, lr=1e-2, batch_size=3, log=lambda s: None, stop=ipo.StopRule(every=1, patience=100))
    full, m_full = ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, out_dir=tmp_path / "a", epochs=2, **kw)
    one, m_one = ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, out_dir=tmp_path / "b", epochs=1, **kw)
    assert m_one["stop"] == "budget" and m_one["steps"] == 3 and not m_one["converged"]
    logs = []
    on, m_on = ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, out_dir=tmp_path / "b", epochs=2,
                             **{**kw, "log": logs.append})
    assert "3 when it was saved" in logs[0] and m_on["steps"] == m_full["steps"] == 6 and m_on["budget"] == 6
    assert torch.equal(on.a, full.a) and torch.equal(on.b, full.b) and m_on["curve"] == m_full["curve"]
    assert not torch.equal(one.b, full.b)
    again, m_again = ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, out_dir=tmp_path / "b", epochs=1, **kw)
    assert m_again["epochs"] == 2 and m_again["steps"] == 6 and torch.equal(again.b, full.b)
    with pytest.raises(ValueError, match="different run"):  # another change than the budget: another run
        ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, out_dir=tmp_path / "b", **{**kw, "tau": 0.3})
    conv = {**kw, "stop": ipo.StopRule(every=1, patience=1, min_delta=0.0)}  # stops at the first non-gain
    done, m_conv = ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, out_dir=tmp_path / "c", epochs=2, **conv)
    assert m_conv["converged"] and m_conv["steps"] < 6
    same, m_same = ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, out_dir=tmp_path / "c", epochs=3, **conv)
    assert m_same["steps"] == m_conv["steps"] and m_same["converged"] and torch.equal(same.b, done.b)


def test_bad_input(model, tmp_path):
    tok, prompts, cfg = CharTokenizer(), Prompts(), model.cfg
    empty = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.bool)
    with pytest.raises(ValueError, match="no heads"):
        ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, empty, out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="no validation pairs"):
        ipo.train_ipo(model, tok, PAIRS, [], prompts, None, out_dir=tmp_path / "x")
    for kw in ({"every": 0}, {"patience": 0}, {"min_delta": -0.1}, {"min_delta": 1.0}):
        with pytest.raises(ValueError, match="stopping rule"):
            ipo.StopRule(**kw)
    with pytest.raises(ValueError, match="empty learning-rate grid"):
        ipo.select_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, lrs=[], out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="LoRA scale"):
        ipo.Rank1Edit.full(cfg, scale=0.0)
    with pytest.raises(ValueError, match="shape"):
        ipo.Rank1Edit.at_heads(cfg, torch.ones(2, 2, dtype=torch.bool))
    for kw in ({"tau": 0.0}, {"tau": -1.0}, {"lr": float("nan")}, {"lr": -1e-3}):
        with pytest.raises(ValueError, match="tau|lr"):
            ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, None, out_dir=tmp_path / "x", **kw)
    with pytest.raises(FileNotFoundError):
        ipo.Rank1Edit.load(tmp_path / "missing.safetensors")
    # a learning rate that blows the loss up: a clear error, the last good state kept
    with pytest.raises(ValueError, match="non-finite"):
        ipo.train_ipo(model, tok, PAIRS, PAIRS[:2], prompts, some_mask(cfg), lr=1e20, warmup=0, epochs=3,
                      out_dir=tmp_path / "nan",
                      log=lambda s: None)
    st = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    assert st["step"] >= 1
    assert all(torch.isfinite(t).all() for t in st["edit"].values() if t.is_floating_point())
    assert not (tmp_path / "nan" / "edit.safetensors").exists()


def test_real_model_generation_prompts_short_run(tmp_path):
    """SmolLM2 on TruthfulQA pairs with the full generation prompt: the packed log-probs equal plain
    forwards of prompt + answer (the BPE-aware shared prefix), and two training steps at 16 heads run."""
    import truthfulqa as tq
    from tokenizer import Tokenizer

    model, tok = Llama.from_pretrained("smollm2-135m"), Tokenizer.from_pretrained("smollm2-135m")
    qs = tq.load_questions()
    prompts = tq.load_prompts()
    pairs = tq.preference_pairs(qs, [q.qid for q in qs[:3]])
    train, val = pairs[::3][:6], pairs[1::3][:3]
    data = ipo.encode_pairs(tok, train[:3], prompts)
    assert len(data.prefix) > 150 and tok.decode(data.prefix).startswith(prompts.instruction)
    mask = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
    mask.view(-1)[torch.randperm(mask.numel(), generator=torch.Generator().manual_seed(0))[:16]] = True
    edit = random_edit(model, mask)
    with torch.no_grad():
        edit.b.mul_(0.1)
        got = ipo.answer_logprobs(model, *data.batch(range(3)), prefix_kv=ipo.prefix_cache(model, data.prefix, edit),
                                  edit=edit, average=False)
        want = [naive_logprob(model, data.prefix + data.prompts[i], y, edit, False)
                for i in range(3) for y in (data.chosen[i], data.rejected[i])]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-3)

    trained, m = ipo.train_ipo(model, tok, train, val, prompts, mask, epochs=1, batch_size=3, out_dir=tmp_path,
                               log=lambda s: None)
    assert m["steps"] == 2 and m["lr"] == 5e-4 and math.isfinite(m["val_loss"]) and not m["converged"]
    last = torch.load(tmp_path / "ckpt.pt", weights_only=True)["edit"]["b"]  # the last state (the kept one may be b = 0)
    assert (last != 0).sum() == 16 * model.cfg.head_dim
    assert trained.layers == [1, 6, 7, 9, 10, 14, 15, 21, 23, 25, 26, 27, 29]  # the layers of the 16 seeded heads


class _FakeEdit:
    def save(self, path, meta):
        pass


@pytest.mark.parametrize("lrs, best_step, loss, tried, chosen", [
    # the lowest rate wins but peaked at the end of the warm-up: 4x lower, again, until one is not too fast
    ([8e-3], lambda lr: 20 if lr > 1e-3 else 150, lambda lr: lr, [8e-3, 2e-3, 5e-4], 5e-4),
    # every rate too fast: at most LR_DOWN_MAX rates below the grid
    ([0.1], lambda lr: 20, lambda lr: lr, [0.1, 0.025, 0.00625], 0.00625),
    # too fast but not the lowest rate tried, and the rate below stopped by the patience rule: that one again with
    # PATIENCE_UP times the patience, once
    ([1e-4, 8e-3], lambda lr: 20, lambda lr: -lr, [1e-4, 8e-3, 1e-4], 8e-3),
    # the rate below the grid is worse: it is trained again with more patience, then the search stops
    ([8e-3], lambda lr: 20, lambda lr: -lr, [8e-3, 2e-3, 2e-3], 8e-3),
    # the rate kept is not too fast: nothing more
    ([1e-4, 8e-3], lambda lr: 150, lambda lr: -lr, [1e-4, 8e-3], 8e-3),
])
def test_select_ipo_tries_lower_rates_when_the_lowest_is_too_fast(tmp_path, monkeypatch, lrs, best_step, loss, tried,
                                                                  chosen):
    calls, patience = [], []

    def fake_train(model, tok, pairs_train, pairs_val, prompts, mask, *, lr, out_dir, ref_dir, log, stop, **kw):
        calls.append(lr)
        patience.append((stop.patience, out_dir.name))
        return _FakeEdit(), {"val_loss": loss(lr), "best_step": best_step(lr), "steps": 200, "converged": True,
                             "warmup": ipo.WARMUP, "curve": [{"step": 0, "val_loss": 25.0}], "lr": lr,
                             "epochs": kw["epochs"]}

    monkeypatch.setattr(ipo, "train_ipo", fake_train)
    _, m = ipo.select_ipo(None, None, [], [], None, None, lrs=lrs, out_dir=tmp_path, log=lambda s: None,
                          stop=ipo.StopRule(every=10))
    assert calls == pytest.approx(tried) and m["lr"] == pytest.approx(chosen)
    grid = m["selection"]["grid"]
    assert [g["below_grid"] for g in grid] == [g["lr"] < min(lrs) for g in grid]
    assert [g["patience_factor"] for g in grid] == [1 + (ipo.PATIENCE_UP - 1) * (g["lr"] in [x["lr"] for x in grid[:k]])
                                                   for k, g in enumerate(grid)]
    assert [p for p, _ in patience] == [4 * g["patience_factor"] for g in grid]  # the stopping rule's patience
    assert len({d for _, d in patience}) == len(patience)  # each training in its own directory
    assert ipo.next_try(m["selection"], 10) is None and grid[m["selection"]["chosen"]]["lr"] == pytest.approx(chosen)


@pytest.mark.parametrize("still_falling_at", [1, ipo.BUDGET_UP])
def test_select_ipo_trains_on_the_edit_kept_when_its_budget_ran_out(tmp_path, monkeypatch, still_falling_at):
    """The edit kept spent its budget with the validation loss still falling: the same training (same directory)
    goes on to BUDGET_UP times the budget, once, and its record replaces the earlier one."""
    calls = []

    def fake_train(model, tok, pairs_train, pairs_val, prompts, mask, *, lr, epochs, out_dir, ref_dir, log, stop, **kw):
        calls.append((lr, epochs, out_dir.name))
        conv = epochs > still_falling_at
        return _FakeEdit(), {"val_loss": 10.0 - epochs - lr, "best_step": 100 * epochs, "steps": 100 * epochs,
                             "converged": conv, "warmup": ipo.WARMUP, "curve": [{"step": 0, "val_loss": 25.0}],
                             "lr": lr, "epochs": epochs}

    monkeypatch.setattr(ipo, "train_ipo", fake_train)
    _, m = ipo.select_ipo(None, None, [], [], None, None, lrs=[1e-3, 4e-3], out_dir=tmp_path, log=lambda s: None,
                          epochs=1, stop=ipo.StopRule(every=10))
    assert calls == [(1e-3, 1, "lr0.001"), (4e-3, 1, "lr0.004"), (4e-3, ipo.BUDGET_UP, "lr0.004")]
    grid = m["selection"]["grid"]
    assert [(g["lr"], g["budget_factor"]) for g in grid] == [(1e-3, 1), (4e-3, ipo.BUDGET_UP)]
    assert m["lr"] == 4e-3 and m["converged"] == (still_falling_at == 1)
    assert ipo.next_try(m["selection"], 10) is None  # once only, converged or not


def test_pack_rows_fills_rows_in_order():
    assert ipo.pack_rows([3, 3, 3, 10, 1], 6) == [[0, 1], [2], [3], [4]]  # 10 > 6: a row of its own
    assert ipo.pack_rows([1, 1, 1], 512) == [[0, 1, 2]] and ipo.pack_rows([], 8) == []


def upper_mask(cfg):
    mask = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.bool)
    mask[1, 2] = mask[2, 0] = True  # lowest edited layer 1: layer 0 is the same for every edit
    return mask


def test_layers_below_the_edit_run_once_and_change_nothing(model, monkeypatch):
    """`Below`: the validation pass and the training step give bit-identical log-probs, losses and gradients
    with the layers under the edit run once, and the second pass over the same rows runs none of them."""
    data = ipo.encode_pairs(CharTokenizer(), PAIRS, Prompts())
    edit = random_edit(model, upper_mask(model.cfg))
    below = ipo.Below(model, 1)
    runs = []
    mlp0 = model.layers[0].mlp
    monkeypatch.setattr(model.layers[0], "mlp", lambda x: runs.append(x.shape[1]) or mlp0(x))
    want = ipo.pair_logprobs(model, data, edit, max_tokens=40)
    n_plain = len(runs)
    got = [ipo.pair_logprobs(model, data, edit, max_tokens=40, below=below) for _ in range(2)]
    assert len(runs) == 2 * n_plain  # the first pass with `below` runs layer 0 as a plain pass does, the second not
    assert torch.equal(got[0], want) and torch.equal(got[1], want) and len(below.rows) > 1
    other = data.subset([0, 2, 4, 1])  # other rows (the first begins as a kept one does) through the same `below`:
    assert torch.equal(ipo.pair_logprobs(model, other, edit, max_tokens=40, below=below),  # their own residuals
                       ipo.pair_logprobs(model, other, edit, max_tokens=40))
    with torch.no_grad():  # a changed edit reads the same kept rows and gets its own answer
        edit.a.mul_(-2)
    assert torch.equal(ipo.pair_logprobs(model, data, edit, max_tokens=40, below=below),
                       ipo.pair_logprobs(model, data, edit, max_tokens=40))
    ref = torch.zeros(len(data), 2)
    grads = []
    for b in (None, below, below):
        loss, h = ipo.ipo_step_loss(model, data, [0, 3, 6], ref, edit, 0.5, below=b)
        ga, gb = torch.autograd.grad(loss, [edit.a, edit.b])
        grads.append((loss, h, ga, gb))
    for g in grads[1:]:
        assert all(torch.equal(x, y) for x, y in zip(g, grads[0]))


def test_training_with_the_lower_layers_run_once_equals_a_plain_training(model, tmp_path, monkeypatch):
    tok, prompts = CharTokenizer(), Prompts()
    kw = dict(tau=0.5, lr=0.05, epochs=3, warmup=2, batch_size=4, log=lambda s: None,
              stop=ipo.StopRule(every=2, patience=50))
    made = []
    real = ipo.Below
    monkeypatch.setattr(ipo, "Below", lambda m, l0: made.append(l0) or real(m, l0))
    edit, m = ipo.train_ipo(model, tok, PAIRS, PAIRS[:3], prompts, upper_mask(model.cfg), out_dir=tmp_path / "a", **kw)
    monkeypatch.setattr(ipo, "Below", lambda m, l0: None)
    plain, pm = ipo.train_ipo(model, tok, PAIRS, PAIRS[:3], prompts, upper_mask(model.cfg), out_dir=tmp_path / "b",
                              **kw)
    assert made == [1] and torch.equal(edit.a, plain.a) and torch.equal(edit.b, plain.b)
    assert [r["val_loss"] for r in m["curve"]] == [r["val_loss"] for r in pm["curve"]] and m["steps"] == 6


def test_more_patience_goes_on_from_where_the_smaller_one_stopped(model, tmp_path):
    """A converged training called again with a larger patience goes on from its last state and ends exactly where
    a training given that patience from the start ends; a smaller patience or another rule is another run."""
    tok, prompts = CharTokenizer(), Prompts()
    kw = dict(tau=0.2, lr=0.05, epochs=10, batch_size=3, warmup=0, log=lambda s: None)
    rule = dict(every=1, min_delta=0.02)
    full, m_full = ipo.train_ipo(model, tok, PAIRS, PAIRS[:3], prompts, None, out_dir=tmp_path / "a",
                                 stop=ipo.StopRule(patience=6, **rule), **kw)
    short, m_short = ipo.train_ipo(model, tok, PAIRS, PAIRS[:3], prompts, None, out_dir=tmp_path / "b",
                                   stop=ipo.StopRule(patience=1, **rule), **kw)
    assert m_short["converged"] and m_short["steps"] < m_full["steps"]  # the smaller patience stopped earlier
    logs = []
    on, m_on = ipo.train_ipo(model, tok, PAIRS, PAIRS[:3], prompts, None, out_dir=tmp_path / "b",
                             stop=ipo.StopRule(patience=6, **rule), **{**kw, "log": logs.append})
    assert "patience 6, 1 when it was saved" in logs[0]
    assert m_on["curve"] == m_full["curve"] and m_on["steps"] == m_full["steps"] and m_on["stop"] == m_full["stop"]
    assert torch.equal(on.a, full.a) and torch.equal(on.b, full.b)
    for other in (dict(patience=2, **rule), dict(patience=8, every=2, min_delta=0.02)):  # less patience; another rule
        with pytest.raises(ValueError, match="different run"):
            ipo.train_ipo(model, tok, PAIRS, PAIRS[:3], prompts, None, out_dir=tmp_path / "b",
                          stop=ipo.StopRule(**other), **kw)


def test_next_try_trains_each_rate_with_more_patience_while_above_the_bound():
    grid = [{"lr": 1e-3, "val_loss": 0.70, "best_step": 90, "converged": True},
            {"lr": 4e-3, "val_loss": 0.65, "best_step": 60, "converged": True}]
    sel = {"chosen": 1, "chosen_lr": 4e-3, "grid": grid}
    assert ipo.next_try(sel, 10) is None and ipo.next_try(sel, 10, bound=0.66) is None  # no bound, or below it
    assert ipo.next_try(sel, 10, bound=0.6)[:3] == (1e-3, ipo.PATIENCE_UP, 1)  # the lowest rate first
    grid.append({"lr": 1e-3, "val_loss": 0.62, "best_step": 300, "converged": True, "patience_factor": ipo.PATIENCE_UP})
    sel = {"chosen": 2, "grid": grid}
    nxt = ipo.next_try(sel, 10, bound=0.6)
    assert nxt[:3] == (4e-3, ipo.PATIENCE_UP, 1) and "above 0.6000" in nxt.why  # still above: the next rate
    grid.append({"lr": 4e-3, "val_loss": 0.64, "best_step": 200, "converged": True, "patience_factor": ipo.PATIENCE_UP})
    assert ipo.next_try(sel, 10, bound=0.6) is None  # every rate tried with more patience: left as it is
    grid[2].update(converged=False)  # the edit kept spent its budget: that first, as without a bound
    assert ipo.next_try(sel, 10, bound=0.6)[:3] == (1e-3, ipo.PATIENCE_UP, ipo.BUDGET_UP)


def test_select_ipo_goes_on_with_more_patience_toward_a_bound(model, tmp_path):
    """select_ipo with a bound its edit does not reach: the rates again with more patience, each going on from its
    first training's last state (the copied checkpoint), the bound recorded in the selection."""
    tok, prompts = CharTokenizer(), Prompts()
    logs = []
    _, m = ipo.select_ipo(model, tok, PAIRS, PAIRS[:3], prompts, None, lrs=[1e-3, 0.01], tau=0.2, epochs=10,
                          batch_size=3, warmup=0, out_dir=tmp_path, log=logs.append, bound=1e-6,
                          stop=ipo.StopRule(every=1, patience=1, min_delta=0.02))
    grid = m["selection"]["grid"]
    assert [(g["lr"], g["patience_factor"]) for g in grid] == [(1e-3, 1), (0.01, 1), (1e-3, 4), (0.01, 4)]
    assert m["selection"]["bound"] == 1e-6 and sum("the full-model bound" in x for x in logs) == 2
    assert sum("patience 4, 1 when it was saved" in x for x in logs) == 2  # each went on from the first training
    for lr in ("0.001", "0.01"):
        assert (tmp_path / f"lr{lr}-p4" / "ckpt.pt").exists()
    first, again = grid[1], grid[3]
    assert again["curve"][:len(first["curve"])] == first["curve"]
