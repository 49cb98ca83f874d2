"""Stage 4: constraint-aware preference optimisation (APO), the heart of the method.

The consensus written by the bootstrapped model is the positive, the source answers it overruled
are the negatives ("drift as constraint"), the bootstrapped model is the frozen reference, and the
loss is apo_loss.py's multi-negative Plackett-Luce objective (the paper's Eqs. (6)-(9)):

    r(y) = beta * (log pi_theta(y|x) - log pi_ref(y|x));   L_APO = logsumexp([r+, r-_1 .. r-_K]) - r+

    accelerate launch apo.py --model runs/bootstrap --data runs/preferences.jsonl --out runs/apo

The reference log-probs are computed once from the initial weights and cached in OUT.run
(common/reference.py). Departures from the paper, all off by default but the last: --max-negatives
keeps the most drifted negatives; --nll-weight adds the chosen response's NLL; --length-normalize
scores per-token averages; --loss dpo-pairs is the official scripts' pairwise loss; every weight is
trained, where the official recipe trains LoRA adapters (--lora-rank 8).
"""

import argparse
import time

from common import preferences, training
from common.records import lazy_import
from common.reference import REFERENCE_FILE, reference_logps
from common.run import Run, run_folder

# Loaded on first use, so that --help and a wrong flag answer at once (torch alone takes seconds).
torch = lazy_import("torch")
apo_loss = lazy_import("apo_loss")
modeling = lazy_import("common.modeling")
shared_prompt = lazy_import("common.shared_prompt")

# What decides the trained weights besides the model, the data and the loop (training.run_config).
SETTINGS = ("max_length", "max_negatives", "beta", "loss", "nll_weight", "share_prompt", "length_normalize")
LOSS_NAMES = ("apo", "dpo-pairs")  # apo_loss.LOSSES, named here for --help (test_apo_stage checks they agree)


def apo_step_loss(module, batch, reference, device, args):
    """Per-instance losses [B] of one micro-batch, and the sums its metrics are made of.

    reference: (chosen [B], rejected [B, K]) cached log-probs of the initial weights (summed).
    args: --beta, --loss (apo_loss.LOSSES), --nll-weight, --length-normalize (rewards from
    per-token averages, for both models).
    The sums (a dict of scalars) add up over micro-batches and processes; step_metrics divides.
    """
    chosen, rejected, mask, (chosen_tokens, rejected_tokens) = concatenated_forward(module, batch, device)
    ref_chosen, ref_rejected = (t.to(device) for t in reference)
    pc, pr, rc, rr = chosen, rejected, ref_chosen, ref_rejected[:, :rejected.shape[1]]
    if args.length_normalize:
        pc, rc = apo_loss.per_token_logps(pc, chosen_tokens), apo_loss.per_token_logps(rc, chosen_tokens)
        pr, rr = apo_loss.per_token_logps(pr, rejected_tokens), apo_loss.per_token_logps(rr, rejected_tokens)
    losses, chosen_rewards, rejected_rewards = apo_loss.LOSSES[args.loss](pc, pr, rc, rr, beta=args.beta, rejected_mask=mask)
    nll = -chosen / chosen_tokens.clamp(min=1)
    if args.nll_weight:
        losses = losses + args.nll_weight * nll
    # Accuracy and margin against the hardest negative: the positive must beat every one of them.
    hardest = rejected_rewards.masked_fill(~mask, float("-inf")).max(1).values
    sums = {
        "instances": len(losses), "loss": losses.detach().sum(),
        "rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > hardest).float().sum(),
        "rewards/margins": (chosen_rewards - hardest).sum(),
        "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().masked_fill(~mask, 0).sum(),
        "nll_loss": nll.detach().sum(),
        "negatives": mask.sum(), "tokens": batch["tokens"],
    }
    return losses, {k: torch.as_tensor(v, device=device).float() for k, v in sums.items()}


def concatenated_forward(module, batch, device):
    """Summed log-probs of every instance's responses in one forward (the original DPO code's
    concatenated_forward): chosen [B], rejected [B, K], mask [B, K] (True where a negative is real)
    and the response token counts (chosen [B], rejected [B, K]).

    module is modeling.ResponseLogps around the model: rows [prompt + response], the decoder's last
    hidden states, and log pi(y|x) = sum over the response tokens of log softmax(W h)[y], in chunks
    (apo_loss.sequence_logps); with --share-prompt, shared_prompt.SharedPromptLogps: the same sums
    from one packed row per instance.
    """
    logps, counts = module(**{k: v.to(device) for k, v in batch["inputs"].items()})
    chosen, rejected, mask = split_rows(logps, batch["num_negatives"])
    chosen_tokens, rejected_tokens, _ = split_rows(counts, batch["num_negatives"])
    return chosen, rejected, mask, (chosen_tokens, rejected_tokens)


