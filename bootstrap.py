"""Stage 2 of APO: supervised bootstrapping on the union of all source trajectories.

Every (instance, trajectory) pair of split train is one example; the loss is next-token
cross-entropy on the response tokens only (system, prompt, image tokens and padding masked),
averaged over the response tokens of the global batch: the paper's Eq. (4), which projects the
target into the union of the sources. Labels are never read: APO is label-free.

    accelerate launch bootstrap.py --model Qwen/Qwen2.5-VL-7B-Instruct --data trajectories.jsonl --out runs/bootstrap

OUT receives the fine-tuned model as a Hugging Face folder (consensus.py's and apo.py's starting
point); the run folder OUT.run beside it holds checkpoints/, metrics.jsonl and the summary.
Departures from the paper's recipe: every weight is trained by default, at lr 1e-5, where the
official recipe trains LoRA adapters (--lora-rank 8, lr 1e-4); batches are length-grouped, not
packed; --max-length cuts long responses at the end, never the prompt (a prompt that leaves no
room is skipped and counted).
"""

import argparse
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from common import training
from common.answers import parse_answer
from common.records import RecordError, file_hash, lazy_import
from common.run import Run
from common.trl_format import read_instances

# Loaded on first use, so that --help and a wrong flag answer at once (torch alone takes seconds).
torch = lazy_import("torch")
modeling = lazy_import("common.modeling")


# ---------------------------------------------------------------------------------------------
# The objective of one micro-batch


def sft_step_loss(module, batch, device):
    """Summed negative log-likelihood of the micro-batch's response tokens.

    module is modeling.ResponseLogps (as in apo.py): summed log-probs of each row's labelled tokens,
    from hidden states in chunks. The loop divides by the global batch's token count.
    """
    logps, _ = module(**{k: v.to(device) for k, v in batch.items()})
    return -logps.sum()


# ---------------------------------------------------------------------------------------------
# Data: one example per (train instance, trajectory)


@dataclass
class Example:
    record: dict  # the instance
    text: str  # the source's full answer, the training target
    source: str
    length: int = 0  # prompt + response tokens, for length-grouped batches
    response_tokens: int = 0  # tokens the loss is averaged over


def collect_examples(records, drop_unanswered):
    """The (instance, trajectory) pairs of split train, and what was left out, counted."""
    examples = []
    counts = Counter(dict.fromkeys(["train_instances", "test_instances", "instances_without_trajectories",
                                    "empty_trajectories", "unanswered"], 0))
    for record in records:
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
            examples.append(Example(record, t["text"], t["source"]))
    return examples, counts


def measure_examples(processor, examples, args, data_path, accelerator):
    """The examples that fit, with their lengths; the skipped instances ((message, prompt tokens),
    one per instance); responses cut.

    Each process encodes a share of the instances (the prompt and images once for all of an
    instance's trajectories) and the results are gathered, so images are processed once in all
    rather than once per GPU. A prompt that leaves no room under --max-length is skipped.
    """
    from accelerate.utils import gather_object

    by_instance = defaultdict(list)
    for i, ex in enumerate(examples):
        by_instance[ex.record["_line"]].append(i)
    mine = sorted(by_instance)[accelerator.process_index :: accelerator.num_processes]
    rows = []  # (example index, length, response tokens, responses cut or skip message)
    for line in tqdm(mine, desc="tokenizing", disable=not accelerator.is_local_main_process):
        idx = by_instance[line]
        try:
            enc = modeling.encode(processor, examples[idx[0]].record, [examples[i].text for i in idx], args.max_length,
                         data_path)
        except modeling.PromptTooLong as e:  # one message an instance, on its first example
            rows += [(i, None, None, (f"{data_path}:{line}: {e}", e.prompt_tokens) if k == 0 else None)
                     for k, i in enumerate(idx)]
            continue
        rows += [(i, len(enc.prompt_ids) + len(ids), len(ids), enc.truncated if k == 0 else 0)
                 for k, (i, ids) in enumerate(zip(idx, enc.responses))]
    if accelerator.num_processes > 1:
        rows = gather_object(rows)
    kept, skipped, truncated = [], [], 0
    for i, length, response_tokens, extra in sorted(rows, key=lambda row: row[0]):
        if length is None:
            if extra is not None:
                skipped.append(extra)
        else:
            examples[i].length, examples[i].response_tokens = length, response_tokens
            kept.append(examples[i])
            truncated += extra
    return kept, skipped, truncated


