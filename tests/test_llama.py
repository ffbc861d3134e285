"""llama.py against independent computations: a naive per-head reference forward, cached vs full, padded vs
alone, zero edits, loading (sharded, bad input), saving, and the real default model."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama import Config, Edit, KVCache, Llama, pad_left, prefix_cache
from tiny import tiny_config, write_tiny

CONFIGS = {
    "mha-untied": tiny_config(n_heads=4, n_kv_heads=4, tied=False, theta=10000.0),
    "gqa-tied": tiny_config(n_heads=4, n_kv_heads=2, tied=True, theta=100000.0, rope_style="params"),
    "gqa-headdim": tiny_config(n_heads=6, n_kv_heads=2, head_dim=6, d_model=20, tied=False, theta=500.0),
}


@pytest.fixture(params=list(CONFIGS))
def tiny(request, tmp_path):
    path = write_tiny(tmp_path / request.param, CONFIGS[request.param])
    return Llama.from_pretrained(path), path


# ---------------------------------------------------------------------------------------------------------
# An independent reference: per-head loops, the *interleaved* rotary layout applied to llama.cpp-permuted q/k
# rows (the layout GGUF files store), explicit softmax attention. If our rotate_half layout or the
# un-permutation were wrong, the two would disagree.


def permute_llamacpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


def reference_logits(w: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    M, H, K = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D, eps = cfg["head_dim"], cfg["rms_norm_eps"]
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    T = len(ids)

    def norm(x, g):
        return g * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    def rope_interleaved(x, t):  # x: [D], pairs (x[2i], x[2i+1]) rotated by t * theta^(-2i/D)
        y = x.clone()
        for i in range(D // 2):
            a = t * theta ** (-2 * i / D)
            c, s = math.cos(a), math.sin(a)
            y[2 * i], y[2 * i + 1] = x[2 * i] * c - x[2 * i + 1] * s, x[2 * i] * s + x[2 * i + 1] * c
        return y

    r = w["model.embed_tokens.weight"][ids].double()  # [T, M]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        x = norm(r, w[p + "input_layernorm.weight"].double())
        Wq = permute_llamacpp(w[p + "self_attn.q_proj.weight"], H).double()
        Wk = permute_llamacpp(w[p + "self_attn.k_proj.weight"], K).double()
        Wv, Wo = w[p + "self_attn.v_proj.weight"].double(), w[p + "self_attn.o_proj.weight"].double()
        q = (x @ Wq.T).view(T, H, D)
        k = (x @ Wk.T).view(T, K, D)
        v = (x @ Wv.T).view(T, K, D)
        q = torch.stack([torch.stack([rope_interleaved(q[t, h], t) for h in range(H)]) for t in range(T)])
        k = torch.stack([torch.stack([rope_interleaved(k[t, h], t) for h in range(K)]) for t in range(T)])
        attn_out = torch.zeros(T, M, dtype=torch.float64)
        for h in range(H):
            kh = h // (H // K)
            scores = q[:, h] @ k[:, kh].T / math.sqrt(D)  # [T, T]
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            o_h = scores.softmax(-1) @ v[:, kh]  # [T, D]
            attn_out += o_h @ Wo[:, h * D:(h + 1) * D].T  # W_h o_h, summed over heads (eq. 2.4)
        r = r + attn_out
        x = norm(r, w[p + "post_attention_layernorm.weight"].double())
        g = x @ w[p + "mlp.gate_proj.weight"].double().T
        u = x @ w[p + "mlp.up_proj.weight"].double().T
        r = r + (torch.nn.functional.silu(g) * u) @ w[p + "mlp.down_proj.weight"].double().T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"]).double()
    return norm(r, w["model.norm.weight"].double()) @ head.T


def test_logits_match_reference(tiny):
    model, path = tiny
    cfg = json.loads((path / "config.json").read_text())
    ids = [5, 17, 3, 60, 9, 22, 41]
    ref = reference_logits(load_file(str(path / "model.safetensors")), cfg, ids)
    ours = model(torch.tensor([ids]))[0].double()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_wrong_rotary_layout_is_detected(tiny):
    """The reference is sensitive to the layout: feeding it un-permuted weights gives different logits."""
    model, path = tiny
    cfg = json.loads((path / "config.json").read_text())
    w = load_file(str(path / "model.safetensors"))
    for l in range(cfg["num_hidden_layers"]):  # pre-apply the inverse so the reference permutes it back
        for name, n in (("q_proj", cfg["num_attention_heads"]), ("k_proj", cfg["num_key_value_heads"])):
            key = f"model.layers.{l}.self_attn.{name}.weight"
            out, inp = w[key].shape
            w[key] = w[key].reshape(n, out // n // 2, 2, inp).transpose(1, 2).reshape(out, inp)
    ids = [5, 17, 3, 60, 9]
    ref = reference_logits(w, cfg, ids)
    assert (model(torch.tensor([ids]))[0].double() - ref).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# The seam


class Capture(Edit):
    """Records o and W at every layer; adds nothing."""

    def __init__(self):
        self.o, self.W = {}, {}

    def delta(self, l, o, W):
        self.o[l], self.W[l] = o.clone(), W
        return None


class Zero(Edit):
    def delta(self, l, o, W):
        return torch.zeros(o.shape[0], o.shape[1], W.shape[0], dtype=o.dtype)


def test_per_head_slices_sum_to_o_proj(tiny):
    model, _ = tiny
    cap = Capture()
    model(torch.randint(0, 64, (2, 6)), edit=cap)
    for l, layer in enumerate(model.layers):
        o, W = cap.o[l], cap.W[l]  # [B, T, H, D], [M, H, D]
        per_head = sum(o[:, :, h] @ W[:, h].T for h in range(o.shape[2]))  # sum_h W_h o_h
        torch.testing.assert_close(per_head, o.flatten(2) @ layer.wo.weight.T, rtol=1e-5, atol=1e-5)
        assert W.data_ptr() == layer.wo.weight.data_ptr()  # a view of o_proj, not a copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_edit_is_bit_identical(tiny, dtype):
    model, _ = tiny
    model = model.to(dtype)
    ids = torch.randint(0, 64, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0
    assert torch.equal(model(ids, mask), model(ids, mask, edit=Zero()))
    assert torch.equal(model(ids, mask), model(ids, mask, edit=Capture()))
    assert model.generate_ids([[1, 2, 3], [4]], 6) == model.generate_ids([[1, 2, 3], [4]], 6, edit=Zero())


def test_edit_enters_at_the_seam(tiny):
    """A constant edit at layer l equals adding the same vector to that layer's o_proj output by hand."""
    model, _ = tiny
    torch.manual_seed(0)
    vec = torch.randn(model.cfg.d_model)

    class AddAt1(Edit):
        def delta(self, l, o, W):
            return vec if l == 1 else None

    ids = torch.randint(0, 64, (2, 5))
    got = model(ids, edit=AddAt1())
    h = model(ids, stop_at_layer=1)  # residual after layer 0
    layer = model.layers[1]
    cap = Capture()
    model(ids, edit=cap)
    r = h + cap.o[1].flatten(2) @ layer.wo.weight.T + vec
    r = r + layer.mlp(layer.mlp_norm(r))
    want = model(ids, resid=r, start_at_layer=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_edit_mask_restricts_positions(tiny):
    model, _ = tiny
    vec = torch.randn(model.cfg.d_model)

    class Const(Edit):
        def delta(self, l, o, W):
            return vec

    ids = torch.randint(0, 64, (1, 6))
    em = torch.zeros(1, 6, dtype=torch.bool)
    em[0, 4] = True
    base, edited = model(ids), model(ids, edit=Const(), edit_mask=em)
    assert torch.equal(base[:, :4], edited[:, :4])  # causal: nothing before position 4 moves
    assert (base[:, 4:] - edited[:, 4:]).abs().max() > 1e-3


def test_probe_is_last_token_o(tiny):
    model, _ = tiny
    ids = torch.randint(0, 64, (2, 7))
    cap = Capture()
    model(ids, edit=cap)
    want = torch.stack([cap.o[l][:, -1] for l in range(model.cfg.n_layers)], dim=1)  # [B, L, H, D]
    got = model.probe(ids)
    assert got.shape == (2, model.cfg.n_layers, model.cfg.n_heads, model.cfg.head_dim)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Cache, padding, generation


def test_cached_decoding_equals_full_forward(tiny):
    model, _ = tiny
    ids = torch.randint(0, 64, (2, 10))
    full = model(ids)
    cache = KVCache(model.cfg, 2, 10, model.dtype, "cpu")
    steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cached_decoding_in_bf16_is_as_exact_as_the_full_forward(tiny):
    """In bf16 a decoding step's attention is the written-out one (scores scaled inside a bf16 baddbmm), the full
    forward's is SDPA's. Both round differently, so neither is compared bit for bit: the cached steps must be
    as close to the fp32 logits as the bf16 full forward is, for every config's head_dim (6: a scale 6^-0.5
    that bf16 cannot hold exactly)."""
    model, path = tiny
    b16 = Llama.from_pretrained(path, dtype="bf16")
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 10))
        exact = model(ids)
        full = (b16(ids).float() - exact).abs().max()
        cache = KVCache(b16.cfg, 2, 10, b16.dtype, "cpu")
        steps = [b16(ids[:, :4], cache=cache)] + [b16(ids[:, t:t + 1], cache=cache) for t in range(4, 10)]
        cached = (torch.cat(steps, dim=1).float() - exact).abs().max()
        assert cached <= 1.5 * full + 1e-3, (cached, full)


