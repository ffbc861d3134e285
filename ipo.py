"""ipo.py: the optimal edit at a set of heads (the paper's section 4), found by IPO preference training.

Two rank-1 edits of the o_proj weights W^l: [M, H*D], both `llama.Edit`s acting at every position:

    plain LoRA, "full model" (eq. 4.1)   r += <a^l, o^l> b^l                      b^l: [M] (model space)
    reparameterised LoRA (eq. 4.2-4.3)   r += <a^l, o^l> W^l b^l = <a^l, o^l> sum_h W_h b_h^l
                                                                                  b^l: [H*D], zero outside the heads

Both merge exactly into the weights: W' = W + b a^T (eq. 4.1) and W' = W + (W b) a^T (eq. 4.3).

They are trained with the IPO loss (Azar et al. 2023) on (prompt x, chosen y_w, rejected y_l) triples,

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
    loss = mean over the batch of (h - 1/(2 tau))^2

where pi is the edited model, pi_ref the unedited one, and log pi(y|x) is averaged over y's tokens (or summed).

The paper's argument compares *optimal* edits, so every edit is trained to the same standard: `train_ipo`
validates on fixed held-out pairs every few steps and stops when the validation loss levels off (`StopRule`),
keeping the best checkpoint and recording `converged`; `select_ipo` does that once per learning rate of a grid
and keeps the lowest validation loss.

Speed: every training prompt is the generation prompt instruction + primer + "Q: ...\\nA:", so all prompts share
a long token prefix (~219 tokens for SmolLM2). Each step runs that prefix once at batch 1 with the edit (so
gradients flow through it), then the batch's questions and answers packed into one row without padding, a
"tree" (`pack_tree`): each question once, chosen and rejected answer each on top of its question, with an
attention mask that keeps them apart. Log-probabilities are computed only at answer positions (the LM head is
49152 wide). The reference log-probabilities are computed once, before training, with the edit switched off.
(Measured on 1 CPU thread, batch 4, bare "Q: ...\\nA:" prompts: the packed row is 1.4x (fp32) and 1.9x (bf16)
faster than padded batches, with or without the question shared between chosen and rejected via a KV cache.)
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from llama import Edit, Llama, Progress, note_kept, prefix_cache, shared_prefix_len, write_file_atomic
from probe import head_list

# ----------------------------------------------------------------------------------------------------------
# The edits (eq. 4.1-4.3)


class Rank1Edit(Edit):
    """A rank-1 edit of every active layer's o_proj, kept in fp32 (cast to the model dtype in `delta`).

    kind "lora"    (eq. 4.1)     a: [L, H*D], b: [L, M]     every layer active ("aligning the full model")
    kind "reparam" (eq. 4.2-4.3) a: [L, H*D], b: [L, H*D]   b masked by the head mask: [L, H] bool

    Parameters are stored for all L layers; `layers` lists the active ones (those holding a chosen head).
    Rows of inactive layers are zero and never receive a gradient, so they stay zero (AdamW runs without
    weight decay). Initialisation as in LoRA/peft: a Kaiming-uniform (peft's lora_A: U(-1/sqrt(H*D),
    1/sqrt(H*D))), b = 0, so a fresh edit is the identity and gradients reach b first.

    `scale` is peft's LoRA scaling lora_alpha / r: the delta is scale * <a^l, o^l> (W^l) b^l. The edits it
    can express are the same for any scale, but Adam's steps are not (default 1: the paper's equations as
    written).
    """

    def __init__(self, kind: str, mask: torch.Tensor, d_model: int, head_dim: int, seed: int = 0,
                 scale: float = 1.0):
        if kind not in ("lora", "reparam"):
            raise ValueError(f"edit kind {kind!r}: expected 'lora' or 'reparam'")
        mask = torch.as_tensor(mask, dtype=torch.bool).cpu()
        if mask.dim() != 2:
            raise ValueError(f"head mask of shape {tuple(mask.shape)}: expected [n_layers, n_heads]")
        if not mask.any():
            raise ValueError("head mask selects no heads: an edit needs at least one head")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"LoRA scale {scale}: expected a finite number > 0")
        L, H = mask.shape
        self.kind, self.mask, self.d_model, self.head_dim, self.scale = kind, mask, d_model, head_dim, float(scale)
        self.layers = [l for l in range(L) if mask[l].any()]
        self._active = set(self.layers)
        HD = H * head_dim
        g = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(HD)  # kaiming_uniform_(a=sqrt(5)) on a [1, H*D] matrix
        self.a = torch.zeros(L, HD)  # [L, H*D]
        self.a[self.layers] = (torch.rand(len(self.layers), HD, generator=g) * 2 - 1) * bound
        self.b = torch.zeros(L, d_model if kind == "lora" else HD)  # [L, M] or [L, H*D]
        self.a.requires_grad_(True)
        self.b.requires_grad_(True)
        # b's mask over its entries: [L, H*D] (each chosen head contributes its D coordinates b_h^l)
        self.b_mask = None if kind == "lora" else mask[:, :, None].expand(L, H, head_dim).reshape(L, HD).float()

    @classmethod
    def full(cls, cfg, seed: int = 0, scale: float = 1.0) -> "Rank1Edit":
        """Plain rank-1 LoRA on every layer's o_proj (eq. 4.1): the full-model reference."""
        return cls("lora", torch.ones(cfg.n_layers, cfg.n_heads, dtype=torch.bool), cfg.d_model, cfg.head_dim, seed,
                   scale)

    @classmethod
    def at_heads(cls, cfg, mask: torch.Tensor, seed: int = 0, scale: float = 1.0) -> "Rank1Edit":
        """Reparameterised rank-1 LoRA restricted to the heads in mask: [L, H] bool (eq. 4.2-4.3)."""
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if tuple(mask.shape) != (cfg.n_layers, cfg.n_heads):
            raise ValueError(f"head mask of shape {tuple(mask.shape)}: expected [n_layers, n_heads] = "
                             f"[{cfg.n_layers}, {cfg.n_heads}]")
        return cls("reparam", mask, cfg.d_model, cfg.head_dim, seed, scale)

    def parameters(self) -> list[torch.Tensor]:
        return [self.a, self.b]

    def to(self, device) -> "Rank1Edit":
        """Move the parameters (kept fp32 leaves) to a device."""
        self.a = self.a.detach().to(device).requires_grad_(True)
        self.b = self.b.detach().to(device).requires_grad_(True)
        self.b_mask = None if self.b_mask is None else self.b_mask.to(device)
        return self

    @property
    def heads(self) -> list[str]:
        """The chosen heads as "layer.head" strings (all heads for the plain LoRA)."""
        return head_list(self.mask)

    def b_eff(self) -> torch.Tensor:
        """b with the head mask applied: [L, M] or [L, H*D]. Entries outside the heads are exactly zero and
        so are their gradients."""
        return self.b if self.b_mask is None else self.b * self.b_mask

    def delta(self, l: int, o: torch.Tensor, W: torch.Tensor) -> torch.Tensor | None:
        if l not in self._active:
            return None
        a = (self.scale * self.a[l]).to(o.dtype)  # scale * a^l: [H*D]
        s = o.flatten(2) @ a  # scale * <a^l, o^l>: [B, T]
        if self.kind == "lora":
            v = self.b[l].to(o.dtype)  # b^l: [M]                                          (eq. 4.1)
        else:
            b = (self.b[l] * self.b_mask[l]).to(W.dtype)  # b^l, zero outside the heads: [H*D]
            v = W.flatten(1) @ b  # W^l b^l = sum_h W_h b_h^l: [M]                         (eq. 4.3)
        return s[..., None] * v  # [B, T, M]

    def head_vectors(self, l: int, W: torch.Tensor) -> torch.Tensor | None:
        """W_h b_h^l for each head h: [H, M] fp32 (eq. 4.3, zero outside the chosen heads), with coefficient
        scale * <a^l, o^l> (`coefficient`); None for the plain LoRA, whose b lives in model space."""
        if self.kind == "lora":
            return None
        b = self.b_eff()[l].detach().float().to(W.device).view(W.shape[1], W.shape[2])  # b_h^l: [H, D]
        return torch.einsum("mhd,hd->hm", W.float(), b)

    def coefficient(self, l: int, o: torch.Tensor) -> torch.Tensor:
        return o.flatten(2).float() @ (self.scale * self.a[l].detach().float().to(o.device))  # [B, T]

    # -- merging and saving ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge_into(self, model: Llama, inplace: bool = False) -> Llama:
        """The model with the edit folded into its o_proj weights (a copy unless inplace):
        W' = W + scale b a^T (eq. 4.1) or W' = W + scale (W b) a^T (eq. 4.3), computed in fp32."""
        target = model if inplace else copy.deepcopy(model)
        b = self.b_eff().detach()
        for l in self.layers:
            W = target.layers[l].wo.weight  # [M, H*D]
            W32 = W.float()
            v = b[l] if self.kind == "lora" else W32 @ b[l]  # [M]
            W.copy_((W32 + torch.outer(v, self.scale * self.a[l].detach())).to(W.dtype))  # [M, H*D]
        return target

    def state(self) -> dict[str, torch.Tensor]:
        return {"a": self.a.detach().clone(), "b": self.b.detach().clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.a.copy_(state["a"])
            self.b.copy_(state["b"])

    def save(self, path: str | os.PathLike, extra_meta: dict | None = None) -> Path:
        """Write a, b, mask as safetensors; kind, heads, shapes and `extra_meta` (JSON) as metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": "editloc.Rank1Edit", "kind": self.kind, "heads": json.dumps(self.heads),
                "scale": json.dumps(self.scale),
                "config": json.dumps({"d_model": self.d_model, "head_dim": self.head_dim,
                                      "n_layers": self.mask.shape[0], "n_heads": self.mask.shape[1]})}
        for k, v in (extra_meta or {}).items():
            meta[k] = json.dumps(v)
        tensors = {"a": self.a.detach().contiguous(), "b": self.b_eff().detach().contiguous(),
                   "mask": self.mask.contiguous()}
        return write_file_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Rank1Edit":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such edit file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "editloc.Rank1Edit":
                    raise TypeError(f"metadata format {meta.get('format')!r}")
                t = {k: f.get_tensor(k) for k in ("a", "b", "mask")}
            c = json.loads(meta["config"])
            edit = cls(meta["kind"], t["mask"], c["d_model"], c["head_dim"],
                       scale=json.loads(meta.get("scale", "1.0")))
            edit.load_state(t)
            edit.meta = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "kind", "scale")}
        except Exception as e:  # safetensors raises its own error type (a missing tensor, a damaged file)
            raise ValueError(f"{path}: not a complete Rank1Edit file (tensors a, b, mask and editloc's metadata): "
                             f"{e}") from None
        return edit


def export(model: Llama, edit: Rank1Edit, out_dir: str | os.PathLike, copy_from=None) -> Path:
    """Write the edited model as an HF-format directory (fp32 weights, tokenizer files copied from
    `copy_from`, default the model's source directory) that `Llama.from_pretrained` and any Llama runtime
    load. The merge is done on an fp32 copy, so a bf16 base loses nothing extra."""
    merged = edit.merge_into(copy.deepcopy(model).float(), inplace=True)
    return merged.save_pretrained(out_dir, copy_from=copy_from or getattr(model, "source", None),
                                  dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# The IPO objective


def ipo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, tau: float) -> torch.Tensor:
    """mean_batch ((pi_w - ref_w) - (pi_l - ref_l) - 1/(2 tau))^2; all arguments [B] answer log-probs."""
    if not tau > 0:
        raise ValueError(f"tau={tau}: the IPO regularisation tau must be > 0")
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)  # [B]
    return ((h - 1 / (2 * tau)) ** 2).mean()


# ----------------------------------------------------------------------------------------------------------
# Answer log-probabilities: the shared prefix once, then every prompt and answer packed into one "tree" row


@dataclass
class Tree:
    """Prompts and answers packed into one row without padding: each prompt once, then each of its answers
    (without its last token, which is only predicted), all at the positions they would have alone.

    A token attends to the prefix, to its own prompt and to the earlier tokens of its own answer (not to the
    other answers or prompts): `mask` [T, P + T]. The logits at row position pred[j] predict token tgt[j] of
    answer which[j]; the first answer token is predicted at its prompt's last position."""
    ids: torch.Tensor  # [T]
    pos: torch.Tensor  # [T] rotary positions
    mask: torch.Tensor  # [T, P + T] bool, True = may attend
    newest: torch.Tensor  # [T] bool: where a "newest" edit (ITI) acts: each prompt's last position, the answers
    pred: torch.Tensor  # [n] row positions whose outputs predict the answer tokens
    tgt: torch.Tensor  # [n] the answer tokens
    which: torch.Tensor  # [n] the answer each token belongs to (answers numbered in order)
    n_answers: list[int]  # tokens per answer


def pack_tree(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[Sequence[int]]], P: int = 0,
              device=None) -> Tree:
    """Pack prompts[i] (ids after a shared prefix of P tokens, at least one) and their answers[i] (lists of
    answer ids, at least one token each) into a `Tree`."""
    ids, pos, group, branch, newest, pred, tgt, which, n_ans = [], [], [], [], [], [], [], [], []
    for i, (x, ys) in enumerate(zip(prompts, answers)):
        if len(x) == 0:
            raise ValueError("every prompt needs at least one token after the shared prefix")
        ids += x
        pos += range(P, P + len(x))
        group += [i] * len(x)
        branch += [0] * len(x)  # branch 0: the prompt, seen by all its answers
        newest += [False] * (len(x) - 1) + [True]
        end = len(ids) - 1  # the prompt's last position predicts each answer's first token
        for y in ys:
            if len(y) == 0:
                raise ValueError("empty answer (no tokens)")
            start = len(ids)
            ids += y[:-1]
            pos += range(P + len(x), P + len(x) + len(y) - 1)
            group += [i] * (len(y) - 1)
            branch += [len(n_ans) + 1] * (len(y) - 1)
            newest += [True] * (len(y) - 1)
            pred += [end] + list(range(start, start + len(y) - 1))
            tgt += y
            which += [len(n_ans)] * len(y)
            n_ans.append(len(y))
    T = len(ids)
    g, br = torch.tensor(group), torch.tensor(branch)  # [T]
    mask = torch.ones(T, T, dtype=torch.bool).tril()  # causal, and within one prompt and one of its answers:
    mask &= (g[:, None] == g[None, :]) & ((br[None, :] == 0) | (br[:, None] == br[None, :]))
    mask = torch.cat([torch.ones(T, P, dtype=torch.bool), mask], dim=1)  # [T, P + T]: the prefix is seen by all
    t = lambda v, dtype=torch.long: torch.tensor(v, dtype=dtype, device=device)
    return Tree(t(ids), t(pos), mask.to(device), t(newest, torch.bool), t(pred), t(tgt), t(which), n_ans)


class Below:
    """The layers below an edit's lowest layer l0 compute the same thing whatever the edit's parameters, so while
    one edit trains they run once per distinct input: the shared prefix's keys/values there and its residual at
    l0 (the same every step), and the residual at l0 of each packed row it sees (the validation rows, packed the
    same way at every validation; the training steps' rows do not come here). Exact: the layers from l0 up run on bit-identical tensors (the
    layers below have no edit, and run without gradients either way)."""

    def __init__(self, model: Llama, l0: int):
        self.model, self.l0 = model, l0
        self.done: tuple[tuple, tuple] | None = None  # (prefix ids, what `prefix` returns for them)
        self.rows: dict[bytes, torch.Tensor] = {}  # a packed row's key -> its residual at l0: [1, T, M]

    @torch.no_grad()
    def prefix(self, prefix: Sequence[int]) -> tuple[list, torch.Tensor, int] | None:
        """For `prefix_cache(lower=)`: (per-layer (k, v) of the layers below l0, the residual at l0 [1, P, M], l0)."""
        key = tuple(prefix)
        if not key:
            return None
        if self.done is None or self.done[0] != key:
            ids = torch.as_tensor(key, device=self.model.device)[None]  # [1, P]
            r, kv = self.model(ids, output="kv", stop_at_layer=self.l0)  # r: [1, P, M]
            self.done = (key, (kv, r, self.l0))
        return self.done[1]

    @torch.no_grad()
    def row(self, tree: Tree, past) -> torch.Tensor:
        """The residual at l0 of a packed row: [1, T, M], kept for the next call with the same row."""
        key = b"".join(t.cpu().numpy().tobytes() for t in (tree.ids, tree.pos, tree.mask))
        r = self.rows.get(key)
        if r is None:
            r = self.rows[key] = self.model(tree.ids[None], past=past, output="hidden", pos=tree.pos[None],
                                            attn_mask=tree.mask[None, None], stop_at_layer=self.l0)  # [1, T, M]
        return r


def tree_forward(model: Llama, tree: Tree, past=None, edit: Edit | None = None,
                 below: Below | None = None) -> torch.Tensor:
    """The final residual [T, M] of a packed row: the model's forward with the tree's positions and attention
    mask. past: the shared prefix's per-layer (k, v) [1, K, P, D]. below: the layers under the edit run once
    for this row (`Below`)."""
    emask = None
    if edit is not None and edit.positions == "newest":  # ITI: the last prompt position and the answers
        emask = tree.newest[None]  # [1, T]
    r, l0 = (None, 0) if below is None else (below.row(tree, past), below.l0)
    return model(tree.ids[None], edit=edit, edit_mask=emask, past=past, output="hidden", pos=tree.pos[None],
                 attn_mask=tree.mask[None, None], resid=r, start_at_layer=l0)[0]  # [T, M]


def answer_logprobs(model: Llama, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[Sequence[int]]], *,
                    prefix_kv=None, edit: Edit | None = None, average: bool = True,
                    below: Below | None = None) -> torch.Tensor:
    """log p(answer | prefix + prompt) for each prompt's answers, flattened: [sum_i len(answers[i])].

    prompts[i]: token ids after the shared prefix (at least one), answers[i]: a list of answer token lists.
    prefix_kv: from `prefix_cache` (None: no prefix). Everything runs as one packed row (`pack_tree`): each
    prompt once, each answer once, no padding; only answer positions reach the LM head. average=True: mean
    over the answer's tokens, else the sum. An "all" edit acts everywhere; a "newest" edit (ITI) on the last
    prompt position and the answer positions, as in generation. below: see `tree_forward`.
    """
    P = 0 if prefix_kv is None else prefix_kv[0][0].shape[2]
    tree = pack_tree(prompts, answers, P, model.device)
    if not tree.n_answers:
        return torch.zeros(0, device=model.device)
    h = tree_forward(model, tree, prefix_kv, edit, below)  # [T, M]
    lp = _token_logprobs(model.logits(h[tree.pred]), tree.tgt)  # [n]
    total = torch.zeros(len(tree.n_answers), device=h.device).index_add(0, tree.which, lp)  # [N]
    return total / torch.tensor(tree.n_answers, device=h.device) if average else total


