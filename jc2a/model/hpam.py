"""Hybrid Prototype Alignment Module (HPAM, paper §3.3, Eqs. 1-10): point-to-point and point-to-block alignment."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jc2a.model.attention import ATTENTIONS, Attention, Context, build_attention

__all__ = ["HPAM", "MERGES", "block_coverage", "block_positions", "select_blocks"]

MERGES = ("add", "concat", "multiply")


def block_coverage(mask: Tensor, m: int) -> Tensor:
    """Importance of every m x m block, Eq. 6: the mean of the mask over the block.

    Args:
        mask: support mask `[B, 1, H, W]`, float in [0, 1].
        m: block size; H and W are padded with 0 (uncovered) up to a multiple of m.

    Returns:
        `[B, N]` coverage in [0, 1], blocks in row-major order, `N = ceil(H/m) * ceil(W/m)`.
    """
    h, w = mask.shape[-2:]
    mask = F.pad(mask.float(), (0, -w % m, 0, -h % m))
    return F.avg_pool2d(mask, kernel_size=m, stride=m).flatten(1)  # sum over the block / m^2 (Eq. 6)


def select_blocks(coverage: Tensor, k: int, *, shuffle_ties: bool = False) -> Tensor:
    """Indices of the top-k blocks by coverage, Eq. 7: `[B, min(k, N)]`, highest coverage first.

    A block with higher coverage is never dropped for one with lower coverage. Blocks tied at the cut-off
    (every interior block of a large object has coverage 1) are not taken in raster order, which would keep
    only the object's top band:
    - `shuffle_ties` (training): a random order among equal coverages, from torch's global generator on the
      tensor's device;
    - otherwise (evaluation): of the n blocks tied at the cut-off value, of which r are needed, the ones of
      rank `floor((2i + 1) n / 2r)`, i < r, in raster order: evenly spaced, centred, deterministic.

    Args:
        coverage: `[B, N]` block coverage (Eq. 6), blocks in raster order.
        k: number of blocks to keep (clamped to N).
        shuffle_ties: break ties at random instead of by the evenly spaced choice.
    """
    bsz, n_blocks = coverage.shape
    k = min(k, n_blocks)
    if shuffle_ties:
        perm = torch.rand(bsz, n_blocks, device=coverage.device).argsort(dim=1)  # a random raster order
        order = torch.sort(coverage.gather(1, perm), dim=1, descending=True, stable=True).indices
        return perm.gather(1, order[:, :k])
    ranked = torch.sort(coverage, dim=1, descending=True, stable=True)  # ties in raster order
    cutoff = ranked.values[:, k - 1 : k]  # [B, 1], the k-th largest coverage
    above = (coverage > cutoff).sum(dim=1, keepdim=True)  # a < k blocks always kept, ranks 0..a-1
    tied = (coverage == cutoff).sum(dim=1, keepdim=True)  # n blocks at the cut-off, ranks a..a+n-1
    need = k - above  # r >= 1 of them are kept
    j = torch.arange(k, device=coverage.device).view(1, k)
    spread = above + torch.div((2 * (j - above) + 1) * tied, 2 * need, rounding_mode="floor")
    return ranked.indices.gather(1, torch.where(j < above, j, spread))


def block_positions(h: int, w: int, m: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Where each block's positions lie in a flattened `h x w` map padded up to a multiple of m (Eq. 5).

    Returns:
        `index` `[N, m*m]` (long): flat position `y * w + x` of position j of block i (0 where padded);
        `inside` `[N, m*m]` (bool): False for the zero padding. Blocks and positions are row-major.
    """
    hb, wb = -(-h // m), -(-w // m)
    y = torch.arange(hb, device=device)[:, None] * m + torch.arange(m, device=device)[None, :]  # [hb, m]
    x = torch.arange(wb, device=device)[:, None] * m + torch.arange(m, device=device)[None, :]  # [wb, m]
    y = y[:, None, :, None].expand(hb, wb, m, m).reshape(hb * wb, m * m)
    x = x[None, :, None, :].expand(hb, wb, m, m).reshape(hb * wb, m * m)
    inside = (y < h) & (x < w)
    return torch.where(inside, y * w + x, 0), inside


class HPAM(nn.Module):
    """Hybrid Prototype Alignment Module: `P_aw = P2P + P2B` (Eq. 10) at one pyramid bin per call.

    The projections `W_Q, W_K, W_V` (Eq. 1, `C x C`, no bias) are shared by every bin and by both branches.
    P2B's position embeddings `p_q, p_s` (Eq. 4) are one `b x b` map each per bin, broadcast over channels.
    `forward` works support first: it turns the masked support into each branch's attention context
    (`p2p_context`, `p2b_context`), drops it, then aligns the query. For the linear forms a context is a
    `C x C` matrix, and the value projection folds into it (`Psi(K) (W_V f)^T = (Psi(K) f^T) W_V^T`), so
    the values are never projected at every support position and the peak memory is a few `C x b x b` maps.
    P2B projects only the k*m*m support positions it keeps. On the query side, because a projection has no
    bias and an embedding is the same for every channel, `Q_q^p = W_Q (f_q + p_q) = Q_q + (W_Q 1) p_q^T`:
    a rank-one update of P2P's `Q_q` instead of a second projection.

    The attention form (paper Table 4) is one of `linear_relu` (ours), `softmax` (NA), `linear_bn` (NLA),
    `cosine`; see `jc2a.model.attention`. P2P and P2B each own an instance (NLA's BatchNorm is per branch,
    shared across bins).
    """

    def __init__(
        self,
        dim: int,
        bins: Sequence[int],
        topk: Sequence[int],
        block: Sequence[int],
        *,
        p2p: bool = True,
        p2b: bool = True,
        pos_embed: bool = True,
        attention: str = "linear_relu",
        merge: str = "add",
    ) -> None:
        """Args:
        dim: channels C of the query and support features.
        bins: pyramid bin sizes b, finest first, already scaled to the input (60, 30, 15, 8 at 473).
        topk: number of blocks k_l kept per bin (Eq. 7), clamped to the number of blocks.
        block: block size m_l per bin (Eq. 5).
        p2p: use point-to-point alignment (Eq. 3).
        p2b: use point-to-block alignment (Eqs. 4-9).
        pos_embed: learnable position embeddings in P2B (Eq. 4).
        attention: `linear_relu` (ours), `softmax` (NA), `linear_bn` (NLA) or `cosine`.
        merge: hybrid prototype (Eq. 10): `add` (paper), `concat` or `multiply`.
        """
        super().__init__()
        if not (p2p or p2b):
            raise ValueError("HPAM needs p2p or p2b (or both); with neither, build the model without an HPAM")
        if not len(bins) == len(topk) == len(block):
            raise ValueError(f"bins, topk and block need one entry per bin, got {len(bins)}, {len(topk)}, {len(block)}")
        if min(bins) < 1 or min(topk) < 1 or min(block) < 1:
            raise ValueError(f"bins, topk and block must be >= 1, got {list(bins)}, {list(topk)}, {list(block)}")
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}: expected one of {', '.join(ATTENTIONS)}")
        if merge not in MERGES:
            raise ValueError(f"unknown merge {merge!r}: expected one of {', '.join(MERGES)}")
        self.dim = dim
        self.bins = tuple(int(b) for b in bins)
        self.topk = tuple(int(k) for k in topk)
        self.block = tuple(int(m) for m in block)
        self.use_p2p, self.use_p2b, self.use_pos_embed = p2p, p2b, pos_embed and p2b
        self.merge = merge
        # Eq. 1: shared 1x1 projections W_Q, W_K, W_V.
        self.w_q = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.w_k = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.w_v = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.attn_p2p: Attention | None = build_attention(attention, dim) if p2p else None
        self.attn_p2b: Attention | None = build_attention(attention, dim) if p2b else None
        # Eq. 4: p_q, p_s in R^{b x b} per bin, broadcast over channels.
        if self.use_pos_embed:
            self.pos_q = nn.ParameterList([nn.Parameter(torch.zeros(1, 1, b, b)) for b in self.bins])
            self.pos_s = nn.ParameterList([nn.Parameter(torch.zeros(1, 1, b, b)) for b in self.bins])
            for p in (*self.pos_q, *self.pos_s):
                nn.init.trunc_normal_(p, std=0.02)
        else:
            self.pos_q = self.pos_s = None
        # Eq. 5: where each block's positions lie in the flattened map, per bin (fixed, moves with the module).
        for level, (b, m) in enumerate(zip(self.bins, self.block)):
            index, inside = block_positions(b, b, m) if p2b else (None, None)
            self.register_buffer(f"block_index_{level}", index, persistent=False)
            self.register_buffer(f"block_inside_{level}", None if b % m == 0 else inside, persistent=False)

    @property
    def out_dim(self) -> int:
        """Channels of `forward`'s output: 2C for `concat` of both branches, else C."""
        return 2 * self.dim if self.merge == "concat" and self.use_p2p and self.use_p2b else self.dim

    # ------------------------------------------------------------------ branches

    def p2p_context(self, f_s: Tensor) -> Context:
        """Support side of point-to-point alignment (Eq. 3): every masked support point is a key.

        Args:
            f_s: masked support `f~_s` `[B, C, N_s]`.

        Returns:
            The P2P attention context (for `linear_relu`, `softmax(K_s)^T V_s` `[B, C, C]`).
        """
        k = self._project(self.w_k, f_s)  # K_s = W_K f~_s (Eq. 1); V_s = W_V f~_s is left to the attention
        return self.attn_p2p.context(k.unsqueeze(2), f_s.unsqueeze(2), self._weight(self.w_v))  # one set

    def p2b_context(self, level: int, f_s: Tensor, mask_s: Tensor) -> Context:
        """Support side of point-to-block alignment (Eqs. 4-9): the top-k blocks, one key set per position j.

        Args:
            level: pyramid level (index into `bins`, `topk`, `block`).
            f_s: masked support `f~_s` `[B, C, b*b]`.
            mask_s: support mask `[B, 1, b, b]`.

        Returns:
            The P2B attention context (for `linear_relu`, `mean_j softmax(B(K_s^p)_j)^T B(V_s^p)_j` `[B, C, C]`).
        """
        bsz, c = f_s.shape[:2]
        m = self.block[level]
        coverage = block_coverage(mask_s, m)  # Eq. 6, [B, N_blocks]
        idx = select_blocks(coverage, self.topk[level], shuffle_ties=self.training)  # Eq. 7, [B, k]
        topk = idx.shape[1]
        # Flat support positions of the selected blocks (Eq. 5), grouped by position j in the block: [B, m*m*k].
        index = getattr(self, f"block_index_{level}")[idx].transpose(1, 2).reshape(bsz, 1, m * m * topk)
        f_s = f_s.gather(2, index.expand(-1, c, -1))  # B(f~_s | Topk), Eqs. 5, 7: [B, C, m*m*k]
        if self.use_pos_embed:
            f_s = f_s + self.pos_s[level].flatten()[index].to(f_s.dtype)  # f~_s^p = f~_s + p_s, Eq. 4
        # Selected blocks with no target ("pure empty regions") and the zero padding: zero features, hence zero
        # keys and values, so that they add exactly nothing to K^T V.
        keep = (coverage.gather(1, idx) > 0)[:, None, None, :]  # [B, 1, 1, k]
        inside = getattr(self, f"block_inside_{level}")
        if inside is not None:  # b is not a multiple of m: the last blocks hang over the padding
            keep = keep & inside[idx].transpose(1, 2)[:, None]  # [B, 1, m*m, k]
        f_s = (f_s.view(bsz, c, m * m, topk) * keep.to(f_s.dtype)).view(bsz, c, m * m * topk)
        k = self._project(self.w_k, f_s).view(bsz, c, m * m, topk)  # B(K_s^p), Eq. 8; one key set per j
        v = f_s.view(bsz, c, m * m, topk)  # B(V_s^p) = W_V B(f~_s^p), projected by the attention
        return self.attn_p2b.context(k, v, self._weight(self.w_v))  # the bracket of Eq. 9, mean over the m*m

    def p2p(self, q: Tensor, f_s: Tensor) -> Tensor:
        """Point-to-point alignment `P_aw^d` `[B, C, N]`, Eq. 3, from `Q_q` `[B, C, N]` and `f~_s` `[B, C, N_s]`."""
        return self.attn_p2p.align(q, self.p2p_context(f_s))

    def p2b(self, level: int, q: Tensor, f_s: Tensor, mask_s: Tensor) -> Tensor:
        """Point-to-block alignment `P_aw^s` `[B, C, N]`, Eq. 9, from `Q_q^p` `[B, C, N]`, `f~_s` `[B, C, b*b]`
        and the support mask `[B, 1, b, b]`."""
        return self.attn_p2b.align(q, self.p2b_context(level, f_s, mask_s))

    # ------------------------------------------------------------------ forward

    def _weight(self, conv: nn.Conv2d) -> Tensor:
        """The `[C, C]` matrix of a 1x1 projection."""
        return conv.weight.view(self.dim, self.dim)

    def _project(self, conv: nn.Conv2d, x: Tensor) -> Tensor:
        """A bias-free 1x1 convolution as one batched product: `[B, C, N] -> [B, C, N]` (Eq. 1)."""
        return torch.bmm(self._weight(conv).expand(x.shape[0], -1, -1), x)

    def forward(self, level: int, f_q: Tensor, f_s: Tensor, mask_s: Tensor) -> Tensor:
        """Aligned prototype at one bin.

        Args:
            level: pyramid level, an index into `bins` (finest first).
            f_q: query feature pooled to the bin `[B, C, b, b]`.
            f_s: masked support `f~_s = f_s (.) M_s` pooled to the bin `[B, C, b, b]` (mask first, then pool).
            mask_s: support mask pooled to the bin `[B, 1, b, b]`, float in [0, 1]; it ranks P2B's blocks (Eq. 6).

        Returns:
            `P_aw` `[B, out_dim, b, b]` (Eq. 10).
        """
        bsz, c, h, w = f_q.shape
        b = self.bins[level]
        if (h, w) != (b, b) or tuple(f_s.shape[-2:]) != (b, b) or tuple(mask_s.shape[-2:]) != (b, b):
            raise ValueError(
                f"HPAM level {level} expects {b}x{b} maps, got f_q {tuple(f_q.shape)}, "
                f"f_s {tuple(f_s.shape)}, mask_s {tuple(mask_s.shape)}"
            )
        # 1. Support: each branch's attention context from the masked support f~_s (pooled after masking, so no
        # background leaks into a coarse bin).
        masked = f_s.flatten(2)  # [B, C, N]
        ctx_d = self.p2p_context(masked) if self.use_p2p else None  # Eq. 3
        ctx_s = self.p2b_context(level, masked, mask_s) if self.use_p2b else None  # Eqs. 4-9
        del masked

        # 2. Query: Q_q = W_Q f_q (Eq. 1), aligned by P2P; Q_q^p = W_Q (f_q + p_q) = Q_q + (W_Q 1) p_q^T (Eqs. 4, 8),
        # aligned by P2B. 3. Hybrid prototype, Eq. 10 (`add` accumulates P_aw^s into P_aw^d in place).
        q = self._project(self.w_q, f_q.flatten(2))  # [B, C, N]
        out = self.attn_p2p.align(q, ctx_d) if self.use_p2p else None  # P_aw^d, Eq. 3
        if self.use_p2b:
            if self.use_pos_embed:
                w1 = self.w_q.weight.sum(dim=1).view(1, c, 1).to(q.dtype)
                q = torch.addcmul(q, w1, self.pos_q[level].view(1, 1, h * w).to(q.dtype))
            if out is not None and self.merge == "add":
                out = self.attn_p2b.align(q, ctx_s, acc=out)  # P_aw = P_aw^d + P_aw^s
            else:
                p_s = self.attn_p2b.align(q, ctx_s)  # P_aw^s, Eq. 9
                if out is None:
                    out = p_s
                elif self.merge == "multiply":
                    out = out * p_s
                else:
                    out = torch.cat([out, p_s], dim=1)
        return out.view(bsz, out.shape[1], h, w)
