"""Shared machinery of the attention references: positions, GQA, and blocked attention.

Conventions for every method: q is (batch, heads, Lq, d); k and v are (batch, kv_heads, Lk, d) with
heads a multiple of kv_heads (grouped-query attention: query head h reads kv head h // group).
The queries are the last Lq of the Lk keys, so query row i sits at key index Lk - Lq + i; this
covers prefill (Lq = Lk) and decoding (Lq < Lk) alike. Causality is by index, positions (the
rotary position ids, which methods may remap) are separate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..positions import Rope

# A chunk of query blocks is sized so that its score tile stays under this many elements.
TILE_ELEMENTS = 1 << 20
# A GPU runs each tile's few dozen kernels in microseconds, so small tiles leave it launch-bound.
TILE_ELEMENTS_CUDA = 1 << 24
# Keys are rotated this many positions at a time, so rotation temporaries stay small.
ROTATE_CHUNK = 4096


def tile_budget(device: torch.device) -> int:
    """How many score elements one chunk of work may hold on ``device``."""
    return TILE_ELEMENTS_CUDA if device.type == "cuda" else TILE_ELEMENTS


@dataclass(frozen=True)
class Positions:
    """Rotary position ids of the queries (batch, Lq) and keys (batch, Lk), and a key mask.

    ``key_mask`` (batch, Lk) is True for real keys; None means no padding.
    """

    query: Tensor
    key: Tensor
    key_mask: Tensor | None = None

    @staticmethod
    def contiguous(batch: int, q_len: int, k_len: int, device: torch.device | str = "cpu") -> Positions:
        """Positions 0..Lk-1 for the keys and the last Lq of them for the queries."""
        key = torch.arange(k_len, device=device).expand(batch, k_len)
        return Positions(key[:, k_len - q_len :], key)


def check_shapes(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> int:
    """Validate shapes and return the GQA group size (query heads per kv head); causal attention's
    queries are the last of the keys, so there are no more of them than keys."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q (b, h, Lq, d) and k, v (b, h_kv, Lk, d) of equal shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"batch and head_dim of q {tuple(q.shape)} and k {tuple(k.shape)} must match")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"more queries ({q.shape[2]}) than keys ({k.shape[2]})")
    return q.shape[1] // k.shape[1]


def repeat_kv(x: Tensor, group: int) -> Tensor:
    """(b, h_kv, L, d) -> (b, h_kv * group, L, d), kv head j serving query heads j*group..."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def require_rope(rope: Rope | None, method: str) -> Rope:
    if rope is None:
        raise ValueError(
            f"attention method {method!r} remaps rotary positions and needs un-rotated q and k with a rope; "
            "configure the model with longreach.extend(model, attention=...)"
        )
    return rope


def rotate(rope: Rope | None, x: Tensor, positions: Tensor) -> Tensor:
    """Apply ``rope`` at ``positions``; with no rope, q and k arrive already rotated."""
    return x if rope is None else rope.rotate(x, positions)


def rotate_keys(rope: Rope | None, k: Tensor, positions: Tensor) -> Tensor:
    """Rotate k (b, h, L, d) at positions (b, L) in slices of ROTATE_CHUNK positions into one output."""
    if rope is None:
        return k
    out = torch.empty_like(k)
    for lo in range(0, k.shape[2], ROTATE_CHUNK):
        hi = lo + ROTATE_CHUNK
        out[:, :, lo:hi] = rope.rotate(k[:, :, lo:hi], positions[:, None, lo:hi])
    return out


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim where ``mask`` holds; rows with no visible key give zeros."""
    logits = logits.masked_fill(~mask, float("-inf"))
    peak = logits.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).min)
    weights = torch.exp(logits - peak)
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)


@dataclass(frozen=True)
class Tile:
    """One chunk of query blocks and the key columns each of them reads.

    Rows: R query blocks of B rows; columns: C keys per query block. Shapes broadcast over
    (batch, heads, R): ``q`` (b, h, R, B, d), ``v`` (b, h, R, C, d), ``k`` a tuple of the method's key
    variants (each (b, h, R, C, d), e.g. keys rotated under two position maps), ``q_index`` (1, 1, R, B)
    key indices of the rows, ``k_index`` (b|1, h|1, R, C) key indices of the columns (-1 for none),
    ``q_pos``/``k_pos`` their rotary positions, ``valid`` (b|1, h|1, R, B, C) which pairs may attend.
    """

    q: Tensor
    k: tuple[Tensor, ...]
    v: Tensor
    q_index: Tensor
    k_index: Tensor
    q_pos: Tensor
    k_pos: Tensor
    valid: Tensor