def pack_rows(sizes: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive items (prompts with their answers, `sizes` tokens each) into rows of at most max_tokens tokens,
    greedily and in order; an item larger than max_tokens gets a row of its own. -> item indices per row."""
    rows: list[list[int]] = []
    size = 0
    for i, n in enumerate(sizes):
        if not rows or size + n > max_tokens:
            rows.append([])
            size = 0
        rows[-1].append(i)
        size += n
    return rows


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in fp32: logits [n, V], targets [n] -> [n]."""
    logits = logits.float()
    return logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Data: preference pairs as token ids


@dataclass
class PairData:
    """Tokenised preference pairs: the shared prefix, then per pair the rest of the prompt and both answers."""
    prefix: list[int]
    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, idx: Sequence[int]) -> tuple[list[list[int]], list[list[list[int]]]]:
        return [self.prompts[i] for i in idx], [[self.chosen[i], self.rejected[i]] for i in idx]

    def subset(self, idx: Sequence[int]) -> "PairData":
        return PairData(self.prefix, [self.prompts[i] for i in idx], [self.chosen[i] for i in idx],
                        [self.rejected[i] for i in idx])

    def n_tokens(self, idx: Sequence[int]) -> int:
        """Tokens of the full sequences (prefix + prompt + answer, chosen and rejected) of these pairs."""
        P = len(self.prefix)
        return sum(2 * (P + len(self.prompts[i])) + len(self.chosen[i]) + len(self.rejected[i]) for i in idx)


