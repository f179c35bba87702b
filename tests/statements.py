"""Independent statements of each attention method for the tests.

Each one writes, from the method's definition, the explicit boolean mask M[i, j] and the rotary
positions (qp[i, j], kp[i, j]) used for every (query, key) pair (or the weight transform), then
runs plain dense attention over all pairs. Query row i has key index I = Lk - Lq + i; positions
are the indices. Nothing here calls the block engine.
"""

import math

import torch
import torch.nn.functional as F


def pair_attention(q, k, v, rope, scale, mask, qp, kp, weights=None):
    """out[b,h,i] = sum_j w_ij v_j with logits rot(q_i, qp_ij) . rot(k_j, kp_ij) * scale.

    mask/qp/kp broadcast to (b, h, Lq, Lk). Rows with no visible key give zeros.
    """
    b, h, lq, d = q.shape
    lk = k.shape[2]
    group = h // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    shape = (b, h, lq, lk)
    mask, qp, kp = mask.expand(shape), qp.expand(shape), kp.expand(shape)
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            qr = q[bi, hi][:, None, :].expand(lq, lk, d) if rope is None else rope.rotate(
                q[bi, hi][:, None, :].expand(lq, lk, d), qp[bi, hi])
            kr = k[bi, hi][None].expand(lq, lk, d) if rope is None else rope.rotate(
                k[bi, hi][None].expand(lq, lk, d), kp[bi, hi])
            logits = (qr * kr).sum(-1) * scale
            m = mask[bi, hi]
            if weights is None:
                w = torch.softmax(logits.masked_fill(~m, float("-inf")), -1).nan_to_num(0.0)
            else:
                w = weights(logits, m)
            out[bi, hi] = w @ v[bi, hi]
    return out


def grids(lq, lk):
    i = torch.arange(lk - lq, lk)[:, None]
    j = torch.arange(lk)[None, :]
    return i, j


def dense(q, k, v, rope, scale):
    i, j = grids(q.shape[2], k.shape[2])
    return pair_attention(q, k, v, rope, scale, j <= i, i + 0 * j, j + 0 * i)


