"""The four attention forms of HPAM (paper Table 4) as operators over query points and key/value sets."""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ATTENTIONS",
    "Attention",
    "Context",
    "CosineAttention",
    "LinearAttention",
    "SoftmaxAttention",
    "build_attention",
    "project_values",
]


Context = Union[Tensor, Tuple[Tensor, Tensor]]


def _at_least_fp32(x: Tensor) -> Tensor:
    """`x` in fp32 if it is in a narrower float type (fp16, bf16 under autocast); fp32 and fp64 stay as they are."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def project_values(v: Tensor, w_v: Optional[Tensor]) -> Tensor:
    """`W_V v` for `v` `[B, C, J, S]` and `w_v` `[C_out, C]` (or `v` itself when `w_v` is None)."""
    if w_v is None:
        return v
    b, c, j, s = v.shape
    return torch.bmm(w_v.expand(b, -1, -1), v.reshape(b, c, j * s)).view(b, -1, j, s)


class Attention(nn.Module):
    """Attention of every query point over J key/value sets of S positions each, averaged over the J sets.

    P2P (Eq. 3) is the case J = 1, S = H*W (every support position); P2B (Eq. 9) is J = m*m (one set per
    position inside a block), S = k (the selected blocks). It runs in two steps, `context` on the support
    and `align` on the query, so that a caller can drop the keys and values before touching the query: the
    linear forms shrink them to a `C x C` matrix. The value projection may be handed over with the
    unprojected values (`V = W_V v`): the linear forms fold it into that matrix, `(Psi(K) v^T) W_V^T`,
    instead of projecting every support position. Softmaxes and normalisations run in fp32, also under
    autocast, and are cast back to the dtype they came in.
    """

    def context(self, k: Tensor, v: Tensor, w_v: Optional[Tensor] = None) -> Context:
        """What `align` needs of the support, from keys `[B, C, J, S]` and values `W_V v`, v `[B, C, J, S]`."""
        raise NotImplementedError

    def align(self, q: Tensor, ctx: Context, acc: Optional[Tensor] = None) -> Tensor:
        """`[B, C, N]`: `(1/J) sum_j Attn(q, k[:, :, j], v[:, :, j])` for queries `[B, C, N]`, added in place to
        `acc` `[B, C, N]` when one is given (a sum of alignments without a temporary)."""
        raise NotImplementedError


class LinearAttention(Attention):
    """Linear attention, Eq. 2: `Phi(Q) (Psi(K)^T V)`, with `Psi` = softmax over the S key positions.

    `Phi` = ReLU is ours (Eqs. 3, 9); `Phi` = BatchNorm over the channels of Q is NLA, the "normal linear
    attention" of efficient attention [30]. Because the form is linear, the mean over the J key sets is the
    mean of their `C x C` contexts: `Phi(Q) mean_j(softmax(K_j)^T V_j)`. No `N x S` matrix is ever formed:
    cost O((N + J*S) C^2), memory O((N + J*S) C + C^2).
    """

    def __init__(self, dim: int, phi: str = "relu") -> None:
        """Args:
        dim: channels C.
        phi: `"relu"` (ours) or `"bn"` (NLA: `BatchNorm1d(dim)` over the channels of Q, batch statistics
            taken over the batch and the N query points, i.e. BatchNorm2d over the `b x b` map).
        """
        super().__init__()
        if phi not in ("relu", "bn"):
            raise ValueError(f"phi must be 'relu' or 'bn', got {phi!r}")
        self.norm = nn.BatchNorm1d(dim) if phi == "bn" else None

    def phi(self, q: Tensor) -> Tensor:
        """`Phi(Q)`: ReLU (ours) or BatchNorm in fp32 (NLA), `[B, C, N]`."""
        if self.norm is None:
            return F.relu(q)
        # A training batch with one value per channel (batch 1 at a 1x1 bin) has no variance: normalise it
        # with the running statistics instead of failing.
        norm = self.norm
        out = F.batch_norm(
            _at_least_fp32(q),
            norm.running_mean,
            norm.running_var,
            norm.weight,
            norm.bias,
            training=self.training and q.shape[0] * q.shape[2] > 1,
            momentum=0.1 if norm.momentum is None else norm.momentum,
            eps=norm.eps,
        )
        return out.to(q.dtype)

    def context(self, k: Tensor, v: Tensor, w_v: Optional[Tensor] = None) -> Tensor:
        """`mean_j softmax_S(K_j)^T V_j`, the bracket of Eqs. 3 and 9: `[B, C_k, C_v]`."""
        b, c, j, s = k.shape
        psi = _at_least_fp32(k).softmax(dim=-1).to(k.dtype)  # Psi: softmax over the S positions of each set, fp32
        ctx = torch.bmm(psi.reshape(b, c, j * s), v.reshape(b, v.shape[1], j * s).transpose(1, 2))
        if w_v is not None:
            ctx = torch.matmul(ctx, w_v.t())  # Psi(K) (W_V v)^T = (Psi(K) v^T) W_V^T
        return ctx / j if j > 1 else ctx

    def align(self, q: Tensor, ctx: Tensor, acc: Optional[Tensor] = None) -> Tensor:
        """`ctx^T Phi(Q)`, `[B, C, N]` (Eq. 2; Eq. 3 for J = 1, Eq. 9 for J = m*m), plus `acc` if given."""
        if acc is not None:
            return acc.baddbmm_(ctx.transpose(1, 2).to(acc.dtype), self.phi(q).to(acc.dtype))
        return torch.bmm(ctx.transpose(1, 2), self.phi(q).to(ctx.dtype))


class SoftmaxAttention(Attention):
    """Normal attention (NA): `V softmax(Q^T K / sqrt(C))^T`, softmax over the S keys of each set.

    The textbook form with the `N x S` score matrix of every set materialised (for P2P that is `HW x HW`);
    the scale is folded into Q. Its context is the keys and values themselves. Cost O(N J S C), memory
    O(N J S).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = 1.0 / math.sqrt(dim)

    def context(self, k: Tensor, v: Tensor, w_v: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The keys and the projected values themselves."""
        return k, project_values(v, w_v)

    def align(self, q: Tensor, ctx: tuple[Tensor, Tensor], acc: Optional[Tensor] = None) -> Tensor:
        """`[B, C, N]` for queries `[B, C, N]` and the keys and values `[B, C, J, S]`, plus `acc` if given."""
        k, v = ctx
        b, c, j, s = k.shape
        n = q.shape[2]
        scores = torch.bmm((q * self.scale).transpose(1, 2), k.reshape(b, c, j * s))  # Q^T K: [B, N, J*S]
        attn = _at_least_fp32(scores.view(b, n, j, s)).softmax(dim=-1).to(scores.dtype)  # fp32, over each set's S keys
        del scores
        # sum_j V_j A_j^T is one product over the concatenated sets: [B, C, J*S] x [B, J*S, N].
        out = torch.bmm(v.reshape(b, v.shape[1], j * s), attn.view(b, n, j * s).transpose(1, 2))
        out = out / j if j > 1 else out
        return out if acc is None else acc.add_(out)


class CosineAttention(Attention):
    """Cosine interaction: weights `w(n, s) = cos(q_n, k_s) / S`, output `sum_s w(n, s) v_s`, mean over J.

    Query and key vectors are L2-normalised over the channels (fp32; a zero vector stays zero, so an empty
    key adds nothing but still counts in S). No softmax, no learned normalisation: each weight lies in
    `[-1/S, 1/S]`. Being bilinear, it is computed in the linear order `(K_hat V^T / (J S))^T Q_hat`, so it
    costs what the linear forms cost and never forms the `N x S` matrix.
    """

    def context(self, k: Tensor, v: Tensor, w_v: Optional[Tensor] = None) -> Tensor:
        """`K_hat V^T / (J S)`: `[B, C_k, C_v]`."""
        b, c, j, s = k.shape
        k_hat = F.normalize(_at_least_fp32(k), dim=1).to(k.dtype)
        ctx = torch.bmm(k_hat.reshape(b, c, j * s), v.reshape(b, v.shape[1], j * s).transpose(1, 2))
        if w_v is not None:
            ctx = torch.matmul(ctx, w_v.t())  # K_hat (W_V v)^T = (K_hat v^T) W_V^T
        return ctx / (j * s)

    def align(self, q: Tensor, ctx: Tensor, acc: Optional[Tensor] = None) -> Tensor:
        """`ctx^T Q_hat`, `[B, C, N]`, plus `acc` if given."""
        q_hat = F.normalize(_at_least_fp32(q), dim=1)
        if acc is not None:
            return acc.baddbmm_(ctx.transpose(1, 2).to(acc.dtype), q_hat.to(acc.dtype))
        return torch.bmm(ctx.transpose(1, 2), q_hat.to(ctx.dtype))


ATTENTIONS = ("linear_relu", "softmax", "linear_bn", "cosine")


def build_attention(name: str, dim: int) -> Attention:
    """One of `ATTENTIONS`: `linear_relu` (ours), `softmax` (NA), `linear_bn` (NLA), `cosine`."""
    if name == "linear_relu":
        return LinearAttention(dim, phi="relu")
    if name == "linear_bn":
        return LinearAttention(dim, phi="bn")
    if name == "softmax":
        return SoftmaxAttention(dim)
    if name == "cosine":
        return CosineAttention()
    raise ValueError(f"unknown attention {name!r}: expected one of {', '.join(ATTENTIONS)}")
