"""probe.py: ITI's linear probes on every attention head (Li et al. 2023, sec. 3.1) and the head sets.

For each TruthfulQA training example, the paper's (x, y, x_random) "Q: {question}\\nA: {answer}\\nQ: {another
question}" (or ITI's "Q: {question}\\nA: {answer}": truthfulqa.PROBE_LAYOUTS), we read every head's output o_h^l
at the last token (the per-head attention output before o_proj, eq. 2.4), X: [N, L, H, D], and fit one logistic
regression per head, p(true | o_h^l) = sigmoid(w_h^l . o_h^l + b_h^l), all L x H heads at once. The heads whose
probes reach the highest validation accuracy are ITI's "truthful" heads (`probe16`).

  collect        X [N, L, H, D] for a list of ProbeExamples (cached on disk)
  train_probes   fit all probes (batched Newton, sklearn's C=1 objective) -> validation accuracy [L, H]
  probe_heads    the whole thing on the training questions of a Split -> ProbeResult (save: JSON, safetensors, png)
  compare_rankings  two accuracy maps [L, H] (e.g. of the two layouts): top-k overlap, Spearman rho, mean |diff|
  parse_heads    head sets: probeK, randomK, all, single:L.H, L.H,L.H,...  -> mask [L, H]
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import llama
import truthfulqa
from llama import KVCache, Progress, cache_dir, pad_left, shared_prefix_len, write_file_atomic


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Collecting o_h^l


def texts_sha1(texts: list[str]) -> str:
    """The digest of the exact texts that an activation cache file holds (stored in its metadata)."""
    return hashlib.sha1("\x00".join(texts).encode()).hexdigest()


def activation_key(model_name: str, dtype: torch.dtype, examples: list) -> str:
    """The activation cache key of `examples` for a model: its name, dtype and the digest of the texts (which
    covers the data version, the questions and the probe layout)."""
    return f"{model_name}-{str(dtype).replace('torch.', '')}-{texts_sha1([e.text for e in examples])[:16]}"


def _cache_path(cache_key: str) -> Path:
    return cache_dir() / "activations" / (re.sub(r"[^A-Za-z0-9._=-]+", "_", cache_key) + ".safetensors")


def collect(model, tokenizer, examples: list, *, batch_size: int = 32, cache_key: str | None = None,
            progress: bool = True) -> torch.Tensor:
    """Last-token per-head outputs of every layer for each example's `text`: X [N, L, H, D] in the model dtype.

    The examples of one question share their longest common token prefix (at least "Q: {question}\\nA:"; with the
    paper layout each text goes on past its answer with its own random question), so that prefix is run once per
    question and only the rest of each text (answer, random question) is run on top of its keys/values:
      1. a block of questions (about 4 * batch_size examples, sorted by prefix length) runs its prefixes,
         left-padded, into a KVCache [Q, K, P, D];
      2. the block's answers, sorted by length, run in batches of `batch_size` (left-padded) on a cache whose
         rows are their questions' prefixes (output="probe").
    The token sequences are exactly the tokenization of the full texts, so X equals a plain forward of each
    text up to rounding. With `cache_key` the result is kept in cache_dir()/activations/<key>.safetensors and
    reused when the texts match. A collection interrupted midway keeps what it did in partial files beside that
    path (written about every llama.SAVE_EVERY_S seconds) and goes on from there when called again."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    texts = [e.text for e in examples]
    if not texts:
        raise ValueError("collect: no examples")
    digest = texts_sha1(texts)
    path = None
    if cache_key is not None:
        path = _cache_path(cache_key)
        if path.exists():
            try:
                with safe_open(str(path), framework="pt") as f:
                    if (f.metadata() or {}).get("texts_sha1") == digest:
                        if progress:
                            _log(f"activations: {len(texts)} examples from cache {path}")
                        return f.get_tensor("X")
                _log(f"activations: cache {path} holds other texts; recomputing")
            except Exception as e:  # a damaged cache file is recomputed, never trusted
                _log(f"activations: cache {path} unreadable ({e}); recomputing")

    cfg, dev, pad = model.cfg, model.device, tokenizer.pad_id or 0
    L, H, D = cfg.n_layers, cfg.n_heads, cfg.head_dim
    enc = [tokenizer.encode(t) for t in texts]
    if any(len(s) == 0 for s in enc):
        raise ValueError("collect: an example's text encodes to no tokens")
    by_q: dict[int, list[int]] = {}  # qid -> example indices
    for i, e in enumerate(examples):
        by_q.setdefault(e.qid, []).append(i)
    questions = sorted(((shared_prefix_len([enc[i] for i in rows]), rows) for rows in by_q.values()),
                       key=lambda q: q[0])  # (prefix length P, example indices), shortest prefix first

    X = torch.empty(len(texts), L, H, D, dtype=model.dtype)  # X: [N, L, H, D]
    done = torch.zeros(len(texts), dtype=torch.bool)  # [N] rows of X collected (here or by an interrupted call)
    if path is not None and _load_parts(path, digest, X, done) and progress:
        _log(f"activations: resuming with {int(done.sum())} of {len(texts)} examples saved by an interrupted run")
    meter = Progress(len(texts) - int(done.sum()), "activations", unit="examples") if progress else None
    t0, n_tok, q = time.time(), 0, 0
    saved, new = time.time(), []  # when progress was last saved, and the rows collected since
    with torch.inference_mode():
        while q < len(questions):
            if path is not None and new and time.time() - saved >= llama.SAVE_EVERY_S:
                _save_part(path, digest, X, done, new)
                saved, new = time.time(), []
            block, n = [], 0  # 1. the prefixes of a block of questions
            while q < len(questions) and n < 4 * batch_size:
                block.append(questions[q])
                n += len(questions[q][1])
                q += 1
            if all(bool(done[r].all()) for _, r in block):  # saved by an interrupted call (the same blocks)
                continue
            ids, mask = pad_left([enc[rows[0]][:P] for P, rows in block], pad, dev)  # [Q, Pm]
            Pm = ids.shape[1]
            prefix = KVCache(cfg, len(block), Pm, model.dtype, dev)  # k_t[l]: [Q, K, D, Pm], v[l]: [Q, K, Pm, D]
            model(ids, mask, cache=prefix, output="hidden")
            # 2. the answers on top, shortest first: (answer length, example, question in block)
            rows = sorted((len(enc[i]) - P, i, j) for j, (P, r) in enumerate(block) for i in r)
            for c in range(0, len(rows), batch_size):
                batch = rows[c:c + batch_size]
                which = torch.tensor([j for _, _, j in batch], device=dev)  # [B] row -> question
                ids, mask = pad_left([enc[i][block[j][0]:] for _, i, j in batch], pad, dev)  # [B, T]
                cache = KVCache(cfg, len(batch), Pm + ids.shape[1], model.dtype, dev)
                for l in range(L):
                    cache.k_t[l][..., :Pm] = prefix.k_t[l][which]  # K^T: [B, K, D, Pm]
                    cache.v[l][:, :, :Pm] = prefix.v[l][which]  # [B, K, Pm, D]
                cache.mask[:, :Pm], cache.pos, cache.len = prefix.mask[which], prefix.pos[which], Pm
                o = model(ids, mask, cache=cache, output="probe")  # [B, L, H, D]
                rows_b = [i for _, i, _ in batch]
                X[torch.tensor(rows_b)] = o.to("cpu", X.dtype)
                done[rows_b] = True
                new += rows_b
                n_tok += sum(len(enc[i]) for _, i, _ in batch)
                if meter:
                    meter.update(len(batch), extra=f"{n_tok / max(time.time() - t0, 1e-9):.0f} tok/s")
    if meter:
        meter.close()
    if path is not None:
        write_file_atomic(path, lambda tmp: save_file({"X": X.contiguous()}, tmp, metadata={
            "texts_sha1": digest, "n": str(len(texts)), "key": cache_key}))
        for p in _part_paths(path):  # the whole result is saved: its parts are no longer needed
            p.unlink(missing_ok=True)
        llama.note_kept("activations", None)
    return X