def too_few_examples(usable, micro_global, too_long, skipped, args):
    """Why a run cannot take one micro-batch, with the flag that changes it."""
    message = f"{usable} usable training examples, fewer than one micro-batch over all processes ({micro_global})"
    if skipped:
        longest = max(tokens for _, tokens in skipped)
        message += (f": {too_long} examples of {len(skipped)} instances skipped, their prompt leaves no room for a "
                    f"response under --max-length {args.max_length} (longest prompt {longest} tokens); "
                    f"raise --max-length above {longest}")
    else:
        message += f"; lower --batch-size ({args.batch_size}) or add training data"
    return message


def encode_examples(processor, examples, args, data_path):
    # Encoded again when used (cheap next to a forward), so the whole data set's ids and image
    # tensors never sit in memory at once.
    return [modeling.encode(processor, ex.record, [ex.text], args.max_length, data_path) for ex in examples]


def make_batch(encoded_items, pad_id):
    """Right-padded rows of these examples: labels are the response tokens, -100 elsewhere."""
    return modeling.collate(encoded_items, pad_id)


# ---------------------------------------------------------------------------------------------
# The stage


def train(args):
    with Run("bootstrap", args, project="apo-bootstrap") as run:
        # Data first: a bad line ends the run before any model is loaded.
        examples, counts, held_out, vision = read_data(args)
        accelerator = run.start(vision, text_only_rows=any(not ex.record.get("images") for ex in examples))
        if run.finished(run_config(args, accelerator)):  # another run's folder is refused now, not after loading
            return
        processor = load_processor(args.model)
        micro_global = args.batch_size * accelerator.num_processes
        examples, skipped, truncated, too_long = usable_examples(processor, examples, args, accelerator, micro_global)
        total = training.total_steps(len(examples), micro_global, args, accelerator.print)
        model, lora = training.load_trainable_model(args, accelerator)
        module, optimizer, scheduler = training.prepare_training(accelerator, modeling.ResponseLogps(model), args, total)
        held_out = usable_held_out(processor, held_out, args, accelerator)
        start = run.resume(module, total)
        accelerator.print(f"bootstrap: {len(examples)} examples from {counts['train_instances']} train instances, "
                          + training.describe_steps(accelerator, args, total, start, unit=" examples"), flush=True)
        lengths = [ex.length for ex in examples]
        micro_batch = training.MicroBatches(lengths, micro_global, args.seed)
        pad_id = modeling.tokenizer_of(processor).pad_token_id

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
                batch = make_batch(encode_examples(processor, [examples[i] for i in rows], args, args.data), pad_id)
                with accelerator.accumulate(module):
                    nll = sft_step_loss(module, batch, accelerator.device)
                    accelerator.backward(nll * scale)
                    nll_sum += nll.detach()
                    if accelerator.sync_gradients:
                        loss = accelerator.reduce(nll_sum, reduction="sum") / step_tokens
                        run.check_finite(loss, step + 1, {examples[i].record["id"] for b in micro for i in b})
                        lr, grad_norm = training.optimizer_step(accelerator, module, optimizer, scheduler, args, step + 1)
            done = step + 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if done % args.log_every == 0 or done == total:
                seen = done * args.grad_accum * micro_global
                run.log(done, {
                    "loss": loss.item(), "learning_rate": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_s": sum(lengths[i] for b in micro for i in b) / (time.perf_counter() - began),
                    "examples_seen": seen, "epoch": seen / (micro_batch.per_epoch * micro_global),
                })
            if training.eval_due(args, done, total):
                run.log_eval(done, {"loss": held_out_loss(accelerator, module, processor, held_out, args, pad_id)})
            run.end_of_step(done)
        progress.close()

        run.save(module, processor, lora)
        summary = run.summary(examples=len(examples), **counts, truncated=truncated, prompt_too_long=too_long)
        unanswered = f"{counts['unanswered']} unanswered {'dropped' if args.drop_unanswered else 'kept'}"
        accelerator.print(
            f"bootstrap: {total} steps on {len(examples)} examples, loss {summary['first_loss']} -> "
            f"{summary['final_loss']}; {unanswered}, {truncated} truncated, {too_long} skipped (prompt too long), "
            f"{counts['empty_trajectories']} empty; model in {args.out}")


def read_data(args):
    """The training examples and what was left out (counted), the held-out examples (--eval-data),
    and whether the model reads images."""
    records = read_instances(args.data)  # trajectories.jsonl or TRL's SFT conversations
    examples, counts = collect_examples(records, args.drop_unanswered)
    held_out = held_out_examples(args.eval_data, args.drop_unanswered) if args.eval_data else None
    if not examples:
        raise RecordError(args.data, None, "trajectories", "no training examples (no trajectory of split train)")
    try:
        vision = modeling.is_vision_model(args.model)
    except OSError as e:
        raise RecordError(args.model, None, None, f"cannot read the model's config: {e}") from None
    return examples, counts, held_out, vision


