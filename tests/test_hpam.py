"""HPAM (Eqs. 1-10): shapes, P2P/P2B identities, top-k blocks, empty supports, gradients, autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from jc2a.model.attention import ATTENTIONS
from jc2a.model.hpam import HPAM, MERGES, block_coverage, block_positions, select_blocks

C = 16
BINS = [9, 5, 3, 2]
TOPK = [6, 4, 2, 1]
BLOCK = [2, 2, 2, 1]


def _inputs(b: int, bsz: int = 2, seed: int = 0, dim: int = C) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query feature `[B, C, b, b]`, masked support `f~_s` `[B, C, b, b]` and its soft mask `[B, 1, b, b]` (with
    exact zeros)."""
    g = torch.Generator().manual_seed(seed)
    f_q = torch.randn(bsz, dim, b, b, generator=g)
    f_s = torch.randn(bsz, dim, b, b, generator=g)
    mask = torch.rand(bsz, 1, b, b, generator=g) * (torch.rand(bsz, 1, b, b, generator=g) > 0.4)
    return f_q, f_s * mask, mask


def _hpam(seed: int = 0, **kwargs) -> HPAM:
    torch.manual_seed(seed)
    kwargs = {"bins": BINS, "topk": TOPK, "block": BLOCK, **kwargs}
    return HPAM(C, **kwargs)


# ---------------------------------------------------------------------------- naive reference (Eqs. 1-9)


