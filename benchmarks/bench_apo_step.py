"""The APO training step against the usual implementation: tokens/s, peak GPU memory and MFU (issue 9).

    python benchmarks/bench_apo_step.py --json bench_apo_step.json    # one GPU (H100 / H200), a few minutes
    python benchmarks/bench_apo_step.py --tiny                        # CPU smoke run of the same code, < 1 min

Variants (--variants), each in its own process so that peaks and allocator caches never mix:
- usual: the original DPO code's and TRL's way. Policy AND reference model in memory; the 1 + K rows
  of an instance (chosen + negatives) in one concatenated forward; every position's logits upcast
  to fp32, log_softmax, gather, sum (_get_batch_logps); the reference forwarded every step under
  no_grad; gradient checkpointing on. Written here, in this file.
- apo, apo-ckpt: apo.py's own step, imported: preferences.make_batch with --share-prompt (the
  prompt encoded once for all 1 + K responses), shared_prompt.SharedPromptLogps (log-probs from hidden
  states in chunks, never the [rows, tokens, vocab] logits), reference log-probs computed once
  beforehand by a no-grad pass as apo.py caches them, apo.apo_step_loss. -ckpt: with gradient
  checkpointing (apo.py --gradient-checkpointing), for when memory needs it.
- apo-rows, apo-rows-ckpt: the same without --share-prompt (one row per response, modeling.ResponseLogps),
  to see that lever alone. usual-nockpt: the usual without checkpointing.

Model: a randomly initialised Qwen2.5-1.5B (Qwen2Config with the real sizes, vocab 151936), K = 7,
--batch-size instances a step, bf16 weights, sdpa attention, at prompt 512 + responses 512 and
prompt 1024 + responses 1024 (every response that long); then a Qwen2.5-7B config for peak memory
only (an out-of-memory is reported as such). A step is one micro-batch: building the batch on
the CPU, forward, backward into the gradients (no optimizer update: it is the same for every
variant). Every variant uses apo_loss.py's loss; the weights never change, so the policy is the
reference and every step's loss is log(1 + K): the report checks it, so a variant that computed
something else would show.

What is reported (the report prints these definitions too):
- tokens/s: (1 + K) x (prompt + response) tokens x instances per step / step time (median of the
  timed steps). The prompt counts once per response for every variant, as the usual
  implementation processes it, so tokens/s ratios are step-time ratios. Also given for apo.py with
  its one-time reference pass added (what a single epoch pays per instance).
- peak: torch.cuda.max_memory_allocated over a shape's steps (weights, gradients, activations),
  reset between shapes. On the CPU (--tiny): the rise of the peak RSS, coarse.
- MFU: model FLOPs of the variant's step / step time / the matmul peak, a large bf16 matmul timed
  with CUDA events in each process (the highest is used). Model FLOPs are the matmuls the
  algorithm needs (forward_flops: 2 per weight per token, attention over the pairs a token may
  see, the output projection where logits are computed; a backward twice that; the usual's
  reference forward), no recomputation. HFU counts what the kernels compute, recomputation included.
- PASS/FAIL against issue 9's targets, from this run's measurements: apo.py's step at >= 1.5x the
  usual's tokens/s and <= 0.5x its peak, both at once, at every shape; MFU >= 50%. The issue's
  anchor (the usual step on an H200) is printed next to the run's own usual.
"""

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import apo  # noqa: E402
from common import preferences, shared_prompt  # noqa: E402
from common import training  # noqa: E402
from apo_loss import apo_loss  # noqa: E402
from common.modeling import IGNORE_INDEX, Encoded, ResponseLogps, collate  # noqa: E402
from common.records import check_writable, fail, write_json_atomic  # noqa: E402

# The usual step with gradient checkpointing, measured on an H200 with torch 2.11 (issue 9).
ANCHOR_DEVICE = "H200, torch 2.11"
ANCHOR = {(512, 512): {"tokens_per_s": 25.0e3, "peak_gib": 26.2}, (1024, 1024): {"tokens_per_s": 25.8e3, "peak_gib": 40.9}}
# Targets for apo.py's step against the usual one measured in the same run.
TARGET_SPEEDUP, TARGET_MEMORY, TARGET_MFU = 1.5, 0.5, 0.5

