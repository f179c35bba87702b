"""Where select_merge's merged-position turn costs: variants of a standalone forward kernel.

32K, 32 heads, head_dim 128, bf16, one select_merge table (``--table select_merge``, from random q and
k, as benchmarks/attention.py) or a random sorted one (``--table random``); each variant's best of a
few pipelines (do_bench), its error against a float64 statement of merged positions (heads 0-1),
the library's forward kernel on the same table (profiler) and SDPA causal, all in one run. Run on
the device: ``PYTHONPATH=src python benchmarks/turn_variants.py --out DIR``. Variants (``MODE``):

0  absolute positions, no turn               8  query turned in a product's result layout
1  key block turned after its load            9  as 8, bf16 arithmetic
2  as 1, cos/sin by angle addition           10  as 8, scale folded into the query (the library)
3  query turned in its load layout           11  as 10, packed bf16x2 turn (inline PTX)
4  key block turned in bf16 arithmetic       12  as 0, query in the result layout, scale folded
5  as 4, packed bf16x2 (inline PTX)          14  as 10, two slots per iteration
6  as 3, packed bf16x2 (inline PTX)
7  as 8, cos/sin by angle addition            15  as 10, next slot's query turned after the
                                                 value product is issued
                                             16  as 15, packed bf16x2 turn (inline PTX)
                                             17  as 10, the turn as products with diagonal
                                                 bf16 cos and sin matrices (tensor cores)
"""
import argparse
import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from longreach.attention.select_merge import select_blocks
from longreach.kernels.block_sparse import block_sparse_attention, compact
from longreach.kernels.tiles import load_halves


@triton.jit
def _fma2(a, b, c):
    return tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.bfloat16,
                                     is_pure=True, pack=2)

@triton.jit
def _mul2(a, b):
    return tl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.bfloat16,
                                     is_pure=True, pack=2)

@triton.jit
def _query_turn(qm1, qm2, qb1, qb2, c, s, PACKED: tl.constexpr):
    if PACKED:
        cb = tl.broadcast_to(c.to(qb1.dtype), qb1.shape)
        sb = tl.broadcast_to(s.to(qb1.dtype), qb1.shape)
        return _fma2(qb1, cb, _mul2(qb2, sb)), _fma2(qb2, cb, -_mul2(qb1, sb))
    return (qm1 * c + qm2 * s).to(qb1.dtype), (qm2 * c - qm1 * s).to(qb2.dtype)


