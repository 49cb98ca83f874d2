"""Stage 2 of APO: supervised bootstrapping on the union of all source trajectories.

Every (instance, trajectory) pair of split train is one example; the loss is next-token
cross-entropy on the response tokens only (system, prompt, image tokens and padding are masked),
averaged over the response tokens of the global batch. Labels are never read: APO is label-free.

    accelerate launch bootstrap.py --model Qwen/Qwen2.5-VL-7B-Instruct --data trajectories.jsonl --out runs/bootstrap
    python bootstrap.py --model M --data trajectories.jsonl --out DIR          # one process

DIR receives the fine-tuned model as a Hugging Face folder (the reference and starting point of
consensus.py and apo.py), checkpoints/ (exact resume), metrics.jsonl and training_summary.json.
After an interruption, run the same command again: it continues from the last checkpoint in DIR
(weights, optimizer, schedule, RNG and data position) and ends with the weights an uninterrupted
run would have had. A finished run, rerun, does nothing. SIGTERM or Ctrl-C stops it after the
optimizer step in flight, with a checkpoint, exit status 75 (training.STOPPED_EXIT): rerun to resume.

Defaults follow the paper's official recipe (1 epoch, 2 examples per device, global batch 32, max
length 2304, warmup 0.05, bf16 on GPU). By default every weight is trained, at lr 1e-5 (the usual
rate for full fine-tuning); --lora-rank 8 trains the recipe's LoRA adapters (alpha 32, all linear
layers of the language model) at its lr 1e-4, and DIR holds the merged model plus DIR/adapter.
Batches are length-grouped (examples of similar length together, random order across groups) to
pad little; sequences are not packed. --max-length cuts long responses at the end, never the
prompt or its image tokens; an instance whose prompt leaves no room is skipped. Both are counted.
"""

import argparse
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import training
from answers import parse_answer
from modeling import (PromptTooLong, ResponseLogps, collate, encode, is_vision_model, load_model, load_processor,
                      model_fingerprint, tokenizer_of)
from records import RecordError, file_hash, load_instances, write_json_atomic

SUMMARY = "training_summary.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="target model: a Hugging Face folder or hub id (text LM or VLM)")
    parser.add_argument("--data", required=True, help="trajectories.jsonl from collect.py; only split train is used")
    parser.add_argument("--out", required=True, help="output folder: final model, checkpoints/, metrics.jsonl")
    parser.add_argument("--drop-unanswered", action="store_true",
                        help="drop trajectories without a parseable 'Answer:' line (refusals); by default they are "
                             "kept, as the paper trains on the union of all trajectories. Counted either way")
    parser.add_argument("--mixed-precision", choices=["auto", "bf16", "fp16", "no"], default="auto",
                        help="'auto': the accelerate config's setting, else bf16 on GPU, fp32 on CPU. Weights and "
                             "optimizer state stay fp32 (full fine-tuning updates are below bf16 resolution); "
                             "bf16 is the compute dtype (default: %(default)s)")
    training.add_training_args(parser, lr=None, max_length=2304, batch_size=2, warmup=0.05, global_batch=32)
    training.add_lora_args(parser, dropout=0.05)
    next(a for a in parser._actions if a.dest == "lr").help = "peak learning rate (default: 1e-5, 1e-4 with --lora-rank)"
    args = parser.parse_args(argv)
    if args.lr is None:  # the recipe's rate for adapters; full fine-tuning of every weight wants ~10x less
        args.lr = 1e-4 if args.lora_rank else 1e-5
    return args


# ---------------------------------------------------------------------------------------------
# Data: one example per (train instance, trajectory)


@dataclass
class Example:
    record: int  # index into the instance list
    text: str  # the source's full answer, the training target
    source: str
    length: int = 0  # prompt + response tokens, for length-grouped batches
    response_tokens: int = 0  # tokens the loss is averaged over


def collect_examples(records, drop_unanswered):
    """The (instance, trajectory) pairs of split train, and what was left out, counted."""
    examples = []
    counts = Counter(dict.fromkeys(["train_instances", "test_instances", "instances_without_trajectories",
                                    "empty_trajectories", "unanswered"], 0))
    for r, record in enumerate(records):
        if record["split"] != "train":
            counts["test_instances"] += 1
            continue
        counts["train_instances"] += 1
        if not record.get("trajectories"):
            counts["instances_without_trajectories"] += 1
            continue
        for t in record["trajectories"]:
            if not t["text"].strip():
                counts["empty_trajectories"] += 1
                continue
            if parse_answer(t["text"]) is None:
                counts["unanswered"] += 1
                if drop_unanswered:
                    continue
            examples.append(Example(r, t["text"], t["source"]))
    return examples, counts