def encode_pairs(tokenizer, pairs, prompts) -> PairData:
    """Tokenise pairs (objects with .question, .chosen, .rejected). The prompt x is prompts.generation(question)
    (or prompts(question) for a callable); an answer y is " " + answer, so x + y reads like a generation. The
    prompt is tokenised whole (BPE merges across "\\n\\nQ" differ from a piecewise encoding); the shared prefix
    is the longest common token prefix of all prompts."""
    make = prompts.generation if hasattr(prompts, "generation") else prompts
    full = [tokenizer.encode(make(p.question)) for p in pairs]
    prefix = full[0][:shared_prefix_len(full)] if full else []
    return PairData(prefix, [x[len(prefix):] for x in full], [encode_answer(tokenizer, p.chosen) for p in pairs],
                    [encode_answer(tokenizer, p.rejected) for p in pairs])


def encode_answer(tokenizer, text: str) -> list[int]:
    """The tokens of an answer y as it follows "A:" in a prompt: " " + answer (unless it starts with a space).
    Used for training pairs and for the multiple-choice targets alike."""
    ids = tokenizer.encode(text if text[:1].isspace() else " " + text)
    if not ids:
        raise ValueError(f"answer {text!r} has no tokens")
    return ids


@torch.no_grad()
def pair_logprobs(model: Llama, data: PairData, edit: Edit | None = None, average: bool = True,
                  max_tokens: int = 512, progress: str | None = None, partial: tuple[Path, str] | None = None,
                  below: Below | None = None) -> torch.Tensor:
    """[n, 2] log-probs of (chosen, rejected) for every pair, without gradients. Each distinct prompt runs
    once with its distinct answers (TruthfulQA's pairs are all true x false answer combinations of a
    question), packed into rows of about max_tokens tokens after the prefix.
    `partial` = (path, key): what is done is saved to path about every llama.SAVE_EVERY_S seconds (whole prompts,
    in order), and a pass interrupted midway goes on from the saved prompts when called again with the same key.
    below: the layers under the edit run once for these pairs (`Below`), the rows kept there for the next call."""
    import llama

    groups: dict[tuple, dict[tuple, int]] = {}  # prompt -> {answer: its index}
    for i in range(len(data)):
        g = groups.setdefault(tuple(data.prompts[i]), {})
        for y in (data.chosen[i], data.rejected[i]):
            g.setdefault(tuple(y), len(g))
    keys = [(x, y) for x, ys in groups.items() for y in ys]  # every (prompt, answer), in order
    lp: dict[tuple, float] = {}  # (prompt, answer) -> log-prob
    skip = _load_partial(partial, keys, lp) if partial else 0  # prompts done by an interrupted pass
    kv = prefix_cache(model, data.prefix, edit, below and below.prefix(data.prefix))
    meter = Progress(len(groups) - skip, progress, unit="prompts") if progress else None
    saved = time.time()

    def run(row):
        nonlocal saved
        out = answer_logprobs(model, [list(x) for x in row], [[list(y) for y in groups[x]] for x in row],
                              prefix_kv=kv, edit=edit, average=average, below=below).tolist()
        lp.update(zip([(x, y) for x in row for y in groups[x]], out))
        if meter:
            meter.update(len(row))
        if partial and time.time() - saved >= llama.SAVE_EVERY_S:
            _save_partial(partial, keys, lp)
            saved = time.time()

    todo = list(groups.items())[skip:]
    for row in pack_rows([len(x) + sum(len(y) - 1 for y in ys) for x, ys in todo], max_tokens):
        run([todo[i][0] for i in row])
    if meter:
        meter.close()
    return torch.tensor([[lp[tuple(x), tuple(c)], lp[tuple(x), tuple(r)]]
                         for x, c, r in zip(data.prompts, data.chosen, data.rejected)]).reshape(-1, 2)