def s2_sf(q, k, v, rope, scale, group, shift, sink):
    h = q.shape[1]
    i, j = grids(q.shape[2], k.shape[2])
    s = torch.tensor([group // 2 if (shift and hh >= h // 2) else 0 for hh in range(h)]).view(1, h, 1, 1)
    same = (i + s) // group == (j + s) // group
    mask = (j <= i) & (same | (j < sink))
    return pair_attention(q, k, v, rope, scale, mask, i + 0 * j, j + 0 * i)


def dca(q, k, v, rope, scale, chunk_size, local_window):
    cl = chunk_size - local_window
    i, j = grids(q.shape[2], k.shape[2])
    gap = i // cl - j // cl
    intra = i % cl + 0 * j
    successive = torch.minimum(i % cl + cl, torch.tensor(chunk_size)) + 0 * j
    inter = torch.full_like(intra, chunk_size)
    qp = torch.where(gap == 0, intra, torch.where(gap == 1, successive, inter))
    return pair_attention(q, k, v, rope, scale, j <= i, qp, j % cl + 0 * i)


def self_extend(q, k, v, rope, scale, group, window):
    i, j = grids(q.shape[2], k.shape[2])
    near = i - j < window
    qp = torch.where(near, i + 0 * j, i // group + window - window // group + 0 * j)
    kp = torch.where(near, j + 0 * i, j // group + 0 * i)
    return pair_attention(q, k, v, rope, scale, j <= i, qp, kp)


def sinks(q, k, v, rope, scale, sink, window):
    i, j = grids(q.shape[2], k.shape[2])
    recent = i - j < window
    mask = (j <= i) & (recent | (j < sink))
    qp = torch.where(recent, i + 0 * j, torch.clamp(i, max=sink + window - 1) + 0 * j)
    return pair_attention(q, k, v, rope, scale, mask, qp, j + 0 * i)


def softplus(q, k, v, rope, scale, train_length, power):
    i, j = grids(q.shape[2], k.shape[2])

    def weights(logits, m):
        n = m.sum(-1, keepdim=True).clamp_min(1).double()
        lam = torch.log(n) / math.log(train_length)
        a = F.softplus(lam * logits.double()) * m
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
        a = a**power
        return (a / a.sum(-1, keepdim=True).clamp_min(1e-300)).to(logits.dtype)

    return pair_attention(q, k, v, rope, scale, j <= i, i + 0 * j, j + 0 * i, weights)


def block_score(qb, keys, score, part, values=None):
    """One query summary against one key block (rows, d), times sqrt(d): its mean key, Quest's per-channel
    bound, or the best of the means of its parts of ``part`` rows, or its best key; with the block's
    ``values``, the best key by logit + log |v| (its output share exp(logit) |v|)."""
    if score == "max" and values is not None:
        root_d = math.sqrt(len(qb))
        pairs = zip(keys, values, strict=True)
        return max(float(qb @ key) + root_d * math.log(float(val.norm())) for key, val in pairs)
    if score == "max":
        return max(float(qb @ key) for key in keys)
    if score == "mean":
        return float(qb @ keys.mean(0))
    if score == "minmax":
        return sum(max(float(qb[c] * keys[:, c].min()), float(qb[c] * keys[:, c].max())) for c in range(len(qb)))
    return max(float(qb @ keys[lo:lo + part].mean(0)) for lo in range(0, len(keys), part))


def select_merge(q, k, v, rope, scale, block, top_k, local, sink, mode, score="max", query_rows=8,
                 per_head=True, representatives=4, vote="mean", score_distance=512, value_norm=False, shared=0,
                 carry=0):
    """Brute force: explicit block summaries, scores, top-k and merged positions, in loops. With ``shared``,
    that many picks of every selection (head, or kv group) are the blocks most often among the selections'
    best two (ties to the lower block), the rest each selection's own best of the blocks not shared. With
    ``carry`` (one layer, nothing carried in), the blocks of largest softmax probability at temperature 1/2
    in any selection's scores instead."""
    b, h, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    group = h // hk
    first = lk - lq
    n_blocks = (lk - 1) // block + 1
    units = list(range(h)) if per_head else [g * group for g in range(hk)]  # each selection's first head
    i, j = grids(lq, lk)
    mask = torch.zeros(b, h, lq, lk, dtype=torch.bool)
    qp = (i + 0 * j).expand(b, h, lq, lk).clone()
    kp = (j + 0 * i).expand(b, h, lq, lk).clone()
    for bi in range(b):
        key_blocks = [[k[bi, g, jb * block:(jb + 1) * block] for jb in range(n_blocks)] for g in range(hk)]
        value_blocks = [[v[bi, g, jb * block:(jb + 1) * block] if value_norm else None for jb in range(n_blocks)]
                        for g in range(hk)]
        for ib in range(first // block, n_blocks):
            rows = [r for r in range(ib * block, (ib + 1) * block) if first <= r < lk]
            forced = {jb for jb in range(ib + 1) if jb < sink or jb >= ib - local}
            others = [jb for jb in range(ib + 1) if jb not in forced]
            ranked, sureness = {}, {}
            for unit in units:
                g = unit // group
                voters = [unit] if per_head else list(range(g * group, (g + 1) * group))
                summary_rows = rows if query_rows is None else rows[-query_rows:]
                qbars = [q[bi, m, [r - first for r in summary_rows]].mean(0) for m in voters]
                if score_distance is not None:  # the summary turned as a query that far from the keys
                    qbars = [rope.rotate(qb[None], torch.tensor([score_distance]))[0] for qb in qbars]
                per_voter = [{jb: block_score(qb, key_blocks[g][jb], score, block // representatives,
                                              value_blocks[g][jb]) / math.sqrt(d)
                              for jb in others} for qb in qbars]
                if vote == "softmax":  # each head's softmax over the candidates, summed
                    per_voter = [{jb: math.exp(s[jb] - max(s.values())) / sum(math.exp(x - max(s.values()))
                                                                             for x in s.values()) for jb in s}
                                 for s in per_voter]
                score_of = {jb: sum(s[jb] for s in per_voter) / len(per_voter) for jb in others}
                ranked[unit] = sorted(others, key=lambda jb: -score_of[jb])
                if carry and others:  # softmax at temperature 1/2
                    top = max(score_of.values())
                    total = sum(math.exp(2 * (x - top)) for x in score_of.values())
                    sureness[unit] = {jb: math.exp(2 * (score_of[jb] - top)) / total for jb in others}
            votes = {}
            for order in ranked.values():
                for jb in order[:min(2, top_k, n_blocks)]:
                    votes[jb] = votes.get(jb, 0) + 1
            if carry:
                votes = {jb: max(sure[jb] for sure in sureness.values()) for jb in others}
            common = min(shared + carry, top_k, n_blocks)
            common_blocks = set(sorted(votes, key=lambda jb: (-votes[jb], jb))[:common])
            for hh in range(h):
                unit = hh if per_head else hh // group * group
                own = [jb for jb in ranked[unit] if jb not in common_blocks]
                kept = forced | set(own[:min(top_k, n_blocks) - len(common_blocks)]) | common_blocks
                merged = [t for jb in sorted(kept) for t in range(jb * block, min((jb + 1) * block, lk))]
                rank = {t: n for n, t in enumerate(merged)}
                for r in rows:
                    for t in merged:
                        if t <= r:
                            mask[bi, hh, r - first, t] = True
                    if mode == "selected":
                        qp[bi, hh, r - first, :] = rank[r]
                        kp[bi, hh, r - first, merged] = torch.tensor([rank[t] for t in merged])
    return pair_attention(q, k, v, rope, scale, mask, qp, kp)