QWEN2_5_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                    max_position_embeddings=32768)
QWEN2_5_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                  max_position_embeddings=32768)
# --tiny: the same code on CPU in seconds; the second config stands in for the 7B memory run.
TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=1024)
TINY_WIDE = dict(TINY, hidden_size=128, intermediate_size=352, num_hidden_layers=3, tie_word_embeddings=False)

VARIANTS = {
    "usual": dict(impl="usual", checkpointing=True),
    "usual-nockpt": dict(impl="usual", checkpointing=False),
    "apo": dict(impl="apo", share_prompt=True, checkpointing=False),
    "apo-ckpt": dict(impl="apo", share_prompt=True, checkpointing=True),
    "apo-rows": dict(impl="apo", share_prompt=False, checkpointing=False),
    "apo-rows-ckpt": dict(impl="apo", share_prompt=False, checkpointing=True),
}

GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="usual,apo,apo-ckpt",
                   help=f"comma-separated, the first is the baseline of the ratios; from {', '.join(VARIANTS)} "
                        "(default: %(default)s)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated PROMPT+RESPONSE token lengths (default: 512+512,1024+1024; --tiny: 32+32,64+64)")
    p.add_argument("--k", type=int, default=7, help="negatives per instance: 1 + K rows (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="instances per step (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per shape (default: 3; --tiny: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per shape (default: 10; --tiny: 2)")
    p.add_argument("--memory-model", choices=["7b", "none"], default="7b",
                   help="also run the Qwen2.5-7B config, one step per shape, for peak memory only (default: %(default)s)")
    p.add_argument("--precision", choices=["bf16", "amp", "fp32"], default=None,
                   help="bf16: bf16 weights for every variant (as the anchor); amp: fp32 weights under bf16 autocast, "
                        "as apo.py trains with accelerate's mixed precision; fp32 (default: bf16; --tiny: fp32)")
    p.add_argument("--chunk-size", type=int, default=1024,
                   help="apo: tokens per chunk of the output projection (apo.py's default: %(default)s)")
    p.add_argument("--beta", type=float, default=0.1, help="the loss's beta (default: %(default)s)")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="N of the N x N x N bf16 matmul that measures the peak (default: 8192; --tiny: 256 in fp32)")
    p.add_argument("--json", metavar="OUT", default=None, help="write every measurement and the verdicts to OUT")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: tiny Qwen2 configs, short shapes, fp32; the numbers say nothing about a GPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and token ids (default: %(default)s)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    if not args.variants:
        p.error("--variants: name at least one variant")
    args.shapes = parse_shapes(p, args.shapes or ("32+32,64+64" if args.tiny else "512+512,1024+1024"))
    for name, value in (("--k", args.k), ("--batch-size", args.batch_size), ("--chunk-size", args.chunk_size)):
        if value < 1:
            p.error(f"{name} must be at least 1")
    args.warmup = (1 if args.tiny else 3) if args.warmup is None else args.warmup
    args.steps = (2 if args.tiny else 10) if args.steps is None else args.steps
    if args.warmup < 0 or args.steps < 1:
        p.error("--warmup must be >= 0 and --steps >= 1")
    args.matmul_size = args.matmul_size or (256 if args.tiny else 8192)
    args.precision = args.precision or ("fp32" if args.tiny else "bf16")
    return args


def parse_shapes(parser, text):
    shapes = []
    for part in text.split(","):
        try:
            prompt, response = (int(x) for x in part.strip().split("+"))
        except ValueError:
            parser.error(f"--shapes: {part.strip()!r} is not PROMPT+RESPONSE, e.g. 512+512")
        if prompt < 1 or response < 1:
            parser.error(f"--shapes: {part.strip()!r}: prompt and responses need at least 1 token")
        shapes.append((prompt, response))
    return shapes


def models_to_run(args):
    """(name, sizes, timed) of each model config; the memory-only model runs one step per shape."""
    speed = ("tiny", TINY) if args.tiny else ("Qwen2.5-1.5B", QWEN2_5_1_5B)
    models = [(*speed, True)]
    if args.memory_model == "7b":
        models.append(("tiny-wide (7B stand-in)", TINY_WIDE, False) if args.tiny else ("Qwen2.5-7B", QWEN2_5_7B, False))
    return models


# ---------------------------------------------------------------------------------------------
# Data: instances as modeling.encode returns them (prompt ids, 1 + K responses), random ids


def synthetic_instances(count, prompt_len, response_len, k, vocab_size, seed):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, vocab_size, (n,), generator=g).tolist()  # 0 is the pad id

    return [Encoded(ids(prompt_len), [ids(response_len) for _ in range(1 + k)]) for _ in range(count)]


PAD_ID = 0


# ---------------------------------------------------------------------------------------------
# The usual implementation (original DPO code / TRL): two models, full fp32 logits


def full_logps(model, input_ids, attention_mask, labels):
    """_get_batch_logps of the original DPO code: all positions' logits in fp32, log_softmax, gather."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.to(torch.float32)
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != IGNORE_INDEX
    labels[~loss_mask] = 0
    per_token_logps = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    return (per_token_logps * loss_mask).sum(-1)


def usual_step_loss(policy, reference, items, k, beta, device):
    """concatenated_forward for the policy, then the reference under no_grad, then the loss: [B]."""
    batch = {name: t.to(device) for name, t in collate(items, PAD_ID).items()}
    policy_logps = full_logps(policy, **batch).view(-1, 1 + k)  # rows: chosen, then its K negatives
    with torch.no_grad():
        reference_logps = full_logps(reference, **batch).view(-1, 1 + k)
    losses, _, _ = apo_loss(policy_logps[:, 0], policy_logps[:, 1:], reference_logps[:, 0], reference_logps[:, 1:],
                            beta=beta)
    return losses


# ---------------------------------------------------------------------------------------------
# apo.py's step, as its training loop calls it


def apo_module(model, share_prompt, chunk_size):
    return shared_prompt.SharedPromptLogps(model, chunk_size) if share_prompt else ResponseLogps(model, chunk_size)


@torch.no_grad()
def apo_reference(module, items, share_prompt, device):
    """The cached reference of each instance, computed as common/reference.py's compute_reference does: (chosen [1], rejected [1, K])."""
    cache = []
    for item in items:
        batch = preferences.make_batch([item], PAD_ID, share_prompt)
        chosen, rejected, mask, _ = apo.concatenated_forward(module, batch, device)
        cache.append((chosen.float().cpu(), torch.where(mask, rejected.float(), torch.zeros_like(rejected.float())).cpu()))
    return cache


def apo_step_loss(module, items, reference, share_prompt, beta, device):
    """apo.py's micro-batch: make_batch, then apo_step_loss with the cached reference rows: [B]."""
    batch = preferences.make_batch(items, PAD_ID, share_prompt)
    ref = (torch.cat([c for c, _ in reference]), torch.cat([r for _, r in reference]))
    settings = SimpleNamespace(beta=beta, loss="apo", nll_weight=0.0, length_normalize=False)  # apo.py's defaults
    losses, _ = apo.apo_step_loss(module, batch, ref, device, settings)
    return losses


# ---------------------------------------------------------------------------------------------
# FLOPs: what each variant's step needs (no recomputation), from the config sizes alone


def forward_flops(sizes, tokens, pairs, head_tokens):
    """Matmul FLOPs of one forward: `tokens` through the layers, attention over `pairs` (query, key)
    pairs, the output projection at `head_tokens` positions. A backward costs twice as much."""
    h, inter, layers = sizes["hidden_size"], sizes["intermediate_size"], sizes["num_hidden_layers"]
    head_dim = sizes.get("head_dim") or h // sizes["num_attention_heads"]
    q, kv = sizes["num_attention_heads"] * head_dim, sizes["num_key_value_heads"] * head_dim
    layer_weights = h * q + 2 * h * kv + q * h + 3 * h * inter  # q, k, v, o, gate, up, down
    return 2 * tokens * layers * layer_weights + 4 * pairs * layers * q + 2 * head_tokens * h * sizes["vocab_size"]


def causal_pairs(n):
    return n * (n + 1) // 2


def step_flops(sizes, variant, prompt, response, k, batch):
    """(model FLOPs, hardware FLOPs) of one step. Model FLOPs count what the algorithm needs. Hardware
    FLOPs add what the kernels do beyond it: recomputation (checkpointed layers, the chunked output
    projection in backward) and, for the packed shared-prompt row, every (query, key) pair, because
    sdpa with an arbitrary mask skips none (causal rows: flash attention skips the masked half)."""
    spec, rows, length = VARIANTS[variant], batch * (1 + k), prompt + response
    if spec["impl"] == "apo" and spec["share_prompt"]:
        # One packed row per instance; a response sees the prompt and its own earlier tokens.
        width = prompt + (1 + k) * response
        tokens, computed_pairs = batch * width, batch * width * width
        pairs = batch * (causal_pairs(prompt) + (1 + k) * (response * prompt + causal_pairs(response)))
    else:
        tokens, pairs = rows * length, rows * causal_pairs(length)
        computed_pairs = pairs
    if spec["impl"] == "usual":
        full = forward_flops(sizes, tokens, pairs, tokens)  # logits at every position
        model = 3 * full + full  # policy forward + backward, reference forward
        recompute = forward_flops(sizes, tokens, pairs, 0) if spec["checkpointing"] else 0
        return model, model + recompute
    head_tokens = rows * response  # logits only where a response token is predicted
    model = 3 * forward_flops(sizes, tokens, pairs, head_tokens)
    hardware = 3 * forward_flops(sizes, tokens, computed_pairs, head_tokens)
    hardware += forward_flops(sizes, 0, 0, head_tokens)  # sequence_logps recomputes its chunks' logits
    if spec["checkpointing"]:
        hardware += forward_flops(sizes, tokens, computed_pairs, 0)
    return model, hardware


# ---------------------------------------------------------------------------------------------
# Measuring one variant (child process)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        from bench_logps import reset_peak_rss

        reset_peak_rss()


def peak_bytes(device, baseline_rss):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    from bench_logps import proc_status_bytes

    return proc_status_bytes("VmHWM") - baseline_rss  # CPU: the rise of peak RSS over the bare process


def matmul_peak(device, n, dtype, repeats=10):
    """FLOP/s of an n x n x n matmul in dtype: the peak MFU is a fraction of (CUDA events on GPU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        repeats *= 5
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        seconds = time.perf_counter() - t0
    return 2 * n ** 3 * repeats / seconds


def build_model(sizes, dtype, device, seed):
    """A randomly initialised Qwen2 causal LM, created directly on the device."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(**sizes, use_cache=False)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def measure_model(args, variant, sizes, timed, device, dtype, baseline_rss):
    """Every shape of one model config: step times, peak memory, losses; an OOM ends the model's shapes."""
    spec = VARIANTS[variant]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "amp" else nullcontext()
    policy = build_model(sizes, dtype, device, args.seed)
    if spec["impl"] == "usual":
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        policy.train()
        if spec["checkpointing"]:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:  # as apo.py prepares its model
        policy = training.prepare_model_for_training(
            policy, SimpleNamespace(freeze_vision=False, gradient_checkpointing=spec["checkpointing"]))
        training.disable_dropout(policy)
        policy.train()
        module = apo_module(policy, spec["share_prompt"], args.chunk_size)
    warmup, steps = (args.warmup, args.steps) if timed else (0, 1)
    results = []
    for prompt, response in args.shapes:
        row = {"prompt": prompt, "response": response}
        results.append(row)
        if any(r.get("oom") for r in results[:-1]):
            row["oom"] = "skipped: a shorter shape ran out of memory"
            continue
        items = synthetic_instances(args.batch_size * (warmup + steps), prompt, response, args.k,
                                    sizes["vocab_size"], args.seed + prompt * 7919 + response)
        try:
            if spec["impl"] == "apo":  # the one-time reference pass of apo.py, timed apart
                sync(device)
                t0 = time.perf_counter()
                with autocast:
                    reference_cache = apo_reference(module, items, spec["share_prompt"], device)
                sync(device)
                row["reference_pass_s_per_instance"] = (time.perf_counter() - t0) / len(items)
            policy.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            reset_peak(device)
            times, losses = [], []
            for s in range(warmup + steps):
                batch = items[s * args.batch_size:(s + 1) * args.batch_size]
                sync(device)
                t0 = time.perf_counter()
                with autocast:
                    if spec["impl"] == "usual":
                        step_losses = usual_step_loss(policy, reference, batch, args.k, args.beta, device)
                    else:
                        ref = reference_cache[s * args.batch_size:(s + 1) * args.batch_size]
                        step_losses = apo_step_loss(module, batch, ref, spec["share_prompt"], args.beta, device)
                step_losses.mean().backward()  # gradients accumulate, as between optimizer steps
                sync(device)
                if s >= warmup:
                    times.append(time.perf_counter() - t0)
                losses.append(step_losses.detach().mean().item())
            row.update(step_s=times, losses=losses, peak_bytes=peak_bytes(device, baseline_rss),
                       tokens_per_step=args.batch_size * (1 + args.k) * (prompt + response))
        except torch.cuda.OutOfMemoryError:
            row["oom"] = f"out of memory (peak {torch.cuda.max_memory_allocated() / GIB:.1f} GiB before it)"
        if row.get("oom"):  # free what the failed step held before the next model
            policy.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
    return results


def run_variant(args):
    """Child process: one variant, every model config and shape; one JSON line on stdout."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        torch.set_num_threads(1)  # tiny ops on a shared CPU: more threads only fight (25x slower measured)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    # Imported before the CPU baseline, so that the peak RSS rise counts tensors, not modules.
    from transformers import Qwen2ForCausalLM  # noqa: F401
    torch.manual_seed(args.seed)
    baseline_rss = 0
    if device.type == "cpu":
        from bench_logps import proc_status_bytes

        baseline_rss = proc_status_bytes("VmRSS")
    out = {"variant": args.variant, "device": device_name(device), "torch": torch.__version__,
           "matmul_flops_per_s": matmul_peak(device, args.matmul_size, torch.bfloat16 if device.type == "cuda" else torch.float32),
           "models": {}}
    for name, sizes, timed in models_to_run(args):
        try:
            out["models"][name] = measure_model(args, args.variant, sizes, timed, device, dtype, baseline_rss)
        except torch.cuda.OutOfMemoryError:  # the weights themselves did not fit
            out["models"][name] = [{"prompt": p, "response": r, "oom": "out of memory building the model(s)"}
                                   for p, r in args.shapes]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(out), flush=True)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"


# ---------------------------------------------------------------------------------------------
# The report (parent process)


def run_children(args):
    from tqdm.auto import tqdm

    children, failed = {}, []
    for variant in tqdm(args.variants, desc="variants (one process each)"):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args.argv, "--variant", variant],
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            failed.append(variant)
            print(f"variant {variant} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
            continue
        children[variant] = json.loads(lines[-1])
    return children, failed


def summarise(args, children):
    """Per model and shape: each variant's tokens/s, peak, MFU and ratios to the baseline variant."""
    peak_flops = max(c["matmul_flops_per_s"] for c in children.values())
    base = args.variants[0]
    table = {}
    for name, sizes, timed in models_to_run(args):
        for i, (prompt, response) in enumerate(args.shapes):
            rows = {}
            for variant, child in children.items():
                r = child["models"][name][i]
                if r.get("oom"):
                    rows[variant] = {"oom": r["oom"]}
                    continue
                seconds = statistics.median(r["step_s"])
                model_flops, hardware_flops = step_flops(sizes, variant, prompt, response, args.k, args.batch_size)
                row = {"step_s": seconds, "tokens_per_s": r["tokens_per_step"] / seconds,
                       "peak_gib": r["peak_bytes"] / GIB, "loss": r["losses"][0], "loss_spread": max(r["losses"]) - min(r["losses"]),
                       "mfu": model_flops / seconds / peak_flops, "hfu": hardware_flops / seconds / peak_flops,
                       "model_tflop_per_step": model_flops / 1e12, "memory_only": not timed}
                if "reference_pass_s_per_instance" in r:
                    # With one epoch (the paper's recipe) apo.py pays the reference pass once per instance.
                    per_step = seconds + r["reference_pass_s_per_instance"] * args.batch_size
                    row["tokens_per_s_with_reference_pass"] = r["tokens_per_step"] / per_step
                rows[variant] = row
            baseline = rows.get(base, {})
            for variant, row in rows.items():
                if "oom" not in row and "oom" not in baseline and baseline:
                    row["speedup"] = row["tokens_per_s"] / baseline["tokens_per_s"]
                    row["memory_ratio"] = row["peak_gib"] / baseline["peak_gib"]
            table[(name, prompt, response)] = rows
    return table, peak_flops


def verdicts(args, table):
    """PASS/FAIL of each non-baseline variant on the speed model: speed and memory at once at every shape, MFU."""
    name = models_to_run(args)[0][0]
    out = {}
    for variant in args.variants[1:]:
        rows = [table[(name, p, r)].get(variant, {}) for p, r in args.shapes]
        both = all(r.get("speedup", 0) >= TARGET_SPEEDUP and r.get("memory_ratio", math.inf) <= TARGET_MEMORY for r in rows)
        mfu = all(r.get("mfu", 0) >= TARGET_MFU for r in rows)
        out[variant] = {"speed_and_memory": "PASS" if both else "FAIL", "mfu": "PASS" if mfu else "FAIL",
                        "all": "PASS" if both and mfu else "FAIL"}
    return out


def fmt(row, key, spec, none="-"):
    return format(row[key], spec) if key in row else none


def report(args, children, table, peak_flops, verdict):
    device = next(iter(children.values()))["device"]
    expected = math.log(1 + args.k)
    print(f"\nAPO step benchmark on {device}, torch {next(iter(children.values()))['torch']}, "
          f"{args.precision}, K = {args.k}, {args.batch_size} instance(s) a step")
    print(f"matmul peak: {peak_flops / 1e12:.1f} TFLOP/s ({args.matmul_size}^3 "
          f"{'fp32, CPU' if args.tiny else 'bf16, timed with CUDA events'}; the highest of the {len(children)} processes)")
    print("tokens/s = (1 + K) x (prompt + response) tokens x instances / step time (median): the prompt counts once per "
          "response for every variant, so tokens/s ratios are step-time ratios")
    print("peak = torch.cuda.max_memory_allocated over a shape's steps (weights + gradients + activations)"
          if not args.tiny else "peak = rise of peak RSS (CPU, coarse)")
    print("MFU = model FLOPs of the step (the matmuls it needs, no recomputation) / step time / matmul peak; "
          "HFU counts what the kernels compute (recomputation, all pairs of a masked attention)")
    print(f"check: every loss must be log(1 + K) = {expected:.4f} (the policy is the reference)")
    for (name, prompt, response), rows in table.items():
        timed = name == models_to_run(args)[0][0]
        print(f"\n{name}, prompt {prompt} + responses {response}" + ("" if timed else " (memory only, one step)"))
        print(f"  {'variant':14s} {'step ms':>8s} {'tok/s':>9s} {'x base':>7s} {'peak GiB':>9s} {'x base':>7s} "
              f"{'MFU':>6s} {'HFU':>6s} {'loss':>7s}  tok/s incl. reference pass")
        for variant in args.variants:
            row = rows.get(variant)
            if row is None:
                print(f"  {variant:14s} failed")
            elif "oom" in row:
                print(f"  {variant:14s} {row['oom']}")
            else:
                ok = abs(row["loss"] - expected) < 1e-2 and row["loss_spread"] < 1e-2
                warn = "" if ok else "!"
                if not timed:  # one untimed-quality step: only its memory means something
                    print(f"  {variant:14s} {'-':>8s} {'-':>9s} {'-':>7s} {row['peak_gib']:9.2f} "
                          f"{fmt(row, 'memory_ratio', '7.2f'):>7s} {'-':>6s} {'-':>6s} {row['loss']:7.4f}{warn}")
                    continue
                print(f"  {variant:14s} {1000 * row['step_s']:8.1f} {row['tokens_per_s']:9.0f} {fmt(row, 'speedup', '7.2f'):>7s} "
                      f"{row['peak_gib']:9.2f} {fmt(row, 'memory_ratio', '7.2f'):>7s} {100 * row['mfu']:5.1f}% "
                      f"{100 * row['hfu']:5.1f}% {row['loss']:7.4f}{warn} "
                      f" {fmt(row, 'tokens_per_s_with_reference_pass', '.0f')}")
        anchor = ANCHOR.get((prompt, response))
        if anchor and timed and not args.tiny:
            line = f"  anchor (usual, {ANCHOR_DEVICE}): {anchor['tokens_per_s']:.0f} tok/s at {anchor['peak_gib']} GiB"
            usual = rows.get("usual", {})
            if "tokens_per_s" in usual:
                line += (f"; this run's usual: {usual['tokens_per_s'] / anchor['tokens_per_s']:.2f}x its tok/s, "
                         f"{usual['peak_gib'] / anchor['peak_gib']:.2f}x its peak")
            print(line)
    if any(abs(row["loss"] - expected) >= 1e-2 or row["loss_spread"] >= 1e-2
           for rows in table.values() for row in rows.values() if "loss" in row):
        print(f"! a loss differs from log(1 + K) = {expected:.4f}: that variant does not compute the APO loss of these weights")
    print(f"\ntargets for apo.py's step against the run's own {args.variants[0]}: tokens/s >= {TARGET_SPEEDUP}x and peak "
          f"<= {TARGET_MEMORY}x, both at once at every shape; MFU >= {TARGET_MFU:.0%}")
    anchors = "; ".join(f"{p}+{r}: {a['tokens_per_s'] / 1e3:.1f}k tok/s at {a['peak_gib']} GiB" for (p, r), a in ANCHOR.items())
    print(f"anchor (issue 9, usual step with checkpointing, {ANCHOR_DEVICE}): {anchors}")
    for variant, v in verdict.items():
        print(f"  {variant:14s} speed and memory {v['speed_and_memory']}, MFU {v['mfu']} -> {v['all']}")
    if args.tiny:
        print("  (--tiny: a CPU smoke run; PASS/FAIL here says nothing about the GPU targets)")


def headline(args, table, verdict):
    """Each compared variant's speed-up, memory ratio and MFU per shape, and its verdict."""
    name = models_to_run(args)[0][0]
    parts = []
    for variant, v in verdict.items():
        rows = [table[(name, p, r)].get(variant, {}) for p, r in args.shapes]
        numbers = ", ".join(f"{fmt(r, 'speedup', '.2f', '?')}x speed {fmt(r, 'memory_ratio', '.2f', '?')}x memory "
                            f"{100 * r.get('mfu', 0):.0f}% MFU" for r in rows)
        parts.append(f"{variant} {numbers} -> {v['all']}")
    return "; ".join(parts) or "no variant to compare"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    if args.variant:
        return run_variant(args)
    if not args.tiny and not torch.cuda.is_available():
        fail("no CUDA device: run this on a GPU, or with --tiny for the CPU smoke run")
    if args.json:  # now, not after minutes of measuring
        check_writable(args.json, "--json")
    children, failed = run_children(args)
    if not children:
        print("error: every variant failed", file=sys.stderr)
        raise SystemExit(1)
    table, peak_flops = summarise(args, children)
    verdict = verdicts(args, table)
    report(args, children, table, peak_flops, verdict)
    if args.json:
        write_json_atomic(args.json, {
            "args": {k: v for k, v in vars(args).items() if k not in ("variant", "argv")}, "children": children,
            "matmul_flops_per_s": peak_flops, "anchor": {f"{p}+{r}": a for (p, r), a in ANCHOR.items()},
            "anchor_device": ANCHOR_DEVICE, "targets": {"speedup": TARGET_SPEEDUP, "memory_ratio": TARGET_MEMORY, "mfu": TARGET_MFU},
            "results": [dict(model=n, prompt=p, response=r, variants=rows) for (n, p, r), rows in table.items()],
            "verdicts": verdict, "failed": failed})
    print(f"bench_apo_step: {len(children)} variants x {len(args.shapes)} shape(s) on {next(iter(children.values()))['device']}; "
          f"{headline(args, table, verdict)}" + (f"; {', '.join(failed)} failed" if failed else "")
          + (f" -> {args.json}" if args.json else ""))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
