"""Chunked `sequence_logps` against full logits: time and peak memory of forward + backward.

    python benchmarks/bench_logps.py            # N=8, T=64, V=151936, H=896: under a minute on 2 CPU cores
    python benchmarks/bench_logps.py --full     # N=8, T=1024 (Qwen2.5-0.5B shapes): needs a GPU or ~25 GB RAM

Each variant runs in its own subprocess so peaks do not mix. Peak memory is
torch.cuda.max_memory_allocated on GPU; on CPU it is the rise of the process's peak RSS (VmHWM)
over the call, which is coarse but catches a multi-GB logits tensor. The theoretical size of the
fp32 [N, T, V] logits the chunked version never allocates is printed too.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from apo_loss import sequence_logps, sequence_logps_plain  # noqa: E402


def proc_status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss():
    # Setup temporaries (randn, scaling) would otherwise set the peak; "5" resets VmHWM to VmRSS.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return proc_status_bytes("VmRSS")


def child(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(args.n, args.t, args.h, generator=g).to(device, dtype).requires_grad_(True)
    weight = (0.02 * torch.randn(args.v, args.h, generator=g)).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, args.v, (args.n, args.t), generator=g).to(device)
    labels[:, : int(args.prompt_frac * args.t)] = -100
    if args.variant == "chunked":
        fn = lambda: sequence_logps(hidden, weight, labels, chunk_size=args.chunk_size)  # noqa: E731
    else:
        fn = lambda: sequence_logps_plain(hidden, weight, labels)  # noqa: E731
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    out.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else proc_status_bytes("VmHWM")) - base
    print(json.dumps({"variant": args.variant, "device": device, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_bytes": peak,
                      "logps": out.detach().double().cpu().tolist()}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="sequences")
    p.add_argument("--t", type=int, default=64, help="tokens per sequence (--full sets 1024)")
    p.add_argument("--v", type=int, default=151936, help="vocabulary size (Qwen2.5: 151936)")
    p.add_argument("--h", type=int, default=896, help="hidden size (Qwen2.5-0.5B: 896)")
    p.add_argument("--full", action="store_true", help="the full size, N=8 T=1024")
    p.add_argument("--chunk-size", type=int, default=128, help="tokens per chunk of sequence_logps")
    p.add_argument("--prompt-frac", type=float, default=0.0, help="fraction of each sequence labelled -100")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="hidden/weight dtype")
    p.add_argument("--variants", default="full,chunked", help="comma-separated: full, chunked")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.full:
        args.t = 1024
    if args.variant:
        return child(args)

    gib = 2 ** 30
    tokens = args.n * args.t
    print(f"N={args.n} T={args.t} V={args.v} H={args.h} dtype={args.dtype} chunk={args.chunk_size} "
          f"threads={torch.get_num_threads()}")
    print(f"fp32 logits avoided: [N, T, V] = {tokens * args.v * 4 / gib:.2f} GiB here, "
          f"{8 * 1024 * args.v * 4 / gib:.2f} GiB at N=8 T=1024; "
          f"chunked keeps ~3 x [{args.chunk_size}, V] fp32 = {3 * args.chunk_size * args.v * 4 / gib:.2f} GiB; "
          f"both peaks include the [V, H] weight grad, {args.v * args.h * 4 / gib:.2f} GiB")
    results = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant] + [
            a for a in sys.argv[1:] if a != "--variant"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{variant}: failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
            continue
        res = results[variant] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{variant:8s} {res['device']}: fwd+bwd {res['seconds']:.2f} s wall ({res['cpu_seconds']:.2f} s CPU), "
              f"peak +{res['peak_bytes'] / gib:.2f} GiB")
    if len(results) == 2:
        diff = max(abs(a - b) for a, b in zip(results["full"]["logps"], results["chunked"]["logps"]))
        print(f"max |logp_full - logp_chunked| = {diff:.2e} (sequence sums of ~{args.t} tokens)")


if __name__ == "__main__":
    main()
