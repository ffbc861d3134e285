"""ITI: theta = sigma * u from training rows, the edit through llama.py's seam against shifting o itself, alpha = 0,
save / load."""
import types

import pytest
import torch

import iti
import probe
from llama import Llama
from tiny import tiny_config, write_tiny


def data(N=200, L=3, H=4, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(N, generator=g) < 0.5).long()
    X = torch.randn(N, L, H, D, generator=g) + y.float()[:, None, None, None] * torch.randn(L, H, D, generator=g)
    return X, y


def test_fit_iti_mass_mean(monkeypatch):
    X, y = data()
    mask = probe.parse_heads("0.1,2.3", 3, 4)
    train = torch.arange(150)
    raw, real = [], iti.ITIEdit  # theta as fit_iti builds it, before ITIEdit zeroes the heads outside the mask
    with monkeypatch.context() as m:
        m.setattr(iti, "ITIEdit", lambda theta, *a, **k: raw.append(theta.clone()) or real(theta, *a, **k))
        edit = iti.fit_iti(X, y, train, mask)
    assert isinstance(edit, real) and torch.equal(raw[0][~mask], torch.zeros(10, 8))
    assert edit.alpha == 1.0 and edit.directions == "mass_mean" and edit.heads == ["0.1", "2.3"]
    for l, h in [(0, 1), (2, 3)]:  # recompute one head at a time in fp64
        x, t = X[:150, l, h].double(), y[:150].bool()
        u = x[t].mean(0) - x[~t].mean(0)
        u = u / u.norm()
        proj = x @ u
        sigma = (proj - proj.mean()).pow(2).mean().sqrt()  # population std, as np.std
        assert torch.allclose(edit.theta[l, h].double(), sigma * u, atol=1e-5)
    # no leakage: rows outside train_idx do not matter
    X2 = X.clone()
    X2[150:] = 100.0
    assert torch.equal(iti.fit_iti(X2, y, train, mask).theta, edit.theta)
    X2 = X.clone()
    X2[:, ~mask] = 100.0  # nor do the heads outside the mask
    assert torch.equal(iti.fit_iti(X2, y, train, mask).theta, edit.theta)
    with pytest.raises(ValueError, match="no heads"):
        iti.fit_iti(X, y, train, torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="both true"):
        iti.fit_iti(X, torch.ones_like(y), train, mask)