def split_rows(row_values, num_negatives):
    """Per-row values in item order (chosen, then its negatives) -> chosen [B], rejected [B, K], mask [B, K]."""
    num_negatives = num_negatives.to(row_values.device)
    starts = torch.cumsum(num_negatives + 1, 0) - (num_negatives + 1)
    width = int(num_negatives.max())
    offsets = torch.arange(1, width + 1, device=row_values.device)
    mask = offsets[None, :] <= num_negatives[:, None]
    index = torch.where(mask, starts[:, None] + offsets[None, :], starts[:, None])
    return row_values[starts], row_values[index], mask


def step_metrics(sums, seconds=None):
    """An optimizer step's metrics (TRL's and ms-swift's names) from the sums of its micro-batches.

    At K = 1 each is TRL DPOTrainer's. With K negatives, rewards/rejected and logps/rejected are
    means over all real negatives, and rewards/accuracies and rewards/margins are taken against
    the hardest negative (the one of highest reward): the positive must beat every one.
    """
    s = {k: v.item() for k, v in sums.items()}
    n = s["instances"]
    means = {k: s[k] / n for k in ("loss", "rewards/chosen", "rewards/accuracies", "rewards/margins",
                                   "logps/chosen", "nll_loss")}
    negatives = max(1.0, s["negatives"])
    means.update({"rewards/rejected": s["rewards/rejected"] / negatives, "logps/rejected": s["logps/rejected"] / negatives})
    if seconds is not None:
        means["tokens_per_s"] = s["tokens"] / max(seconds, 1e-9)
    return means


# ---------------------------------------------------------------------------------------------
# The stage


def train(args):
    with Run("apo", args) as run:
        data, eval_records = preferences.training_data(run, args, SETTINGS)  # read and measured before any model is loaded
        if data is None:  # OUT already holds this run, finished
            return
        accelerator, examples = run.accelerator, data.examples
        micro_global = args.batch_size * accelerator.num_processes  # instances per micro-batch, all processes together
        total = 0 if args.reference_only else training.total_steps(len(examples), micro_global, args, accelerator.print)
        # Dropout off: at step 0 the policy must compute exactly the reference's log-probs (rewards 0).
        model, lora = training.load_trainable_model(args, accelerator, dropout=False)
        module, optimizer, scheduler = training.prepare_training(accelerator, logps_module(model, args), args, total)
        # The frozen reference: the initial weights' log-probs (cached), taken before a checkpoint loads.
        reference, reference_state = reference_logps(accelerator, model, examples, run.config, args.out,
                                                     reference_forward(accelerator, module, data), args.batch_size)
        if args.reference_only:
            return accelerator.print(f"apo: reference log-probs {reference_state} for {data.described()} -> "
                                     f"{run_folder(args.out) / REFERENCE_FILE}")
        held_out = preferences.held_out(accelerator, data.processor, eval_records, args,
                                        lambda held: reference_forward(accelerator, module, held))
        run.resume(module, total, f"{len(examples)} preferences")
        micro_batch = training.MicroBatches([ex.length for ex in examples], micro_global, args.seed)

        for step in run.steps():
            began, totals = time.perf_counter(), None
            for k in range(args.grad_accum):
                rows = training.shard(micro_batch(step * args.grad_accum + k), accelerator)
                batch = data.batch([examples[i] for i in rows])
                with accelerator.accumulate(module):
                    ref = (reference["chosen"][rows], reference["rejected"][rows])
                    losses, sums = apo_step_loss(module, batch, ref, accelerator.device, args)
                    # The mean over this process's instances; accelerate divides by grad_accum and DDP
                    # averages over processes, so the step's gradient is the global batch mean.
                    accelerator.backward(losses.mean())
                    totals = sums if totals is None else {name: totals[name] + sums[name] for name in sums}
                    if accelerator.sync_gradients:
                        totals = accelerator.reduce(totals, reduction="sum")
                        run.check_finite(totals["loss"], step + 1)
                        lr, grad_norm = training.optimizer_step(accelerator, module, optimizer, scheduler, args, step + 1)
            done = step + 1
            run.log(done, dict(step_metrics(totals, time.perf_counter() - began), learning_rate=lr, grad_norm=grad_norm,
                               epoch=done * args.grad_accum / micro_batch.per_epoch), shown=("loss", "rewards/accuracies"))
            if training.eval_due(args, done, total):
                run.log_eval(done, evaluate_preferences(accelerator, module, held_out, args))

        run.save(module, data.processor, lora)
        run.summary(f"{data.described()}, reference log-probs {reference_state}", preferences=len(examples),
                    prompt_too_long=len(data.skipped), truncated=data.truncated, reference_logps=reference_state)


