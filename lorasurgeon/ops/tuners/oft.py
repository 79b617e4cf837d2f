"""OFT and BOFT: an orthogonal (block-diagonal, Cayley-parametrized) rotation of the input space. Multiplicative:

OFT   W' = (R @ Wᵀ)ᵀ, R = block_diag of the Cayley transforms of the skew-symmetric blocks built from
      ``oft_R.weight`` (rows: one per block, or one shared block). peft/tuners/oft/layer.py: Linear.merge
      (:537, ``torch.mm(oft_mat, weight.t())``), unmerge (:585, ``torch.linalg.inv(oft_mat)``),
      OFTRotationModule.get_weight (:286), _cayley_batch (:118: Cayley-Neumann series, or ``solve``),
      _project_batch (:159: COFT), _block_diagonal (:176). Block size from the row length n = b(b-1)/2.
BOFT  W' = ((M @ Wᵀ)ᵀ) ⊙ s, M = the product over butterfly factors i of Pᵢ @ block_diag(Rᵢ) @ Pᵢᵀ.
      peft/tuners/boft/layer.py: Linear.merge (:493), unmerge (:541: Mᵀ and 1/s), get_delta_weight
      (:562), cayley_batch (:453), block_butterfly_perm (:414), perm2mat (:395), update_layer (:266: Pᵢ).
      Without PEFT's CUDA extension boft_n_butterfly_factor is forced to 1 (one factor, P = I).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import IncompatibleError
from ._base import ModuleConfig, Parts, Shapes, Tuner, f32, need

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


def block_size_of(n_elements: int) -> int:
    """b with b(b-1)/2 == n_elements (the strict upper triangle of a b×b block)."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    if b * (b - 1) // 2 != n_elements:
        raise IncompatibleError(f"oft: {n_elements} parameters per block is no b(b-1)/2")
    return b


def _skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(b, b, 1)
    matrix = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
    matrix[:, rows, cols] = vec
    return matrix - matrix.transpose(-2, -1)


def _project(q: torch.Tensor, b: int, eps: float) -> torch.Tensor:
    """COFT's projection (OFTRotationModule._project_batch), returning the upper-triangle vector."""
    oft_r = _skew(q, b)
    eps_t = eps * 1 / torch.sqrt(torch.tensor(oft_r.shape[0]))
    eye = torch.zeros((b, b), dtype=oft_r.dtype).unsqueeze(0).expand_as(oft_r)
    diff = oft_r - eye
    norm_diff = torch.norm(oft_r - eye, dim=(1, 2), keepdim=True)
    out = torch.where((norm_diff <= eps_t).bool(), oft_r, eye + eps_t * (diff / norm_diff))
    rows, cols = torch.triu_indices(b, b, 1)
    return out[:, rows, cols]


def _cayley(q: torch.Tensor, b: int, neumann: bool, terms: int) -> torch.Tensor:
    """OFTRotationModule._cayley_batch."""
    q_skew = _skew(q, b)
    if not neumann:
        eye = torch.eye(b).unsqueeze(0).expand(q.shape[0], b, b)
        solved: torch.Tensor = torch.linalg.solve(eye + q_skew, eye - q_skew, left=False)
        return solved
    r = torch.eye(b, dtype=q.dtype).repeat(q.shape[0], 1, 1)
    if terms > 1:
        r.add_(q_skew, alpha=2.0)
        if terms > 2:
            q_power = torch.bmm(q_skew, q_skew)
            r.add_(q_power, alpha=2.0)
            for _ in range(3, terms - 1):
                q_power = torch.bmm(q_power, q_skew)
                r.add_(q_power, alpha=2.0)
            q_power = torch.bmm(q_power, q_skew)
            r.add_(q_power)
    return r


