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

from common import training, trajectories
from common.records import lazy_import
from common.run import Run

# Loaded on first use, so that --help and a wrong flag answer at once (torch alone takes seconds).
torch = lazy_import("torch")
modeling = lazy_import("common.modeling")

# What decides the trained weights besides the model, the data and the loop (training.run_config).
SETTINGS = ("drop_unanswered", "max_length")


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
        data, counts, held_out = trajectories.training_data(run, args, SETTINGS)  # read and measured before any model is loaded
        if data is None:  # OUT already holds this run, finished
            return
        accelerator, examples = run.accelerator, data.examples
        micro_global = args.batch_size * accelerator.num_processes  # examples per micro-batch, all processes together
        total = training.total_steps(len(examples), micro_global, args, accelerator.print)
        model, lora = training.load_trainable_model(args, accelerator)
        module, optimizer, scheduler = training.prepare_training(accelerator, modeling.ResponseLogps(model), args, total)
        held_out = trajectories.usable_held_out(data.processor, held_out, args, accelerator)
        run.resume(module, total, f"{len(examples)} examples from {counts['train_instances']} train instances",
                   unit=" examples")
        micro_batch = training.MicroBatches([ex.length for ex in examples], micro_global, args.seed)

        for step in run.steps():
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
            done, seen = step + 1, (step + 1) * args.grad_accum * micro_batch.global_batch
            run.log(done, {
                "loss": loss.item(), "learning_rate": lr, "grad_norm": grad_norm,
                "tokens_per_s": sum(micro_batch.lengths[i] for b in micro for i in b) / (time.perf_counter() - began),
                "examples_seen": seen, "epoch": seen / (micro_batch.per_epoch * micro_batch.global_batch),
            })
            if training.eval_due(args, done, total):
                run.log_eval(done, {"loss": held_out_loss(accelerator, module, held_out, args)})

        run.save(module, data.processor, lora)
        run.summary(f"{len(examples)} examples ({left_out(data, counts, args)})", examples=len(examples), **counts,
                    truncated=data.truncated, prompt_too_long=data.too_long)


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