def reference_forward(accelerator, module, data):
    """compute_reference's forward: examples -> their summed log-probs (chosen, rejected, mask)."""
    return lambda examples: concatenated_forward(module, data.batch(examples), accelerator.device)[:3]


@training.no_grad
def evaluate_preferences(accelerator, module, held_out, args):
    """TRL's eval metrics on the held-out preferences: loss, reward accuracy and margin (against the
    hardest negative), rewards and log-probs. Each process takes a share of the batches; every
    process runs the same number of forwards (training.held_out_batches)."""
    (data, reference), totals = held_out, None
    for rows, counted in training.held_out_batches(len(data.examples), args.batch_size, accelerator):
        ref = (reference["chosen"][rows], reference["rejected"][rows])
        _, sums = apo_step_loss(module, data.batch([data.examples[j] for j in rows]), ref, accelerator.device, args)
        sums = {k: v * counted for k, v in sums.items()}
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
    return step_metrics(accelerator.reduce(totals, reduction="sum"))


def logps_module(model, args):
    """What the loop calls for summed log-probs: one row per response, or one packed row per
    instance (--share-prompt)."""
    if args.share_prompt:
        shared_prompt.check_attention(model, args.model)
        return shared_prompt.SharedPromptLogps(model, args.chunk_size)
    return modeling.ResponseLogps(model, args.chunk_size)


EPILOG = """losses (--loss):
  apo        the paper's multi-negative Plackett-Luce loss over the consensus and its K negatives
  dpo-pairs  pairwise DPO averaged over the (consensus, negative) pairs, what the official ms-swift
             scripts run; equal to apo at K = 1
--length-normalize scores each response by its per-token average log-prob (SimPO / LD-DPO), for
policy and reference alike: rewards shrink by about the response length, so beta wants to grow.
--data rows of TRL's preference format that share a prompt and chosen become one instance with K
negatives. OUT holds only the model; checkpoints/, metrics.jsonl, the reference cache and the
summary go to the run folder OUT.run beside it. docs/RELIABILITY.md: resume, signals, exit codes."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the bootstrapped model (bootstrap.py's output folder, or "
                        "any Hugging Face folder or hub id): initial policy and frozen reference")
    parser.add_argument("--data", required=True, help="preferences.jsonl written by consensus.py, or TRL's "
                        "preference format (prompt / chosen / rejected; JSONL or any file datasets loads)")
    parser.add_argument("--out", required=True, help="model folder of the result (run files in OUT.run)")
    apo = parser.add_argument_group("APO")
    apo.add_argument("--beta", type=float, default=0.1, help="reward scale of the loss (default: %(default)s)")
    apo.add_argument("--loss", choices=LOSS_NAMES, default="apo", help="the objective, see below (default: %(default)s)")
    apo.add_argument("--max-negatives", type=int, default=None,
                     help="keep at most this many negatives per instance, the highest-drift ones first "
                          "(ties and records without 'drift' keep file order); default: all")
    apo.add_argument("--nll-weight", type=float, default=0.0,
                     help="add this times the chosen response's token-mean NLL to the loss, like ms-swift "
                          "DPO's rpo_alpha (default: %(default)s)")
    apo.add_argument("--length-normalize", action="store_true",
                     help="rewards from the average log-prob per response token instead of the sum (see below)")
    apo.add_argument("--share-prompt", action="store_true",
                     help="text models: encode each prompt once for all 1 + K responses (one packed row per "
                          "instance with a block attention mask); needs the sdpa or eager attention")
    apo.add_argument("--chunk-size", type=int, default=1024,
                     help="tokens per chunk of the output projection when summing log-probs (default: %(default)s)")
    apo.add_argument("--reference-only", action="store_true",
                     help="compute (or check) the cached reference log-probs, then stop")
    training.add_training_args(parser, lr=5e-7, max_length=4096, batch_size=1, warmup=0.05, global_batch=32)
    # Every other dropout is switched off (disable_dropout); the adapters' is the user's to choose.
    training.add_lora_args(parser, dropout=0.0)
    args = training.parse_with_config(parser, argv)
    if args.max_negatives is not None and args.max_negatives < 1:
        parser.error("--max-negatives must be at least 1")
    return args


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    main()