def measure_examples(processor, records, examples, max_length, data_path, accelerator):
    """Token lengths of every example (prompt and images encoded once per instance).

    Each process measures a share of the instances and the results are gathered, so images are
    processed once per GPU count rather than on every GPU. Returns the examples that fit, with
    their lengths, and the counts of responses cut at max_length and of prompts too long to train.
    """
    from accelerate.utils import gather_object

    by_record = defaultdict(list)
    for i, ex in enumerate(examples):
        by_record[ex.record].append(i)
    mine = sorted(by_record)[accelerator.process_index :: accelerator.num_processes]
    rows = []  # (example index, length, response tokens) or (example index, None, None) when skipped
    truncated = 0
    for r in tqdm(mine, desc="tokenizing", disable=not accelerator.is_local_main_process):
        idx = by_record[r]
        try:
            enc = encode(processor, records[r], [examples[i].text for i in idx], max_length, data_path)
        except PromptTooLong:
            rows += [(i, None, None) for i in idx]
            continue
        truncated += enc.truncated
        rows += [(i, len(enc.prompt_ids) + len(ids), len(ids)) for i, ids in zip(idx, enc.responses)]
    rows = sorted(gather_object(rows))
    truncated = int(training.global_count(accelerator, truncated))
    kept = []
    for i, length, response_tokens in rows:
        if length is not None:
            examples[i].length, examples[i].response_tokens = length, response_tokens
            kept.append(examples[i])
    return kept, truncated, len(examples) - len(kept)


def build_batch(processor, records, examples, indices, max_length, data_path, pad_id):
    """Right-padded rows of these examples: labels are the response tokens, -100 elsewhere."""
    encoded = [encode(processor, records[examples[i].record], [examples[i].text], max_length, data_path)
               for i in indices]
    return collate(encoded, pad_id)


def run_config(args, accelerator):
    """The settings that decide the trained weights; a checkpoint resumes only under the same ones."""
    model = Path(args.model)
    return {
        "model": str(model.resolve()) if model.exists() else args.model,
        "model_fingerprint": model_fingerprint(args.model),
        "data_sha256": file_hash(args.data),
        "drop_unanswered": args.drop_unanswered,
        "max_length": args.max_length,
        "micro_batch": args.batch_size * accelerator.num_processes,  # global, so the GPU count may change
        "grad_accum": args.grad_accum,
        "lr": args.lr, "epochs": args.epochs, "max_steps": args.max_steps, "warmup": args.warmup,
        "schedule": args.schedule, "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm,
        "freeze_vision": args.freeze_vision, "seed": args.seed, **training.lora_config(args),
    }


def finished_run(out_dir, config):
    """The summary of a finished run in out_dir with these settings; None if there is none."""
    path = Path(out_dir) / SUMMARY
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    diff = training.config_mismatch(summary.get("config") or {}, config)
    if diff:
        raise training.ResumeMismatch(f"{out_dir} holds a finished run with other settings ({diff}); "
                                      f"use another --out")
    return summary


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    training.run_stage(train, parse_args(argv))