def _part_paths(path: Path) -> list[Path]:
    """The partial files of an activation cache file: <name>.part-0000.safetensors, ... (in order)."""
    return sorted(path.parent.glob(f"{path.stem}.part-*.safetensors"))


def _save_part(path: Path, digest: str, X: torch.Tensor, done: torch.Tensor, rows: list[int]) -> Path:
    """Save the rows of X collected since the last part (atomically) as the next partial file of `path`."""
    from safetensors.torch import save_file

    parts = _part_paths(path)
    k = int(parts[-1].name.rsplit(".part-", 1)[1].split(".")[0]) + 1 if parts else 0
    idx = torch.tensor(rows, dtype=torch.long)
    part = path.parent / f"{path.stem}.part-{k:04d}.safetensors"
    write_file_atomic(part, lambda tmp: save_file({"idx": idx, "X": X[idx].contiguous()}, tmp,
                                                  metadata={"texts_sha1": digest}))
    llama.note_kept("activations", f"activations of {int(done.sum())} of {len(done)} examples "
                                   f"(in {path.parent}/{path.stem}.part-*)")
    return part


def _load_parts(path: Path, digest: str, X: torch.Tensor, done: torch.Tensor) -> int:
    """Fill rows of X [N, L, H, D] and done [N] from the partial files an interrupted collection of the same
    texts left beside `path`; parts of other texts or damaged ones are ignored (recomputed). Returns how many
    parts were read."""
    from safetensors import safe_open

    n = 0
    for p in _part_paths(path):
        try:
            with safe_open(str(p), framework="pt") as f:
                if (f.metadata() or {}).get("texts_sha1") != digest:
                    continue
                idx, x = f.get_tensor("idx"), f.get_tensor("X")
        except Exception:  # safetensors raises its own error type for a damaged file
            continue
        if x.shape[1:] != X.shape[1:] or len(idx) != len(x) or not bool(((idx >= 0) & (idx < len(X))).all()):
            continue
        X[idx] = x.to(X.dtype)
        done[idx] = True
        n += 1
    return n


