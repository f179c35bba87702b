"""Which cached tokens a policy keeps or attends to: plain functions over tensors.

Shapes: b batch, h query heads, h_kv key/value heads (h = h_kv * g), L cached tokens, d head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..positions import Rope


def sink_window(length: int, sink: int, window: int, device: torch.device | str = "cpu") -> Tensor:
    """StreamingLLM's kept indices (ascending): the first ``sink`` and the last ``window`` of ``length``."""
    if length <= sink + window:
        return torch.arange(length, device=device)
    return torch.cat([torch.arange(sink, device=device), torch.arange(length - window, length, device=device)])


def heavy_hitters(scores: Tensor, budget: int, recent: int) -> Tensor:
    """H2O's kept indices (b, h_kv, budget), ascending, from accumulated attention ``scores`` (b, h_kv, L).

    The last ``recent`` tokens always stay; of the older ones the ``budget - recent`` with the highest
    accumulated score stay (ties: the earlier token). With L <= budget everything stays.
    """
    b, h, length = scores.shape
    if length <= budget:
        return torch.arange(length, device=scores.device).expand(b, h, length)
    heavy = budget - recent
    old = scores[..., : length - recent]
    top = old.topk(heavy, dim=-1, sorted=False).indices if heavy > 0 else old.new_zeros(b, h, 0, dtype=torch.long)
    tail = torch.arange(length - recent, length, device=scores.device).expand(b, h, recent)
    return torch.cat([top, tail], dim=-1).sort(dim=-1).values


def soft_votes(query: Tensor, keys: Tensor, scale: float, key_mask: Tensor | None = None) -> Tensor:
    """TokenSelect's per-head soft voting: (b, L) = sum over heads of softmax_L(qbar . k * scale).

    ``query`` (b, h, Lq, d) is averaged over its rows (the chunk's fingerprint); ``keys`` (b, h_kv, L, d)
    are scored per query head without copying them per head; ``key_mask`` (L,) leaves out empty slots.
    """
    b, h, _, d = query.shape
    h_kv = keys.shape[1]
    fingerprint = query.mean(2).view(b, h_kv, h // h_kv, d)
    logits = (fingerprint @ keys.transpose(-1, -2)).float() * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, float("-inf"))
    return logits.softmax(-1).sum(dim=(1, 2))


def top_tokens(votes: Tensor, n_init: int, n_local: int, top_k: int) -> Tensor:
    """The ``top_k`` most voted tokens (b, top_k) between the first ``n_init`` and the last ``n_local``."""
    length = votes.shape[-1]
    candidates = votes[:, n_init : length - n_local]
    take = min(top_k, candidates.shape[-1])
    return candidates.topk(take, dim=-1).indices.sort(dim=-1).values + n_init


def attended_slots(votes: Tensor, length: Tensor, n_init: int, top_k: int, n_local: int) -> tuple[Tensor, Tensor]:
    """A static cache step's attended slots (b, n_init + top_k + n_local), the top-k part unordered: the
    first ``n_init``, the ``top_k`` candidates (slots n_init up to ``length`` - n_local) with the most
    ``votes`` (b, L) and the last ``n_local``; with whether each holds a token that counts (b, same)."""
    b, slots = votes.shape
    index = torch.arange(slots, device=votes.device)
    candidate = (index >= n_init) & (index < length - n_local)
    picked = votes.masked_fill(~candidate, float("-inf")).topk(top_k, dim=-1, sorted=False).indices
    init = index[:n_init].expand(b, -1)
    local = (length - n_local + index[:n_local]).expand(b, -1)
    return (torch.cat([init, picked, local.clamp_min(0)], dim=-1),
            torch.cat([init < length, candidate[picked], local >= n_init], dim=-1))


def attended(picked: Tensor, length: int, n_init: int, n_local: int) -> Tensor:
    """The attention set (b, n_init + k + n_local), ascending: [0, n_init), ``picked`` (b, k), the last n_local."""
    b = picked.shape[0]
    init = torch.arange(min(n_init, length), device=picked.device).expand(b, -1)
    local = torch.arange(max(n_init, length - n_local), length, device=picked.device).expand(b, -1)
    return torch.cat([init, picked, local], dim=-1)


def similar(fingerprint: Tensor, stored: Tensor, threshold: float) -> Tensor:
    """TokenSelect's selection-cache test per batch row, (b,) bool: the cosine similarity of a query
    fingerprint (b, ...) and the ``stored`` one (b, ...) that made the last selection is at least
    ``threshold``. A zero ``stored`` row means no selection yet: False there."""
    a, s = fingerprint.flatten(1).float(), stored.flatten(1).float()
    dot, norms = (a * s).sum(-1), a.square().sum(-1) * s.square().sum(-1)
    return (s.abs().amax(-1) > 0) & (dot >= threshold * norms.sqrt())


def attention_with_mass(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, rope: Rope | None,
                        scale: float, rows: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """Causal dense attention and the attention mass each key received (H2O's score increment).

    q (b, h, Lq, d) and k/v (b, h_kv, Lk, d) un-rotated, the queries being the last Lq keys; positions
    q_pos (b, Lq), k_pos (b, Lk). Returns the output (b, h, Lq, d) and the mass (b, h_kv, Lk): softmax
    probabilities summed over query rows and the query heads of each kv group. Query rows are taken in
    slices of at most ``rows`` score elements, so no (Lq, Lk) tensor exists for long prefills.
    """
    b, h, q_len, d = q.shape
    h_kv, k_len = k.shape[1], k.shape[2]
    if rope is not None:
        q, k = rope.rotate(q, q_pos[:, None]), rope.rotate(k, k_pos[:, None])
    grouped = q.view(b, h_kv, h // h_kv, q_len, d)
    keys = k.transpose(-1, -2)[:, :, None]
    out, mass = [], torch.zeros(b, h_kv, k_len, device=q.device, dtype=torch.float32)
    step = max(1, rows // (b * h * k_len))
    for lo in range(0, q_len, step):
        logits = (grouped[:, :, :, lo : lo + step] @ keys).float() * scale
        index = torch.arange(k_len - q_len + lo, k_len - q_len + lo + logits.shape[3], device=q.device)
        logits = logits.masked_fill(torch.arange(k_len, device=q.device) > index[:, None], float("-inf"))
        probs = logits.softmax(-1)
        out.append(probs.to(v.dtype) @ v[:, :, None])
        mass += probs.sum(dim=(2, 3))
    return torch.cat(out, dim=3).view(b, h, q_len, d), mass


def decode_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, scale: float) -> Tensor:
    """One query row per head over keys already rotated: q (b, h, 1, d) rotated, k/v (b, h_kv, L, d),
    key_mask (b, L) True where a key counts. Grouped: keys are read once per kv head, never copied
    per query head. Returns (b, h, 1, d)."""
    b, h, _, d = q.shape
    h_kv = k.shape[1]
    logits = (q.view(b, h_kv, h // h_kv, d) @ k.transpose(-1, -2)).float() * scale
    logits = logits.masked_fill(~key_mask[:, None, None], float("-inf"))
    return (logits.softmax(-1).to(v.dtype) @ v).view(b, h, 1, d)
