"""Stage 4: constraint-aware optimisation (APO), the heart of the method.

The consensus written by the bootstrapped model is the positive, the source trajectories it
overruled are the negatives ("drift as constraint"), the bootstrapped model is the frozen reference,
and the loss is the multi-negative Plackett-Luce objective of apo_loss.py (the paper's Eqs. (6)-(9)):

    r(y)  = beta * (log pi_theta(y|x) - log pi_ref(y|x))
    L_APO = logsumexp([r+, r-_1 .. r-_K]) - r+

    accelerate launch apo.py --model runs/bootstrap --data runs/preferences.jsonl --out runs/apo
    python apo.py ...                                    # one process is fine too

Read in this order: `apo_step_loss`, the objective of one micro-batch, and `concatenated_forward`,
the one forward it takes; then the data; then `train`, the stage; then the reference log-probs'
cache. shared_prompt.py holds the optional --share-prompt packing.

What happens, top to bottom:
1. preferences.jsonl is validated whole and encoded (a prompt that leaves no room under
   --max-length is skipped and counted; a response that does not fit is cut at its end).
2. The policy is loaded from the bootstrapped model. The reference log-probs of every (prompt,
   response) are computed ONCE, by a no-grad pass of those same initial weights, before the first
   update (each process its share, summed across processes), and cached in
   OUT.run/reference_logps.safetensors with what they depend on as metadata: a rerun or a resumed run
   reuses them, a mismatch recomputes them. Only one model is ever in memory (with --lora-rank too:
   the adapters start at zero, so the adapted model before its first update computes the base's).
3. Training: each instance's 1 + K responses go through one forward together (rows = chosen +
   negatives, variable K masked), summed response log-probs come from hidden states in chunks
   (never the [rows, tokens, vocab] logits), then the loss.
4. Checkpoints (exact resume: rerun the same command), metrics.jsonl, the final Hugging Face
   folder in OUT, and training_summary.json last: a finished run, rerun, does nothing. OUT holds
   only the model (what from_pretrained and vLLM read); everything else is in the run folder OUT.run.

Where this departs from the paper (all off by default but the last; README lists them too):
--max-negatives keeps the most drifted negatives first; --nll-weight adds the chosen response's
NLL; --length-normalize scores responses by their per-token average log-prob; --loss dpo-pairs is the pairwise loss the official scripts run; every weight is trained by
default, where the official recipe trains LoRA adapters (--lora-rank 8).
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import training
from common.records import RecordError, disk_full_reported, fail, file_hash, lazy_import
from common.trl_format import read_preferences

# Loaded on first use, so that --help and a wrong flag answer at once (torch alone takes seconds).
torch = lazy_import("torch")
apo_loss = lazy_import("apo_loss")
modeling = lazy_import("common.modeling")
shared_prompt = lazy_import("common.shared_prompt")

REFERENCE_FILE = "reference_logps.safetensors"
LOSS_NAMES = ("apo", "dpo-pairs")  # apo_loss.LOSSES, named here for --help (test_apo_stage checks they agree)
# Bump when the log-prob computation changes, so caches written by older code are recomputed.
REFERENCE_VERSION = "1"
TENSORS_SHA256 = "tensors_sha256"  # metadata key: the cached values as saved


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the bootstrapped model (bootstrap.py's output folder, or "
                        "any Hugging Face folder or hub id): initial policy and frozen reference")
    parser.add_argument("--data", required=True, help="preferences.jsonl written by consensus.py, or TRL's preference "
                        "format (prompt / chosen / rejected, standard or conversational; JSONL or any file datasets "
                        "loads): rows sharing a prompt and chosen become one instance with K negatives")
    parser.add_argument("--out", required=True, help="model folder of the result; checkpoints/, metrics.jsonl, "
                        f"{REFERENCE_FILE} and the summary go to the run folder OUT.run beside it")
    apo = parser.add_argument_group("APO")
    apo.add_argument("--beta", type=float, default=0.1, help="reward scale of the loss (default: %(default)s)")
    apo.add_argument("--loss", choices=LOSS_NAMES, default="apo",
                     help="'apo': the paper's multi-negative Plackett-Luce loss; 'dpo-pairs': pairwise DPO averaged "
                          "over the (consensus, negative) pairs, what the official ms-swift scripts run. Equal at "
                          "K = 1 (default: %(default)s)")
    apo.add_argument("--max-negatives", type=int, default=None,
                     help="keep at most this many negatives per instance, the highest-drift ones first "
                          "(ties and records without 'drift' keep file order); default: all")
    apo.add_argument("--nll-weight", type=float, default=0.0,
                     help="add this times the chosen response's token-mean NLL to the loss, like ms-swift "
                          "DPO's rpo_alpha (default: %(default)s)")
    apo.add_argument("--length-normalize", action="store_true",
                     help="departure from the paper (off by default): rewards from the average log-prob per "
                          "response token (SimPO / LD-DPO) instead of the sum, for policy and reference alike; "
                          "rewards shrink by about the response length, so beta wants to grow accordingly")
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


# ---------------------------------------------------------------------------------------------
# The objective of one micro-batch, and the one forward it takes


def apo_step_loss(module, batch, reference, device, beta, nll_weight, loss="apo", length_normalize=False):
    """Per-instance losses [B] of one micro-batch, and the sums its metrics are made of.

    reference: (chosen [B], rejected [B, K]) cached log-probs of the initial weights (summed).
    length_normalize: rewards from per-token averages (--length-normalize), for both models.
    The sums (a dict of scalars) add up over micro-batches and processes; step_metrics divides.
    """
    logps, counts = row_logps(module, batch, device)
    chosen, rejected, mask = split_rows(logps, batch["num_negatives"])
    chosen_tokens, rejected_tokens, _ = split_rows(counts, batch["num_negatives"])
    ref_chosen, ref_rejected = (t.to(device) for t in reference)
    ref_rejected = ref_rejected[:, :rejected.shape[1]]
    pc, pr, rc, rr = chosen, rejected, ref_chosen, ref_rejected
    if length_normalize:
        pc, rc = apo_loss.per_token_logps(pc, chosen_tokens), apo_loss.per_token_logps(rc, chosen_tokens)
        pr, rr = apo_loss.per_token_logps(pr, rejected_tokens), apo_loss.per_token_logps(rr, rejected_tokens)
    losses, chosen_rewards, rejected_rewards = apo_loss.LOSSES[loss](pc, pr, rc, rr, beta=beta, rejected_mask=mask)
    nll = -chosen / chosen_tokens.clamp(min=1)
    if nll_weight:
        losses = losses + nll_weight * nll
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
    """Summed log-probs of every instance's responses, all in one forward (the original DPO code's
    concatenated_forward): chosen [B], rejected [B, K], mask [B, K] (True where a negative is
    real), and the chosen responses' token counts [B].

    module is modeling.ResponseLogps around the model: rows [prompt + response], the decoder's last
    hidden states, and log pi(y|x) = sum over the response tokens of log softmax(W h)[y]
    (apo_loss.sequence_logps_plain), computed by apo_loss.sequence_logps in chunks. With
    --share-prompt it is shared_prompt.SharedPromptLogps: the same sums from one packed row per
    instance.
    """
    logps, counts = row_logps(module, batch, device)
    chosen, rejected, mask = split_rows(logps, batch["num_negatives"])
    chosen_tokens, _, _ = split_rows(counts, batch["num_negatives"])
    return chosen, rejected, mask, chosen_tokens


def row_logps(module, batch, device):
    """Summed response log-probs and response token counts of every row, in item order."""
    return module(**{k: v.to(device) for k, v in batch["inputs"].items()})


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
# Data: which negatives each instance keeps, and its token ids


@dataclass
class Example:
    record: dict
    negatives: list  # indices into record["rejected"], in training order
    length: int = 0  # forward_length: the cost used to group batches


def build_examples(records, max_negatives, data_path):
    return [Example(r, select_negatives(r, max_negatives, data_path)) for r in records]


def select_negatives(record, max_negatives, data_path):
    """The negatives an instance trains on: the most drifted first, since an answer far from the
    consensus is the constraint the method is about; ties (and records without drift) keep file order."""
    order = list(range(len(record["rejected"])))
    drift = record.get("drift")
    if drift is not None:
        if not all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in drift):
            raise RecordError(data_path, record["_line"], "drift", "must be a list of numbers")
        order.sort(key=lambda i: -drift[i])
    return order[:max_negatives] if max_negatives else order


def responses_of(example):
    return [example.record["chosen"]] + [example.record["rejected"][i] for i in example.negatives]


def measure_examples(processor, examples, args, data_path, accelerator):
    """The examples that fit, with their lengths; the skipped prompts (messages); responses cut.

    Each process encodes a share and the results are gathered, so images are processed once in
    all rather than once per GPU. A prompt that leaves no room under --max-length is skipped.
    """
    from accelerate.utils import gather_object

    rows = []  # (example index, length or None, responses cut or skip message)
    for i in range(accelerator.process_index, len(examples), accelerator.num_processes):
        ex = examples[i]
        try:
            enc = modeling.encode(processor, ex.record, responses_of(ex), args.max_length, data_path)
        except modeling.PromptTooLong as e:
            rows.append((i, None, f"{data_path}:{ex.record['_line']}: {e}"))
            continue
        rows.append((i, forward_length(enc, args.share_prompt), enc.truncated))
    if accelerator.num_processes > 1:
        rows = gather_object(rows)
    kept, skipped, truncated = [], [], 0
    for i, length, extra in sorted(rows, key=lambda row: row[0]):
        if length is None:
            skipped.append(extra)
        else:
            examples[i].length = length
            kept.append(examples[i])
            truncated += extra
    return kept, skipped, truncated


def forward_length(encoded, share_prompt):
    """Tokens an instance puts through the model: the cost that groups batches of similar length."""
    responses = sum(len(r) for r in encoded.responses)
    return len(encoded.prompt_ids) * (1 if share_prompt else len(encoded.responses)) + responses


def encode_examples(processor, examples, args, data_path):
    # Encoded again when used (cheap next to a forward), so the whole data set's ids and image
    # tensors never sit in memory at once.
    return [modeling.encode(processor, ex.record, responses_of(ex), args.max_length, data_path) for ex in examples]


def make_batch(encoded_items, pad_id, share_prompt):
    """Model inputs for the items plus the layout: how many negatives each item has."""
    if share_prompt:
        inputs = shared_prompt.pack_shared_prompt(encoded_items, pad_id)
    else:
        inputs = modeling.collate(encoded_items, pad_id)
    num_negatives = torch.tensor([len(e.responses) - 1 for e in encoded_items])
    # Tokens as the usual implementation sees them (the prompt once per response), so tokens/s
    # compares directly with and without --share-prompt.
    tokens = sum(len(e.prompt_ids) + len(r) for e in encoded_items for r in e.responses)
    return {"inputs": inputs, "num_negatives": num_negatives, "tokens": tokens}


# ---------------------------------------------------------------------------------------------
# The stage


def train(args):
    from tqdm.auto import tqdm

    out, data_path = Path(args.out), Path(args.data)

    # Data first: a bad line ends the run before any model is loaded.
    records = read_preferences(data_path)  # preferences.jsonl or TRL's preference format
    eval_records = read_preferences(args.eval_data) if args.eval_data else None
    examples = build_examples(records, args.max_negatives, data_path)
    try:
        vision = modeling.is_vision_model(args.model)  # a folder's config.json, or a hub id's config
    except (OSError, ValueError) as e:
        raise RecordError(args.model, None, None, f"not a model folder or hub id: cannot read its config ({e})") from None
    check_inputs(records, vision, args, data_path)

    accelerator = training.start_run(args, "apo.py", vision, text_only_rows=any(not r.get("images") for r in records))
    config = run_config(args, accelerator, file_hash(data_path))
    done = training.finished_run(out, config)  # another run's folder is refused now, not after the reference pass
    if done is not None and not args.reference_only:
        accelerator.print(f"apo: nothing to do, {out} already holds the finished model "
                          f"({done['steps']} steps, final loss {done['final_loss']})")
        return

    processor = modeling.load_processor(args.model)
    examples, skipped, truncated = measure_examples(processor, examples, args, data_path, accelerator)
    if accelerator.is_main_process:
        for line in skipped:
            print(f"skipped {line}", file=sys.stderr)
    if not examples:
        raise RecordError(data_path, None, None, f"no usable preference ({len(skipped)} prompts longer than --max-length)")
    micro_global = args.batch_size * accelerator.num_processes
    if not args.reference_only and len(examples) < micro_global:
        raise RecordError(data_path, None, None, f"{len(examples)} usable preferences, fewer than one micro-batch "
                                                 f"over all processes ({micro_global})")
    total = 0 if args.reference_only else training.total_steps(len(examples), micro_global, args, accelerator.print)

    # Dropout off: at step 0 the policy must compute exactly the reference's log-probs (rewards 0).
    model, lora = training.load_trainable_model(args, accelerator, dropout=False)
    module, optimizer, scheduler = training.prepare_training(accelerator, logps_module(model, args), args, total)

    # Reference log-probs: from the initial weights, so before a checkpoint's weights are loaded.
    reference, reference_state = reference_logps(accelerator, module, model, processor, examples, config, args)
    if args.reference_only:
        accelerator.print(f"apo: reference log-probs {reference_state} for {len(examples)} preferences "
                          f"({len(skipped)} skipped: prompt too long; {truncated} responses truncated) "
                          f"-> {training.run_folder(out) / REFERENCE_FILE}")
        return

    held_out = held_out_preferences(accelerator, module, processor, eval_records, args)  # before a checkpoint's weights load
    start, metrics = training.resume_run(accelerator, out, config, args, "apo", total)
    training.init_weights(accelerator, module, config, start)
    accelerator.print(f"apo: {len(examples)} preferences, " + training.describe_steps(accelerator, args, total, start),
                      flush=True)
    micro_batch = training.MicroBatches([ex.length for ex in examples], micro_global, args.seed)
    pad_id = modeling.tokenizer_of(processor).pad_token_id

    last = None
    stop = training.stop_on_signal()
    progress = tqdm(total=total, initial=start, desc="apo", disable=not accelerator.is_local_main_process)
    for step in range(start, total):
        began = time.perf_counter()
        totals = None
        for k in range(args.grad_accum):
            rows = training.shard(micro_batch(step * args.grad_accum + k), accelerator)
            batch = make_batch(encode_examples(processor, [examples[i] for i in rows], args, data_path), pad_id,
                               args.share_prompt)
            ref = (reference["chosen"][rows], reference["rejected"][rows])
            with accelerator.accumulate(module):
                losses, sums = apo_step_loss(module, batch, ref, accelerator.device, args.beta, args.nll_weight,
                                             args.loss, args.length_normalize)
                # The mean over this process's instances; accelerate divides by grad_accum and DDP
                # averages over processes, so the step's gradient is the global batch mean.
                accelerator.backward(losses.mean())
                totals = sums if totals is None else {name: totals[name] + sums[name] for name in sums}
                if accelerator.sync_gradients:
                    totals = accelerator.reduce(totals, reduction="sum")
                    training.check_finite(totals["loss"], step + 1, out)
                    lr, grad_norm = training.optimizer_step(accelerator, module, optimizer, scheduler, args, step + 1)
        done = step + 1
        last = step_metrics(totals, time.perf_counter() - began)
        progress.update(1)
        progress.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracies']:.2f}")
        if done % args.log_every == 0 or done == total:
            metrics.log(done, dict(last, learning_rate=lr, grad_norm=None if grad_norm is None else float(grad_norm),
                                   epoch=done * args.grad_accum / micro_batch.per_epoch))
        if training.eval_due(args, done, total):
            metrics.log_eval(done, evaluate_preferences(accelerator, module, processor, held_out, args, pad_id))
        training.end_of_step(accelerator, out, done, total, {"config": config}, args, stop)
    progress.close()

    training.save_final(accelerator, module, processor, out, total, start, config, args, lora)
    training.write_summary(accelerator, out, {
        "config": config, "steps": total, "preferences": len(examples), "prompt_too_long": len(skipped),
        "truncated": truncated, "reference_logps": reference_state}, stage="apo")
    accelerator.end_training()
    result = (f"last step loss {last['loss']:.4f}, reward accuracy {last['rewards/accuracies']:.2f}, "
              f"margin {last['rewards/margins']:.4f}" if last else "nothing left to train")
    accelerator.print(f"apo: {total} steps on {len(examples)} preferences ({len(skipped)} skipped: prompt too long; "
                      f"{truncated} responses truncated), reference log-probs {reference_state}; {result}; "
                      f"model in {out}")


def held_out_preferences(accelerator, module, processor, records, args):
    """--eval-data's usable examples and their reference log-probs (the initial weights'), or None."""
    from tqdm.auto import tqdm

    if records is None:
        return None
    path = Path(args.eval_data)
    examples = build_examples(records, args.max_negatives, path)
    examples, skipped, _ = measure_examples(processor, examples, args, path, accelerator)
    if not examples:
        raise RecordError(path, None, None, f"no usable preference ({len(skipped)} prompts longer than --max-length)")
    with tqdm(total=len(examples), desc="held-out reference", disable=not accelerator.is_main_process) as bar:
        reference = compute_reference(accelerator, module, processor, examples, args, path, bar)
    return examples, reference, path


@training.no_grad
def evaluate_preferences(accelerator, module, processor, held_out, args, pad_id):
    """TRL's eval metrics on the held-out preferences: loss, reward accuracy and margin (against the
    hardest negative), rewards and log-probs. Each process takes a share of the batches; every
    process runs the same number of forwards (FSDP's are collective), repeats counting nothing."""
    examples, reference, path = held_out
    batches = [list(range(i, min(i + args.batch_size, len(examples)))) for i in range(0, len(examples), args.batch_size)]
    real = len(batches)
    batches += batches[-1:] * (-len(batches) % accelerator.num_processes)
    totals = None
    for i in range(accelerator.process_index, len(batches), accelerator.num_processes):
        rows = batches[i]
        batch = make_batch(encode_examples(processor, [examples[j] for j in rows], args, path), pad_id,
                           args.share_prompt)
        _, sums = apo_step_loss(module, batch, (reference["chosen"][rows], reference["rejected"][rows]),
                                accelerator.device, args.beta, args.nll_weight, args.loss)
        sums = {k: v * (i < real) for k, v in sums.items()}
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
    return step_metrics(accelerator.reduce(totals, reduction="sum"))


def logps_module(model, args):
    """What the loop calls for summed log-probs: one row per response, or one packed row per
    instance (--share-prompt)."""
    if args.share_prompt:
        shared_prompt.check_attention(model, args.model)
        return shared_prompt.SharedPromptLogps(model, args.chunk_size)
    return modeling.ResponseLogps(model, args.chunk_size)


def check_inputs(records, model_is_vlm, args, data_path):
    if not model_is_vlm:
        for r in records:
            if r.get("images"):
                raise RecordError(data_path, r["_line"], "images", f"{args.model} is a text model and cannot read images")
    if args.share_prompt and model_is_vlm:
        fail("--share-prompt is for text models (a VLM's image positions are computed from its own rows)")


def run_config(args, accelerator, data_sha256):
    """The settings that decide the trained weights; a checkpoint resumes only under the same ones."""
    model = Path(args.model)
    return {
        "model": str(model.resolve()) if model.exists() else args.model,
        "model_fingerprint": modeling.model_fingerprint(args.model),
        "data_sha256": data_sha256, "max_length": args.max_length, "max_negatives": args.max_negatives,
        "beta": args.beta, "loss": args.loss, "nll_weight": args.nll_weight, "share_prompt": args.share_prompt,
        "length_normalize": args.length_normalize,
        **training.loop_config(args, accelerator),
    }


# ---------------------------------------------------------------------------------------------
# Reference log-probs: once, from the initial weights, cached with what they depend on


def reference_logps(accelerator, module, model, processor, examples, config, args):
    """The cached reference log-probs if they match, else computed and cached; and which it was."""
    from tqdm.auto import tqdm

    run = training.run_folder(args.out)
    # bf16 base weights (LoRA on GPU) give other log-probs than fp32 ones under the same autocast.
    weights = next(model.parameters()).dtype
    key = reference_key(config, accelerator.mixed_precision + ("" if weights == torch.float32 else f", {weights} weights"))
    path = run / REFERENCE_FILE
    reference, problem = load_reference(path, key, examples)
    if problem:
        accelerator.print(f"reference log-probs: the cached {path} is not used, {problem}; computing them again",
                          flush=True)
    # Decided together: the pass is collective, and a node without a shared disk sees no cache.
    state = "computed" if training.global_count(accelerator, reference is None) else "reused"
    if state == "computed":
        with tqdm(total=len(examples), desc="reference log-probs", disable=not accelerator.is_main_process) as bar:
            reference = compute_reference(accelerator, module, processor, examples, args, args.data, bar)
        if accelerator.is_main_process:
            run.mkdir(parents=True, exist_ok=True)
            save_reference(path, reference, key)
        accelerator.wait_for_everyone()
    accelerator.print(f"reference log-probs: {state} ({path})", flush=True)
    return reference, state


def reference_key(config, precision):
    """The metadata a cached reference must match: everything the log-probs depend on."""
    key = {k: str(config[k]) for k in ("data_sha256", "model", "model_fingerprint", "max_length", "max_negatives",
                                       "share_prompt")}
    return dict(key, precision=precision, version=REFERENCE_VERSION)


def load_reference(path, key, examples):
    """(the cached tensors, None) if the file exists and matches key and data, else (None, why not:
    None when there is no file, or the settings or data changed; a sentence when the file itself is bad)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # a torn or foreign file is recomputed, not trusted
        return None, f"unreadable ({' '.join(str(e).split())[:200]})"
    stored_hash = meta.pop(TENSORS_SHA256, None)
    if meta != key:
        return None, None
    lines = torch.tensor([ex.record["_line"] for ex in examples])
    if tensors.get("line") is None or not torch.equal(tensors["line"], lines):
        return None, None
    problem = reference_problem(tensors, examples)
    if problem is None and stored_hash != tensors_sha256(tensors):
        problem = ("its values are not the ones that were saved (content hash differs)" if stored_hash else
                   "it carries no content hash to check its values against")
    return (None, problem) if problem else (tensors, None)


def reference_problem(tensors, examples):
    """What is wrong with cached reference tensors for these examples, or None: each is a sum of
    log-probabilities, so finite and at most 0, one per example and negative."""
    n, width = len(examples), max(len(ex.negatives) for ex in examples)
    shapes = {"chosen": (n,), "rejected": (n, width), "num_negatives": (n,)}
    for name, shape in shapes.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            return f"'{name}' has shape {got}, expected {shape}"
    if tensors["num_negatives"].tolist() != [len(ex.negatives) for ex in examples]:
        return "'num_negatives' does not match the data"
    for name in ("chosen", "rejected"):
        values = tensors[name].float()
        if not torch.isfinite(values).all():
            return f"'{name}' holds NaN or infinite values"
        if (values > 0).any():
            return f"'{name}' holds positive values, which no sum of log-probabilities can be"
    return None


def tensors_sha256(tensors):
    """sha256 over the tensors' names and bytes, stored in the file's metadata at save."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_reference(path, tensors, key):
    from safetensors.torch import save_file

    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    with disk_full_reported(path, leftovers=[tmp], resumes="the same command computes the reference pass again"):
        save_file(tensors, str(tmp), metadata={**key, TENSORS_SHA256: tensors_sha256(tensors)})
        os.replace(tmp, path)


@training.no_grad
def compute_reference(accelerator, module, processor, examples, args, data_path, progress):
    """Log-probs of the initial weights for every example, each process its share, summed.

    Batches of similar lengths; every process runs the same number of forwards (the list is padded
    with repeats whose results are dropped) because FSDP and ZeRO-3 forwards are collective.
    """
    n, width = len(examples), max(len(ex.negatives) for ex in examples)
    chosen = torch.zeros(n, device=accelerator.device)
    rejected = torch.zeros(n, width, device=accelerator.device)
    filled = torch.zeros(n, device=accelerator.device)
    order = sorted(range(n), key=lambda i: -examples[i].length)
    batches = [order[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
    real = len(batches)
    batches += batches[-1:] * (-len(batches) % accelerator.num_processes)
    pad_id = modeling.tokenizer_of(processor).pad_token_id
    for i in range(accelerator.process_index, len(batches), accelerator.num_processes):
        idx = batches[i]
        batch = make_batch(encode_examples(processor, [examples[j] for j in idx], args, data_path), pad_id,
                           args.share_prompt)
        c, r, mask, _ = concatenated_forward(module, batch, accelerator.device)
        if i < real:
            idx_t = torch.tensor(idx, device=accelerator.device)
            chosen[idx_t] = c.float()
            rejected[idx_t, :r.shape[1]] = torch.where(mask, r.float(), torch.zeros_like(r.float()))
            filled[idx_t] = 1
        progress.update(len(idx) * accelerator.num_processes)
    # Each example is filled by exactly one process and zero elsewhere, so the sum is exact.
    chosen, rejected, filled = (accelerator.reduce(t, reduction="sum") for t in (chosen, rejected, filled))
    if not torch.equal(filled, torch.ones_like(filled)):
        raise RuntimeError("reference pass did not cover every example exactly once")
    return {"chosen": chosen.cpu(), "rejected": rejected.cpu(),
            "num_negatives": torch.tensor([len(ex.negatives) for ex in examples]),
            "line": torch.tensor([ex.record["_line"] for ex in examples])}


def main(argv=None):
    training.run_stage(train, parse_args(argv))


if __name__ == "__main__":
    main()