# ----------------------------------------------------------------------------------------------------------
# Fitting all L x H probes at once


def fit_probes(X: torch.Tensor, y: torch.Tensor, C: float = 1.0, max_iter: int = 50, tol: float = 1e-8,
               chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression for every head at once: X [N, L, H, D], y [N] in {0, 1} -> w [L, H, D], b [L, H].

    Each head minimises scikit-learn's objective  f = C * sum_i logloss(y_i, w.x_i + b) + 0.5 * ||w||^2
    (intercept unpenalised, no standardisation: ITI's LogisticRegression(C=1)) by Newton's method, batched over
    the G = L*H heads: Hessian C Z^T S Z + diag(1..1, 0) with Z = [x, 1], S = diag(p (1 - p)), and step
    halving wherever f would not fall enough. A head stops once its Newton decrement g^T H^-1 g (about twice
    its distance to the optimum in f) is below tol * (1 + f); usually after 5-6 steps. Products run in fp32 on
    X's device, the solves and f in fp64. The gradient, Hessian and step are computed `chunk` heads at a time
    (default: all heads on a GPU; one on a CPU, where one head's Z stays in cache: fastest there)."""
    if X.device.type == "cpu" and chunk in (None, 1) and torch.get_num_threads() > 1:
        threads = torch.get_num_threads()  # one head's products are too small to share between threads: the
        torch.set_num_threads(1)  # synchronisation would cost more than it saves (far more on a busy machine)
        try:
            return fit_probes(X, y, C, max_iter, tol, chunk)
        finally:
            torch.set_num_threads(threads)
    N, L, H, D = X.shape
    G = L * H
    dev = X.device
    chunk = chunk or (G if dev.type != "cpu" else 1)
    Z = torch.ones(G, N, D + 1, device=dev)  # Z = [x, 1], the last column for the intercept: [G, N, D+1]
    Z[..., :D] = X.reshape(N, G, D).permute(1, 0, 2)  # [G, N, D]
    yf = y.to(dev, torch.float32).reshape(1, N)  # [1, N], the same labels for every head
    reg = torch.ones(D + 1, device=dev, dtype=torch.float64)
    reg[-1] = 0  # the intercept is not penalised
    beta = torch.zeros(G, D + 1, device=dev, dtype=torch.float64)  # [G, D+1] = (w, b)

    def objective(beta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # z = Z beta: [G, N] -> f: [G]
        return C * (torch.nn.functional.softplus(z) - yf * z).sum(1) + 0.5 * (reg * beta * beta).sum(1)

    z = torch.zeros(G, N, device=dev, dtype=torch.float64)  # z = Z beta: [G, N], updated by fp32 products Z step
    f = objective(beta, z)  # [G]
    done = torch.zeros(G, dtype=torch.bool, device=dev)
    eye = torch.diag(reg)  # [D+1, D+1]
    for _ in range(max_iter):
        step = torch.zeros_like(beta)  # Newton step: [G, D+1] (0 for finished heads)
        dz = torch.zeros_like(z)  # Z step: [G, N]
        decrement = torch.zeros_like(f)  # Newton decrement^2 g^T H^-1 g: [G]
        for c in range(0, G, chunk):  # a chunk of heads at a time, so that its Z stays in cache
            todo = (~done[c:c + chunk]).nonzero()[:, 0] + c
            if len(todo) == 0:
                continue
            Zc = Z[todo] if len(todo) < min(chunk, G - c) else Z[c:c + chunk]  # [c, N, D+1]
            p = torch.sigmoid(z[todo]).float()  # [c, N]
            grad = C * torch.bmm(Zc.transpose(1, 2), (p - yf)[..., None])[..., 0].double() + reg * beta[todo]
            hess = C * torch.bmm(Zc.transpose(1, 2), Zc * (p * (1 - p))[..., None]).double() + eye  # Z^T S Z
            step[todo] = torch.linalg.solve(hess, grad)  # [c, D+1]
            decrement[todo] = (grad * step[todo]).sum(1)
            dz[todo] = torch.bmm(Zc, step[todo].float()[..., None])[..., 0].double()  # [c, N]
        done |= decrement <= tol * (1 + f.abs())
        if bool(done.all()):
            break
        step[done], dz[done], decrement[done] = 0, 0, 0
        t = torch.ones(G, device=dev, dtype=torch.float64)  # step size per head
        for _ in range(20):  # backtracking (Armijo); Newton's full step is taken almost always
            new, z_new = beta - t[:, None] * step, z - t[:, None] * dz  # [G, D+1], [G, N]
            f_new = objective(new, z_new)
            ok = (f_new <= f - 0.25 * t * decrement) | done
            if bool(ok.all()):
                break
            t = torch.where(ok, t, t / 2)
        done |= ~ok  # no decrease found: at the limit of fp32 precision
        beta, z, f = torch.where(done[:, None], beta, new), torch.where(done[:, None], z, z_new), \
            torch.where(done, f, f_new)
    return beta[:, :D].float().reshape(L, H, D), beta[:, D].float().reshape(L, H)


def probe_accuracy(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Accuracy of every head's probe: X [N, L, H, D], w [L, H, D], b [L, H] -> [L, H]."""
    logits = torch.einsum("nlhd,lhd->nlh", X.float(), w.to(X.device)) + b.to(X.device)  # [N, L, H]
    return ((logits > 0).float() == y.to(X.device).float()[:, None, None]).float().mean(0).cpu()


def train_probes(X: torch.Tensor, y: torch.Tensor, train_idx, val_idx, device=None, return_weights: bool = False):
    """Fit all L x H probes on X[train_idx] and return their accuracies on X[val_idx]: [L, H]
    (with return_weights, also w [L, H, D] and b [L, H]). `device` (e.g. "cuda") moves the fit there."""
    train_idx, val_idx = torch.as_tensor(train_idx, dtype=torch.long), torch.as_tensor(val_idx, dtype=torch.long)
    if X.dim() != 4 or y.shape != (X.shape[0],):
        raise ValueError(f"train_probes: expected X [N, L, H, D] and y [N], got {tuple(X.shape)} and {tuple(y.shape)}")
    ys = set(y[train_idx].tolist())
    if ys != {0, 1}:
        raise ValueError(f"train_probes: training labels must contain both 0 and 1, got {sorted(ys)}")
    dev = torch.device(device) if device is not None else X.device
    w, b = fit_probes(X[train_idx].to(dev), y[train_idx])
    acc = probe_accuracy(X[val_idx].to(dev), y[val_idx], w, b)  # [L, H]
    return (acc, w.cpu(), b.cpu()) if return_weights else acc


def rank_heads(acc: torch.Tensor) -> list[tuple[int, int]]:
    """Heads (l, h) by decreasing probe accuracy (ties: lower layer, then lower head first)."""
    H = acc.shape[1]
    order = torch.argsort(acc.flatten(), descending=True, stable=True)  # [L*H], ties keep row-major order
    return [(i // H, i % H) for i in order.tolist()]


# ----------------------------------------------------------------------------------------------------------
# The whole probing step


@dataclass
class ProbeResult:
    acc: torch.Tensor  # [L, H] validation accuracy of each head's probe
    X: torch.Tensor  # [N, L, H, D] activations of the training questions' examples
    y: torch.Tensor  # [N] labels (1 true answer, 0 false)
    qids: list[int]  # [N] question of each example
    train_idx: torch.Tensor  # example indices of the probe-train questions (80% of the training questions)
    val_idx: torch.Tensor  # example indices of the probe-validation questions (the other 20%)
    split: truthfulqa.Split | None = None
    meta: dict | None = None

    def save(self, out_dir: str | os.PathLike, mask: torch.Tensor | None = None) -> Path:
        """probe_acc.json (accuracies, ranking, the split), probe_acc.safetensors, and heatmap.png when matplotlib
        is available (`mask` marks the chosen heads)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        d = {"acc": [[round(float(a), 6) for a in row] for row in self.acc],
             "ranking": [f"{l}.{h}" for l, h in rank_heads(self.acc)],
             "n_examples": len(self.qids), "n_probe_train": len(self.train_idx), "n_probe_val": len(self.val_idx),
             "probe_train_qids": sorted(set(self.qids[i] for i in self.train_idx.tolist())),
             "probe_val_qids": sorted(set(self.qids[i] for i in self.val_idx.tolist())),
             "split": self.split.to_dict() if self.split else None, "meta": self.meta or {}}
        if mask is not None:
            d["chosen"] = head_list(mask)
        write_file_atomic(out / "probe_acc.json", lambda tmp: Path(tmp).write_text(json.dumps(d, indent=1)))
        write_file_atomic(out / "probe_acc.safetensors",
                          lambda tmp: save_file({"acc": self.acc.float().contiguous()}, tmp))
        heatmap(self.acc, mask, out / "heatmap.png", title=(self.meta or {}).get("title", ""))
        return out


def probe_split(qids: list[int], seed: int = 0, frac: float = 0.8) -> tuple[list[int], list[int]]:
    """Split the training questions 80/20 into probe-train and probe-validation questions (seeded)."""
    q = sorted(set(qids))
    random.Random(f"probe:{seed}").shuffle(q)
    n = round(frac * len(q))
    return sorted(q[:n]), sorted(q[n:])


def probe_rows(qids: list[int], train_qids: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Example indices of the probe-train and probe-val questions: qids [N] (each example's question),
    train_qids (the split's training questions) -> train_idx, val_idx (see `probe_split`)."""
    ptrain = set(probe_split(train_qids, seed)[0])
    return (torch.tensor([i for i, q in enumerate(qids) if q in ptrain]),
            torch.tensor([i for i, q in enumerate(qids) if q not in ptrain]))


def probe_heads(model, tokenizer, questions: list, split: truthfulqa.Split, *, model_name: str, version: str,
                seed: int = 0, batch_size: int = 32, device=None, layout: str = "paper") -> ProbeResult:
    """Probe every head on the training questions of `split`: build the probe texts in `layout` ("paper" draws
    each example's random question under `seed`, from the training questions), collect X (cached on disk by
    model, dtype and the digest of the probe texts, so the layouts and seeds cache apart), split the questions
    80/20 into probe-train / probe-val (under `seed`), fit all probes (on `device`), return the validation
    accuracies with everything needed for ITI (`iti.fit_iti`)."""
    examples = truthfulqa.probe_examples(questions, split.train, layout=layout, seed=seed)
    key = activation_key(model_name, model.dtype, examples)
    X = collect(model, tokenizer, examples, batch_size=batch_size, cache_key=key)
    y = torch.tensor([e.label for e in examples])
    qids = [e.qid for e in examples]
    train_idx, val_idx = probe_rows(qids, split.train, seed)
    t0 = time.time()
    acc = train_probes(X, y, train_idx, val_idx, device=device)
    L, H = acc.shape
    best = rank_heads(acc)[0]
    _log(f"probes ({layout} layout): {L * H} heads fitted in {time.time() - t0:.2f}s on {len(train_idx)} examples; "
         f"validation accuracy max {float(acc.max()):.3f} (head {best[0]}.{best[1]}), mean {float(acc.mean()):.3f}")
    return ProbeResult(acc=acc, X=X, y=y, qids=qids, train_idx=train_idx, val_idx=val_idx, split=split,
                       meta={"model": model_name, "version": version, "seed": seed, "layout": layout,
                             "cache_key": key, "title": f"probe accuracy: {model_name}, TruthfulQA {version}, "
                                                        f"{layout} layout"})


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks of v [n] in increasing order, tied values sharing the mean of their ranks: [n] fp64."""
    _, inverse, counts = torch.unique(v, sorted=True, return_inverse=True, return_counts=True)  # [n], [u]
    last = torch.cumsum(counts, 0).double()  # [u] rank of each distinct value's last copy
    return (last - (counts.double() - 1) / 2)[inverse]  # mean of ranks last - c + 1 .. last


def compare_rankings(acc_a: torch.Tensor, acc_b: torch.Tensor, k: int = 16) -> dict:
    """How alike two probe accuracy maps [L, H] are (e.g. the "paper" and "iti" layouts):
      overlap        |top-k(a) & top-k(b)|, the top k heads by `rank_heads`; shared: those heads, "L.H" row-major
      spearman       Spearman's rho over all L*H heads: Pearson's r of the average ranks (ties share their mean
                     rank); nan when either map is constant
      mean_abs_diff  mean over heads of |acc_a - acc_b|"""
    if acc_a.dim() != 2 or acc_a.shape != acc_b.shape:
        raise ValueError(f"compare_rankings: expected two accuracy maps [L, H] of one shape, got "
                         f"{tuple(acc_a.shape)} and {tuple(acc_b.shape)}")
    L, H = acc_a.shape
    if not 1 <= k <= L * H:
        raise ValueError(f"compare_rankings: k={k} must be between 1 and {L * H} (the number of heads)")
    top = []
    for acc in (acc_a, acc_b):
        mask = torch.zeros(L, H, dtype=torch.bool)
        for l, h in rank_heads(acc)[:k]:
            mask[l, h] = True
        top.append(mask)
    a, b = acc_a.flatten().double().cpu(), acc_b.flatten().double().cpu()  # [L*H]
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    shared = head_list(top[0] & top[1])
    return {"k": k, "overlap": len(shared), "shared": shared,
            "spearman": float((ra * rb).sum()) / denom if denom > 0 else float("nan"),
            "mean_abs_diff": float((a - b).abs().mean())}


# ----------------------------------------------------------------------------------------------------------
# Head sets


HEADS_HELP = "probeK (top K by probe accuracy), randomK (K seeded random heads), all, single:L.H, or L.H,L.H,..."


def needs_probe(spec: str) -> bool:
    """Whether a head spec needs probe accuracies (probeK)."""
    return spec.strip().startswith("probe")


def _head(s: str, n_layers: int, n_heads: int, spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", s)
    if not m:
        raise ValueError(f"--heads {spec!r}: {s!r} is not a head 'L.H'; expected {HEADS_HELP}")
    l, h = int(m.group(1)), int(m.group(2))
    if l >= n_layers or h >= n_heads:
        raise ValueError(f"--heads {spec!r}: head {l}.{h} out of range (layers 0..{n_layers - 1}, "
                         f"heads 0..{n_heads - 1})")
    return l, h


def parse_heads(spec: str, n_layers: int, n_heads: int, acc: torch.Tensor | None = None, seed: int = 0
                ) -> torch.Tensor:
    """A head set as a mask [L, H] (bool). probeK needs `acc` [L, H]; randomK draws K heads with
    torch.randperm under `seed` (the same seed gives the same heads)."""
    s = spec.strip()
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    n = n_layers * n_heads
    m = re.fullmatch(r"(probe|random)(\d+)", s)
    if m:
        k = int(m.group(2))
        if not 1 <= k <= n:
            raise ValueError(f"--heads {spec!r}: K={k} must be between 1 and {n} (the model has {n_layers} x "
                             f"{n_heads} heads)")
        if m.group(1) == "probe":
            if acc is None:
                raise ValueError(f"--heads {spec!r} needs probe accuracies (run the probes first)")
            if tuple(acc.shape) != (n_layers, n_heads):
                raise ValueError(f"--heads {spec!r}: probe accuracies have shape {tuple(acc.shape)}, "
                                 f"expected {(n_layers, n_heads)}")
            chosen = rank_heads(acc)[:k]
        else:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist()
            chosen = [(i // n_heads, i % n_heads) for i in idx]
    elif s == "all":
        chosen = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    elif s.startswith("single:"):
        chosen = [_head(s[len("single:"):], n_layers, n_heads, spec)]
    elif s and re.fullmatch(r"[\d.,\s]+", s):
        chosen = [_head(p, n_layers, n_heads, spec) for p in s.split(",")]
        twice = sorted({f"{l}.{h}" for l, h in chosen if chosen.count((l, h)) > 1})
        if twice:
            raise ValueError(f"--heads {spec!r}: head(s) {', '.join(twice)} given more than once")
    else:
        raise ValueError(f"--heads {spec!r}: expected {HEADS_HELP}")
    for l, h in chosen:
        mask[l, h] = True
    return mask


def check_heads(spec: str, n_layers: int, n_heads: int) -> None:
    """Raise ValueError when `spec` names no head set of a model with n_layers x n_heads heads (probeK's K is
    checked without the probe accuracies, so this runs before the probes)."""
    parse_heads(spec, n_layers, n_heads, acc=torch.zeros(n_layers, n_heads))


def head_list(mask: torch.Tensor) -> list[str]:
    """The chosen heads of a mask [L, H] as "L.H" strings, row-major."""
    return [f"{l}.{h}" for l, h in mask.nonzero().tolist()]


def heatmap(acc: torch.Tensor, mask: torch.Tensor | None, path: str | os.PathLike, title: str = "") -> Path | None:
    """Probe accuracy per head (layers down, heads across), chosen heads outlined. Needs matplotlib (optional):
    without it, says so and returns None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log(f"heatmap: matplotlib is not installed (pip install matplotlib); skipped {path}")
        return None
    L, H = acc.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * H, 1.0 + 0.22 * L))
    im = ax.imshow(acc.float().numpy(), aspect="auto", cmap="viridis", origin="lower")
    if mask is not None:
        for l, h in mask.nonzero().tolist():
            ax.add_patch(matplotlib.patches.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or "probe validation accuracy", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08)
    fig.tight_layout()
    path = Path(path)
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# Benchmark


def bench_probe(model_name: str = "smollm2-135m", n_examples: int = 1000, batch_size: int = 32, data=None,
                layout: str = "paper") -> dict:
    """Collection speed (examples/s, and tok/s counting every token of each full text, as a plain forward would
    process; fresh, no cache) on the first n_examples TruthfulQA v0 training examples (in `layout`), and the
    time of one batched fit of all heads on the full probe-train set (split seed 0). The fit's activations come
    from the disk cache that probe_heads uses; on a cold cache they are collected first (untimed;
    `fit_cache_hit`)."""
    from llama import Llama
    from tokenizer import Tokenizer

    load = os.getloadavg()[0]  # other work on the machine slows every figure (with 2 threads, badly)
    model = Llama.from_pretrained(model_name, dtype="bf16")
    tok = Tokenizer.from_pretrained(model_name)
    questions = truthfulqa.load_questions(data, "v0")
    split = truthfulqa.make_split(questions, seed=0)
    every = truthfulqa.probe_examples(questions, split.train, layout=layout, seed=0)  # as probe_heads with seed 0
    examples = every[:n_examples]
    n_tok = sum(len(tok.encode(e.text)) for e in examples)
    t0 = time.time()
    collect(model, tok, examples, batch_size=batch_size, progress=False)
    dt = time.time() - t0
    key = activation_key(model_name, model.dtype, every)
    hit = _cache_path(key).exists()
    X = collect(model, tok, every, batch_size=batch_size, cache_key=key)  # [N, L, H, D]
    y = torch.tensor([e.label for e in every])  # [N]
    train_idx, val_idx = probe_rows([e.qid for e in every], split.train, 0)
    Xtr, ytr = X[train_idx], y[train_idx]
    t1 = time.time()
    w, b = fit_probes(Xtr, ytr)  # w [L, H, D], b [L, H]
    fit_s = time.time() - t1
    acc = probe_accuracy(X[val_idx], y[val_idx], w, b)  # [L, H]
    return {"layout": layout, "collect_examples": len(examples), "collect_s": round(dt, 2),
            "collect_examples_per_s": round(len(examples) / dt, 1), "collect_tok_per_s": round(n_tok / dt),
            "fit_heads": acc.numel(), "fit_n": len(train_idx), "fit_s": round(fit_s, 3), "fit_cache_hit": hit,
            "probe_acc_max": round(float(acc.max()), 4), "probe_acc_mean": round(float(acc.mean()), 4),
            "threads": torch.get_num_threads(), "load_average_before": round(load, 2)}


if __name__ == "__main__":
    print(json.dumps(bench_probe(), indent=1))