def _save_partial(partial: tuple[Path, str], keys: list[tuple], lp: dict) -> None:
    """The log-probs of the prompts done so far (a prefix of `keys`, whole prompts), atomically."""
    from safetensors.torch import save_file

    path, key = partial
    done = [lp[k] for k in keys[:len(lp)]]
    prompts = len({x for x, _ in keys[:len(lp)]})
    write_file_atomic(path, lambda tmp: save_file({"lp": torch.tensor(done, dtype=torch.float64)}, tmp,
                                                  metadata={"key": key, "prompts": str(prompts)}))
    note_kept(f"ipo-ref-{path.name}", f"reference log-probs of {prompts} prompts (in {path})")


def _load_partial(partial: tuple[Path, str], keys: list[tuple], lp: dict) -> int:
    """Fill `lp` from a partial file saved with the same key; returns the number of prompts it covers."""
    from safetensors import safe_open

    path, key = partial
    if not path.exists():
        return 0
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, done = f.metadata() or {}, f.get_tensor("lp").tolist()
    except Exception:  # safetensors raises its own error type for a damaged file: done again
        return 0
    if meta.get("key") != key or len(done) > len(keys):
        return 0
    lp.update(zip(keys[:len(done)], done))
    return int(meta["prompts"])


def ipo_step_loss(model: Llama, data: PairData, idx: Sequence[int], ref: torch.Tensor, edit: Rank1Edit,
                  tau: float, average: bool = True, below: Below | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The IPO loss of the pairs idx (with gradients into the edit) and their margins h [B]: the shared
    prefix once at batch 1 with the edit, then all prompts and answers in one packed row on top of it.
    below: the prefix's layers under the edit run once (`Below`)."""
    kv = prefix_cache(model, data.prefix, edit, below and below.prefix(data.prefix))  # [1, K, P, D] per layer
    lp = answer_logprobs(model, *data.batch(idx), prefix_kv=kv, edit=edit, average=average).view(-1, 2)  # [B, 2]
    r = ref[list(idx)].to(lp.device)  # [B, 2]
    h = (lp[:, 0] - r[:, 0]) - (lp[:, 1] - r[:, 1])  # [B]
    return ipo_loss(lp[:, 0], lp[:, 1], r[:, 0], r[:, 1], tau), h.detach()


def evaluate_pairs(model: Llama, data: PairData, ref: torch.Tensor, edit: Edit | None, tau: float,
                   average: bool = True, below: Below | None = None) -> dict:
    """IPO loss, preference accuracy (fraction with h > 0) and mean margin h on pairs, ref: [n, 2]."""
    lp = pair_logprobs(model, data, edit, average, below=below)  # [n, 2]
    h = (lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1])  # [n]
    return {"loss": ipo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], tau).item(),
            "acc": (h > 0).float().mean().item(), "margin": h.mean().item()}


# ----------------------------------------------------------------------------------------------------------
# Training


def default_lr(mask: torch.Tensor | None) -> float:
    """The paper's learning rates by head count: 2e-3 for one head, 5e-4 up to 16 heads, 1e-4 for more
    heads and for the full model."""
    if mask is None:
        return 1e-4
    n = int(torch.as_tensor(mask).sum())
    return 2e-3 if n == 1 else 5e-4 if n <= 16 else 1e-4


LR_FACTORS = (1.0, 4.0, 16.0)  # the learning-rate grid: these multiples of the paper's rate for the head count


FULL_EXTRA = 4.0  # the full model's grid goes one step further: FULL_EXTRA x its largest factor


def lr_grid(mask: torch.Tensor | None, factors=LR_FACTORS) -> list[float]:
    """The learning rates every edit at this head count is trained with; the lowest validation loss wins.
    The full model also tries FULL_EXTRA times the largest rate: its b' lives in model space (eq. 4.1), where
    one AdamW step of a given size moves the edit less than at heads, whose W_h b_h multiplies each step by the
    head's o_proj singular values; a full model left slower than a head set can fail the full-model check
    (experiments.full_model_check) without being worse, only less trained."""
    lrs = [default_lr(mask) * f for f in factors]
    return lrs + [lrs[-1] * FULL_EXTRA] if mask is None else lrs