def test_fit_iti_random_direction():
    X, y = data()
    mask = probe.parse_heads("1.1,1.2,2.0", 3, 4)
    a = iti.fit_iti(X, y, None, mask, random_direction=True, seed=5)
    assert a.directions == "random"
    assert torch.equal(a.theta, iti.fit_iti(X, y, None, mask, random_direction=True, seed=5).theta)
    assert not torch.equal(a.theta, iti.fit_iti(X, y, None, mask, random_direction=True, seed=6).theta)
    u = a.theta[mask] / a.theta[mask].norm(dim=-1, keepdim=True)
    sigma = torch.einsum("nkd,kd->nk", X[:, mask], u).std(0, correction=0)
    assert torch.allclose(a.theta[mask].norm(dim=-1), sigma, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny"), tiny_config(n_layers=3, n_heads=4, n_kv_heads=2))


def shift_o(model, theta, alpha, where):
    """Independently of ITIEdit.delta: make every layer's attention return o + alpha * theta[l] (o: [B, T, H, D])
    at the positions where(T) says, before o_proj sums the heads."""
    for l, layer in enumerate(model.layers):
        original = layer.attention

        def attention(self, *args, _l=l, _orig=original, **kw):
            o, kv = _orig(*args, **kw)
            add = torch.zeros_like(o)
            add[:, where(o.shape[1])] = (alpha * theta[_l]).to(o.dtype)  # [H, D] at the chosen positions
            return o + add, kv

        layer.attention = types.MethodType(attention, layer)
    return model


def random_edit(model, heads="0.1,0.3,2.2", seed=0):
    c = model.cfg
    theta = torch.randn(c.n_layers, c.n_heads, c.head_dim, generator=torch.Generator().manual_seed(seed))
    return iti.ITIEdit(theta, probe.parse_heads(heads, c.n_layers, c.n_heads), alpha=2.5)


def test_edit_equals_shifting_o(tiny_dir):
    model = Llama.from_pretrained(tiny_dir)
    edit = random_edit(model)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    edit_mask = torch.zeros(2, 9, dtype=torch.bool)
    edit_mask[:, 5:] = True  # e.g. the answer positions when scoring
    got = model(ids, edit=edit, edit_mask=edit_mask)
    assert not torch.allclose(got, model(ids), atol=1e-3)  # the edit does something
    shifted = shift_o(Llama.from_pretrained(tiny_dir), edit.theta, edit.alpha,
                      lambda T: slice(5, None) if T == 9 else slice(None))
    assert torch.allclose(got, shifted(ids), atol=1e-5)
    # generation: ITI acts at the last prompt position and at every generated token
    prompts = [[5, 9, 11, 4, 7], [8, 3, 30, 12, 40]]
    newest = shift_o(Llama.from_pretrained(tiny_dir), edit.theta, edit.alpha, lambda T: slice(T - 1, T))
    a = model.generate_ids(prompts, 12, edit=edit, eos_id=None)
    assert a == newest.generate_ids(prompts, 12, eos_id=None)
    assert a != model.generate_ids(prompts, 12, eos_id=None)


def test_alpha_zero_is_bit_identical(tiny_dir):
    model = Llama.from_pretrained(tiny_dir, dtype="bf16")
    edit = random_edit(model).with_alpha(0.0)
    ids = torch.randint(3, 64, (3, 11), generator=torch.Generator().manual_seed(2))
    assert torch.equal(model(ids, edit=edit), model(ids))
    prompts = [[5, 9, 11, 4, 7], [8, 3]]
    assert model.generate_ids(prompts, 10, edit=edit, eos_id=None) == model.generate_ids(prompts, 10, eos_id=None)


def test_residual_shift_is_alpha_sum_W_theta(tiny_dir):
    """Through the model: layer 0's residual stream (before its MLP) moves by alpha * sum_h W_h theta_h at the
    edited positions and nowhere else, W_h sliced by hand from o_proj's [M, H*D] weight (eq. 2.6)."""
    model = Llama.from_pretrained(tiny_dir)
    seen = []  # the residual stream entering layer 0's MLP: [B, T, M]
    model.layers[0].mlp_norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    edit_mask = torch.zeros(2, 7, dtype=torch.bool)
    edit_mask[0, 3:], edit_mask[1, -1] = True, True
    model(ids)
    plain = seen.pop()
    Wo, D = model.layers[0].wo.weight, model.cfg.head_dim  # [M, H*D]
    for alpha in (1.0, 3.0, -0.5):
        edit = random_edit(model).with_alpha(alpha)
        model(ids, edit=edit, edit_mask=edit_mask)
        shift = sum(Wo[:, h * D:(h + 1) * D] @ edit.theta[0, h] for h in (1, 3))  # heads 0.1 and 0.3: [M]
        expected = alpha * shift * edit_mask[..., None]  # [B, T, M]
        assert torch.allclose(seen.pop() - plain, expected, atol=1e-5), alpha
    assert edit.delta(1, torch.zeros(1, 1, 4, 8), model.layers[1].W_O) is None  # layer 1 has no chosen head


def test_save_load_identical(tiny_dir, tmp_path):
    model = Llama.from_pretrained(tiny_dir)
    edit = iti.ITIEdit(random_edit(model).theta, random_edit(model).mask, alpha=15.0, directions="random", seed=7)
    path = edit.save(tmp_path / "iti.safetensors")
    back = iti.ITIEdit.load(path)
    assert torch.equal(back.theta, edit.theta) and torch.equal(back.mask, edit.mask)
    assert (back.alpha, back.directions, back.seed, back.heads) == (15.0, "random", 7, edit.heads)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    assert torch.equal(model(ids, edit=back), model(ids, edit=edit))
    with pytest.raises(FileNotFoundError):
        iti.ITIEdit.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not an ITI edit file"):
        iti.ITIEdit.load(tmp_path / "bad.safetensors")


def test_delta_follows_the_weights(tiny_dir):
    """The precomputed alpha * sum_h W_h theta_h is recomputed for another model or changed weights."""
    a = Llama.from_pretrained(tiny_dir)
    edit = random_edit(a)
    o = torch.zeros(1, 1, 4, 8)
    d_a = edit.delta(0, o, a.layers[0].W_O).clone()
    cfg = tiny_config(n_layers=3, n_heads=4, n_kv_heads=2)
    b = Llama.from_pretrained(write_tiny(tiny_dir.parent / "other", cfg, seed=1))
    expected = edit.alpha * torch.einsum("hd,mhd->m", edit.theta[0], b.layers[0].W_O)
    assert torch.allclose(edit.delta(0, o, b.layers[0].W_O), expected, atol=1e-5)
    with torch.no_grad():
        a.layers[0].wo.weight.mul_(2)
    assert torch.allclose(edit.delta(0, o, a.layers[0].W_O), 2 * d_a, atol=1e-5)