Logits = Callable[[Tile], Tensor]
Weights = Callable[[Tile, Tensor], Tensor]


def _pad_to_blocks(x: Tensor, block: int, dim: int) -> Tensor:
    extra = -x.shape[dim] % block
    if not extra:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _pad_front(x: Tensor, count: int, dim: int) -> Tensor:
    if not count:
        return x
    shape = list(x.shape)
    shape[dim] = count
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _gather_columns(x: Tensor, blocks: Tensor, block: int) -> Tensor:
    """x (b, h, Lk_padded, ...) and blocks (b, h, R, K) -> (b, h, R, K * block, ...); -1 reads block 0."""
    b, h, length = x.shape[:3]
    tail = x.shape[3:]
    xb = x.reshape(b, h, length // block, block, *tail)
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    hi = torch.arange(h, device=x.device).view(1, h, 1, 1)
    out = xb[bi, hi, blocks.clamp_min(0)]
    return out.reshape(*blocks.shape[:3], blocks.shape[3] * block, *tail)


def blocked_attention(
    q: Tensor,
    keys: tuple[Tensor, ...],
    v: Tensor,
    positions: Positions,
    *,
    block_size: int,
    key_blocks: Tensor | None,
    logits: Logits,
    weights: Weights | None = None,
) -> Tensor:
    """Attention of each query block over a list of key blocks, chunked to bound memory.

    ``keys`` holds the method's key variants, each (b, h_kv, Lk, d): keys whose rotary position does
    not depend on the query are rotated once, before the loop, under each position map the method
    uses; the logits function picks among them per (query, key) pair.
    ``key_blocks`` (b, h, nq, K) lists, per query block (blocks of the key-index grid that the queries
    occupy, i.e. query index Lk - Lq + i lies in block (Lk - Lq + i) // B), the key blocks it reads,
    -1 for unused slots; None means every key up to the chunk's last query (dense span, no gather;
    then ``block_size`` only bounds the rows per chunk).
    ``logits(tile)`` returns scores (b, h, R, B, C); pairs that are not ``tile.valid`` (causal,
    listed and not padding) are masked here. ``weights(tile, scores)`` replaces the softmax
    (softplus attention). Returns (b, h, Lq, d). Memory is O(L) plus one chunk's tile.
    """
    batch, heads, q_len, dim = q.shape
    k_len = v.shape[2]
    group = check_shapes(q, keys[0], v)
    keys, v = tuple(repeat_kv(k, group) for k in keys), repeat_kv(v, group)
    device = q.device
    tile_elements = tile_budget(device)
    B = block_size
    if key_blocks is None:  # rows play no role in a dense span: take as many as fit one tile
        B = max(1, min(block_size, tile_elements // (batch * heads * k_len)))
    first = k_len - q_len
    start_block, end_block = first // B, (k_len - 1) // B + 1
    n_q_blocks = end_block - start_block
    # Query rows laid on the key-index grid: row slot t of block j holds query index j*B + t.
    lead = first - start_block * B
    q_grid = _pad_to_blocks(_pad_front(q, lead, 2), B, 2).view(batch, heads, n_q_blocks, B, dim)
    q_pos_grid = _pad_to_blocks(_pad_front(positions.query, lead, 1), B, 1).view(batch, 1, n_q_blocks, B)
    k_pad, v_pad = tuple(_pad_to_blocks(k, B, 2) for k in keys), _pad_to_blocks(v, B, 2)
    k_pos_pad = _pad_to_blocks(positions.key, B, 1)
    key_ok = positions.key_mask
    if key_ok is None:
        key_ok = torch.ones(batch, k_len, dtype=torch.bool, device=device)
    key_ok = _pad_to_blocks(key_ok.to(torch.bool), B, 1)
    key_index = _pad_to_blocks(torch.arange(k_len, device=device), B, 0)
    key_index[k_len:] = -1
    columns = k_len if key_blocks is None else key_blocks.shape[-1] * B
    per_block = batch * heads * B * max(columns, 1)
    chunk = max(1, tile_elements // per_block)
    out = q.new_empty(batch, heads, n_q_blocks, B, dim)
    for lo in range(0, n_q_blocks, chunk):
        hi = min(lo + chunk, n_q_blocks)
        rows = torch.arange(lo, hi, device=device)
        q_index = ((rows + start_block) * B)[:, None] + torch.arange(B, device=device)
        q_index = torch.where((q_index >= first) & (q_index < k_len), q_index, -1)
        if key_blocks is None:
            span = min(k_len, (hi + start_block) * B)
            kt, vt = tuple(k[:, :, None, :span] for k in keys), v[:, :, None, :span]
            k_index = torch.arange(span, device=device).view(1, 1, 1, span)
            k_pos = positions.key[:, None, None, :span]
            ok = key_ok[:, None, None, :span]
        else:
            sel = key_blocks[:, :, lo:hi]
            kt = tuple(_gather_columns(k, sel, B) for k in k_pad)
            vt = _gather_columns(v_pad, sel, B)
            expand = sel.shape[:3]
            k_index = _gather_columns(key_index.expand(*expand[:2], -1), sel, B)
            k_index = torch.where((sel >= 0).repeat_interleave(B, dim=-1), k_index, -1)
            k_pos = _gather_columns(k_pos_pad[:, None].expand(-1, sel.shape[1], -1), sel, B)
            ok = _gather_columns(key_ok[:, None].expand(-1, sel.shape[1], -1), sel, B)
        qi = q_index.view(1, 1, hi - lo, B)
        valid = (k_index[..., None, :] >= 0) & (k_index[..., None, :] <= qi[..., None]) & (qi[..., None] >= 0)
        valid = valid & ok[..., None, :]
        tile = Tile(q_grid[:, :, lo:hi], kt, vt, qi, k_index, q_pos_grid[:, :, lo:hi], k_pos, valid)
        scores = logits(tile)
        probs = masked_softmax(scores, valid) if weights is None else weights(tile, scores)
        out[:, :, lo:hi] = (probs.to(vt.dtype) @ vt).to(out.dtype)
    out = out.view(batch, heads, n_q_blocks * B, dim)
    return out[:, :, first - start_block * B : first - start_block * B + q_len]


def listed_attention(q: Tensor, k: Tensor, v: Tensor, key_blocks: Tensor, *, block_size: int, scale: float
                     ) -> Tensor:
    """Non-causal attention of each query block over its listed key blocks, one softmax per query row.

    q (b, h, Lq, d) and k/v (b, h_kv, Lk, d) are separate sequences (self or cross attention, already
    rotated); query block i is rows i*B..; ``key_blocks`` (b, h, ceil(Lq/B), K) lists key-block ids, -1
    unused. The reference of the block-sparse kernel's ``causal=False`` path, chunked over query blocks
    so memory stays O(L K B). Returns (b, h, Lq, d); a row with nothing listed gives zeros.
    """
    batch, heads, q_len, dim = q.shape
    k_len, group = k.shape[2], check_shapes(q, k, v, causal=False)
    k, v = _pad_to_blocks(repeat_kv(k, group), block_size, 2), _pad_to_blocks(repeat_kv(v, group), block_size, 2)
    q_grid = _pad_to_blocks(q, block_size, 2).view(batch, heads, -1, block_size, dim)
    n_q, width = q_grid.shape[2], key_blocks.shape[-1]
    key_index = (key_blocks.clamp_min(0)[..., None] * block_size + torch.arange(block_size, device=q.device))
    listed = ((key_blocks[..., None] >= 0) & (key_index < k_len)).flatten(-2)
    chunk = max(1, tile_budget(q.device) // max(1, batch * heads * block_size * width * block_size))
    out = q.new_empty(batch, heads, n_q, block_size, dim)
    for lo in range(0, n_q, chunk):
        rows = slice(lo, lo + chunk)
        kt, vt = (_gather_columns(x, key_blocks[:, :, rows], block_size) for x in (k, v))
        logits = (q_grid[:, :, rows].float() @ kt.float().transpose(-1, -2)) * scale
        weights = masked_softmax(logits, listed[:, :, rows, None, :])
        out[:, :, rows] = (weights @ vt.float()).to(q.dtype)
    return out.flatten(2, 3)[:, :, :q_len]


def dot(tile_q: Tensor, tile_k: Tensor, scale: float) -> Tensor:
    """Scaled scores (..., B, C) between rows (..., B, d) and columns (..., C, d), at least float32."""
    acc = torch.promote_types(tile_q.dtype, torch.float32)
    return (tile_q.to(acc) @ tile_k.to(acc).transpose(-1, -2)) * scale


def rotated_keys(rope: Rope | None, k: Tensor, positions: Positions) -> tuple[Tensor]:
    """The single key variant of methods that keep every key at its own position."""
    return (rotate_keys(rope, k, positions.key),)


def plain_logits(rope: Rope | None, scale: float) -> Logits:
    """Scores of queries rotated at their own positions against the keys of :func:`rotated_keys`."""

    def logits(t: Tile) -> Tensor:
        return dot(rotate(rope, t.q, t.q_pos), t.k[0], scale)

    return logits