@triton.jit
def _fwd(Q, K, V, Out, TABLE, COUNT, COS, SIN, CD, SD, L, WIDTH, qk_scale,
         BLOCK: tl.constexpr, HALF: tl.constexpr, MODE: tl.constexpr):
    m = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.arange(0, BLOCK)
    dh = tl.arange(0, HALF)
    q_idx = m * BLOCK + t
    q_ok = q_idx < L
    base = h * L * 2 * HALF
    q1, q2 = load_halves(Q + base, q_idx, q_ok, 2 * HALF, HALF)
    n = tl.load(COUNT + h * tl.num_programs(0) + m)
    table = TABLE + (h * tl.num_programs(0) + m) * WIDTH
    c = tl.load(COS + (WIDTH - n) * HALF + dh)[None, :]
    s = tl.load(SIN + (WIDTH - n) * HALF + dh)[None, :]
    cb = tl.load(COS + (WIDTH - 2) * HALF + dh)[None, :]
    sb = -tl.load(SIN + (WIDTH - 2) * HALF + dh)[None, :]
    if MODE >= 7:
        eye = (dh[:, None] == dh[None, :]).to(q1.dtype)
        qm1 = tl.dot(q1, eye)
        qm2 = tl.dot(q2, eye)
        if MODE >= 10:
            qm1 = qm1 * qk_scale
            qm2 = qm2 * qk_scale
        qb1 = qm1.to(q1.dtype)
        qb2 = qm2.to(q2.dtype)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc1 = tl.zeros([BLOCK, HALF], tl.float32)
    acc2 = tl.zeros([BLOCK, HALF], tl.float32)
    if MODE == 14:
        npair = (n - 1) // 2
        for pr in range(0, npair):
            sa = 2 * pr
            kba = tl.load(table + sa)
            kbb = tl.load(table + sa + 1)
            ka_idx = kba * BLOCK + t
            kb_idx = kbb * BLOCK + t
            ka1, ka2 = load_halves(K + base, ka_idx, ka_idx < L, 2 * HALF, HALF)
            kb1, kb2 = load_halves(K + base, kb_idx, kb_idx < L, 2 * HALF, HALF)
            ca = tl.load(COS + (sa - n + WIDTH) * HALF + dh)[None, :]
            sna = tl.load(SIN + (sa - n + WIDTH) * HALF + dh)[None, :]
            cbb = tl.load(COS + (sa + 1 - n + WIDTH) * HALF + dh)[None, :]
            snb = tl.load(SIN + (sa + 1 - n + WIDTH) * HALF + dh)[None, :]
            xa1, xa2 = (qm1 * ca + qm2 * sna).to(q1.dtype), (qm2 * ca - qm1 * sna).to(q2.dtype)
            xb1, xb2 = (qm1 * cbb + qm2 * snb).to(q1.dtype), (qm2 * cbb - qm1 * snb).to(q2.dtype)
            qka = tl.dot(xa2, tl.trans(ka2), tl.dot(xa1, tl.trans(ka1)))
            qkb = tl.dot(xb2, tl.trans(kb2), tl.dot(xb1, tl.trans(kb1)))
            m_new = tl.maximum(m_i, tl.maximum(tl.max(qka, 1), tl.max(qkb, 1)))
            pa = tl.math.exp2(qka - m_new[:, None])
            pb = tl.math.exp2(qkb - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(pa, 1) + tl.sum(pb, 1)
            va1, va2 = load_halves(V + base, ka_idx, ka_idx < L, 2 * HALF, HALF)
            vb1, vb2 = load_halves(V + base, kb_idx, kb_idx < L, 2 * HALF, HALF)
            pa = pa.to(V.dtype.element_ty)
            pb = pb.to(V.dtype.element_ty)
            acc1 = tl.dot(pb, vb1, tl.dot(pa, va1, acc1 * alpha[:, None]))
            acc2 = tl.dot(pb, vb2, tl.dot(pa, va2, acc2 * alpha[:, None]))
            m_i = m_new
        first = 2 * npair
    else:
        first = 0
    if MODE == 15 or MODE == 16:
        cl = tl.load(COS + (WIDTH - n) * HALF + dh)[None, :]
        sl = tl.load(SIN + (WIDTH - n) * HALF + dh)[None, :]
        a1n, a2n = _query_turn(qm1, qm2, qb1, qb2, cl, sl, MODE == 16)
    for slot in range(first, n):
        kb = tl.load(table + slot)
        k_idx = kb * BLOCK + t
        k_in = k_idx < L
        k1, k2 = load_halves(K + base, k_idx, k_in, 2 * HALF, HALF)
        a1, a2 = q1, q2
        if MODE == 1:
            cl = tl.load(COS + (slot - n + WIDTH) * HALF + dh)[None, :]
            sl = tl.load(SIN + (slot - n + WIDTH) * HALF + dh)[None, :]
            x1, x2 = k1.to(tl.float32), k2.to(tl.float32)
            k1, k2 = (x1 * cl - x2 * sl).to(k1.dtype), (x2 * cl + x1 * sl).to(k2.dtype)
        elif MODE == 2:
            x1, x2 = k1.to(tl.float32), k2.to(tl.float32)
            k1, k2 = (x1 * c - x2 * s).to(k1.dtype), (x2 * c + x1 * s).to(k2.dtype)
        elif MODE == 3:
            x1, x2 = q1.to(tl.float32), q2.to(tl.float32)
            a1, a2 = (x1 * c + x2 * s).to(q1.dtype), (x2 * c - x1 * s).to(q2.dtype)
        elif MODE == 4:
            cc, ss = c.to(tl.bfloat16), s.to(tl.bfloat16)
            k1, k2 = k1 * cc - k2 * ss, k2 * cc + k1 * ss
        elif MODE == 5:
            cc = tl.broadcast_to(c.to(tl.bfloat16), [BLOCK, HALF])
            ss = tl.broadcast_to(s.to(tl.bfloat16), [BLOCK, HALF])
            ns = tl.broadcast_to((-s).to(tl.bfloat16), [BLOCK, HALF])
            k1, k2 = _fma2(k1, cc, _mul2(k2, ns)), _fma2(k2, cc, _mul2(k1, ss))
        elif MODE == 6:
            cc = tl.broadcast_to(c.to(tl.bfloat16), [BLOCK, HALF])
            ss = tl.broadcast_to(s.to(tl.bfloat16), [BLOCK, HALF])
            ns = tl.broadcast_to((-s).to(tl.bfloat16), [BLOCK, HALF])
            a1, a2 = _fma2(q1, cc, _mul2(q2, ss)), _fma2(q2, cc, _mul2(q1, ns))
        elif MODE == 7:
            a1, a2 = (qm1 * c + qm2 * s).to(q1.dtype), (qm2 * c - qm1 * s).to(q2.dtype)
        elif MODE == 8:
            cl = tl.load(COS + (slot - n + WIDTH) * HALF + dh)[None, :]
            sl = tl.load(SIN + (slot - n + WIDTH) * HALF + dh)[None, :]
            a1, a2 = (qm1 * cl + qm2 * sl).to(q1.dtype), (qm2 * cl - qm1 * sl).to(q2.dtype)
        elif MODE == 10 or MODE == 14:
            cl = tl.load(COS + (slot - n + WIDTH) * HALF + dh)[None, :]
            sl = tl.load(SIN + (slot - n + WIDTH) * HALF + dh)[None, :]
            a1, a2 = (qm1 * cl + qm2 * sl).to(q1.dtype), (qm2 * cl - qm1 * sl).to(q2.dtype)
        elif MODE == 11:
            cl = tl.broadcast_to(tl.load(COS + (slot - n + WIDTH) * HALF + dh)[None, :].to(q1.dtype), [BLOCK, HALF])
            sl = tl.broadcast_to(tl.load(SIN + (slot - n + WIDTH) * HALF + dh)[None, :].to(q1.dtype), [BLOCK, HALF])
            a1, a2 = _fma2(qb1, cl, _mul2(qb2, sl)), _fma2(qb2, cl, -_mul2(qb1, sl))
        elif MODE == 17:
            diag = (slot - n + WIDTH) * HALF * HALF + dh[:, None] * HALF + dh[None, :]
            cm = tl.load(CD + diag)
            sm = tl.load(SD + diag)
            a1 = tl.dot(qb2, sm, tl.dot(qb1, cm)).to(q1.dtype)
            a2 = (tl.dot(qb2, cm) - tl.dot(qb1, sm)).to(q2.dtype)
        elif MODE == 15 or MODE == 16:
            a1, a2 = a1n, a2n
        elif MODE == 12:
            a1, a2 = qb1, qb2
        elif MODE == 9:
            cl = tl.load(COS + (slot - n + WIDTH) * HALF + dh)[None, :].to(q1.dtype)
            sl = tl.load(SIN + (slot - n + WIDTH) * HALF + dh)[None, :].to(q1.dtype)
            a1, a2 = qb1 * cl + qb2 * sl, qb2 * cl - qb1 * sl
        if MODE == 2 or MODE == 7:
            c, s = c * cb - s * sb, s * cb + c * sb
        qk = tl.dot(a2, tl.trans(k2), tl.dot(a1, tl.trans(k1)))
        if MODE < 10:
            qk = qk * qk_scale
        if slot == n - 1:
            qk = tl.where((k_idx[None, :] <= q_idx[:, None]) & k_in[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v1, v2 = load_halves(V + base, k_idx, k_in, 2 * HALF, HALF)
        p = p.to(V.dtype.element_ty)
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None])
        acc2 = tl.dot(p, v2, acc2 * alpha[:, None])
        m_i = m_new
        if MODE == 15 or MODE == 16:
            row = tl.minimum(slot + 1 - n + WIDTH, WIDTH - 1)
            cl = tl.load(COS + row * HALF + dh)[None, :]
            sl = tl.load(SIN + row * HALF + dh)[None, :]
            a1n, a2n = _query_turn(qm1, qm2, qb1, qb2, cl, sl, MODE == 16)
    ptr = Out + base + q_idx[:, None] * 2 * HALF + dh[None, :]
    tl.store(ptr, (acc1 / l_i[:, None]).to(Out.dtype.element_ty), mask=q_ok[:, None])
    tl.store(ptr + HALF, (acc2 / l_i[:, None]).to(Out.dtype.element_ty), mask=q_ok[:, None])


def table_for(L, H, B=64, topk=8, local=2, sink=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    nq = L // B
    width = topk + local + sink + 1
    tab = torch.full((H, nq, width), -1, dtype=torch.int32)
    cnt = torch.zeros((H, nq), dtype=torch.int32)
    for i in range(nq):
        forced = set(range(max(0, i - local), i + 1)) | set(range(min(sink, i + 1)))
        pool = [j for j in range(i) if j not in forced]
        for hh in range(H):
            pick = set(forced)
            if pool:
                idx = torch.randperm(len(pool), generator=g)[:topk].tolist()
                pick |= {pool[x] for x in idx}
            row = sorted(pick)
            tab[hh, i, :len(row)] = torch.tensor(row, dtype=torch.int32)
            cnt[hh, i] = len(row)
    return tab, cnt, width


def reference(q, k, v, tab, cnt, inv, B):
    nq, W = tab.shape
    D = q.shape[-1]
    idx = tab.long().clamp(min=0)
    kk = k.double().view(nq, B, D)[idx]
    vv = v.double().view(nq, B, D)[idx]
    delta = torch.arange(W, device=q.device)[None, :] - (cnt.long()[:, None] - 1)
    ang = (delta * B)[..., None].double() * inv.double()
    c, s = ang.cos()[:, :, None], ang.sin()[:, :, None]
    k1, k2 = kk[..., : D // 2], kk[..., D // 2:]
    kk = torch.cat([k1 * c - k2 * s, k2 * c + k1 * s], -1)
    sc = torch.einsum("ntd,nwsd->ntws", q.double().view(nq, B, D), kk) * D ** -0.5
    slot = torch.arange(W, device=q.device)[None, :]
    ok = (slot < cnt[:, None])[:, None, :, None].expand(nq, B, W, B).clone()
    diag = slot == cnt[:, None] - 1
    tri = torch.tril(torch.ones(B, B, dtype=torch.bool, device=q.device))
    ok &= ~diag[:, None, :, None] | tri[None, :, None, :]
    sc = sc.masked_fill(~ok, float("-inf")).reshape(nq, B, W * B).softmax(-1).view(nq, B, W, B)
    return torch.einsum("ntws,nwsd->ntd", sc, vv).reshape(nq * B, D)


def library(q, k, v, tab, cnt, inv, B):
    """ms of the library's forward kernel (profiler) on the same table, merged and absolute positions."""
    out = {}
    for name, freq in (("merged", inv), ("absolute", None)):
        fn = functools.partial(block_sparse_attention, q[None], k[None], v[None], tab[None], block_size=B,
                               inv_freq=freq)
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
        ev = [e for e in prof.key_averages() if "_fwd_kernel" in e.key]
        out[name] = sum(e.device_time_total for e in ev) / 20 / 1000
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", default="1,0,8,10,11,12,14")
    parser.add_argument("--table", choices=("select_merge", "random"), default="select_merge")
    args = parser.parse_args()
    L, H, D, B = 32768, 32, 128, 64
    torch.manual_seed(0)
    q, k, v = (torch.randn(H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if args.table == "random":
        tab, cnt, width = (x.cuda() if torch.is_tensor(x) else x for x in table_for(L, H, B))
    else:
        tab, cnt = compact(select_blocks(q[None], k[None], block_size=B, top_k=8, local=2, sink=1))
        tab, cnt = tab[0].contiguous(), cnt[0].contiguous()
        width = tab.shape[-1]
    pairs = cnt.sum().item()
    flops = 4 * pairs * B * B * D
    print("width", width, "pairs per query block", pairs / cnt.numel())
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, device="cuda").float() / D)
    ang = torch.arange(1 - width, 1, device="cuda").float()[:, None] * B * inv
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    cd, sd = (torch.diag_embed(x).to(torch.bfloat16).contiguous() for x in (cos, sin))
    res = {}
    exact = torch.stack([reference(q[h], k[h], v[h], tab[h], cnt[h], inv, B) for h in range(2)])
    ref = None
    for mode in [int(m) for m in args.modes.split(",")]:
        best = None
        for warps, stages in [(4, 2), (4, 3), (4, 4), (8, 2), (8, 3)]:
            o = torch.empty_like(q)
            launch = functools.partial(_fwd[(L // B, H)], q, k, v, o, tab, cnt, cos, sin, cd, sd, L, width,
                                       D**-0.5 * 1.4426950408889634, BLOCK=B, HALF=D // 2, MODE=mode,
                                       num_warps=warps, num_stages=stages)
            try:
                kern = launch()
                torch.cuda.synchronize()
                ms = do_bench(launch, warmup=50, rep=300)
            except Exception as e:  # a pipeline that does not compile for this variant
                print(mode, warps, stages, "failed", str(e)[:200])
                continue
            if best is None or ms < best[0]:
                best = (ms, warps, stages, o.clone(), kern)
        ms, warps, stages, o, kern = best
        (args.out / f"mode{mode}.ttgir").write_text(kern.asm["ttgir"])
        if mode == 1:
            ref = o.float()
        err = (o.float() - ref).abs().max().item()
        e64 = (o[:2].double() - exact).abs()
        res[mode] = dict(ms=ms, tflops=flops / ms / 1e9, warps=warps, stages=stages, max_err_vs_mode1=err,
                         max_err_fp64=e64.max().item(), mean_err_fp64=e64.mean().item())
        print(mode, res[mode], flush=True)
    res["library"] = library(q, k, v, tab, cnt, inv, B)
    print("library", res["library"])
    # SDPA causal forward in the same run
    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, q[None], k[None], v[None],
                             is_causal=True)
    sd = do_bench(sdpa, warmup=20, rep=200)
    res["sdpa"] = dict(ms=sd, tflops=4 * H * L * L / 2 * D / sd / 1e9)
    print("sdpa", res["sdpa"])
    (args.out / "turn_variants.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