WARMUP = 20  # steps of linear learning-rate warm-up
LR_DOWN = 4.0  # a rate below the grid: the lowest rate tried over LR_DOWN
LR_DOWN_MAX = 2  # at most this many rates below the grid


PATIENCE_UP = 4  # a rate the stopping rule cut short on a plateau is trained again with this many times the patience
BUDGET_UP = 4  # the edit kept, when its step budget ran out first, is trained on to this many times the budget, once


def too_fast(g: dict, every: int) -> bool:
    """Whether a training record (train_ipo's metrics, or an entry of a selection's grid) kept its best validation
    no later than one validation, every `every` steps, after the warm-up: the loss rose as soon as the rate was full."""
    return g["best_step"] <= g.get("warmup", WARMUP) + every


class Try(NamedTuple):
    lr: float
    patience: int  # factor on the stopping rule's patience
    budget: int  # factor on the step budget
    why: str


def patience_note(g: dict) -> str:
    """How a learning rate's entry in the selection is told apart when it was trained again with more patience, or
    went on under a larger step budget."""
    more = ([f"{g['patience_factor']}x patience"] if g.get("patience_factor", 1) > 1 else []) + (
        [f"{g['budget_factor']}x budget"] if g.get("budget_factor", 1) > 1 else [])
    return f" ({', '.join(more)})" if more else ""