def _ref_attention(form: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query set `q [C, N]` over one key/value set `k, v [C, S]`, written the slow, obvious way."""
    if form == "linear_relu":
        return (k.softmax(dim=1) @ v.T).T @ F.relu(q)
    if form == "softmax":
        return v @ (q.T @ k / math.sqrt(q.shape[0])).softmax(dim=1).T
    if form == "cosine":
        weights = F.normalize(q, dim=0).T @ F.normalize(k, dim=0) / k.shape[1]  # [N, S]
        return v @ weights.T
    raise AssertionError(form)


def _ref_topk(cover: list[float], k: int) -> list[int]:
    """Eq. 7 with the evaluation tie rule: blocks above the k-th coverage, then evenly spaced ones among the tie."""
    k = min(k, len(cover))
    cut = sorted(cover, reverse=True)[k - 1]
    above = sorted((n for n in range(len(cover)) if cover[n] > cut), key=lambda n: -cover[n])
    tied = [n for n in range(len(cover)) if cover[n] == cut]  # raster order
    need = k - len(above)
    return above + [tied[(2 * i + 1) * len(tied) // (2 * need)] for i in range(need)]


def _ref_p2b(hpam: HPAM, form: str, level: int, f_q, f_s, mask) -> torch.Tensor:
    """Eqs. 4-9 literally: embed, pad, project the embedded maps, cut blocks, top-k, per-position attention."""
    b, m, topk = hpam.bins[level], hpam.block[level], hpam.topk[level]
    p_q = hpam.pos_q[level] if hpam.use_pos_embed else 0.0
    p_s = hpam.pos_s[level] if hpam.use_pos_embed else 0.0
    f_qp = f_q + p_q  # Eq. 4
    f_sp = f_s + p_s
    pad = -b % m
    f_sp, mask_p = F.pad(f_sp, (0, pad, 0, pad)), F.pad(mask, (0, pad, 0, pad))
    q, k, v = hpam.w_q(f_qp), hpam.w_k(f_sp), hpam.w_v(f_sp)  # Eq. 8: projections of the embedded maps
    nb = (b + pad) // m
    out = []
    for i in range(f_q.shape[0]):
        blocks_k, blocks_v, cover = [], [], []
        for r in range(nb):
            for c in range(nb):
                window = (slice(r * m, (r + 1) * m), slice(c * m, (c + 1) * m))
                blocks_k.append(k[i][:, window[0], window[1]].reshape(C, m * m))
                blocks_v.append(v[i][:, window[0], window[1]].reshape(C, m * m))
                cover.append(mask_p[i, 0][window].sum().item() / m**2)  # Eq. 6
        order = _ref_topk(cover, topk)  # Eq. 7
        acc = 0.0
        for j in range(m * m):
            kj = torch.stack([blocks_k[n][:, j] * (cover[n] > 0) for n in order], dim=1)  # [C, k]
            vj = torch.stack([blocks_v[n][:, j] * (cover[n] > 0) for n in order], dim=1)
            acc = acc + _ref_attention(form, q[i].flatten(1), kj, vj)
        out.append(acc / (m * m))  # Eq. 9
    return torch.stack(out).view(f_q.shape)


# ---------------------------------------------------------------------------- construction and shapes


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize(
    "switches", [(True, True, True), (True, True, False), (True, False, False), (False, True, True)]
)
def test_output_shapes(attention: str, merge: str, switches: tuple[bool, bool, bool]) -> None:
    p2p, p2b, pos_embed = switches
    hpam = _hpam(p2p=p2p, p2b=p2b, pos_embed=pos_embed, attention=attention, merge=merge)
    expected = 2 * C if (merge == "concat" and p2p and p2b) else C
    assert hpam.out_dim == expected
    for level, b in enumerate(BINS):
        f_q, f_s, mask = _inputs(b)
        out = hpam(level, f_q, f_s, mask)
        assert out.shape == (2, expected, b, b)
        assert torch.isfinite(out).all()


def test_parameters_follow_the_switches() -> None:
    full = _hpam()
    assert [tuple(p.shape) for p in full.pos_q] == [(1, 1, b, b) for b in BINS]
    assert [tuple(p.shape) for p in full.pos_s] == [(1, 1, b, b) for b in BINS]
    n_proj = 3 * C * C  # W_Q, W_K, W_V shared by every bin and both branches (Eq. 1)
    assert sum(p.numel() for p in full.parameters()) == n_proj + 2 * sum(b * b for b in BINS)
    assert sum(p.numel() for p in _hpam(pos_embed=False).parameters()) == n_proj
    assert sum(p.numel() for p in _hpam(p2b=False).parameters()) == n_proj
    assert (
        sum(p.numel() for p in _hpam(attention="linear_bn").parameters())
        == n_proj + 2 * sum(b * b for b in BINS) + 2 * 2 * C
    )  # one BatchNorm (weight, bias) per branch


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"p2p": False, "p2b": False}, "p2p or p2b"),
        ({"attention": "flash"}, "unknown attention"),
        ({"merge": "sum"}, "unknown merge"),
        ({"topk": [6, 4, 2]}, "one entry per bin"),
        ({"block": [2, 2, 0, 1]}, ">= 1"),
    ],
)
def test_bad_configurations_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _hpam(**kwargs)


def test_wrong_map_size_raises() -> None:
    f_q, f_s, mask = _inputs(5)
    with pytest.raises(ValueError, match="expects 9x9"):
        _hpam()(0, f_q, f_s, mask)


# ---------------------------------------------------------------------------- P2P (Eq. 3)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_p2p_is_invariant_to_permuting_support_positions(attention: str) -> None:
    hpam = _hpam(p2b=False, attention=attention)
    f_q, f_s, mask = _inputs(9)
    perm = torch.randperm(81, generator=torch.Generator().manual_seed(1))
    f_s_perm = f_s.flatten(2)[..., perm].view_as(f_s)
    mask_perm = mask.flatten(2)[..., perm].view_as(mask)
    out = hpam(0, f_q, f_s, mask)
    out_perm = hpam(0, f_q, f_s_perm, mask_perm)
    torch.testing.assert_close(out_perm, out, rtol=1e-5, atol=1e-5)
    assert out.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("attention", ["linear_relu", "softmax", "cosine"])
def test_p2p_matches_the_naive_formula(attention: str) -> None:
    hpam = _hpam(p2b=False, attention=attention)
    f_q, f_s, mask = _inputs(5)
    q, k, v = hpam.w_q(f_q), hpam.w_k(f_s), hpam.w_v(f_s)  # Eq. 1
    expected = torch.stack(
        [_ref_attention(attention, q[i].flatten(1), k[i].flatten(1), v[i].flatten(1)) for i in range(2)]
    ).view_as(f_q)
    torch.testing.assert_close(hpam(1, f_q, f_s, mask), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- P2B (Eqs. 4-9)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_p2b_with_unit_blocks_and_every_position_equals_p2p(attention: str) -> None:
    # m = 1, k = every position, no embedding: the key/value set is the whole masked support, reordered.
    b = 7
    p2p = HPAM(C, [b], [b * b], [1], p2b=False, attention=attention)
    p2b = HPAM(C, [b], [b * b], [1], p2p=False, pos_embed=False, attention=attention)
    p2b.load_state_dict(p2p.state_dict(), strict=False)
    for module in (p2p.attn_p2p, p2b.attn_p2b):
        module.eval()  # NLA: the same (running) statistics in both branches
    f_q, f_s, mask = _inputs(b, bsz=3)
    torch.testing.assert_close(p2b(0, f_q, f_s, mask), p2p(0, f_q, f_s, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["linear_relu", "softmax", "cosine"])
@pytest.mark.parametrize("level", [0, 1, 3])  # 9 with m=2 (padded to 10), 5 with m=2 (padded to 6), 2 with m=1
def test_p2b_matches_the_naive_formula(attention: str, level: int) -> None:
    hpam = _hpam(p2p=False, attention=attention)
    with torch.no_grad():
        for p in (*hpam.pos_q, *hpam.pos_s):
            p.normal_(0.0, 0.5)  # embeddings that matter
    f_q, f_s, mask = _inputs(BINS[level], seed=3)
    mask[0, 0, :4, :4] = 1.0  # a few blocks tied at full coverage
    f_s = f_s.clone()
    f_s[0, :, :4, :4] += 1.0
    hpam.eval()  # the evaluation tie rule (training breaks ties at random)
    expected = _ref_p2b(hpam, attention, level, f_q, f_s, mask)
    torch.testing.assert_close(hpam(level, f_q, f_s, mask), expected, rtol=1e-5, atol=1e-5)


def test_block_coverage_is_the_mean_mask_over_zero_padded_blocks() -> None:
    mask = torch.rand(2, 1, 5, 5)
    cov = block_coverage(mask, 2)  # 5x5 padded to 6x6: 3x3 blocks
    assert cov.shape == (2, 9)
    torch.testing.assert_close(cov[:, 0], mask[:, 0, :2, :2].sum(dim=(1, 2)) / 4)  # Eq. 6
    torch.testing.assert_close(cov[:, 5], mask[:, 0, 2:4, 4:].sum(dim=(1, 2)) / 4)  # right edge: half padding
    torch.testing.assert_close(cov[:, 8], mask[:, 0, 4, 4] / 4)  # corner: three quarters padding


def test_block_positions_cover_the_map_once() -> None:
    index, inside = block_positions(5, 5, 2)
    assert index.shape == inside.shape == (9, 4)
    assert sorted(index[inside].tolist()) == list(range(25))
    assert index[1].tolist() == [2, 3, 7, 8]  # block (0, 1), row-major inside the block
    assert inside[8].tolist() == [True, False, False, False]


def test_topk_selects_the_most_covered_blocks() -> None:
    # 8x8 mask, 2x2 blocks: 16 blocks in row-major order. Known coverages, with a tie between blocks 3 and 12.
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 2:4, 2:4] = 1.0  # block 5: coverage 1
    mask[0, 0, 4:6, 4:6] = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # block 10: 0.75
    mask[0, 0, 0:2, 6:8] = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # block 3: 0.5
    mask[0, 0, 6:8, 0:2] = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # block 12: 0.5
    mask[0, 0, 0, 0] = 1.0  # block 0: 0.25
    cov = block_coverage(mask, 2)
    assert cov[0, [5, 10, 3, 12, 0]].tolist() == [1.0, 0.75, 0.5, 0.5, 0.25]
    assert select_blocks(cov, 3).tolist() == [[5, 10, 12]]  # of the tie (3, 12), the centred choice
    assert select_blocks(cov, 4).tolist() == [[5, 10, 3, 12]]
    assert select_blocks(cov, 5).tolist() == [[5, 10, 3, 12, 0]]
    assert select_blocks(cov, 100).shape == (1, 16)  # k clamped to the number of blocks
    # 11 zero blocks tied at the cut-off, 3 needed: ranks 1, 5, 9 of the tie (floor((2i+1) * 11 / 6))
    zero = [n for n in range(16) if n not in (5, 10, 3, 12, 0)]
    assert select_blocks(cov, 8).tolist() == [[5, 10, 3, 12, 0, zero[1], zero[5], zero[9]]]
    torch.manual_seed(0)
    for _ in range(20):  # training: the tie is broken either way, the better blocks always kept
        picked = select_blocks(cov, 3, shuffle_ties=True).tolist()[0]
        assert picked[:2] == [5, 10] and picked[2] in (3, 12)
    picks = {select_blocks(cov, 3, shuffle_ties=True)[0, 2].item() for _ in range(40)}
    assert picks == {3, 12}


@pytest.mark.parametrize("shuffle_ties", [False, True])
def test_topk_of_a_large_object_spreads_over_it(shuffle_ties: bool) -> None:
    # Bin 60, m = 4, k = 60: a full-image mask gives 225 blocks all at coverage 1. Raster order would keep the
    # top four block rows only.
    torch.manual_seed(0)
    cov = block_coverage(torch.ones(2, 1, 60, 60), 4)
    assert cov.shape == (2, 225) and bool((cov == 1).all())
    idx = select_blocks(cov, 60, shuffle_ties=shuffle_ties)
    assert idx.shape == (2, 60)
    for row in idx:
        assert len(set(row.tolist())) == 60
        rows = {n // 15 for n in row.tolist()}
        assert len(rows) >= 0.8 * 15, sorted(rows)
        cols = [n % 15 for n in row.tolist()]
        assert max(cols) - min(cols) + 1 >= 0.8 * 15, sorted(set(cols))  # and across its width
    if not shuffle_ties:
        assert torch.equal(idx, select_blocks(cov, 60))  # deterministic
        assert idx[0].tolist() == [(2 * i + 1) * 225 // 120 for i in range(60)]
    else:
        assert not torch.equal(idx[0], idx[1])  # random per support


@pytest.mark.parametrize("shuffle_ties", [False, True])
def test_topk_never_drops_a_better_block(shuffle_ties: bool) -> None:
    g = torch.Generator().manual_seed(2)
    cov = torch.randint(0, 5, (16, 40), generator=g) / 4.0  # many ties at every level
    torch.manual_seed(0)
    for k in (1, 7, 13, 40):
        idx = select_blocks(cov, k, shuffle_ties=shuffle_ties)
        kept = cov.gather(1, idx)
        assert bool((kept[:, :-1] >= kept[:, 1:]).all())  # highest first
        dropped = cov.scatter(1, idx, float("-inf"))  # coverage of the blocks left out
        assert bool((kept.amin(dim=1) >= dropped.amax(dim=1)).all())
        assert all(len(set(r)) == k for r in idx.tolist())


def test_hpam_breaks_ties_at_random_only_in_training() -> None:
    hpam = HPAM(C, [8], [4], [2], p2p=False)
    f_q, f_s, _ = _inputs(8, bsz=1)
    mask = torch.ones(1, 1, 8, 8)  # 16 blocks tied at coverage 1, 4 kept
    hpam.eval()
    out = hpam(0, f_q, f_s, mask)
    torch.testing.assert_close(hpam(0, f_q, f_s, mask), out, rtol=0, atol=0)
    hpam.train()
    torch.manual_seed(0)
    first = hpam(0, f_q, f_s, mask)
    torch.manual_seed(0)
    torch.testing.assert_close(hpam(0, f_q, f_s, mask), first, rtol=0, atol=0)  # the global seed governs it
    outs = [hpam(0, f_q, f_s, mask) for _ in range(4)]
    assert any(not torch.allclose(o, first) for o in outs)


def test_p2b_uses_only_the_selected_blocks() -> None:
    # One support, four 2x2 blocks of a 4x4 map, k = 2: features outside the two best blocks do not matter.
    hpam = HPAM(C, [4], [2], [2], p2p=False)
    f_q, f_s, _ = _inputs(4, bsz=1)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1.0  # block 0: coverage 1
    mask[..., 2:, 2:] = 0.5  # block 3: coverage 0.5
    mask[..., 0, 2] = 0.25  # block 1: coverage 1/16, not selected
    out = hpam(0, f_q, f_s, mask)
    f_s2 = f_s.clone()
    f_s2[..., :2, 2:] += 10.0  # block 1 changes
    torch.testing.assert_close(hpam(0, f_q, f_s2, mask), out)
    f_s2[..., 2:, 2:] += 1.0  # block 3 (selected) changes
    assert not torch.allclose(hpam(0, f_q, f_s2, mask), out)


# ---------------------------------------------------------------------------- empty supports


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("switches", [(True, True), (True, False), (False, True)])
def test_empty_support_mask_gives_finite_outputs(attention: str, switches: tuple[bool, bool]) -> None:
    hpam = _hpam(p2p=switches[0], p2b=switches[1], attention=attention)
    for level, b in enumerate(BINS):
        f_q, f_s, _ = _inputs(b)
        assert torch.isfinite(hpam(level, f_q, f_s, torch.zeros(2, 1, b, b))).all()


def test_empty_support_mask_adds_nothing_in_p2b() -> None:
    hpam = _hpam()
    with torch.no_grad():
        for p in hpam.pos_s:
            p.normal_(0.0, 1.0)  # without the zeroing, empty blocks would carry W_K p_s, W_V p_s
    only_p2p = _hpam(p2b=False)
    only_p2b = _hpam(p2p=False)
    only_p2b.load_state_dict(hpam.state_dict(), strict=False)
    for level, b in enumerate(BINS):
        f_q, f_s, _ = _inputs(b)
        empty = torch.zeros(2, 1, b, b)
        assert torch.equal(only_p2b(level, f_q, f_s, empty), torch.zeros(2, C, b, b))
        torch.testing.assert_close(hpam(level, f_q, f_s, empty), only_p2p(level, f_q, f_s, empty), rtol=0, atol=0)


def test_selected_empty_blocks_contribute_exactly_zero() -> None:
    # 6x6 map, 2x2 blocks, k = 5 but only two blocks covered: three selected blocks are empty.
    hpam = HPAM(C, [6], [5], [2], p2p=False)
    f_q, f_s, _ = _inputs(6, bsz=1)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., :2, :2] = 1.0  # block 0
    mask[..., 4:, 4:] = 0.5  # block 8
    idx = select_blocks(block_coverage(mask, 2), 5)
    assert idx.tolist() == [[0, 8, 2, 4, 6]]  # blocks 2, 4, 6 are selected with zero coverage
    hpam.eval()
    out = hpam(0, f_q, f_s, mask)
    with torch.no_grad():
        hpam.pos_s[0][..., :2, 4:6] += 5.0  # embeddings inside the selected empty blocks 2 and 4
        hpam.pos_s[0][..., 2:4, 2:4] += 5.0
    torch.testing.assert_close(hpam(0, f_q, f_s, mask), out, rtol=0, atol=0)
    with torch.no_grad():
        hpam.pos_s[0][..., 0, 0] += 5.0  # an embedding inside a covered block does matter
    assert not torch.allclose(hpam(0, f_q, f_s, mask), out)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_batch_one_and_one_by_one_bin(attention: str) -> None:
    hpam = HPAM(C, [1], [3], [2], attention=attention).train()
    f_q, f_s, mask = _inputs(1, bsz=1)
    out = hpam(0, f_q, f_s, mask)
    assert out.shape == (1, C, 1, 1)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------- training and precision


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_gradients_reach_projections_and_position_embeddings(attention: str) -> None:
    hpam = _hpam(attention=attention)
    f_q, f_s, mask = _inputs(5)
    out = hpam(1, f_q, f_s, mask)
    (out * torch.randn_like(out)).sum().backward()
    for name in ("w_q", "w_k", "w_v"):
        grad = getattr(hpam, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert hpam.pos_q[1].grad.abs().sum() > 0
    assert hpam.pos_s[1].grad.abs().sum() > 0
    assert hpam.pos_q[0].grad is None  # another bin's embedding is untouched


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("merge", MERGES)
def test_gradients_match_finite_differences(attention: str, merge: str) -> None:
    # fp64 gradcheck through both branches (the in-place sum of Eq. 10 included), b = 3 padded to m = 2.
    torch.manual_seed(0)
    hpam = HPAM(4, [3], [3], [2], attention=attention, merge=merge).double()
    with torch.no_grad():
        for p in (*hpam.pos_q, *hpam.pos_s):
            p.normal_(0.0, 0.5)
    f_q, f_s, mask = (t.double() for t in _inputs(3, bsz=2, dim=4))
    f_q.requires_grad_(True)
    f_s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: hpam(0, a, b, mask), (f_q, f_s), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_bf16_autocast_is_finite_and_close_to_fp32(attention: str) -> None:
    hpam = _hpam(attention=attention).eval()
    f_q, f_s, mask = _inputs(9)
    ref = hpam(0, f_q, f_s, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hpam(0, f_q, f_s, mask)
    out = out.float()
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
