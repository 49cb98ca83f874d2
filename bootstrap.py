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
import time
from pathlib import Path

from tqdm.auto import tqdm

from common import training, trajectories
from common.records import RecordError, file_hash, lazy_import
from common.run import Run

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
# The stage


def train(args):
    with Run("bootstrap", args, project="apo-bootstrap") as run:
        data, counts, held_out = training_data(run, args)  # read and measured before any model is loaded
        if data is None:  # OUT already holds this run, finished
            return
        accelerator, examples = run.accelerator, data.examples
        micro_global = args.batch_size * accelerator.num_processes  # examples per micro-batch, all processes together
        total = training.total_steps(len(examples), micro_global, args, accelerator.print)
        model, lora = training.load_trainable_model(args, accelerator)
        module, optimizer, scheduler = training.prepare_training(accelerator, modeling.ResponseLogps(model), args, total)
        held_out = trajectories.usable_held_out(data.processor, held_out, args, accelerator)
        start = run.resume(module, total)
        accelerator.print(f"bootstrap: {len(examples)} examples from {counts['train_instances']} train instances, "
                          + training.describe_steps(accelerator, args, total, start, unit=" examples"), flush=True)
        micro_batch = training.MicroBatches([ex.length for ex in examples], micro_global, args.seed)

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
                batch = data.batch([examples[i] for i in rows])
                with accelerator.accumulate(module):
                    nll = sft_step_loss(module, batch, accelerator.device)
                    accelerator.backward(nll * scale)
                    nll_sum += nll.detach()
                    if accelerator.sync_gradients:
                        loss = accelerator.reduce(nll_sum, reduction="sum") / step_tokens
                        run.check_finite(loss, step + 1, {examples[i].record["id"] for b in micro for i in b})
                        lr, grad_norm = training.optimizer_step(accelerator, module, optimizer, scheduler, args, step + 1)
            done = step + 1
            log_step(run, progress, done, total, loss, lr, grad_norm, args, micro_batch, micro, began)
            if training.eval_due(args, done, total):
                run.log_eval(done, {"loss": held_out_loss(accelerator, module, held_out, args)})
            run.end_of_step(done)
        progress.close()

        run.save(module, data.processor, lora)
        summary = run.summary(examples=len(examples), **counts, truncated=data.truncated, prompt_too_long=data.too_long)
        accelerator.print(f"bootstrap: {total} steps on {len(examples)} examples, loss {summary['first_loss']} -> "
                          f"{summary['final_loss']}; {left_out(data, counts, args)}; model in {args.out}")


def training_data(run, args):
    """The training examples that fit (trajectories.TrajectoryData), what was left out (counted) and
    the held-out examples, with the run started; (None, None, None) when OUT holds this run, finished."""
    examples, counts, held_out, vision = trajectories.read_data(args)  # a bad line ends the run here
    accelerator = run.start(vision, text_only_rows=any(not ex.record.get("images") for ex in examples))
    if run.finished(run_config(args, accelerator)):  # another run's folder is refused now, not after loading
        return None, None, None
    processor = load_processor(args.model)
    data = trajectories.usable_examples(processor, examples, args, accelerator, args.batch_size * accelerator.num_processes)
    return data, counts, held_out


def load_processor(model):
    try:
        return modeling.load_processor(model)
    except OSError as e:  # a broken or missing tokenizer is a RecordError from load_processor itself
        raise RecordError(model, None, None, f"cannot load the model's tokenizer/processor: {e}") from None


def log_step(run, progress, done, total, loss, lr, grad_norm, args, micro_batch, micro, began):
    """The step on the progress bar and, every --log-every steps and at the last, in the metrics."""
    progress.update(1)
    progress.set_postfix(loss=f"{loss.item():.4f}")
    if done % args.log_every == 0 or done == total:
        seen = done * args.grad_accum * micro_batch.global_batch
        run.log(done, {
            "loss": loss.item(), "learning_rate": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": sum(micro_batch.lengths[i] for b in micro for i in b) / (time.perf_counter() - began),
            "examples_seen": seen, "epoch": seen / (micro_batch.per_epoch * micro_batch.global_batch),
        })


def left_out(data, counts, args):
    """What the closing line says was left out or cut."""
    unanswered = f"{counts['unanswered']} unanswered {'dropped' if args.drop_unanswered else 'kept'}"
    return (f"{unanswered}, {data.truncated} truncated, {data.too_long} skipped (prompt too long), "
            f"{counts['empty_trajectories']} empty")


@training.no_grad
def held_out_loss(accelerator, module, held_out, args):
    """Mean NLL per response token of the held-out examples (the training loss's measure). Every
    process runs the same number of forwards (training.held_out_batches)."""
    nll = torch.zeros((), device=accelerator.device)
    for rows, counted in training.held_out_batches(len(held_out.examples), args.batch_size, accelerator):
        nll += sft_step_loss(module, held_out.batch([held_out.examples[j] for j in rows]), accelerator.device) * counted
    tokens = sum(ex.response_tokens for ex in held_out.examples)
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
