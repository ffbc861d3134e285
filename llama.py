"""llama.py: a hand-written Llama forward pass with the per-head o_proj slices written out.

Everything editloc does enters the network at one place: where layer l adds its attention output to the
residual stream, written per head as in the paper's eq. 2.4,

    r <- r + sum_h W_h^l o_h^l          o: [B, T, H, D], W^l viewed as [M, H, D], W_h^l = W^l[:, h, :]

followed by `r <- r + edit.delta(l, o, W)` (see `Edit`). ITI (eq. 2.5-2.6) and the rank-1 edits
(eq. 4.1-4.3) are `Edit`s. Nothing else in the network is ever modified.

Notation: B batch, T new positions, S key positions (past + new), M model width, L layers, H query heads,
K key/value heads (GQA: each key/value head serves H // K query heads), D head dim, F MLP width, V vocab.
"""
from __future__ import annotations

import contextvars
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import gguf  # GGUF import and the offline default model (resolve_model)
from gguf import cache_dir  # noqa: F401  ($EDITLOC_CACHE or ~/.cache/editloc), re-exported for the other modules

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def as_dtype(dtype: str | torch.dtype, device: str = "cpu") -> torch.dtype:
    """A torch dtype from a name; "auto" is `fast_dtype(device)`, the faster of bf16 and fp32 here."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = fast_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def cpu_id() -> str:
    """This CPU as the dtype choice depends on it: model name, family/model number and the bf16 instructions it
    has. The name alone is not enough: an Ice Lake Xeon and a Xeon with AMX both call themselves "Intel(R)
    Xeon(R) Processor", and bf16 matmuls ran about 0.3x fp32 on the first and about 6x on the second."""
    info: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            k, _, v = line.partition(":")
            if not k.strip() and info:
                break  # the first processor's block is enough
            info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    flags = sorted(set(info.get("flags", "").split()) & {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return " | ".join([name, f"family {info.get('cpu family', '?')} model {info.get('model', '?')}"] +
                      ([" ".join(flags)] if flags else []))


def fast_dtype(device: str = "cpu") -> str:
    """ "bf16" or "fp32", whichever runs this machine's matmuls faster: "bf16" on a GPU; on a CPU measured once
    (the model's [256, 576] x [576, 1536] shape through `linear`, best of 5, well under a second) and cached per
    CPU (`cpu_id`), torch version and thread count in <cache>/fast_dtype.json. CPUs differ: on the AMD EPYC of
    earlier measurements bf16 ran about 4x fp32, on an Intel Xeon (Ice Lake) about a third of it, on a Xeon
    with AMX about 6x.
    bf16 is chosen only when at least 1.25x faster, since it rounds more."""
    if str(device).startswith("cuda"):
        return "bf16"
    key = f"{cpu_id()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = cache_dir() / "fast_dtype.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), dict) and known[key].get("dtype") in ("bf16", "fp32"):
        return known[key]["dtype"]
    rate = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, w = torch.randn(256, 576).to(dt), torch.randn(1536, 576).to(dt)  # x: [T, M], w: [F, M]
        best = float("inf")
        with torch.no_grad():
            for _ in range(6):  # the first call packs the weight (bf16) and warms up
                t = time.perf_counter()
                linear(x, w)
                best = min(best, time.perf_counter() - t)
        rate[name] = 2 * 256 * 576 * 1536 / best  # FLOP/s
    dtype = "bf16" if rate["bf16"] >= 1.25 * rate["fp32"] else "fp32"
    known = known if isinstance(known, dict) else {}
    known[key] = {"dtype": dtype, "gflop_per_s": {k: round(v / 1e9, 1) for k, v in rate.items()}}
    try:
        write_file_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(known, indent=1)))
    except OSError:
        pass  # a read-only cache: measured again next time
    return dtype


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    d_model: int  # M, hidden_size
    n_layers: int  # L
    n_heads: int  # H
    n_kv_heads: int  # K
    head_dim: int  # D (may differ from M // H)
    d_mlp: int  # F, intermediate_size
    vocab_size: int  # V
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    bos_id: int | None = None
    eos_id: int | None = None
    hf: dict = field(default_factory=dict, repr=False)  # the config.json it came from, written back on export

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "Config":
        """Read the config.json of an HF LlamaForCausalLM (Llama-1/2/3 style, transformers 4 or 5)."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        arch = d.get("architectures") or []
        if not isinstance(arch, list):
            raise ValueError(f"{source}: architectures {arch!r}: expected a list")
        if d.get("model_type", "llama") != "llama" or any(a != "LlamaForCausalLM" for a in arch):
            raise ValueError(f"{source}: model_type {d.get('model_type')!r} / architectures {arch}: "
                             "expected a LlamaForCausalLM checkpoint")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise ValueError(f"{source}: {key}=true is not supported (Llama has no biases)")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {d['hidden_act']!r}: expected 'silu'")
        # rope theta: top level in transformers <= 4 (and Llama-1/2 files), rope_parameters in transformers 5
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: rope_parameters / rope_scaling {rope!r}: expected an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"{source}: rope scaling type {rope_type!r} is not supported (only 'default')")

        def num(key: str, kind=int, default=None, where: dict = d):
            """where[key] as a number (`default` when absent); null or text there is an error naming the key."""
            v = where.get(key, default)
            if key not in where and default is None:
                raise ValueError(f"{source}: missing key {key!r}")
            try:
                return kind(v)
            except (TypeError, ValueError):
                raise ValueError(f"{source}: {key} is {v!r}, expected a number") from None

        M, H = num("hidden_size"), num("num_attention_heads")
        if H < 1:
            raise ValueError(f"{source}: num_attention_heads is {H}, expected >= 1")
        eos = d.get("eos_token_id")
        theta = num("rope_theta", float, num("rope_theta", float, 10000.0), rope)  # rope's, else the top level's
        cfg = cls(d_model=M, n_layers=num("num_hidden_layers"), n_heads=H,
                  n_kv_heads=num("num_key_value_heads") if d.get("num_key_value_heads") is not None else H,
                  head_dim=num("head_dim") if d.get("head_dim") is not None else M // H,
                  d_mlp=num("intermediate_size"), vocab_size=num("vocab_size"),
                  norm_eps=num("rms_norm_eps", float, 1e-6), rope_theta=theta,
                  tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                  max_seq_len=num("max_position_embeddings", int, 4096), bos_id=d.get("bos_token_id"),
                  eos_id=eos[0] if isinstance(eos, list) and eos else eos, hf=dict(d))
        sizes = {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                 "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_mlp,
                 "vocab_size": cfg.vocab_size}
        bad = [k for k, v in sizes.items() if v < 1]
        if bad or cfg.n_heads % cfg.n_kv_heads:
            raise ValueError(f"{source}: expected sizes >= 1 and num_attention_heads a multiple of "
                             f"num_key_value_heads, got {sizes}")
        return cfg

    def to_hf(self) -> dict:
        d = dict(self.hf)
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=self.d_model,
                 num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                 num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim, intermediate_size=self.d_mlp,
                 vocab_size=self.vocab_size, rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta,
                 tie_word_embeddings=self.tie_embeddings, max_position_embeddings=self.max_seq_len,
                 bos_token_id=self.bos_id, eos_token_id=self.eos_id, hidden_act="silu")
        d.pop("rope_parameters", None), d.pop("rope_scaling", None)
        return d


# ----------------------------------------------------------------------------------------------------------
# Edits: the one seam


class Edit:
    """Anything added to the residual stream right after a layer's per-head o_proj sum (eq. 2.4).

    `delta(l, o, W)` gets the layer index, the per-head outputs o: [B, T, H, D] and the per-head o_proj
    weights W: [M, H, D] (W_h = W[:, h, :]) and returns the residual delta (broadcastable to [B, T, M]), or
    None where it leaves layer l alone. `positions` says where it acts:
      "all"    every position (weight edits such as the rank-1 LoRAs of eq. 4.1-4.3);
      "newest" the newest position only: the last prompt position at prefill and each generated token while
               decoding (the ITI convention). With the KV cache each token keeps the keys/values computed
               while it was newest, so this equals a full forward with the edit on the last prompt position
               and every generated one. Callers scoring answers pass an explicit `edit_mask` instead.
    """

    positions: str = "all"

    def delta(self, l: int, o: torch.Tensor, W: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def head_vectors(self, l: int, W: torch.Tensor) -> torch.Tensor | None:
        """Per-head vectors v_h: [H, M] (fp32) with delta = coefficient(l, o) * sum_h v_h, for auditing where an
        edit enters head by head (run.py audit); None where the edit has no per-head form."""
        return None

    def coefficient(self, l: int, o: torch.Tensor) -> torch.Tensor | float:
        """The factor of `head_vectors` at each position: [B, T] or a number."""
        return 1.0


# ----------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys/values for incremental decoding: k_t[l]: [B, K, D, S_max] (keys stored transposed, so
    a decoding step's q @ K^T reads contiguous rows of K^T), v[l]: [B, K, S_max, D].

    `mask[b, s]` says whether slot s of row b holds a real token (False for left padding), `pos[b]` is the
    rotary position of row b's next token, `len` the number of filled slots."""

    def __init__(self, cfg: Config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        K, D = cfg.n_kv_heads, cfg.head_dim
        self.k_t = [torch.zeros(batch, K, D, max_len, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(batch, K, max_len, D, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.len = 0
        self.max_len = max_len

    def update(self, l: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v: [B, K, T, D] after the filled slots; return all keys, transposed, K^T:
        [B, K, D, S] and all values [B, K, S, D] (views of the cache)."""
        s, e = self.len, self.len + k.shape[2]
        self.k_t[l][..., s:e] = k.transpose(-1, -2)
        self.v[l][:, :, s:e] = v
        return self.k_t[l][..., :e], self.v[l][:, :, :e]


# ----------------------------------------------------------------------------------------------------------
# The model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32, then scaled in the model dtype (as the reference implementation
        # does, so bf16 matches it); F.rms_norm is the fused kernel for the first part
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of queries or keys x: [B, N, T, D] at the positions of cos, sin: [B, 1, T, D]."""
    return x * cos + rotate_half(x) * sin


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T through oneDNN with a copy of w prepacked once (kept on w, remade when w changes in place), on
    CPU where nothing needs a gradient; otherwise F.linear.
    bf16: always, and bit-identical to F.linear (whose bf16 CPU matmul re-packs its weight on every call: at
      16 rows 1.3-1.5x slower per matmul, greedy generation 1.1x slower).
    fp32: only while generating (`generate_ids`). Every other fp32 forward is the exact mode: F.linear, the
      matmul transformers uses, logits within 1e-4 of it. oneDNN sums in another order (SmolLM2-135M logits
      move by up to 2.1e-4) and is 1.8-5.4x faster per matmul than F.linear's MKL kernel on CPUs where MKL takes
      its slow path (AMD: the 16-row matmuls of a decoding step take 18 ms against 55 ms, the LM head 4 ms
      against 22 ms).
    The copies take as much memory again as the weights they copy (277 MB for SmolLM2-135M in bf16, 533 MB more
    once it has generated in fp32); `llama.PREPACK = False` turns them off."""
    if not PREPACK or w.device.type != "cpu" or w.is_inference() or torch.is_autocast_enabled("cpu") or \
            (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) or \
            not (w.dtype == torch.bfloat16 or (w.dtype == torch.float32 and _GENERATING.get())):
        return F.linear(x, w)
    key = (w._version, w.data_ptr())
    packed = getattr(w, "_packed", None)
    if packed is None or packed[0] != key:
        packed = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16))
        w._packed = packed
    return torch.ops.mkldnn._linear_pointwise(x, packed[1], None, "none", [], "")


PREPACK = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_GENERATING = contextvars.ContextVar("editloc_generating", default=False)  # set by generate_ids (fp32 kernel)


class Layer(nn.Module):
    """One decoder layer, weights as in the HF checkpoint: W_Q, W_K, W_V, o_proj W^l: [M, H*D] (viewed per
    head as W_O: [M, H, D]), and the SwiGLU MLP's gate, up and down projections."""

    def __init__(self, cfg: Config):
        super().__init__()
        M, H, K, D, Fm = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_mlp
        self.H, self.K, self.D = H, K, D
        self.attn_norm = RMSNorm(M, cfg.norm_eps)
        self.wq = nn.Linear(M, H * D, bias=False)  # q_proj
        self.wk = nn.Linear(M, K * D, bias=False)  # k_proj
        self.wv = nn.Linear(M, K * D, bias=False)  # v_proj
        self.wo = nn.Linear(H * D, M, bias=False)  # o_proj, W^l: [M, H*D]
        self.mlp_norm = RMSNorm(M, cfg.norm_eps)
        self.w_gate = nn.Linear(M, Fm, bias=False)  # gate_proj
        self.w_up = nn.Linear(M, Fm, bias=False)  # up_proj
        self.w_down = nn.Linear(Fm, M, bias=False)  # down_proj

    @property
    def W_O(self) -> torch.Tensor:
        """o_proj viewed per head: [M, H, D], W_h = W_O[:, h, :] (a view: no copy)."""
        return self.wo.weight.view(-1, self.H, self.D)

    def kv(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys (rotary applied) and values of x: [B, T, M] (normalised) -> [B, K, T, D] each."""
        B, T, _ = x.shape
        k = linear(x, self.wk.weight).view(B, T, self.K, self.D).transpose(1, 2)  # [B, K, T, D]
        v = linear(x, self.wv.weight).view(B, T, self.K, self.D).transpose(1, 2)  # [B, K, T, D]
        return apply_rope(k, cos, sin), v

    def attention(self, x, cos, sin, attn_mask, cache: KVCache | None, l: int, past=None):
        """x: [B, T, M] (normalised) -> o: [B, T, H, D], plus this layer's (k, v) over all key positions.
        attn_mask: [B, 1, T, S] bool (True = may attend) or None (causal); for a decoding step (T = 1 with a
        cache) the additive form [B*K, 1, S] (0 or -inf) that Llama.forward builds once for all layers."""
        B, T, _ = x.shape
        H, K, D = self.H, self.K, self.D
        q = linear(x, self.wq.weight).view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        q = apply_rope(q, cos, sin)  # cos, sin: [B, 1, T, D]
        k, v = self.kv(x, cos, sin)  # [B, K, T, D] each
        if cache is not None:
            fresh = cache.len == 0
            k_t, v_all = cache.update(l, k, v)  # K^T: [B, K, D, S], [B, K, S, D]
            if T == 1:  # one decoding step: grouped attention written out (SDPA's CPU kernel is slow here)
                qg = q.reshape(B * K, H // K, D)  # the H // K query heads sharing each key/value head
                s = torch.baddbmm(attn_mask, qg, k_t.flatten(0, 1), alpha=D ** -0.5)  # scores: [B*K, H/K, S]
                a = s.softmax(-1, dtype=torch.float32).to(v.dtype)  # [B*K, H/K, S]
                o = torch.bmm(a, v_all.flatten(0, 1)).view(B, 1, H, D)  # [B, 1, H, D]
                return o, (k_t.transpose(-1, -2), v_all)
            if not fresh:  # new tokens on top of cached ones (the first chunk attends to itself alone)
                k, v = k_t.transpose(-1, -2).contiguous(), v_all  # [B, K, S, D]; SDPA's flash kernel wants D contiguous
        elif past is not None:  # a shared prefix's keys/values, [1 or B, K, P, D], kept in the autograd graph
            k = torch.cat([past[0].expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([past[1].expand(B, -1, -1, -1), v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                                           enable_gqa=K != H)  # [B, H, T, D]
        return o.transpose(1, 2), (k, v)  # o: [B, T, H, D]

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(linear(x, self.w_gate.weight)) * linear(x, self.w_up.weight)  # SwiGLU: [B, T, F]
        return linear(h, self.w_down.weight)  # [B, T, M]


class Llama(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- helpers -------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def W_O(self) -> torch.Tensor:
        """All o_proj weights per head: [L, M, H, D] (a stacked copy; use layers[l].W_O for a view)."""
        return torch.stack([layer.W_O for layer in self.layers])

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions pos: [B, T] -> [B, 1, T, D], computed in fp32, cast to the model dtype."""
        n = int(pos.max()) + 1 if pos.numel() else 1
        if self._rope is None or self._rope[0].shape[0] < n or self._rope[0].device != pos.device:
            D = self.cfg.head_dim
            size = max(n, min(self.cfg.max_seq_len, 8192))
            inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64,
                                                                    device=pos.device).float() / D))  # [D/2]
            freqs = torch.arange(size, device=pos.device).float()[:, None] * inv_freq[None, :]  # [S, D/2]
            emb = torch.cat([freqs, freqs], dim=-1)  # [S, D]
            self._rope = (emb.cos(), emb.sin())
        cos, sin = self._rope
        return cos[pos].to(self.dtype)[:, None], sin[pos].to(self.dtype)[:, None]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: h: [B, T, M] -> [B, T, V]."""
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return linear(self.norm(h), w)

    # -- the forward pass ----------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None, *, edit: Edit | None = None,
                edit_mask: torch.Tensor | None = None, cache: KVCache | None = None, past=None,
                output: str = "logits", last_only: bool = False, resid: torch.Tensor | None = None,
                start_at_layer: int = 0, stop_at_layer: int | None = None, pos: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None):
        """ids: [B, T] token ids.

        mask      [B, T], 1 for real tokens, 0 for left padding (None: all real). Right padding needs no mask.
        edit      an `Edit` added at the seam of every layer; edit_mask [B, T] bool restricts it to positions
                  (None: every position).
        cache     a KVCache to read past keys/values from and append these to (incremental decoding).
        past      per-layer (k, v) of a shared prefix ([1 or B, K, P, D], e.g. from output="kv"); gradients
                  flow into it. The prefix has no padding; these tokens continue at position P.
        output    "logits" -> [B, T, V] (only the last position if last_only), "hidden" -> final residual
                  [B, T, M] before the final norm, "probe" -> per-head outputs o at the last position of
                  every layer [B, L, H, D] (no logits computed), "kv" -> (logits, per-layer (k, v)).
        start_at_layer, resid: run layers start_at_layer.. on the residual `resid` [B, T, M] instead of the
                  embedding of ids (ids still gives positions); stop_at_layer=k: return the residual after
                  layers < k ([B, T, M]; with output="kv", also the per-layer (k, v) of the layers run). Together
                  they let a caller cache the lower layers' residuals once.
        pos, attn_mask: explicit rotary positions [B, T] and attention mask [B, 1, T, S] (bool, True = may
                  attend) instead of the ones derived from mask/cache/past, e.g. for several sequences packed
                  into one row (ipo.py). Both or neither.
        """
        B, T = ids.shape
        dev = ids.device
        P = 0 if past is None else past[0][0].shape[2]
        # positions and the attention mask ([B, 1, T, S] bool, True = may attend) -----------------------------
        if pos is not None:
            if attn_mask is None or cache is not None:
                raise ValueError("forward: pass pos together with attn_mask, and without a cache")
        elif cache is not None:
            if cache.len + T > cache.max_len:
                raise ValueError(f"KVCache: {cache.len} + {T} positions do not fit the {cache.max_len} allocated")
            new = torch.ones(B, T, dtype=torch.bool, device=dev) if mask is None else mask.bool()
            cache.mask[:, cache.len:cache.len + T] = new
            pos = cache.pos[:, None] + new.long().cumsum(1) - 1  # [B, T]
            pos = pos.clamp(min=0)
            S = cache.len + T
            keys = cache.mask[:, :S]  # [B, S]
            if T == 1:  # a decoding step: the additive mask every layer's grouped attention adds to its scores
                bias = torch.zeros(B, S, dtype=self.dtype, device=dev).masked_fill(~keys, float("-inf"))
                bias[:, -1] = 0  # the new token sees itself (a padding one too)
                attn_mask = bias.repeat_interleave(self.cfg.n_kv_heads, dim=0)[:, None]  # [B*K, 1, S]
            else:
                q_at = torch.arange(cache.len, S, device=dev)  # slot of each new token
                attn_mask = (torch.arange(S, device=dev)[None, :] <= q_at[:, None])[None] & keys[:, None, :]
                attn_mask |= torch.arange(S, device=dev)[None, None, :] == q_at[None, :, None]  # pads see themselves
                attn_mask = attn_mask[:, None]  # [B, 1, T, S]
        elif mask is not None:
            new = mask.bool()
            pos = (new.long().cumsum(1) - 1).clamp(min=0) + P
            causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            attn_mask = causal[None] & new[:, None, :]  # [B, T, T]
            attn_mask |= torch.eye(T, dtype=torch.bool, device=dev)[None]  # a pad query attends to itself
            if P:
                attn_mask = torch.cat([attn_mask.new_ones(B, T, P), attn_mask], dim=2)
            attn_mask = attn_mask[:, None]  # [B, 1, T, P+T]
        else:
            pos = torch.arange(P, P + T, device=dev)[None].expand(B, T)
            attn_mask = None
            if P and T > 1:  # causal over the new tokens, everything in the prefix visible
                attn_mask = torch.ones(T, P + T, dtype=torch.bool, device=dev).tril(P)
        cos, sin = self.rope(pos)
        if edit_mask is not None:
            edit_mask = edit_mask.to(self.dtype)[..., None]  # [B, T, 1]

        r = self.embed(ids) if resid is None else resid  # residual stream: [B, T, M]
        probes, kvs = [], []
        for l in range(start_at_layer, len(self.layers) if stop_at_layer is None else stop_at_layer):
            layer = self.layers[l]
            o, kv = layer.attention(layer.attn_norm(r), cos, sin, attn_mask, cache, l,
                                    None if past is None else past[l])  # o: [B, T, H, D]
            if output == "probe":
                probes.append(o[:, -1])  # [B, H, D]
                if l == len(self.layers) - 1:
                    return torch.stack(probes, dim=1)  # [B, L, H, D]
            if output == "kv":
                kvs.append(kv)
            # eq. 2.4: r += sum_h W_h o_h, i.e. einsum("bthd,mhd->btm", o, W_O), done as one matmul
            r = r + linear(o.flatten(2), layer.wo.weight)  # [B, T, M]
            if edit is not None:  # ---- the edit seam ----
                d = edit.delta(l, o, layer.W_O)  # [B, T, M] (or broadcastable), or None
                if d is not None:
                    r = r + (d if edit_mask is None else d * edit_mask)
            r = r + layer.mlp(layer.mlp_norm(r))
        if cache is not None:
            cache.len += T
            cache.pos += new.long().sum(1)
        if output == "hidden" or stop_at_layer is not None:
            return (r, kvs) if output == "kv" else r
        logits = self.logits(r[:, -1:] if last_only else r)  # [B, T, V]
        return (logits, kvs) if output == "kv" else logits

    def probe(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last-token per-head outputs o_h^l of every layer: [B, L, H, D] (left-padded batches; no logits)."""
        return self.forward(ids, mask, output="probe")

    # -- generation ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 50, *,
                     edit: Edit | None = None, eos_id: int | None = None, pad_id: int = 0,
                     stop: Callable[[int, list[int]], bool] | None = None, prefix_kv=None) -> list[list[int]]:
        """Greedy decoding of one left-padded batch with a KV cache. Returns each row's new tokens (without
        the EOS). `stop(row, new_ids)` is asked after each token and ends that row when True. prefix_kv: the
        keys/values of a prefix every prompt continues (`prefix_cache`, run once with the same edit), the
        prompts being the tokens after it (at least one each). In fp32 its matmuls take oneDNN's faster kernel,
        which sums in another order than a plain forward (see `linear`)."""
        generating = _GENERATING.set(True)  # fp32 matmuls through the prepacked kernel too (see `linear`)
        try:
            B = len(prompts)
            ids, mask = pad_left(prompts, pad_id, self.device)  # [B, T]
            T = ids.shape[1]
            P = 0 if prefix_kv is None else prefix_kv[0][0].shape[2]
            cache = KVCache(self.cfg, B, P + T + max_new_tokens, self.dtype, self.device)
            if P:  # every row starts with the prefix: slots 0..P-1, then its left padding, then its own tokens
                for l, (k, v) in enumerate(prefix_kv):  # k, v: [1, K, P, D], broadcast over the rows
                    cache.k_t[l][..., :P] = k.transpose(-1, -2)
                    cache.v[l][:, :, :P] = v
                cache.mask[:, :P] = True
                cache.pos[:] = P
                cache.len = P
            newest = edit is not None and edit.positions == "newest"
            edit_mask = None
            if newest:  # ITI acts at the last prompt position (column T-1 for every left-padded row)
                edit_mask = torch.zeros(B, T, dtype=torch.bool, device=self.device)
                edit_mask[:, -1] = True
            out: list[list[int]] = [[] for _ in range(B)]
            done = [False] * B
            x, m = ids, mask
            for _ in range(max_new_tokens):
                logits = self.forward(x, m, edit=edit, edit_mask=edit_mask, cache=cache, last_only=True)
                nxt = logits[:, -1].float().argmax(-1)  # [B] (argmax is 4x faster in fp32 than in bf16)
                for b, t in enumerate(nxt.tolist()):
                    if done[b]:
                        continue
                    if t == eos_id:
                        done[b] = True
                        continue
                    out[b].append(t)
                    if stop is not None and stop(b, out[b]):
                        done[b] = True
                if all(done):
                    break
                x, m, edit_mask = nxt[:, None], None, None  # each new token is the newest position
            return out
        finally:
            _GENERATING.reset(generating)

    def generate(self, tokenizer, prompts: Sequence[str], max_new_tokens: int = 50, *, edit: Edit | None = None,
                 stop: Sequence[str] = ("\nQ:",), batch_size: int = 16, progress: bool = False) -> list[str]:
        """Greedy completions of text prompts, cut before the first stop string (and at EOS). Prompts are
        sorted by length into batches of `batch_size` to keep left padding short."""
        bos = getattr(tokenizer, "add_bos", False)  # Llama-1/2 sentencepiece models expect a BOS, SmolLM2 none
        enc = [tokenizer.encode(p, bos=bos) for p in prompts]
        kv, enc = split_prefix(self, enc, edit)  # the tokens all prompts share (instruction, primer) run once
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        result: list[str] = [""] * len(enc)
        meter = Progress(len(enc), "generate", unit="prompts") if progress else None

        def cut(text: str) -> tuple[str, bool]:
            hits = [text.find(s) for s in stop if s in text]
            return (text[:min(hits)], True) if hits else (text, False)

        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            ids = self.generate_ids([enc[j] for j in rows], max_new_tokens, edit=edit, prefix_kv=kv,
                                    eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id or 0,
                                    stop=(lambda b, new: cut(tokenizer.decode(new))[1]) if stop else None)
            for j, new in zip(rows, ids):
                result[j] = cut(tokenizer.decode(new))[0]
            if meter:
                meter.update(len(rows))
        if meter:
            meter.close()
        return result

    # -- loading and saving --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str | torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "Llama":
        """Load an HF-format LlamaForCausalLM directory (config.json + model.safetensors or sharded
        *.safetensors with model.safetensors.index.json), a .gguf file, or a known name ("smollm2-135m").
        Tensors are read one at a time into the preallocated model: never two full copies in memory."""
        from safetensors import SafetensorError

        path = resolve_model(path)
        dtype, device = as_dtype(dtype, str(device)), torch.device(device)
        cfg = read_config(path)
        with torch.device("meta"):
            model = cls(cfg).to(dtype)  # no memory yet; allocated once, in the target dtype, below
        model = model.to_empty(device=device)
        model.eval().requires_grad_(False)

        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index}: expected a JSON object with a weight_map ({e!r})") from None
        elif (path / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        targets = model._hf_targets()
        seen = set()
        for fname in files:
            f = path / fname
            if not f.exists():
                raise FileNotFoundError(f"{f}: shard listed in model.safetensors.index.json is missing")
            try:
                model._load_file(f, targets, seen)
            except SafetensorError as e:  # a truncated or damaged file
                raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
        missing = sorted(set(targets) - seen)
        if missing:
            raise ValueError(f"{path}: tensors missing from the checkpoint: {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}")
        model.source = str(path)
        return model

    def _load_file(self, f: Path, targets: dict[str, torch.Tensor], seen: set) -> None:
        """Copy the tensors of one safetensors file into their parameters (`targets`), adding their names to
        `seen`."""
        from safetensors import safe_open

        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                if name not in targets:
                    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.cfg.tie_embeddings):
                        continue
                    raise ValueError(f"{f}: unexpected tensor {name!r} for a LlamaForCausalLM")
                dst = targets[name]
                t = st.get_tensor(name)
                if tuple(t.shape) != tuple(dst.shape):
                    raise ValueError(f"{f}: tensor {name!r} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(dst.shape)} from config.json")
                with torch.no_grad():
                    dst.copy_(t)
                seen.add(name)
                del t

    def _hf_targets(self) -> dict[str, torch.Tensor]:
        """HF tensor name -> the parameter it fills."""
        t = {"model.embed_tokens.weight": self.embed.weight, "model.norm.weight": self.norm.weight}
        if self.lm_head is not None:
            t["lm_head.weight"] = self.lm_head.weight
        for l, layer in enumerate(self.layers):
            p = f"model.layers.{l}."
            t.update({p + "input_layernorm.weight": layer.attn_norm.weight,
                      p + "self_attn.q_proj.weight": layer.wq.weight, p + "self_attn.k_proj.weight": layer.wk.weight,
                      p + "self_attn.v_proj.weight": layer.wv.weight, p + "self_attn.o_proj.weight": layer.wo.weight,
                      p + "post_attention_layernorm.weight": layer.mlp_norm.weight,
                      p + "mlp.gate_proj.weight": layer.w_gate.weight, p + "mlp.up_proj.weight": layer.w_up.weight,
                      p + "mlp.down_proj.weight": layer.w_down.weight})
        return t

    def save_pretrained(self, out_dir: str | os.PathLike, copy_from: str | os.PathLike | None = None,
                        dtype: torch.dtype = torch.float32) -> Path:
        """Write an HF-format directory (config.json, model.safetensors) that this class and any Llama runtime
        load; tokenizer files are copied from `copy_from`. Written to a temporary directory, then renamed."""
        from safetensors.torch import save_file

        def fill(tmp: Path) -> None:
            tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in self._hf_targets().items()}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(self.cfg.to_hf(), indent=2))
            if copy_from is not None:
                for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                             "special_tokens_map.json", "generation_config.json"):
                    if (Path(copy_from) / name).exists():
                        shutil.copy(Path(copy_from) / name, tmp / name)

        out = write_dir_atomic(Path(out_dir), fill)
        return out


