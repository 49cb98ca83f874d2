"""Batched generation against one prompt at a time (issue 9): the speed-up collect, consensus and evaluate get.

    python benchmarks/bench_generation.py --json bench_generation.json    # GPU: random Qwen2.5-1.5B, bf16
    python benchmarks/bench_generation.py --model runs/bootstrap           # any local model folder
    python benchmarks/bench_generation.py --tiny                           # CPU smoke run, tiny Qwen2

The same 64 prompts (the drift simulator's radiology-style studies, with the system prompt) go
through modeling.generate, the function every stage calls, twice: in batches of --batch-size
(64: one batch) and one at a time. Greedy decoding; every answer is exactly --max-new-tokens long
(end of turn ignored), so both ways generate the same number of tokens and the speed-up is the
ratio of wall times. The random model has no tokenizer of its own: it reads the prompts through
tiny_models' byte-level tokenizer, whose small vocabulary makes them longer in tokens than
Qwen's tokenizer would (the mean and longest are printed), and its answers decode to little,
which does not matter for speed. Target: batched at least 10x faster for 64 prompts.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # tiny models, servers
from common import modeling  # noqa: E402
import tiny_models  # noqa: E402
from common.records import RecordError, check_writable, fail, write_json_atomic  # noqa: E402
from common.simulator import make_instances  # noqa: E402

TARGET_SPEEDUP = 10.0
QWEN2_5_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                    max_position_embeddings=32768)
TINY = dict(vocab_size=400, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a local model folder (text model or VLM); default: a random Qwen2.5-1.5B config (--tiny: a tiny Qwen2)")
    p.add_argument("--prompts", type=int, default=64, help="prompts to answer (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per batch of the batched run (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens generated per answer (default: 128; --tiny: 8)")
    p.add_argument("--sequential", type=int, default=None,
                   help="time only this many prompts one at a time and scale to --prompts (default: all of them)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="weights (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--json", metavar="OUT", default=None, help="write the measurements to OUT")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny random Qwen2; numbers say nothing about a GPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts (default: %(default)s)")
    args = p.parse_args(argv)
    args.max_new_tokens = args.max_new_tokens or (8 if args.tiny else 128)
    args.sequential = args.prompts if args.sequential is None else args.sequential
    for name, value in (("--prompts", args.prompts), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            p.error(f"{name} must be at least 1")
    if not 1 <= args.sequential <= args.prompts:
        p.error("--sequential must be between 1 and --prompts")
    return args


def load(args, device, dtype):
    """(model, processor, name): the --model folder, or a random config with the tiny byte-level tokenizer."""
    if args.model:
        model = modeling.load_model(args.model, dtype=dtype).to(device)
        return model, modeling.load_processor(args.model), args.model
    from transformers import AutoModelForCausalLM, Qwen2Config

    sizes = TINY if args.tiny else QWEN2_5_1_5B
    tok = tiny_models.train_tokenizer()
    torch.manual_seed(args.seed)
    config = Qwen2Config(**sizes, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                         bos_token_id=None)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, tok, f"random {'tiny Qwen2' if args.tiny else 'Qwen2.5-1.5B'} config"


def timed_generate(model, processor, records, batch_size, max_new_tokens, device, desc=None):
    from tqdm.auto import tqdm

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with tqdm(total=len(records), desc=desc, disable=desc is None, leave=False) as bar:
        answers = modeling.generate(model, processor, records, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    progress=bar)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, answers


def run(args):
    from transformers.utils import logging as hf_logging

    if args.model and not (Path(args.model) / "config.json").is_file():
        raise RecordError(args.model, None, None, "not a model folder (no config.json)")
    if args.json:  # now, not after minutes of measuring
        check_writable(args.json, "--json")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny and not args.model:
        fail("no CUDA device: run this on a GPU, or with --tiny (or --model) on the CPU")
    if args.tiny:
        torch.set_num_threads(1)  # a tiny model on a shared CPU: more threads only fight
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model, processor, name = load(args, device, dtype)
    model.eval()
    records = make_instances(args.prompts, 0, seed=args.seed)
    tok = modeling.tokenizer_of(processor)
    prompt_tokens = [len(tok(modeling.prompt_text(processor, r), add_special_tokens=False)["input_ids"]) for r in records]

    timed_generate(model, processor, records[:2], 2, 2, device)  # warm-up: kernels, allocator
    # Same work both ways: every answer is exactly max_new_tokens long.
    model.generation_config.min_new_tokens = args.max_new_tokens
    batched_s, batched = timed_generate(model, processor, records, args.batch_size, args.max_new_tokens, device,
                                        "batched")
    sequential_s, sequential = timed_generate(model, processor, records[:args.sequential], 1, args.max_new_tokens,
                                              device, "one at a time")
    sequential_s *= args.prompts / args.sequential
    generated = args.prompts * args.max_new_tokens
    result = {
        "model": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({torch.get_num_threads()} thread)", "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "prompts": args.prompts, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens), "prompt_tokens_max": max(prompt_tokens),
        "batched_s": batched_s, "sequential_s": sequential_s, "sequential_timed_prompts": args.sequential,
        "batched_tokens_per_s": generated / batched_s, "sequential_tokens_per_s": generated / sequential_s,
        "speedup": sequential_s / batched_s, "target_speedup": TARGET_SPEEDUP,
        "same_answers": sum(a == b for a, b in zip(batched, sequential)),
    }
    result["verdict"] = "PASS" if result["speedup"] >= TARGET_SPEEDUP else "FAIL"
    scaled = f" (timed on {args.sequential}, scaled)" if args.sequential < args.prompts else ""
    print(f"generation on {result['device']}, {name}, {result['dtype']}, torch {torch.__version__}")
    print(f"{args.prompts} prompts ({result['prompt_tokens_mean']:.0f} tokens on average, {result['prompt_tokens_max']} at most), "
          f"{args.max_new_tokens} new tokens each, greedy")
    print(f"  {f'batched ({args.batch_size} a batch):':24s}{batched_s:8.2f} s  {result['batched_tokens_per_s']:9.1f} new tokens/s")
    print(f"  {'one at a time:':24s}{sequential_s:8.2f} s  {result['sequential_tokens_per_s']:9.1f} new tokens/s{scaled}")
    print(f"  same answer both ways: {result['same_answers']} of {args.sequential} (left padding may change a greedy choice)")
    if args.json:
        write_json_atomic(args.json, result)
    print(f"bench_generation: batched is {result['speedup']:.1f}x one at a time for {args.prompts} prompts "
          f"(target >= {TARGET_SPEEDUP:.0f}x: {result['verdict']}{', a CPU smoke run' if args.tiny else ''})"
          + (f" -> {args.json}" if args.json else ""))


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except RecordError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