def train(args):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(args.out)

    # Data first: a bad line ends the run before any model is loaded.
    records = load_instances(args.data, require_trajectories=True)
    examples, counts = collect_examples(records, args.drop_unanswered)
    if not examples:
        raise RecordError(args.data, None, "trajectories", "no training examples (no trajectory of split train)")
    try:
        vision = is_vision_model(args.model)
    except OSError as e:
        raise RecordError(args.model, None, None, f"cannot read the model's config: {e}") from None
    text_only_rows = any(not records[ex.record].get("images") for ex in examples)

    accelerator = training.build_accelerator(
        args, out, find_unused_parameters=vision and not (args.freeze_vision or args.lora_rank) and text_only_rows)
    training.claim_output(accelerator, out, "bootstrap.py", inputs={"--data": args.data},
                          model_dirs={"--model": args.model})
    config = run_config(args, accelerator)
    done = finished_run(out, config)
    if done is not None:
        accelerator.print(f"bootstrap: nothing to do, {out} already holds the finished model "
                          f"({done['steps']} steps, final loss {done['final_loss']})")
        return
    training.checkpoint_state(out, config)  # another run's checkpoints: refuse now, not after loading
    training.seed_everything(args.seed)

    try:
        processor = load_processor(args.model)
    except OSError as e:
        raise RecordError(args.model, None, None, f"cannot load the model's tokenizer/processor: {e}") from None
    examples, truncated, too_long = measure_examples(processor, records, examples, args.max_length, args.data,
                                                     accelerator)
    micro_global = args.batch_size * accelerator.num_processes
    if len(examples) < micro_global:
        raise RecordError(args.data, None, None, f"{len(examples)} usable training examples, fewer than one "
                                                 f"micro-batch over all processes ({micro_global})")
    total = training.total_steps(len(examples), micro_global, args)
    per_epoch = len(examples) // micro_global
    lengths = [ex.length for ex in examples]

    model = training.prepare_model_for_training(
        load_model(args.model, dtype=training.weights_dtype(args, accelerator.device)), args)
    lora = training.add_lora(model, args, accelerator)
    model.train()
    # The loss module computes log-probs from hidden states in chunks: no [rows, tokens, vocab] logits.
    module = ResponseLogps(model)
    optimizer = training.build_optimizer(module, args.lr, args.weight_decay)
    scheduler = training.build_scheduler(optimizer, args, total)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    pad_id = tokenizer_of(processor).pad_token_id

    state = training.resume_from_checkpoint(accelerator, out, config) or {}
    start = state.get("step", 0)
    metrics = training.Metrics(accelerator, out, resumed_step=start)
    if args.report_to:
        accelerator.init_trackers("apo-bootstrap", config={k: v for k, v in config.items() if v is not None})
    accelerator.print(
        f"bootstrap: {len(examples)} examples from {counts['train_instances']} train instances, "
        f"{total} steps of {micro_global * args.grad_accum} examples "
        f"({args.batch_size} x {accelerator.num_processes} processes x {args.grad_accum} accumulation), "
        f"mixed precision {accelerator.mixed_precision}" + (f", resuming from step {start}" if start else ""),
        flush=True)

    micro_batch = training.MicroBatches(lengths, micro_global, args.seed)

    stop = training.stop_on_signal()
    progress = tqdm(total=total, initial=start, desc="bootstrap", disable=not accelerator.is_local_main_process)
    for step in range(start, total):
        began = time.perf_counter()
        micro = [micro_batch(step * args.grad_accum + k) for k in range(args.grad_accum)]
        mine = [training.shard(b, accelerator) for b in micro]
        # Every process divides by the same global token count, so the gradient is the mean over
        # the whole global batch however the tokens fall across processes and micro-batches.
        step_tokens = training.global_count(accelerator, sum(examples[i].response_tokens for b in mine for i in b))
        scale = accelerator.num_processes * args.grad_accum / step_tokens  # undo DDP's and accelerate's averaging
        nll_sum = torch.zeros((), device=accelerator.device)
        for rows in mine:
            batch = build_batch(processor, records, examples, rows, args.max_length, args.data, pad_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(module):
                logps, _ = module(**batch)
                accelerator.backward(-logps.sum() * scale)
                nll_sum += -logps.detach().sum()
                if accelerator.sync_gradients:
                    loss = accelerator.reduce(nll_sum, reduction="sum") / step_tokens
                    check_finite(loss, step + 1, out, {records[examples[i].record]["id"] for b in micro for i in b})
                    grad_norm = training.clip_gradients(accelerator, module, args.max_grad_norm)
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        done_steps = step + 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if done_steps % args.log_every == 0 or done_steps == total:
            seen = done_steps * args.grad_accum * micro_global
            metrics.log(done_steps, {
                "loss": loss.item(), "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": sum(lengths[i] for b in micro for i in b) / (time.perf_counter() - began),
                "examples_seen": seen, "epoch": seen / (per_epoch * micro_global),
            })
        training.end_of_step(accelerator, out, done_steps, total, {"config": config}, args, stop)
    progress.close()

    if start < total or not training.checkpoint_dirs(out):
        training.save_checkpoint(accelerator, out, total, {"config": config}, keep=args.keep_checkpoints)
    training.save_hf_folder(accelerator, module, processor, out, lora=lora)
    losses = read_losses(out / "metrics.jsonl") if accelerator.is_main_process else []
    summary = {
        "config": config, "steps": total, "examples": len(examples),
        "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        **counts, "truncated": truncated, "prompt_too_long": too_long,
    }
    if accelerator.is_main_process:
        write_json_atomic(out / SUMMARY, summary)  # written last: its presence means "finished"
    accelerator.wait_for_everyone()
    accelerator.end_training()
    unanswered = f"{counts['unanswered']} unanswered {'dropped' if args.drop_unanswered else 'kept'}"
    accelerator.print(
        f"bootstrap: {total} steps on {len(examples)} examples, loss {summary['first_loss']} -> "
        f"{summary['final_loss']}; {unanswered}, {truncated} truncated, {too_long} skipped (prompt too long), "
        f"{counts['empty_trajectories']} empty; model in {out}")


def check_finite(loss, step, out, instance_ids):
    """training.check_finite, naming the step's instances so the data can be looked at."""
    try:
        training.check_finite(loss, step, out)
    except training.NonFiniteLoss as e:
        ids = sorted(instance_ids)
        raise training.NonFiniteLoss(f"{e} Instances in this step: {', '.join(ids[:10])}"
                                     + (" …" if len(ids) > 10 else "")) from None



def read_losses(path):
    if not path.is_file():
        return []
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    main()
