"""Kernel benchmarks on one CUDA GPU; prints markdown tables.

    python3 bench/bench_kernels.py            # decode/prefill attention and the small ops vs torch
    python3 bench/bench_kernels.py --sweep    # also time tile/split settings of the attention kernel

Decode attention is timed in CUDA graphs (GPU time without Python launch overhead; enough copies of
the batch that the K/V cannot stay in L2) and eagerly (do_bench, launch overhead included), and
reported as K/V bytes read / time against the device-to-device copy bandwidth (a 1 GiB torch copy,
bytes read + written) and against torch SDPA on K/V already gathered into a dense tensor (gather not
timed). Prefill is causal FLOPs (4 * Hq * D * n^2 / 2 per sequence) / time against torch SDPA (flash)
on dense tensors. Shapes are Llama-3-8B's: 32 q heads, 8 kv heads, head_dim 128, bf16, block size 16.
Eager times are medians of triton.testing.do_bench.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402

import kernels  # noqa: E402
from kernels.activation import silu_and_mul_ref  # noqa: E402
from kernels.paged_attention import _config, paged_attention_triton  # noqa: E402
from kernels.rms_norm import rms_norm_ref  # noqa: E402
from kernels.rotary import rotary_embedding_ref  # noqa: E402
from kernels.store_kvcache import store_kvcache_ref  # noqa: E402

DEV = torch.device("cuda")
DT = torch.bfloat16
HQ, HKV, D, BS = 32, 8, 128, 16


def ms(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_tbps():
    x = torch.empty(2 ** 30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    t = ms(lambda: y.copy_(x))
    del x, y
    return 2 * 2 ** 30 / (t * 1e-3) / 1e12


def paged(batch, ctx, q_len, seed=0):
    """batch sequences of ctx tokens each, the last q_len of them new; blocks shuffled over the pool."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    nb = batch * (ctx // BS)
    k_cache = torch.randn(nb, BS, HKV, D, generator=g, device=DEV).to(DT)
    v_cache = torch.randn(nb, BS, HKV, D, generator=g, device=DEV).to(DT)
    tables = torch.randperm(nb, device=DEV, generator=g).int().view(batch, ctx // BS)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    qsl = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=DEV)
    q = torch.randn(batch * q_len, HQ, D, generator=g, device=DEV).to(DT)
    return q, k_cache, v_cache, tables, seq_lens, qsl


def dense_kv(k_cache, v_cache, tables):
    b, nblk = tables.shape
    k = k_cache[tables.long()].view(b, nblk * BS, HKV, D).transpose(1, 2).contiguous()
    v = v_cache[tables.long()].view(b, nblk * BS, HKV, D).transpose(1, 2).contiguous()
    return k, v


def graph_us_or_nan(label, fns, **kw):
    """graph_us, or NaN (with a line saying why) where capture or the op fails."""
    try:
        return graph_us(fns, **kw)
    except Exception as e:  # noqa: BLE001
        print(label, "failed:", type(e).__name__, e)
        return float("nan")


def graph_us(fns, iters=10):
    """Microseconds per call of fns (each on its own data) captured back to back into one CUDA graph:
    the GPU time without Python launch overhead, as an engine running decode under CUDA graphs sees it.
    Callers pass enough independent copies that the data (>= 256 MB in all) cannot sit in the 50 MB L2."""
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / (iters * len(fns))


def copies_for(nbytes):
    return min(64, max(1, -(-256 * 2 ** 20 // nbytes)))


def decode_rows(copy_bw):
    rows = []
    for batch in (1, 64, 256):
        for ctx in (1024, 4096):
            kv_bytes = 2 * batch * ctx * HKV * D * DT.itemsize
            data = [paged(batch, ctx, 1, seed=i) for i in range(copies_for(kv_bytes))]
            sc = D ** -0.5
            t = graph_us([lambda b=b: kernels.paged_attention(*b, sc, 1) for b in data])
            t1 = graph_us([lambda b=b: paged_attention_triton(*b, sc, 1, num_segments=1) for b in data])
            te = ms(lambda: kernels.paged_attention(*data[0], sc, 1)) * 1e3
            segs = _config(1, HQ // HKV, D, batch, HKV, DEV)[-1]
            dense = [(b[0].view(batch, HQ, 1, D),) + dense_kv(b[1], b[2], b[3]) for b in data]
            ts = graph_us_or_nan("sdpa", [lambda x=x: F.scaled_dot_product_attention(*x, scale=sc, enable_gqa=True)
                                          for x in dense])
            bw = lambda tt: kv_bytes / (tt * 1e-6) / 1e12  # noqa: E731
            rows.append(f"| {batch} | {ctx} | {segs} | {t:.1f} | {bw(t):.2f} | {100 * bw(t) / copy_bw:.0f}% "
                        f"| {t1:.1f} ({bw(t1):.2f}) | {ts:.1f} ({bw(ts):.2f}) | {te:.1f} |")
            del data, dense
            torch.cuda.empty_cache()
    return rows


def prefill_rows():
    rows = []
    total = 16384
    for n in (1024, 4096, 8192):
        batch = total // n
        q, kc, vc, bt, sl, qsl = paged(batch, n, n)
        flops = batch * 4 * HQ * D * n * n / 2
        t = ms(lambda: kernels.paged_attention(q, kc, vc, bt, sl, qsl, D ** -0.5, n))
        k, v = dense_kv(kc, vc, bt)
        k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)   # flash backend: equal heads
        qd = q.view(batch, n, HQ, D).transpose(1, 2).contiguous()
        ts = ms(lambda: F.scaled_dot_product_attention(qd, k, v, is_causal=True, scale=D ** -0.5))
        rows.append(f"| {batch} x {n} | {t * 1e3:.0f} | {flops / (t * 1e-3) / 1e12:.0f} | {ts * 1e3:.0f} | "
                    f"{flops / (ts * 1e-3) / 1e12:.0f} |")
        del q, kc, vc, bt, k, v, qd
        torch.cuda.empty_cache()
    return rows


def op_rows():
    rows = []
    g = torch.Generator(device=DEV).manual_seed(0)
    rnd = lambda *s, dtype=DT: torch.randn(*s, generator=g, device=DEV).to(dtype)  # noqa: E731
    for t in (256, 4096):
        x, r, w = rnd(t, 4096), rnd(t, 4096), rnd(4096)
        cases = [
            ("rms_norm", f"{t}x4096", 2 * x.numel() * 2, lambda: kernels.rms_norm(x, w, 1e-5), lambda: rms_norm_ref(x, w, 1e-5)),
            ("rms_norm+residual", f"{t}x4096", 4 * x.numel() * 2, lambda: kernels.rms_norm(x, w, 1e-5, r),
             lambda: rms_norm_ref(x, w, 1e-5, r)),
        ]
        qq, kk = rnd(t, HQ, D), rnd(t, HKV, D)
        pos = torch.randint(0, 8192, (t,), device=DEV)
        inv = 1.0 / (500000 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D))
        fr = torch.outer(torch.arange(8192, device=DEV, dtype=torch.float32), inv)
        cs = torch.cat((fr.cos(), fr.sin()), -1)
        cases.append(("rotary (in place)", f"{t} tok, 32+8 heads", 2 * (qq.numel() + kk.numel()) * 2 + t * D * 4,
                      lambda: kernels.rotary_embedding(pos, qq, kk, cs), lambda: rotary_embedding_ref(pos, qq, kk, cs)))
        xm = rnd(t, 2 * 14336)
        cases.append(("silu_and_mul", f"{t}x2x14336", xm.numel() * 2 * 3 // 2, lambda: kernels.silu_and_mul(xm),
                      lambda: silu_and_mul_ref(xm)))
        nblk = 65536
        kc = torch.zeros(nblk, BS, HKV, D, dtype=DT, device=DEV)
        vc = torch.zeros_like(kc)
        slots = torch.randperm(nblk * BS, device=DEV, generator=g)[:t]
        kn, vn = rnd(t, HKV, D), rnd(t, HKV, D)
        cases.append(("store_kvcache", f"{t} tok, 8x128", 4 * kn.numel() * 2,
                      lambda: kernels.store_kvcache(kn, vn, kc, vc, slots), lambda: store_kvcache_ref(kn, vn, kc, vc, slots)))
        for name, shape, nbytes, fk, fr_ in cases:
            tk, tr = ms(fk), ms(fr_)
            # graph timing on one data set: these inputs may sit in L2 (the table says so via GB/s above HBM's)
            tg = graph_us_or_nan(name, [fk], iters=50)
            rows.append(f"| {name} | {shape} | {tk * 1e3:.1f} | {nbytes / (tk * 1e-3) / 1e9:.0f} | {tg:.1f} | "
                        f"{tr * 1e3:.1f} | {tr / tk:.1f}x |")
        del kc, vc
        torch.cuda.empty_cache()
    return rows


def sweep():
    print("\n### Sweep: decode (us per call; auto = the heuristic's pick)\n")
    shapes = [(1, 1024), (1, 4096), (8, 4096), (16, 4096), (32, 4096), (64, 1024), (256, 1024)]
    segs_list, tiles, stages_list = (1, 2, 4, 8, 16, 32, 64), (64, 128), (2, 3)
    head = " | ".join(f"s{s}" for s in segs_list)
    print(f"| batch | ctx | auto (segs) | tile_n, stages | {head} |")
    print("|---|---|---|---|" + "---|" * len(segs_list))
    for batch, ctx in shapes:
        q, kc, vc, bt, sl, qsl = paged(batch, ctx, 1)
        auto = ms(lambda: kernels.paged_attention(q, kc, vc, bt, sl, qsl, D ** -0.5, 1))
        auto_segs = _config(1, HQ // HKV, D, batch, HKV, DEV)[-1]
        for tn in tiles:
            for st in stages_list:
                cells = []
                for s in segs_list:
                    t = ms(lambda: paged_attention_triton(q, kc, vc, bt, sl, qsl, D ** -0.5, 1, num_segments=s,
                                                          tile_n=tn, num_stages=st))
                    cells.append(f"{t * 1e3:.1f}")
                print(f"| {batch} | {ctx} | {auto * 1e3:.1f} ({auto_segs}) | {tn}, {st} | " + " | ".join(cells) + " |",
                      flush=True)
        del q, kc, vc, bt
    print("\n### Sweep: prefill 4 x 4096 (TFLOP/s)\n")
    q, kc, vc, bt, sl, qsl = paged(4, 4096, 4096)
    flops = 4 * 4 * HQ * D * 4096 * 4096 / 2
    for cfg in [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 128, 4, 2),
                (128, 64, 8, 2), (64, 32, 4, 4)]:
        bm, tn, w, st = cfg
        try:
            t = ms(lambda: paged_attention_triton(q, kc, vc, bt, sl, qsl, D ** -0.5, 4096, block_m=bm, tile_n=tn,
                                                  num_warps=w, num_stages=st))
            print(f"| block_m, tile_n, warps, stages = {cfg} | {flops / (t * 1e-3) / 1e12:.0f} |", flush=True)
        except Exception as e:  # noqa: BLE001 (out of shared memory etc.)
            print(f"| {cfg} | failed: {type(e).__name__} |", flush=True)


def profile_decode(path):
    """CUDA kernel times (profiler) of a batch-1 4k decode, split 64 / 16 / 1 ways."""
    from torch.profiler import ProfilerActivity, profile
    q, kc, vc, bt, sl, qsl = paged(1, 4096, 1)
    with open(path, "w") as out:
        for segs in (64, 16, 1):
            f = lambda: paged_attention_triton(q, kc, vc, bt, sl, qsl, D ** -0.5, 1, num_segments=segs)  # noqa: E731
            f()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    f()
                torch.cuda.synchronize()
            out.write(f"segments={segs}\n")
            out.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--only-sweep", action="store_true")
    ap.add_argument("--profile", metavar="FILE")
    a = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if a.profile:
        profile_decode(a.profile)
    if a.sweep or a.only_sweep:
        sweep()
    if a.only_sweep:
        return
    cbw = copy_tbps()
    print(f"\ndevice-to-device copy (1 GiB, read + write): {cbw:.2f} TB/s\n")
    print("### Decode attention (Llama-3-8B heads, bf16, block 16), K/V bytes read / time\n")
    print("CUDA-graph GPU time per call (many copies of the batch replayed back to back, so nothing is L2-resident);")
    print("eager = one Python call, timed by do_bench, launch overhead included.\n")
    print("| batch | context | segments (auto) | us | TB/s | of copy BW | no split: us (TB/s) | SDPA dense: us (TB/s) "
          "| eager us |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in decode_rows(cbw):
        print(r, flush=True)
    print("\n### Prefill attention (causal), TFLOP/s\n")
    print("| sequences x tokens | paged kernel ms | TFLOP/s | SDPA dense ms | SDPA TFLOP/s |")
    print("|---|---|---|---|---|")
    for r in prefill_rows():
        print(r, flush=True)
    print("\n### Other kernels vs their torch references\n")
    print("eager do_bench times (L2 flushed before each call); graph = the kernel alone replayed in a CUDA graph")
    print("(data may stay in L2 there). Speedup = torch reference eager / triton eager.\n")
    print("| op | shape | triton us | triton GB/s | triton graph us | torch ref us | speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in op_rows():
        print(r, flush=True)


if __name__ == "__main__":
    main()