def test_cached_decoding_with_prefill_chunks(tiny):
    """Prefill in two chunks (the second attends to the cached first, as probe.py's shared prefixes do), then
    decoding steps, with left padding: equal to the full forward at every real position."""
    model, _ = tiny
    ids, mask = pad_left([[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25]])  # [2, 8]
    full = model(ids, mask)
    cache = KVCache(model.cfg, 2, 8, model.dtype, "cpu")
    steps = [model(ids[:, :3], mask[:, :3], cache=cache), model(ids[:, 3:6], cache=cache)]
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(6, 8)]
    got = torch.cat(steps, dim=1)
    torch.testing.assert_close(got[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 2:], full[1, 2:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        model(ids[:, :1], cache=cache)


def test_prepacked_bf16_linear_is_bit_identical(tiny, monkeypatch):
    """bf16 inference goes through oneDNN-prepacked weights (llama.linear): the same bits as F.linear, for the
    full forward and for generation, and a weight changed in place is repacked, not served stale."""
    import llama

    if not llama.PREPACK:
        pytest.skip("this torch has no oneDNN prepacking")
    _, path = tiny
    model = Llama.from_pretrained(path, dtype="bf16")
    ids = torch.randint(0, 64, (3, 9))
    prompts = [[3, 4, 5], [7, 8], [9, 10, 11, 12]]
    with torch.inference_mode():
        packed = model(ids), model.generate_ids(prompts, 6)
        assert hasattr(model.layers[0].wq.weight, "_packed")
        monkeypatch.setattr(llama, "PREPACK", False)
        plain = model(ids), model.generate_ids(prompts, 6)
        assert torch.equal(packed[0], plain[0]) and packed[1] == plain[1]
        model.layers[0].w_down.weight.mul_(3)  # in place: its packed copy is now stale
        want = model(ids)
        monkeypatch.setattr(llama, "PREPACK", True)
        got = model(ids)
    assert torch.equal(got, want) and not torch.equal(got, packed[0])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_inference_forward_equals_autograd_forward(tiny, dtype):
    """Without autograd (bf16: through prepacked weights) and with gradients (plain F.linear): the same bits, as
    IPO needs (reference log-probabilities without, the policy's with), and a residual handed in is kept."""
    _, path = tiny
    model = Llama.from_pretrained(path, dtype=dtype)
    ids = torch.randint(0, 64, (3, 7))
    with torch.inference_mode():
        want = model(ids)
        r2 = model(ids, stop_at_layer=2)
        kept = r2.clone()
        top = model(ids, resid=r2, start_at_layer=2)
    assert torch.equal(r2, kept) and torch.equal(top, want)
    model.requires_grad_(True)
    got = model(ids)
    assert got.requires_grad and torch.equal(got.detach(), want)


def test_fp32_generation_kernel_stays_in_generation(tiny, monkeypatch):
    """fp32 generation runs its matmuls through oneDNN-prepacked copies (another summation order); every other
    fp32 forward keeps F.linear: a forward after generating is bit-identical to one before, and the tokens
    equal those generated with the plain kernel."""
    import llama

    if not llama.PREPACK:
        pytest.skip("this torch has no oneDNN prepacking")
    model, _ = tiny
    ids = torch.randint(0, 64, (3, 9))
    prompts = [[3, 4, 5], [7, 8], [9, 10, 11, 12]]
    w = model.layers[0].wq.weight
    with torch.inference_mode():
        before = model(ids)
        assert not hasattr(w, "_packed")  # a plain fp32 forward packs nothing
        fast = model.generate_ids(prompts, 8)
        assert hasattr(w, "_packed") and w._packed[1].dtype == torch.float32  # generation did
        assert torch.equal(model(ids), before)
        monkeypatch.setattr(llama, "PREPACK", False)
        assert model.generate_ids(prompts, 8) == fast


def test_left_padded_batch_equals_each_alone(tiny):
    model, _ = tiny
    seqs = [[3, 9, 27, 14, 5, 6], [7, 8], [40, 41, 42, 43]]
    ids, mask = pad_left(seqs)
    batch = model(ids, mask)
    for b, s in enumerate(seqs):
        alone = model(torch.tensor([s]))[0]
        torch.testing.assert_close(batch[b, -len(s):], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.probe(ids, mask)[b], model.probe(torch.tensor([s]))[0],
                                   rtol=1e-5, atol=1e-5)


def greedy_no_cache(model, prompt, n, edit=None):
    """Greedy decoding by full forwards. A "newest" edit acted on each token while it was the newest, so in a
    full forward it covers the last prompt position and every generated one."""
    ids = list(prompt)
    for _ in range(n):
        em = None
        if edit is not None and edit.positions == "newest":
            em = torch.zeros(1, len(ids), dtype=torch.bool)
            em[0, len(prompt) - 1:] = True
        ids.append(int(model(torch.tensor([ids]), edit=edit, edit_mask=em)[0, -1].argmax()))
    return ids[len(prompt):]


def test_batched_cached_generation_equals_naive_greedy(tiny):
    model, _ = tiny
    prompts = [[3, 9, 27, 14, 5], [7], [40, 41, 42]]

    class Newest(Edit):  # ITI-like: a constant shift at the newest position only
        positions = "newest"

        def __init__(self):
            self.vec = torch.randn(model.cfg.d_model) * 3

        def delta(self, l, o, W):
            return self.vec if l == 0 else None

    for edit in (None, Newest()):
        got = model.generate_ids(prompts, 8, edit=edit)
        assert got == [greedy_no_cache(model, p, 8, edit) for p in prompts]

    # prompts continuing one shared prefix, whose keys/values run once (llama.prefix_cache): the same tokens as
    # greedy decoding of the whole prompts, for an edit acting everywhere (on the prefix too) and a "newest" one
    class Everywhere(Edit):
        positions = "all"

        def __init__(self):
            self.vec = torch.randn(model.cfg.d_model) * 3

        def delta(self, l, o, W):
            return self.vec if l == 1 else None

    prefix = [11, 12, 13, 14]
    for edit in (None, Newest(), Everywhere()):
        with torch.inference_mode():
            kv = prefix_cache(model, prefix, edit)
        got = model.generate_ids(prompts, 8, edit=edit, prefix_kv=kv)
        assert got == [greedy_no_cache(model, prefix + p, 8, edit) for p in prompts]
        if edit is not None:
            assert got != model.generate_ids(prompts, 8, prefix_kv=kv)  # the edit changes the answers

    # one-token prompts beside an empty one: a decoding step with a padding query in the batch stays finite
    got = model.generate_ids([[], [7], [9]], 6)
    assert got[1:] == [greedy_no_cache(model, p, 6) for p in ([7], [9])]
    ids, mask = pad_left([[], [7]])  # [2, 1], row 0 padding
    cache = KVCache(model.cfg, 2, 3, model.dtype, "cpu")
    model(ids, mask, cache=cache)
    assert torch.isfinite(model(torch.tensor([[3], [4]]), cache=cache)).all()


def test_generation_stops():
    class Tok:  # characters as tokens
        eos_id, pad_id = -1, 0

        def encode(self, s, bos=False):
            return [ord(c) % 64 for c in s]

        def decode(self, ids):
            return "".join(chr(65 + i % 26) for i in ids)

    torch.manual_seed(0)
    model = Llama(Config.from_hf(tiny_config()))
    full = model.generate(Tok(), ["ab", "xyz"], 12, stop=())
    assert [len(f) for f in full] == [12, 12]
    stop = full[0][3:5]
    cut = model.generate(Tok(), ["ab", "xyz"], 12, stop=(stop,))
    assert cut[0] == full[0][:full[0].find(stop)]
    assert stop not in cut[1] and full[1].startswith(cut[1])
    # prompts sharing a beginning (run once for the batch) give what each prompt gives alone (no prefix shared)
    shared = ["Q: hello ab", "Q: hello xyz", "Q: hello q"]
    assert model.generate(Tok(), shared, 12, stop=(), batch_size=2) == [model.generate(Tok(), [p], 12, stop=())[0]
                                                                        for p in shared]


# ---------------------------------------------------------------------------------------------------------
# Config and loading


def test_config_reads_both_rope_layouts():
    a = Config.from_hf(tiny_config(theta=123.0, rope_style="top"))
    b = Config.from_hf(tiny_config(theta=123.0, rope_style="params"))
    assert a.rope_theta == b.rope_theta == 123.0


@pytest.mark.parametrize("bad, msg", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
    ({"rope_parameters": {"rope_theta": 1.0, "rope_type": "yarn"}}, "yarn"),
    ({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_config_rejects_unsupported(bad, msg):
    with pytest.raises(ValueError, match=msg):
        Config.from_hf(tiny_config(**bad))


def test_sharded_checkpoint_loads_identically(tmp_path):
    cfg = tiny_config()
    one = Llama.from_pretrained(write_tiny(tmp_path / "one", cfg, seed=3))
    three = Llama.from_pretrained(write_tiny(tmp_path / "three", cfg, seed=3, shards=3))
    ids = torch.randint(0, 64, (1, 5))
    assert torch.equal(one(ids), three(ids))


def test_bad_checkpoints(tmp_path):
    path = write_tiny(tmp_path / "m")
    w = load_file(str(path / "model.safetensors"))
    w["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(w, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"o_proj.weight.*shape \(3, 3\), expected"):
        Llama.from_pretrained(path)
    del w["model.layers.0.self_attn.o_proj.weight"]
    save_file(w, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        Llama.from_pretrained(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Llama.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        Llama.from_pretrained(tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        Llama.from_pretrained(path)


def test_save_pretrained_round_trip(tiny, tmp_path):
    model, _ = tiny
    out = model.save_pretrained(tmp_path / "saved")
    again = Llama.from_pretrained(out)
    ids = torch.randint(0, 64, (2, 5))
    assert torch.equal(model(ids), again(ids))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_bf16_close_to_fp32(tiny):
    model, path = tiny
    b16 = Llama.from_pretrained(path, dtype="bf16")
    ids = torch.randint(0, 64, (2, 6))
    p32, p16 = model(ids).softmax(-1), b16(ids).float().softmax(-1)
    assert (p32 - p16).abs().max() < 0.1


# ---------------------------------------------------------------------------------------------------------
# The real default model (fetched and converted once into the cache)

PARIS = "Q: What is the capital of France?\nA:"
# transformers 5.23 LlamaForCausalLM, fp32, on the same converted weights (measured in a scratch venv):
# token ids of PARIS, and the top-5 (id, logit) at the first and last positions.
HF_IDS = [65, 42, 1812, 314, 260, 3575, 282, 4649, 47, 198, 49, 42]
HF_TOP5 = {0: ([29, 28, 198, 284, 79], [24.51419, 23.25673, 22.08635, 21.83294, 21.83237]),
           11: ([378, 4649, 216, 7042, 198], [14.58589, 14.25377, 13.99214, 13.56194, 13.39986])}


@pytest.fixture(scope="module")
def smol():
    from tokenizer import Tokenizer

    return Llama.from_pretrained("smollm2-135m"), Tokenizer.from_pretrained("smollm2-135m")


def test_real_model_matches_transformers(smol):
    model, tok = smol
    assert tok.encode(PARIS) == HF_IDS
    logits = model(torch.tensor([HF_IDS]))[0]
    for pos, (ids, vals) in HF_TOP5.items():
        top = logits[pos].topk(5)
        assert top.indices.tolist() == ids
        torch.testing.assert_close(top.values, torch.tensor(vals), rtol=0, atol=1e-4)


def test_real_model_answers_paris(smol):
    model, tok = smol
    out = model.generate(tok, [PARIS, "Q: How many legs does a spider have?\nA:"], 20, stop=("\n",))
    assert "Paris" in out[0]
    assert "\n" not in out[0] and "\n" not in out[1]


def test_real_model_bf16_generation_agrees(smol):
    model, tok = smol
    b16 = Llama.from_pretrained("smollm2-135m", dtype="bf16")
    assert "Paris" in b16.generate(tok, [PARIS], 12)[0]
    ids = torch.tensor([HF_IDS])
    p32, p16 = model(ids)[0].softmax(-1), b16(ids)[0].float().softmax(-1)
    assert (p32 - p16).abs().sum(-1).max() < 0.2  # total variation per position


def test_fast_dtype_measures_once_and_caches(tmp_path, monkeypatch):
    """dtype auto: bf16 on a GPU; on a CPU the faster of bf16 and fp32, measured once, then read from the cache
    (a cached answer is used as is, even one the measurement would not give)."""
    import llama

    monkeypatch.setenv("EDITLOC_CACHE", str(tmp_path))
    assert llama.fast_dtype("cuda") == "bf16" and not (tmp_path / "fast_dtype.json").exists()
    got = llama.fast_dtype("cpu")
    known = json.loads((tmp_path / "fast_dtype.json").read_text())
    (key, rec), = known.items()
    assert got == rec["dtype"] in ("bf16", "fp32") and set(rec["gflop_per_s"]) == {"fp32", "bf16"}
    want = "bf16" if rec["gflop_per_s"]["bf16"] >= 1.25 * rec["gflop_per_s"]["fp32"] else "fp32"
    assert got == want  # bf16 only when at least 1.25x faster
    other = "fp32" if got == "bf16" else "bf16"
    (tmp_path / "fast_dtype.json").write_text(json.dumps({key: {"dtype": other, "gflop_per_s": {}}}))
    monkeypatch.setattr(llama, "linear", lambda *a: (_ for _ in ()).throw(AssertionError("measured again")))
    assert llama.fast_dtype("cpu") == other and llama.as_dtype("auto") == llama.DTYPES[other]
    with pytest.raises(ValueError, match="'auto'"):
        llama.as_dtype("fp64")


def test_cpu_id_tells_apart_cpus_of_one_name(monkeypatch):
    """The dtype cache's key: two Xeons of the same model name, one with AMX and one without, are two keys."""
    import builtins
    import io

    import llama

    block = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: {model}\n"
             "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx512f {extra}\n\nprocessor\t: 1\n"
             "model\t\t: 999\nflags\t\t: none\n")
    real_open = builtins.open
    ids = []
    for model, extra in ((106, "avx512_vnni"), (143, "avx512_bf16 amx_bf16 amx_tile")):
        text = block.format(model=model, extra=extra)
        monkeypatch.setattr(builtins, "open", lambda f, *a, **k: io.StringIO(text)
                            if f == "/proc/cpuinfo" else real_open(f, *a, **k))
        ids.append(llama.cpu_id())
    assert ids[0] == "Intel(R) Xeon(R) Processor | family 6 model 106 | avx512f"
    assert ids[1] == "Intel(R) Xeon(R) Processor | family 6 model 143 | amx_bf16 amx_tile avx512_bf16 avx512f"