# ----------------------------------------------------------------------------------------------------------
# Small utilities


def read_config(path: Path) -> Config:
    """The Config of an HF-format model directory, from its config.json (the weights are not read)."""
    f = Path(path) / "config.json"
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ValueError(f"{f}: cannot read a config.json ({e})") from None
    return Config.from_hf(d, str(f))


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """An HF-format directory for a directory, a .gguf file or a known model name (see gguf.py)."""
    return Path(gguf.resolve_model(name_or_path))


def write_file_atomic(path: Path, write: Callable[[str], object]) -> Path:
    """Write a file all at once: write(tmp) writes a temporary sibling, which is then renamed to `path`.
    A failure leaves no half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_dir_atomic(path: Path, fill: Callable[[Path], None]) -> Path:
    """Write a directory all at once: fill(tmp) writes into a temporary sibling, which then replaces `path`.
    A failure leaves no half-written directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        fill(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# Interrupted long steps: what each one in progress has saved so far (step -> one line), for the message that
# an interrupt (Ctrl-C) prints. A step notes its progress when it saves some, and removes its note once done.
KEPT: dict[str, str] = {}

SAVE_EVERY_S = 60.0  # long steps (activations, the judges' frozen pass and training) save progress this often


def note_kept(step: str, what: str | None) -> None:
    """Record what is saved of a long step in progress (`what`), or (None) that the step is finished."""
    if what is None:
        KEPT.pop(step, None)
    else:
        KEPT[step] = what


def interrupted_message() -> str:
    """The line printed on Ctrl-C: what was kept, and how to resume."""
    kept = "; ".join(KEPT.values())
    return ("interrupted: every finished step is saved" + (f", and of the unfinished ones: {kept}" if kept else "")
            + "; run the same command again to resume")


def prefix_cache(model: Llama, prefix: Sequence[int], edit: Edit | None = None, lower=None):
    """Per-layer (k, v) [1, K, P, D] of a prefix that many sequences share (None if empty), run once: a weight
    edit (positions "all") acts there, a "newest" one (ITI) does not. Gradients flow through them into the edit
    when grad is enabled. lower: (per-layer (k, v) of layers < l0, the residual at l0 [1, P, M], l0) computed
    before (`ipo.Below`, for an edit that acts on no layer below l0): only the layers from l0 up run."""
    if len(prefix) == 0:
        return None
    ids = torch.as_tensor(list(prefix), device=model.device)[None]  # [1, P]
    if edit is not None and edit.positions != "all":
        edit = None  # a "newest" edit (ITI) never acts on the prefix
    if lower is None:
        return model(ids, edit=edit, output="kv", last_only=True)[1]
    kv, r, l0 = lower
    return kv + model(ids, edit=edit, output="kv", resid=r, start_at_layer=l0, last_only=True)[1]


def split_prefix(model: Llama, seqs: Sequence[Sequence[int]], edit: Edit | None = None):
    """The longest token prefix the sequences share (`shared_prefix_len`), its keys/values run once
    (`prefix_cache`, no gradients), and each sequence's rest: -> (per-layer (k, v) [1, K, P, D] or None, rests)."""
    P = shared_prefix_len(seqs)
    with torch.inference_mode():
        kv = prefix_cache(model, list(seqs[0])[:P], edit) if seqs else None
    return kv, [list(s)[P:] for s in seqs]


def shared_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common token prefix, leaving at least one token of the shortest sequence."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: -> ids [B, T], mask [B, T] (1 = real token). The last column is every row's
    last real token, which is where probing and ITI read and act."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        if len(s):
            ids[b, T - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[b, T - len(s):] = 1
    return ids.to(device), mask.to(device)


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists: -> ids [B, T], mask [B, T]. Causal attention never sees right padding, so the
    forward needs no mask; use `mask` to ignore the padded positions' outputs."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[b, :len(s)] = 1
    return ids.to(device), mask.to(device)


class Progress:
    """A one-line progress meter on stderr: done/total, rate and ETA; `close()` prints a summary line."""

    def __init__(self, total: int, what: str, unit: str = "it"):
        import sys
        import time

        self.total, self.what, self.unit, self.n = total, what, unit, 0
        self.t0 = self.last = time.time()
        self._time, self._err = time.time, sys.stderr
        self.extra = ""

    def update(self, n: int = 1, extra: str = "") -> None:
        self.n += n
        self.extra = extra or self.extra
        now = self._time()
        if now - self.last >= 1.0 or self.n >= self.total:
            self.last = now
            rate = self.n / max(now - self.t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else math.inf
            self._err.write(f"\r{self.what}: {self.n}/{self.total} {self.unit} "
                            f"{rate:.2f}/s ETA {_fmt_s(eta)} {self.extra}\x1b[K")
            self._err.flush()

    def close(self) -> float:
        dt = self._time() - self.t0
        self._err.write(f"\r{self.what}: {self.n} {self.unit} in {_fmt_s(dt)} "
                        f"({self.n / max(dt, 1e-9):.2f}/s) {self.extra}\x1b[K\n")
        self._err.flush()
        return dt


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
