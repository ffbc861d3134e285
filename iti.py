"""iti.py: Inference-Time Intervention (Li et al. 2023) as an `llama.Edit` (the paper's eq. 2.5-2.6).

For each chosen head h (of layer l) ITI shifts the head's output along a fixed direction before o_proj,

    o_h <- o_h + alpha * theta_h,        theta_h = sigma_h * u_h                              (eq. 2.5)

so the residual stream gets

    r <- r + sum_h W_h o_h + alpha * sum_{h chosen} W_h theta_h                              (eq. 2.6)

u_h is the mass-mean direction, unit(mean of o_h over true answers - mean over false answers), and sigma_h the
standard deviation of the activations projected on u_h, both from the training questions only. ITI edits the
newest position: the last prompt token and each generated token (`positions = "newest"`); scoring answers
(MC, KL) passes edit_mask = the answer positions.
"""
from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import torch

import llama
from probe import head_list

FORMAT = "editloc-iti-1"


class ITIEdit(llama.Edit):
    """theta [L, H, D] (zero outside mask), mask [L, H] bool, alpha: delta(l) = alpha * sum_h W_h theta_h."""

    positions = "newest"

    def __init__(self, theta: torch.Tensor, mask: torch.Tensor, alpha: float = 1.0, directions: str = "mass_mean",
                 seed: int = 0):
        if theta.dim() != 3 or tuple(mask.shape) != tuple(theta.shape[:2]):
            raise ValueError(f"ITIEdit: expected theta [L, H, D] and mask [L, H], got {tuple(theta.shape)} and "
                             f"{tuple(mask.shape)}")
        self.mask = mask.bool().cpu()
        self.theta = (theta.float().cpu() * self.mask[..., None])  # [L, H, D], zero outside the chosen heads
        self.alpha = float(alpha)
        self.directions = directions
        self.seed = int(seed)
        self._delta: dict[int, tuple] = {}  # l -> (weakref to W, (version, device, dtype), delta [M])

    @property
    def heads(self) -> list[str]:
        return head_list(self.mask)

    def delta(self, l: int, o: torch.Tensor, W: torch.Tensor) -> torch.Tensor | None:
        """alpha * sum_h W_h theta_h: [M] (eq. 2.6), computed once per layer in fp32, returned in o's dtype."""
        if not bool(self.mask[l].any()):
            return None
        weight = W._base if W._base is not None else W  # the o_proj parameter W is a view of
        key = (weight._version, W.device, o.dtype)  # _version changes if the weights are modified in place
        hit = self._delta.get(l)
        if hit is None or hit[0]() is not weight or hit[1] != key:
            d = self.head_vectors(l, W).sum(0)  # [M]
            hit = self._delta[l] = (weakref.ref(weight), key, d.to(o.dtype))
        return hit[2]  # [M], broadcast over [B, T, M]

    def head_vectors(self, l: int, W: torch.Tensor) -> torch.Tensor:
        """alpha * W_h theta_h for each head h: [H, M] fp32 (eq. 2.6; zero outside the chosen heads)."""
        return self.alpha * torch.einsum("hd,mhd->hm", self.theta[l].to(W.device), W.float())

    def with_alpha(self, alpha: float) -> "ITIEdit":
        return ITIEdit(self.theta, self.mask, alpha, self.directions, self.seed)

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file: theta [L, H, D] fp32, mask [L, H] uint8; metadata: heads, alpha, directions, seed."""
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "heads": json.dumps(self.heads), "alpha": repr(self.alpha),
                "directions": self.directions, "seed": str(self.seed)}
        tensors = {"theta": self.theta.contiguous(), "mask": self.mask.to(torch.uint8).contiguous()}
        return llama.write_file_atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ITIEdit":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no ITI edit file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                theta, mask = f.get_tensor("theta"), f.get_tensor("mask").bool()
        except Exception as e:  # safetensors raises its own error types for bad files
            raise ValueError(f"{path}: not an ITI edit file (safetensors with theta and mask): {e}") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        try:
            edit = cls(theta, mask, float(meta["alpha"]), meta.get("directions", "mass_mean"),
                       int(meta.get("seed", 0)))
            heads = json.loads(meta["heads"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"{path}: incomplete ITI metadata or tensors ({e!r})") from None
        if heads != edit.heads:
            raise ValueError(f"{path}: heads in the metadata {meta['heads']} do not match the mask {edit.heads}")
        return edit

    def __repr__(self) -> str:
        return f"ITIEdit(heads={len(self.heads)}, alpha={self.alpha}, directions={self.directions!r})"


def fit_iti(X: torch.Tensor, y: torch.Tensor, train_idx, mask: torch.Tensor, *, random_direction: bool = False,
            seed: int = 0) -> ITIEdit:
    """theta_h = sigma_h * u_h for the heads in mask [L, H], from X [N, L, H, D], y [N] restricted to train_idx
    (None: all rows; pass training-question rows only). u_h is the mass-mean direction (or, with
    random_direction, a seeded random unit vector: ITI's control); sigma_h the standard deviation (ddof 0, as
    numpy's np.std in ITI) of the activations projected on u_h. alpha is 1: scale with `with_alpha`."""
    if X.dim() != 4 or tuple(mask.shape) != tuple(X.shape[1:3]):
        raise ValueError(f"fit_iti: expected X [N, L, H, D] and mask [L, H], got {tuple(X.shape)} and "
                         f"{tuple(mask.shape)}")
    mask = mask.bool()
    if not bool(mask.any()):
        raise ValueError("fit_iti: the head mask selects no heads")
    idx = torch.arange(X.shape[0]) if train_idx is None else torch.as_tensor(train_idx, dtype=torch.long)
    Xm = X[idx][:, mask].float()  # [n, K, D], the chosen heads in row-major order
    yt = y[idx].bool()
    if not bool(yt.any()) or bool(yt.all()):
        raise ValueError("fit_iti: the training rows need both true (1) and false (0) answers")
    if random_direction:
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(Xm.shape[1], Xm.shape[2], generator=g)  # [K, D]
    else:
        u = Xm[yt].mean(0) - Xm[~yt].mean(0)  # mass-mean direction: [K, D]
    u = u / u.norm(dim=-1, keepdim=True)  # unit directions u_h: [K, D]
    sigma = torch.einsum("nkd,kd->nk", Xm, u).std(0, correction=0)  # std of the projections: [K]
    theta = torch.zeros(X.shape[1], X.shape[2], X.shape[3])
    theta[mask] = sigma[:, None] * u  # theta_h = sigma_h u_h: [K, D] into [L, H, D]
    return ITIEdit(theta, mask, alpha=1.0, directions="random" if random_direction else "mass_mean", seed=seed)