def load_processor(model):
    try:
        return modeling.load_processor(model)
    except OSError as e:  # a broken or missing tokenizer is a RecordError from load_processor itself
        raise RecordError(model, None, None, f"cannot load the model's tokenizer/processor: {e}") from None


def usable_examples(processor, examples, args, accelerator, micro_global):
    """measure_examples on the training data: the skipped prompts reported, one micro-batch required;
    also how many examples were skipped (the summary's unit, not instances)."""
    measured = len(examples)
    examples, skipped, truncated = measure_examples(processor, examples, args, args.data, accelerator)
    too_long = measured - len(examples)
    if accelerator.is_main_process:
        for message, _ in skipped:
            print(f"skipped {message}", file=sys.stderr)
    if len(examples) < micro_global:
        raise RecordError(args.data, None, None, too_few_examples(len(examples), micro_global, too_long, skipped, args))
    return examples, skipped, truncated, too_long


def usable_held_out(processor, examples, args, accelerator):
    """--eval-data's examples that fit (None without --eval-data)."""
    if examples is None:
        return None
    examples = measure_examples(processor, examples, args, args.eval_data, accelerator)[0]
    if not examples:
        raise RecordError(args.eval_data, None, None, "no usable held-out example (no trajectory of split train "
                                                      "whose prompt fits --max-length)")
    return examples


def held_out_examples(path, drop_unanswered):
    """--eval-data's examples: the trajectories of its val and test instances, or of all of them
    when it has only train ones (a file held out as a whole, e.g. TRL's SFT messages)."""
    records = read_instances(path)
    held = [r for r in records if r["split"] != "train"] or records
    return collect_examples([dict(r, split="train") for r in held], drop_unanswered)[0]


@training.no_grad
def held_out_loss(accelerator, module, processor, examples, args, pad_id):
    """Mean NLL per response token of the held-out examples (the training loss's measure). Every
    process runs the same number of forwards (FSDP's are collective); repeats count nothing."""
    batches = [list(range(i, min(i + args.batch_size, len(examples)))) for i in range(0, len(examples), args.batch_size)]
    real = len(batches)
    batches += batches[-1:] * (-len(batches) % accelerator.num_processes)
    nll = torch.zeros((), device=accelerator.device)
    for i in range(accelerator.process_index, len(batches), accelerator.num_processes):
        batch = make_batch(encode_examples(processor, [examples[j] for j in batches[i]], args, args.eval_data), pad_id)
        nll += sft_step_loss(module, batch, accelerator.device) * (i < real)
    tokens = sum(ex.response_tokens for ex in examples)
    return (accelerator.reduce(nll, reduction="sum") / tokens).item()


def run_config(args, accelerator):
    """The settings that decide the trained weights; a checkpoint resumes only under the same ones."""
    model = Path(args.model)
    return {
        "model": str(model.resolve()) if model.exists() else args.model,
        "model_fingerprint": modeling.model_fingerprint(args.model), "data_sha256": file_hash(args.data),
        "drop_unanswered": args.drop_unanswered, "max_length": args.max_length,
        **training.loop_config(args, accelerator),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="target model: a Hugging Face folder or hub id (text LM or VLM)")
    parser.add_argument("--data", required=True, help="trajectories.jsonl from collect.py (only split train is used), or "
                        "TRL's SFT conversations (`messages`: optional system, one user and one assistant turn)")
    parser.add_argument("--out", required=True, help="model folder of the result; checkpoints/, metrics.jsonl and the "
                        "summary go to the run folder OUT.run beside it")
    parser.add_argument("--drop-unanswered", action="store_true",
                        help="drop trajectories without a parseable 'Answer:' line (refusals); by default they are "
                             "kept, as the paper trains on the union of all trajectories. Counted either way")
    training.add_training_args(parser, lr=None, max_length=2304, batch_size=2, warmup=0.05, global_batch=32)
    training.add_lora_args(parser, dropout=0.05)
    next(a for a in parser._actions if a.dest == "lr").help = "peak learning rate (default: 1e-5, 1e-4 with --lora-rank)"
    args = training.parse_with_config(parser, argv)
    if args.lr is None:  # the recipe's rate for adapters; full fine-tuning of every weight wants ~10x less
        args.lr = 1e-4 if args.lora_rank else 1e-5
    return args


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    main()