@dataclass(frozen=True)
class OFT(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        return {
            "block_share": bool(raw.get("block_share", False)),
            "coft": bool(raw.get("coft", False)),
            "eps": float(raw.get("eps", 6e-5)),
            "use_cayley_neumann": bool(raw.get("use_cayley_neumann", True)),
            "num_cayley_neumann_terms": int(raw.get("num_cayley_neumann_terms", 5)),
        }

    def rotation(self, in_features: int, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        """R (in, in): the block-diagonal orthogonal matrix PEFT's get_delta_weight returns."""
        key = "oft_embedding_R.weight" if "oft_embedding_R.weight" in parts else "oft_R.weight"
        weight = need(parts, key, self.name)
        b = block_size_of(weight.shape[1])
        if cfg["coft"]:
            weight = _project(weight, b, cfg["eps"])
        blocks = _cayley(weight, b, cfg["use_cayley_neumann"], cfg["num_cayley_neumann_terms"])
        rank = in_features // b if cfg["block_share"] else weight.shape[0]
        if rank * b != in_features:
            raise IncompatibleError(f"oft: {rank} blocks of {b} do not cover {in_features} input features")
        rotation: torch.Tensor = torch.block_diag(*[blocks[0 if blocks.shape[0] == 1 else i] for i in range(rank)])
        return rotation

    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        w = f32(w0)
        if cfg["layer"] == "embedding":  # Embedding.merge (:1009): W @ R over the embedding dimension
            return torch.mm(w, self.rotation(w.shape[1], parts, cfg))
        flat = w.reshape(w.shape[0], -1)  # Conv2d.merge (:773): (out, in·k·k)
        rotation = self.rotation(flat.shape[1], parts, cfg)
        return torch.mm(rotation, flat.t()).t().reshape(w.shape)

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        w32 = f32(w)
        if cfg["layer"] == "embedding":
            return torch.mm(w32, torch.linalg.inv(self.rotation(w32.shape[1], parts, cfg)))
        flat = w32.reshape(w32.shape[0], -1)
        rotation = self.rotation(flat.shape[1], parts, cfg)
        return torch.mm(torch.linalg.inv(rotation), flat.t()).t().reshape(w32.shape)


def _butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> torch.Tensor:
    """BOFTLayer.block_butterfly_perm."""
    if n_butterfly_factor == 0:
        return torch.arange(n)
    if b * r * 2 > n:
        raise IncompatibleError("boft: invalid number of blocks")
    block_size = int(n // b)
    indices = torch.arange(n)
    step = block_size / r
    initial_order = torch.arange(block_size)
    sorted_order = torch.empty(block_size, dtype=torch.long)
    sorted_seq = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)), dim=0)
    for i, pos in enumerate(sorted_seq):
        sorted_order[int(i * r) : int(i * r + r)] = initial_order[int(pos * r) : int(pos * r + r)]
    for i in range(0, n, block_size):
        indices[i : i + block_size] = indices[i : i + block_size][sorted_order]
    return indices


def _perm_matrix(indices: torch.Tensor) -> torch.Tensor:
    n = len(indices)
    perm = torch.zeros((n, n))
    perm[torch.arange(n), indices] = 1
    return perm


@dataclass(frozen=True)
class BOFT(Tuner):
    def rotation(self, parts: Parts) -> torch.Tensor:
        """M (in, in): the butterfly orthogonal matrix of BOFT's get_delta_weight."""
        boft_r = need(parts, "boft_R", self.name)
        n, d, h, _ = boft_r.shape
        data = boft_r.view(n * d, h, h)
        skew = 0.5 * (data - data.transpose(1, 2))
        eye = torch.eye(h).unsqueeze(0).expand(n * d, h, h)
        rotate = torch.linalg.solve(eye + skew, eye - skew, left=False).view(n, d, h, h)
        block = torch.stack([torch.block_diag(*torch.unbind(rotate[i])) for i in range(n)])
        in_f = d * h
        perms = [_butterfly_perm(in_f, int(d / (2**i)), int(h / 2), n - 1) for i in range(n)]
        p = torch.stack([_perm_matrix(idx) for idx in perms])
        batch = torch.bmm(p, torch.bmm(block, p.permute(0, 2, 1)))
        result = batch[0]
        for i in range(1, n):
            result = batch[i] @ result
        return result

    def _scale(self, parts: Parts) -> torch.Tensor:
        return need(parts, "boft_s", self.name).reshape(-1, 1)  # Linear (out, 1); Conv2d (1, out), transposed

    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        w = f32(w0)
        flat = w.reshape(w.shape[0], -1)  # Conv2d.merge (:803): (out, in·k·k)
        rotated = torch.mm(self.rotation(parts), flat.t()).t()
        return (rotated * self._scale(parts)).reshape(w.shape)

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        w32 = f32(w)
        flat = w32.reshape(w32.shape[0], -1)
        rotated = torch.mm(self.rotation(parts).t(), flat.t()).t()
        return (rotated * (1 / self._scale(parts))).reshape(w32.shape)


OFT_TUNER = OFT(
    "oft", ("oft_R.weight", "oft_embedding_R.weight"), layers=("linear", "conv", "embedding"), additive=False
)
BOFT_TUNER = BOFT("boft", ("boft_R", "boft_s"), layers=("linear", "conv"), additive=False)
