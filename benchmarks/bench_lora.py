"""A LoRA training step against a full fine-tuning step: peak memory and step time (issue 15).

    python benchmarks/bench_lora.py                     # SmolLM2-135M-Instruct on the CPU (demo_model.py)
    python benchmarks/bench_lora.py --model DIR --rows 4 --tokens 512

Each variant runs in its own process: the model (fp32, as bootstrap.py trains on the CPU), the
step as bootstrap.py takes it (modeling.ResponseLogps: summed response log-probs from hidden states
in chunks, backward, clipping, AdamW step, zero_grad), --steps timed steps after one warm-up step.
- full: every weight trains (bootstrap.py without --lora-rank).
- lora: training.add_lora with the recipe's rank 8, alpha 32, all linear layers of the language
  model (bootstrap.py --lora-rank 8).
Peak: the rise of the peak RSS over the model already in memory (VmHWM reset before the first
step), i.e. gradients + optimizer state + activations; on a GPU torch.cuda.max_memory_allocated.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_logps import proc_status_bytes, reset_peak_rss  # noqa: E402  (one RSS reader for the CPU benchmarks)


def child(args):
    from accelerate import Accelerator

    from common import training
    from common.modeling import ResponseLogps, load_model

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    lora_args = SimpleNamespace(lora_rank=8 if args.variant == "lora" else None, lora_alpha=32, lora_dropout=0.05,
                                lora_targets="all-linear")
    model = load_model(args.model, dtype=training.weights_dtype(lora_args, accelerator.device)).to(accelerator.device)
    model.config.use_cache = False
    training.add_lora(model, lora_args, accelerator)
    model.train()
    module = ResponseLogps(model)
    optimizer = training.build_optimizer(module, 1e-4, 0.0)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())

    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (args.rows, args.tokens), device=accelerator.device)
    labels = input_ids.clone()
    labels[:, : args.tokens // 2] = -100  # the first half is the prompt
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    def step():
        logps, counts = module(**batch)
        (-logps.sum() / counts.sum()).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    times = []
    for i in range(args.steps + 1):
        began = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first step allocates the optimizer state and warms up
            times.append(time.perf_counter() - began)
    peak = (torch.cuda.max_memory_allocated() if cuda else proc_status_bytes("VmHWM")) - base
    print(json.dumps({"variant": args.variant, "device": accelerator.device.type, "trainable": trainable,
                      "parameters": total, "step_s": statistics.median(times), "peak_gib": peak / 2**30}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct from demo_model.py)")
    parser.add_argument("--rows", type=int, default=2, help="sequences a step (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=384, help="tokens a sequence, half of them scored (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default: %(default)s)")
    parser.add_argument("--variant", choices=["full", "lora"], help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--seed", type=int, default=0, help="unused; the data is seeded with 0")
    args = parser.parse_args()
    if args.model is None:
        from common import demo_model

        args.model = str(demo_model.smollm2_folder())
    if args.variant:
        return child(args)
    results = []
    for variant in ("full", "lora"):
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--rows", str(args.rows),
               "--tokens", str(args.tokens), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{Path(args.model).name}, {args.rows} rows x {args.tokens} tokens, median of {args.steps} steps")
    print(f"{'variant':8} {'trainable':>12} {'step s':>8} {'peak GiB':>9}")
    for r in results:
        print(f"{r['variant']:8} {r['trainable']:>12,} {r['step_s']:>8.3f} {r['peak_gib']:>9.3f}")
    full, lora = results
    print(f"lora / full: step time {lora['step_s'] / full['step_s']:.2f}x, peak {lora['peak_gib'] / full['peak_gib']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