def next_try(selection: dict, every: int, bound: float | None = None) -> Try | None:
    """What select_ipo trains next (a Try: learning rate, patience factor, budget factor, and why, in words), or
    None when the selection is final. When the edit kept is too fast (its best validation came no later than one
    validation, every `every` steps, after the warm-up: the loss rose as soon as the rate was full):
    - when it is the lowest rate tried, a rate LR_DOWN times lower, up to LR_DOWN_MAX rates below the grid: a
      grid's edge is no optimum. (At tau 0.5 the target margin 1/(2 tau) is five times nearer than at 0.1, and
      an AdamW step's size does not shrink with it.)
    - when lower rates were tried and lost after the stopping rule ended them, the highest of them again with
      PATIENCE_UP times the patience, once: at a lower rate the same progress takes more steps, and a plateau
      can outlast the patience (seen at tau 0.5, where one seed passed a plateau that stopped another).
    When the edit kept did not converge (its step budget ran out before the stopping rule fired), the same
    training goes on, from its last state, to BUDGET_UP times its budget, once: the stopping rule, not the
    budget, should end the optimum's training (seen at tau 0.5 after the patience retry).
    bound: a validation IPO loss the edit is known to be able to reach (the full model's, from a restriction of it:
    run.full_model_bounds). While the edit kept is above it, each rate of the grid not yet trained with more
    patience is, the lowest first, with PATIENCE_UP times the patience: the edit kept is then no optimum, and a
    lower rate's plateau is the likelier reason (seen at tau 0.5, the full model stopped at step 80 of 480)."""
    grid = selection["grid"]
    chosen = grid[selection["chosen"]] if "chosen" in selection else next(
        g for g in grid if g["lr"] == selection["chosen_lr"])
    kept = f"lr {chosen['lr']:g}{patience_note(chosen)}"
    retried = {g["lr"] for g in grid if g.get("patience_factor", 1) > 1}
    if too_fast(chosen, every):
        why = (f"{kept} kept its best validation at step {chosen['best_step']}, the end of the "
               f"{chosen.get('warmup', WARMUP)}-step warm-up")
        lower = [g for g in grid if g["lr"] < chosen["lr"]]
        if not lower:
            below = {g["lr"] for g in grid if g.get("below_grid", False)}
            if len(below) < LR_DOWN_MAX:
                lr = chosen["lr"] / LR_DOWN
                return Try(lr, 1, 1, f"{why}: trying {lr:g}")
        else:
            cut = [g["lr"] for g in lower if g["converged"] and g["lr"] not in retried]
            if cut:
                return Try(max(cut), PATIENCE_UP, 1, f"{why}: training {max(cut):g} again with {PATIENCE_UP}x the "
                                                     "patience")
    if not chosen.get("converged", True) and chosen.get("budget_factor", 1) < BUDGET_UP:
        return Try(chosen["lr"], chosen.get("patience_factor", 1), BUDGET_UP,
                   f"{kept} spent its step budget before the stopping rule fired (best at step "
                   f"{chosen['best_step']}): training it on to {BUDGET_UP}x the budget")
    if bound is not None and chosen["val_loss"] > bound:
        left = sorted({g["lr"] for g in grid} - retried)
        if left:
            return Try(left[0], PATIENCE_UP, 1,
                       f"{kept}: best validation IPO loss {chosen['val_loss']:.4f}, above {bound:.4f}, which a "
                       f"restriction of this edit reached (the full-model bound): training {left[0]:g} again with "
                       f"{PATIENCE_UP}x the patience")
    return None


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up over the first `warmup` steps, then constant (step counts from 0). A decaying schedule
    would level the loss off by itself; here only the stopping rule ends training."""
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


@dataclass(frozen=True)
class StopRule:
    """When an edit counts as converged: the validation IPO loss, measured every `every` steps on the fixed
    validation pairs, has not fallen below (1 - min_delta) times its best for `patience` evaluations in a row,
    counted from its first such gain over the zero edit (b = 0 starts on a plateau that a small learning rate
    leaves slowly; that is no optimum). The best checkpoint by validation loss is the edit kept. A run that
    reaches its step budget first is recorded as not converged."""
    every: int = 10
    patience: int = 4
    min_delta: float = 0.002

    def __post_init__(self):
        if self.every < 1 or self.patience < 1:
            raise ValueError(f"stopping rule every={self.every}, patience={self.patience}: expected both >= 1")
        if not 0 <= self.min_delta < 1:
            raise ValueError(f"stopping rule min_delta={self.min_delta}: expected 0 <= min_delta < 1")


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _model_id(model: Llama) -> list:
    w = model.embed.weight
    return [str(model.dtype), model.cfg.n_layers, model.cfg.d_model, float(w[:8].float().sum()),
            float(model.layers[-1].wo.weight[:8].float().sum())]


def reference_logprobs(model: Llama, data: dict[str, PairData], average: bool, out_dir: Path) -> dict:
    """Reference log-probs [n, 2] per split, computed once with the edit off and kept in out_dir under a name
    made of everything they depend on (the model, the pairs, and on CPU the thread count: bf16 sums in another
    order with another), so that every run on the same pairs shares one file."""
    from safetensors.torch import load_file, save_file

    threads = torch.get_num_threads() if model.device.type == "cpu" else None
    key = _fingerprint(_model_id(model), average, threads,
                       {k: [d.prefix, d.prompts, d.chosen, d.rejected] for k, d in data.items()})
    path = out_dir / f"ref_logprobs-{key}.safetensors"
    if path.exists():
        return load_file(str(path))
    part = lambda k: out_dir / f"ref_logprobs-{key}.{k}.partial.safetensors"
    ref = {k: pair_logprobs(model, d, None, average, progress=f"reference log-probs ({k})" if len(d) > 200 else None,
                            partial=(part(k), key))
           for k, d in data.items()}
    tensors = {k: v.contiguous() for k, v in ref.items()}
    write_file_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"key": key}))
    for k in data:  # the whole pass is saved: its parts go
        part(k).unlink(missing_ok=True)
        note_kept(f"ipo-ref-{part(k).name}", None)
    return ref


def train_ipo(model: Llama, tokenizer, pairs_train, pairs_val, prompts, mask: torch.Tensor | None, *,
              tau: float = 0.1, lr: float | None = None, epochs: int = 2, batch_size: int = 4, seed: int = 0,
              out_dir: str | os.PathLike, average: bool = True, max_steps: int | None = None,
              stop: StopRule = StopRule(), scale: float = 1.0, ckpt_every: int = 50, clip: float = 1.0,
              warmup: int = WARMUP, ref_dir: str | os.PathLike | None = None,
              log: Callable[[str], None] = print) -> tuple[Rank1Edit, dict]:
    """Train the optimal rank-1 edit at the heads in mask ([L, H] bool; None: plain LoRA on the full model)
    by IPO on preference pairs, until the validation loss levels off (`StopRule`) or the budget of `epochs`
    passes over the training pairs is spent. Returns (edit, metrics): the edit is the best checkpoint by
    validation loss, also saved to out_dir/edit.safetensors; metrics hold the validation curve, the steps
    taken, `best_step` and `converged`.

    pairs: objects with .question, .chosen, .rejected; prompt x = prompts.generation(question) (as at
    evaluation; a callable question -> prompt works too). pairs_val: the fixed validation pairs the stopping
    rule reads (a subsample is fine). lr None: `default_lr` by head count. AdamW (fp32 state, no weight
    decay), linear warm-up over `warmup` steps then a constant rate, gradient-norm clipping at `clip`.
    Deterministic on CPU for a given seed. A checkpoint out_dir/ckpt.pt is written every `ckpt_every` steps
    and at each validation; calling again with the same arguments resumes from it (with another
    `epochs`: the same training, under the larger of the two budgets). max_steps pauses after
    that many steps in total (nothing is saved as final; a later call resumes). Reference log-probs are
    kept in ref_dir (default out_dir), shared by every training on the same pairs. A non-finite loss or
    gradient stops with a ValueError, leaving the last state with a finite loss in ckpt.pt.
    """
    if not tau > 0:
        raise ValueError(f"tau={tau}: the IPO regularisation tau must be > 0")
    lr = default_lr(mask) if lr is None else lr
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr}: expected a finite learning rate > 0")
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size={batch_size}, epochs={epochs}: expected both >= 1")
    if len(pairs_train) == 0:
        raise ValueError("train_ipo: no training pairs")
    if len(pairs_val) == 0:
        raise ValueError("train_ipo: no validation pairs (the stopping rule reads them)")
    cfg = model.cfg
    edit = Rank1Edit.full(cfg, seed, scale) if mask is None else Rank1Edit.at_heads(cfg, mask, seed, scale)
    edit.to(model.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # data and reference log-probs (edit off), cached with the run --------------------------------------------
    both = encode_pairs(tokenizer, list(pairs_train) + list(pairs_val), prompts)
    n_tr = len(pairs_train)
    train, val = both.subset(range(n_tr)), both.subset(range(n_tr, len(both)))
    ref = reference_logprobs(model, {"train": train, "val": val}, average, Path(ref_dir or out))
    below = Below(model, edit.layers[0]) if edit.layers[0] > 0 else None  # the layers under the edit, run once
    run = {"kind": edit.kind, "heads": edit.heads, "tau": tau, "lr": lr, "epochs": epochs, "scale": scale,
           "batch_size": batch_size, "seed": seed, "average": average, "clip": clip, "warmup": warmup,
           "stop": [stop.every, stop.patience, stop.min_delta],
           "data": _fingerprint(both.prefix, both.prompts, both.chosen, both.rejected, n_tr)}

    opt = torch.optim.AdamW(edit.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    per_epoch = math.ceil(len(train) / batch_size)
    budget = epochs * per_epoch
    stop_at = budget if max_steps is None else min(budget, max_steps)
    # the zero edit is the identity (h = 0 exactly): its validation loss is (1/(2 tau))^2
    curve = [{"step": 0, "val_loss": 1 / (4 * tau * tau), "val_margin": 0.0, "val_acc": 0.0}]
    step, sums, bad, reason = 0, [0.0, 0.0, 0.0, 0], 0, None  # sums: loss, margin, accuracy, steps since validation
    best = {"loss": curve[0]["val_loss"], "step": 0, "edit": edit.state()}
    ckpt = out / "ckpt.pt"
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=True)
        diff = sorted(k for k in run if st["run"].get(k) != run[k])
        was = st["run"]["stop"]  # [every, patience, min_delta]
        patient = "stop" in diff and was[0::2] == run["stop"][0::2] and run["stop"][1] > was[1]
        if (diff and not set(diff) <= {"epochs", "stop"}) or ("stop" in diff and not patient):
            raise ValueError(f"{ckpt}: checkpoint of a different run (differs in {diff}); "
                             "use another out_dir or delete it")
        # the same training under another step budget: the pair order of each epoch and the constant rate after the
        # warm-up do not depend on the budget, so it goes on under the larger of the two, exactly as if given that
        # budget from the start (when the smaller budget is a multiple of stop.every; else it has one validation
        # more, at the smaller budget)
        longer = "epochs" in diff and epochs > st["run"]["epochs"]
        if "epochs" in diff and not longer:  # it went on under a larger budget already: that training, so far
            epochs = run["epochs"] = st["run"]["epochs"]
            budget = epochs * per_epoch
            stop_at = budget if max_steps is None else min(budget, max_steps)
        edit.load_state(st["edit"])
        opt.load_state_dict(st["opt"])
        step, curve, sums, bad, reason, best = st["step"], st["curve"], st["sums"], st["bad"], st["reason"], st["best"]
        if longer and reason == "budget":
            reason = None
        # the same training with more patience: the stopping rule reads the curve only to stop, so up to where the
        # smaller patience stopped, the larger one's training is the same; from there it goes on
        if patient and reason == "converged" and bad < stop.patience:
            reason = "budget" if step == budget else None
        log(f"ipo: resuming from {ckpt} at step {step} (budget {budget}"
            + ((f"; {st['run']['epochs'] * per_epoch} when it was saved" if longer else
                ", to which this training went on earlier") if "epochs" in diff else "")
            + (f"; patience {stop.patience}, {was[1]} when it was saved" if patient else "") + ")")

    def snapshot() -> dict:
        return {"run": run, "step": step, "curve": copy.deepcopy(curve), "sums": list(sums), "bad": bad,
                "reason": reason, "best": copy.deepcopy(best), "edit": edit.state(),
                "opt": copy.deepcopy(opt.state_dict())}

    def save_ckpt(state: dict) -> None:
        write_file_atomic(ckpt, lambda tmp: torch.save(state, tmp))
        note_kept("ipo", f"IPO training at step {state['step']} (lr {lr:g}, in {ckpt})")

    def status() -> str:
        v = curve[-1]
        return (f"val loss {v['val_loss']:.4f} margin {v['val_margin']:+.3f} acc {v['val_acc']:.2f} "
                f"(best {best['loss']:.4f} at step {best['step']}, {bad}/{stop.patience} without gain)")

    meter = Progress(stop_at - step, f"ipo lr {lr:g}", unit="steps") if stop_at > step and reason is None else None
    good = None  # the last state whose loss was finite
    t0 = time.time()
    while step < stop_at and reason is None:
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        idx = order[k * batch_size:(k + 1) * batch_size].tolist()

        loss, h = ipo_step_loss(model, train, idx, ref["train"], edit, tau, average, below)
        opt.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            good = snapshot()
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(edit.parameters(), clip)
            finite = bool(torch.isfinite(gnorm))
        if not finite:
            if meter:
                meter.close()
            if good is not None:
                save_ckpt(good)
            raise ValueError(f"ipo: non-finite loss or gradient at step {step + 1} with lr={lr:g} (too high?); "
                             f"the last good state ({'step %d' % good['step'] if good else 'none'}) is in {ckpt}")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, warmup)
        opt.step()
        step += 1
        sums = [sums[0] + loss.item(), sums[1] + h.mean().item(), sums[2] + (h > 0).float().mean().item(),
                sums[3] + 1]
        if step % stop.every == 0 or step == budget:  # validate; apply the stopping rule
            n = sums[3]
            rec = {"step": step, "train_loss": sums[0] / n, "train_margin": sums[1] / n, "train_acc": sums[2] / n,
                   **{f"val_{k}": v for k, v in evaluate_pairs(model, val, ref["val"], edit, tau, average, below).items()}}
            curve.append(rec)
            sums = [0.0, 0.0, 0.0, 0]
            if rec["val_loss"] < best["loss"] * (1 - stop.min_delta):
                best, bad = {"loss": rec["val_loss"], "step": step, "edit": edit.state()}, 0
            elif best["step"] > 0:  # patience runs only once the edit has beaten the zero edit (slow starts)
                bad += 1
            reason = "converged" if bad >= stop.patience else "budget" if step == budget else None
            save_ckpt(snapshot())
        elif step % ckpt_every == 0 or step == stop_at:
            save_ckpt(snapshot())
        meter.update(1, f"loss {loss.item():.3f} | {status()}")
    if meter:
        meter.close()
    if reason is None:  # paused by max_steps: the current state, nothing final written
        return edit, {"steps": step, "budget": budget, "done": False, "converged": False, "curve": curve}

    edit.load_state(best["edit"])  # the best checkpoint by validation loss
    at_best = next(r for r in curve if r["step"] == best["step"])
    metrics = {"steps": step, "budget": budget, "best_step": best["step"], "converged": reason == "converged",
               "stop": reason, "rule": {"every": stop.every, "patience": stop.patience, "min_delta": stop.min_delta},
               "warmup": warmup,
               "done": True, "tau": tau, "lr": lr, "scale": scale, "epochs": epochs, "batch_size": batch_size,
               "seed": seed, "average": average, "n_train": len(train), "n_val": len(val),
               "seconds": time.time() - t0, "curve": curve,
               **{k: v for k, v in at_best.items() if k.startswith(("train_", "val_"))}}
    log(f"ipo lr {lr:g}: {'converged' if metrics['converged'] else 'NOT CONVERGED (step budget spent)'} after "
        f"{step} steps; best validation loss {best['loss']:.4f} at step {best['step']} "
        f"(margin {at_best['val_margin']:+.3f}, preference accuracy {at_best['val_acc']:.3f})")
    edit.save(out / "edit.safetensors", {"metrics": metrics, "run": run})
    note_kept("ipo", None)
    return edit, metrics


def select_ipo(model: Llama, tokenizer, pairs_train, pairs_val, prompts, mask: torch.Tensor | None, *,
               lrs: Sequence[float], out_dir: str | os.PathLike, log: Callable[[str], None] = print,
               bound: float | None = None, ref_dir: str | os.PathLike | None = None,
               **kw) -> tuple[Rank1Edit, dict]:
    """The same selection for every edit: train one edit per learning rate in `lrs` (each to convergence by
    the same `StopRule`, in out_dir/lr<lr>/, sharing one reference pass kept in ref_dir, default out_dir) and
    keep the one with the lowest validation IPO loss. When the rate kept is too fast (best at the end of the
    warm-up), `next_try` says what to train next: a rate below the grid, or a lower rate again with more patience
    (in out_dir/lr<lr>-p<n>/, going on from where the smaller patience stopped); also while the edit kept is above
    `bound` (see next_try).
    Returns (edit, metrics of the chosen run + "selection"); the chosen edit is also saved to
    out_dir/edit.safetensors. kw: the rest of `train_ipo`'s arguments (`stop` the StopRule)."""
    lrs = list(lrs)
    if not lrs:
        raise ValueError("select_ipo: an empty learning-rate grid")
    out = Path(out_dir)
    tried = []

    stop = kw.pop("stop", StopRule())
    epochs = kw.pop("epochs", 2)

    def train(lr: float, below_grid: bool, factor: int = 1, budget: int = 1) -> None:
        rule = replace(stop, patience=stop.patience * factor)
        d = out / (f"lr{lr:g}" + (f"-p{rule.patience}" if factor > 1 else ""))
        first = out / f"lr{lr:g}" / "ckpt.pt"
        if factor > 1 and not (d / "ckpt.pt").exists() and first.exists():  # go on where the smaller patience stopped
            d.mkdir(parents=True, exist_ok=True)
            write_file_atomic(d / "ckpt.pt", lambda tmp: shutil.copyfile(first, tmp))
        edit, m = train_ipo(model, tokenizer, pairs_train, pairs_val, prompts, mask, lr=lr, stop=rule,
                            ref_dir=ref_dir or out, out_dir=d, log=log, epochs=epochs * budget, **kw)
        t = (m["val_loss"], lr, edit, m, below_grid, factor, m["epochs"] // epochs)  # the budget it ran under
        same = [i for i, u in enumerate(tried) if u[1] == lr and u[5] == factor]
        if same:  # the same training gone on under a larger budget: it replaces its earlier record
            tried[same[0]] = t
        else:
            tried.append(t)

    for lr in lrs:
        train(lr, False)

    def selection() -> dict:
        k = min(range(len(tried)), key=lambda i: tried[i][0])
        return {"by": "lowest validation IPO loss", "chosen_lr": tried[k][1], "chosen": k,
                "grid": [{"lr": t[1], "val_loss": t[0], "best_step": t[3]["best_step"], "steps": t[3]["steps"],
                          "converged": t[3]["converged"], "warmup": t[3]["warmup"], "below_grid": t[4],
                          "patience_factor": t[5], "budget_factor": t[6],
                          "curve": [[r["step"], r["val_loss"]] for r in t[3]["curve"]]}
                         for t in tried], **({"bound": bound} if bound is not None else {})}

    while nxt := next_try(sel := selection(), stop.every, bound):
        log(f"ipo: {nxt.why}")
        train(nxt.lr, nxt.lr < min(lrs), nxt.patience, nxt.budget)
    _, lr, edit, m, *_ = min(tried, key=lambda t: t[0])
    m = {**m, "selection": sel}
    if len(lrs) > 1:
        log("ipo: learning rate " + ", ".join(f"{t[1]:g} -> {t[0]:.4f}{'' if t[3]['converged'] else ' (not converged)'}"
                                             for t in tried) + f"; chosen {lr:g}")
    edit.save(out / "edit.safetensors", {"metrics": m})
    return edit, m


# ----------------------------------------------------------------------------------------------------------
# Benchmark


def matmul_peak(dtype: torch.dtype, sizes=(1024, 2048), reps: int = 5) -> tuple[float, float]:
    """This machine's measured matmul throughput for n x n x n products in dtype (the best over sizes and
    reps): FLOPs per wall-clock second and FLOPs per CPU second (robust to other load on a shared machine)."""
    best_wall = best_cpu = 0.0
    for n in sizes:
        x, y = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        x @ y
        for _ in range(reps):
            t, c = time.perf_counter(), time.process_time()
            x @ y
            best_wall = max(best_wall, 2 * n ** 3 / (time.perf_counter() - t))
            best_cpu = max(best_cpu, 2 * n ** 3 / max(time.process_time() - c, 1e-9))
    return best_wall, best_cpu


def step_flops(cfg, P: int, tree: Tree) -> float:
    """Model FLOPs of one training step: forward of the prefix (P tokens) and the packed row, the backward's
    activation gradients (the base is frozen: no weight gradients), the LM head on the answer tokens only.
    Linear layers count 2 x MACs forward and again backward; attention (the allowed query-key pairs) counts
    forward once and backward twice."""
    M, H, K, D, Fm, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_mlp, cfg.n_layers
    per_token = L * (M * (H + 2 * K) * D + H * D * M + 3 * M * Fm)  # MACs of the linear layers
    T = len(tree.ids)
    pairs = P * (P + 1) / 2 + float(tree.mask.sum())  # attended (query, key) pairs: prefix causal + the tree
    attn = L * H * D * 2 * 2 * pairs  # q k^T and p v
    head = 2 * M * cfg.vocab_size * (len(tree.tgt) + 1)  # answer tokens (+ the prefix's last_only logit)
    return 2 * (2 * per_token * (P + T)) + 3 * attn + 2 * head


def bench_steps(model: Llama, data: PairData, n_steps: int, batch_size: int = 4, seed: int = 0,
                lr: float = 1e-4) -> dict:
    """Time n_steps full training steps (plain LoRA on the full model: loss, backward, clipping, AdamW) on
    random batches of data; the first (warm-up) step is not counted. Returns the median wall-clock and CPU
    (process) seconds per step (with one thread, CPU time is robust to other load on the machine),
    tokens/step (the full sequences' tokens, prompt + answer for chosen and rejected, as a trainer counts
    them), computed tokens/step (prefix once + the packed row) and model FLOPs/step."""
    edit = Rank1Edit.full(model.cfg, seed)
    opt = torch.optim.AdamW(edit.parameters(), lr=lr, weight_decay=0.0)
    ref = torch.zeros(len(data), 2)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    wall, cpu, toks, comp, flops = [], [], [], [], []
    for s in range(n_steps + 1):
        idx = order[s * batch_size:(s + 1) * batch_size]
        t, c = time.perf_counter(), time.process_time()
        loss, _ = ipo_step_loss(model, data, idx, ref, edit, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(edit.parameters(), 1.0)
        opt.step()
        if s:
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            tree = pack_tree(*data.batch(idx), len(data.prefix))
            toks.append(data.n_tokens(idx))
            comp.append(len(data.prefix) + len(tree.ids))
            flops.append(step_flops(model.cfg, len(data.prefix), tree))
    med = lambda v: sorted(v)[len(v) // 2]
    mean = lambda v: sum(v) / len(v)
    sec = med(wall)
    return {"s_per_step": sec, "cpu_s_per_step": med(cpu), "steps_per_s": 1 / sec,
            "tokens_per_step": mean(toks), "tokens_per_s": mean(toks) / sec,
            "computed_tokens_per_step": mean(comp), "flops_per_step": mean(flops),
            "flop_per_s": mean(flops) / sec, "wall": wall, "cpu": cpu}


def bench_ipo(model_name: str = "smollm2-135m", n_steps: int = 8, dtypes=("fp32", "bf16"),
              log: Callable[[str], None] = print) -> dict:
    """Training speed on the default model, batch 4 TruthfulQA pairs, plain LoRA on the full model, with
    bare "Q: ...\\nA:" prompts and with the full generation prompt (instruction + primer + question); plus
    the one-off reference pass (per pair, on the pairs of whole questions as in training). MFU: model FLOPs
    per CPU second of a step over the matmul peak per CPU second in the same dtype (CPU time is robust to
    other load on a shared machine; use one thread for clean figures)."""
    import truthfulqa as tq
    from tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(model_name)
    qs = tq.load_questions()
    pairs = tq.preference_pairs(qs, tq.make_split(qs).train)
    sel = [pairs[i] for i in torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))[:400].tolist()]
    styles = {"bare": lambda q: f"Q: {q}\nA:", "full": tq.load_prompts()}
    out = {"threads": torch.get_num_threads()}
    for dt in dtypes:
        dtype = torch.bfloat16 if dt == "bf16" else torch.float32
        peak_wall, peak_cpu = matmul_peak(dtype)
        out[f"matmul_peak_{dt}"] = {"flop_per_s": peak_wall, "flop_per_cpu_s": peak_cpu}
        model = Llama.from_pretrained(model_name, dtype=dtype)
        for name, prompts in styles.items():
            r = bench_steps(model, encode_pairs(tok, sel, prompts), n_steps)
            ref_data = encode_pairs(tok, pairs[:200], prompts)  # ~15 whole questions
            t = time.perf_counter()
            pair_logprobs(model, ref_data)
            r["reference_s_per_pair"] = (time.perf_counter() - t) / len(ref_data)
            r["mfu"] = r["flops_per_step"] / r["cpu_s_per_step"] / peak_cpu
            r.pop("wall"), r.pop("cpu")
            out[f"{dt}_{name}"] = r
            log(f"ipo bench {dt} {name:4s}: {r['s_per_step']:.3f} s/step ({r['cpu_s_per_step']:.3f} CPU s), "
                f"{r['tokens_per_s']:.0f} tokens/s ({r['tokens_per_step']:.0f} tokens/step, "
                f"{r['computed_tokens_per_step']:.0f} computed), {r['flops_per_step'] / 1e9:.0f} GFLOP/step, "
                f"MFU {100 * r['mfu']:.0f}% of the {peak_cpu / 1e9:.0f} GFLOP per CPU s matmul peak; "
                f"reference pass {1000 * r['reference_s_per_pair']:.1f} ms/pair")
        del model
    return out


if __name__ == "__main__":
    bench_ipo()
