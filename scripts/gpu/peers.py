#!/usr/bin/env python3
"""Same-call peers for `q4 bench gpu-linear`: PyTorch bf16 matmul (cuBLAS) and bitsandbytes NF4
(`bnb.matmul_4bit`: its GEMV kernel at batch 1, dequantize + cuBLAS above), with the device copy
bandwidth, timed like q4: CUDA events around a batch of calls queued behind a sleep kernel,
median of 5 batches, weights rotating over copies that together exceed the L2 cache several
times. Results go to stdout (a table) and to --json.
"""
import argparse
import json

import torch


def parse_shape(s):
    a, b = s.split("x")
    return int(a), int(b)


def time_calls(fn, calls, batches=5, warmup=3):
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    samples, i = [], warmup
    for _ in range(batches):
        torch.cuda._sleep(int(2_000_000 + 100_000 * calls))  # cycles: host queues the calls meanwhile
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn(i)
            i += 1
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    samples.sort()
    return samples[len(samples) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="8192x8192,28672x4096")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--gemm-m", type=int, default=2048)
    p.add_argument("--rotate-mib", type=int, default=200)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--json")
    a = p.parse_args()
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(0)
    try:
        import bitsandbytes as bnb

        bnb_version = bnb.__version__
    except Exception as e:  # noqa: BLE001 - report and go on without the peer
        bnb, bnb_version = None, f"unavailable: {e}"
    n_copy = 1 << 30
    src = torch.empty(n_copy, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    copy_t = time_calls(lambda i: dst.copy_(src), 10)
    copy_bw = 2 * n_copy / copy_t
    del src, dst
    print(f"# peers on {card}: torch {torch.__version__}, bitsandbytes {bnb_version}; "
          f"device copy {copy_bw / 1e9:.0f} GB/s (read+write)")
    print(f"{'shape':<11} {'batch':>5} {'impl':<14} {'us':>10} {'GB/s':>8} {'%copy':>7} {'TFLOP/s':>9} {'vs_bf16':>8}")
    rows = []
    rotate = a.rotate_mib << 20
    for shape in a.shapes.split(","):
        n, k = parse_shape(shape)
        w = torch.randn(n, k, device=dev) * 0.02
        wb = w.to(torch.bfloat16)
        copies = max(2, -(-rotate // (n * k * 2)))
        wbs = [wb.clone() for _ in range(copies)]
        nf4 = []
        if bnb is not None:
            q, st = bnb.functional.quantize_4bit(wb, quant_type="nf4", blocksize=64)
            nf4_bytes = q.numel() * q.element_size() + st.absmax.numel() * st.absmax.element_size()
            nf4 = [(q.clone(), st) for _ in range(max(2, -(-rotate // nf4_bytes)))]
        batches = [int(b) for b in a.batches.split(",")] + ([a.gemm_m] if a.gemm_m else [])
        for b in batches:
            x = torch.randn(b, k, device=dev).to(torch.bfloat16)
            calls = min(a.calls, 10) if b >= 256 else a.calls
            flops = 2.0 * n * k * b
            t_bf16 = time_calls(lambda i: x @ wbs[i % copies].t(), calls)

            def emit(name, nbytes, t):
                line = (f"{shape:<11} {b:>5} {name:<14} {t * 1e6:>10.1f} {nbytes / t / 1e9:>8.0f} "
                        f"{100 * nbytes / t / copy_bw:>7.1f} {flops / t / 1e12:>9.1f} {t_bf16 / t:>8.2f}")
                print(line, flush=True)
                rows.append(dict(shape=shape, batch=b, impl=name, us=t * 1e6, weight_bytes=nbytes,
                                 gbps=nbytes / t / 1e9, tflops=flops / t / 1e12, speedup_vs_bf16=t_bf16 / t))

            emit("torch-bf16", n * k * 2, t_bf16)
            if nf4:
                t = time_calls(lambda i: bnb.matmul_4bit(x, nf4[i % len(nf4)][0].t(), quant_state=nf4[i % len(nf4)][1]), calls)
                emit("bnb-nf4", nf4_bytes, t)
        del w, wb, wbs, nf4
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(card=card, torch=torch.__version__, bitsandbytes=bnb_version,
                           copy_gbps=copy_bw / 1e9, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
