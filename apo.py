"""Stage 4: constraint-aware optimisation (APO), the heart of the method.

The consensus written by the bootstrapped model is the positive, the source trajectories it
overruled are the negatives ("drift as constraint"), the bootstrapped model is the frozen reference,
and the loss is the multi-negative Plackett-Luce objective of apo_loss.py:

    r(y) = beta * (log pi_theta(y|x) - log pi_ref(y|x))
    loss = logsumexp([r+, r-_1 .. r-_K]) - r+

    accelerate launch apo.py --model runs/bootstrap --data runs/preferences.jsonl --out runs/apo
    python apo.py ...                                    # one process is fine too

What happens, top to bottom:
1. preferences.jsonl is validated whole and encoded (a prompt that leaves no room under
   --max-length is skipped and counted; a response that does not fit is cut at its end).
2. The policy is loaded from the bootstrapped model. The reference log-probs of every (prompt,
   response) are computed ONCE, by a no-grad pass of those same initial weights, before the first
   update (each process its share, summed across processes), and cached in
   OUT/reference_logps.safetensors with the data's sha256, the model, max length, max negatives,
   precision and code version as metadata: a rerun or a resumed run reuses them, a mismatch
   recomputes them. Only one model is ever in memory (with --lora-rank too: the adapters start at
   zero, so the adapted model before its first update computes the base's log-probs).
3. Training: each instance's 1 + K responses go through one forward together (rows = chosen +
   negatives, variable K masked), summed response log-probs come from hidden states in chunks
   (never the [rows, tokens, vocab] logits), then apo_loss. --share-prompt packs each text
   instance into one row so its prompt is encoded once for all 1 + K responses.
4. Checkpoints (exact resume: rerun the same command), metrics.jsonl, and the final Hugging Face
   folder in OUT.
"""

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import training
from apo_loss import LOSSES, sequence_logps
from modeling import (IGNORE_INDEX, PromptTooLong, ResponseLogps, collate, encode, is_vision_model, load_model,
                      load_processor, model_fingerprint, tokenizer_of)
from records import RecordError, disk_full_reported, fail, file_hash, load_preferences

REFERENCE_FILE = "reference_logps.safetensors"
# Bump when the log-prob computation changes, so caches written by older code are recomputed.
REFERENCE_VERSION = "1"
# Fault injection for the reliability tests (RELIABILITY.md): SIGKILL this process right after the
# backward of the given global micro-batch (0-based), i.e. in the middle of an optimizer step.
KILL_ENV = "APO_FAULT_SIGKILL_AFTER_MICROBATCH"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the bootstrapped model folder (bootstrap.py's output): "
                        "initial policy and frozen reference")
    parser.add_argument("--data", required=True, help="preferences.jsonl written by consensus.py")
    parser.add_argument("--out", required=True, help="output folder: final model, checkpoints/, metrics.jsonl, "
                        f"{REFERENCE_FILE}")
    apo = parser.add_argument_group("APO")
    apo.add_argument("--beta", type=float, default=0.1, help="reward scale of the loss (default: %(default)s)")
    apo.add_argument("--loss", choices=sorted(LOSSES), default="apo",
                     help="'apo': the paper's multi-negative Plackett-Luce loss; 'dpo-pairs': pairwise DPO averaged "
                          "over the (consensus, negative) pairs, what the official ms-swift scripts run. Equal at "
                          "K = 1 (default: %(default)s)")
    apo.add_argument("--max-negatives", type=int, default=None,
                     help="keep at most this many negatives per instance, the highest-drift ones first "
                          "(ties and records without 'drift' keep file order); default: all")
    apo.add_argument("--nll-weight", type=float, default=0.0,
                     help="add this times the chosen response's token-mean NLL to the loss, like ms-swift "
                          "DPO's rpo_alpha (default: %(default)s)")
    apo.add_argument("--share-prompt", action="store_true",
                     help="text models: encode each prompt once for all 1 + K responses (one packed row per "
                          "instance with a block attention mask); needs the sdpa or eager attention")
    apo.add_argument("--mixed-precision", choices=["auto", "bf16", "fp16", "no"], default="auto",
                     help="'auto': the accelerate config's setting, else bf16 on GPU, fp32 on CPU. Weights and "
                          "optimizer state stay fp32 (steps of lr 5e-7 are far below bf16 resolution); bf16 is "
                          "the compute dtype (default: %(default)s)")
    apo.add_argument("--chunk-size", type=int, default=1024,
                     help="tokens per chunk of the output projection when summing log-probs (default: %(default)s)")
    apo.add_argument("--reference-only", action="store_true",
                     help="compute (or check) the cached reference log-probs, then stop")
    training.add_training_args(parser, lr=5e-7, max_length=4096, batch_size=1, warmup=0.05, global_batch=32)
    # Every other dropout is switched off (disable_dropout); the adapters' is the user's to choose.
    training.add_lora_args(parser, dropout=0.0)
    args = parser.parse_args(argv)
    if args.max_negatives is not None and args.max_negatives < 1:
        parser.error("--max-negatives must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------
# Data: which negatives each instance keeps, and its token ids


@dataclass
class Example:
    record: dict
    negatives: list  # indices into record["rejected"], in training order
    length: int  # forward_length: the cost used to group batches


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


def build_examples(records, max_negatives, data_path):
    return [Example(r, select_negatives(r, max_negatives, data_path), 0) for r in records]


def measure_examples(processor, examples, args, data_path, accelerator):
    """Token lengths of every example; returns (examples that fit, skipped messages, responses cut).

    Each process encodes a share and the results are gathered, so images are processed once in
    all rather than once per GPU. A prompt that leaves no room under --max-length is skipped.
    """
    from accelerate.utils import gather_object

    rows = []  # (example index, length or None, responses cut or skip message)
    for i in range(accelerator.process_index, len(examples), accelerator.num_processes):
        ex = examples[i]
        try:
            enc = encode(processor, ex.record, responses_of(ex), args.max_length, data_path)
        except PromptTooLong as e:
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
    return [encode(processor, ex.record, responses_of(ex), args.max_length, data_path) for ex in examples]


# ---------------------------------------------------------------------------------------------
# One forward for all 1 + K responses of each instance


class SharedPromptLogps(ResponseLogps):
    """modeling.ResponseLogps's summed response log-probs, with each prompt encoded once.

    An instance is one packed row [prompt, response_0, ..., response_K]. Position ids restart at
    len(prompt) for every response and a block-causal mask lets a response token see the prompt and
    the earlier tokens of its own response only, so each token sees exactly what it sees in its own
    [prompt + response] row, while the prompt's activations (and their gradients) are shared.
    The first token of every response is predicted from the last prompt position, hence the
    explicit `sources` index instead of a shift.
    """

    def forward(self, input_ids, segments, position_ids, targets, sources):
        base = getattr(self.model, self.model.base_model_prefix)
        mask = block_causal_mask(segments, self.model.config._attn_implementation, self.model.dtype)
        hidden = base(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings()
        logps = sequence_logps(hidden.flatten(0, 1)[sources], head.weight, targets, chunk_size=self.chunk_size,
                               lm_head_bias=head.bias)
        return logps, (targets != IGNORE_INDEX).sum(-1)


SHARED_PROMPT_ATTENTION = ("sdpa", "eager")


def block_causal_mask(segments, attn_implementation, dtype):
    """[B, 1, L, L] mask from segment ids (0 prompt, j + 1 response j, -1 padding).

    A query sees earlier keys of the prompt or of its own segment. Padding queries see the prompt,
    so no row is fully masked (that would give NaN in sdpa, and NaN * 0 still spreads).
    """
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = (causal & ((k == 0) | (k == q)))[:, None]
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "eager":  # eager attention adds the mask to its scores
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"--share-prompt needs the sdpa or eager attention, the model uses {attn_implementation}")


def pack_shared_prompt(encoded_items, pad_id):
    """The batch SharedPromptLogps takes: one packed row per item; targets rows in collate's order."""
    width = max(len(e.prompt_ids) + sum(len(r) for r in e.responses) for e in encoded_items)
    n_rows = sum(len(e.responses) for e in encoded_items)
    longest = max(len(r) for e in encoded_items for r in e.responses)
    input_ids = torch.full((len(encoded_items), width), pad_id, dtype=torch.long)
    segments = torch.full((len(encoded_items), width), -1, dtype=torch.long)
    position_ids = torch.zeros((len(encoded_items), width), dtype=torch.long)
    targets = torch.full((n_rows, longest), IGNORE_INDEX, dtype=torch.long)
    sources = torch.zeros((n_rows, longest), dtype=torch.long)
    row = 0
    for b, item in enumerate(encoded_items):
        p = len(item.prompt_ids)
        input_ids[b, :p] = torch.tensor(item.prompt_ids)
        segments[b, :p] = 0
        position_ids[b, :p] = torch.arange(p)
        start = p
        for j, ids in enumerate(item.responses):
            n = len(ids)
            input_ids[b, start:start + n] = torch.tensor(ids)
            segments[b, start:start + n] = j + 1
            position_ids[b, start:start + n] = torch.arange(p, p + n)
            targets[row, :n] = torch.tensor(ids)
            # Token t of the response is predicted by the position before it; token 0 by the prompt's last.
            sources[row, :n] = b * width + torch.cat([torch.tensor([p - 1]), torch.arange(start, start + n - 1)])
            start, row = start + n, row + 1
    return {"input_ids": input_ids, "segments": segments, "position_ids": position_ids, "targets": targets,
            "sources": sources}


def make_batch(encoded_items, pad_id, share_prompt):
    """Model inputs for the items plus the layout: how many negatives each item has."""
    inputs = pack_shared_prompt(encoded_items, pad_id) if share_prompt else collate(encoded_items, pad_id)
    num_negatives = torch.tensor([len(e.responses) - 1 for e in encoded_items])
    # Tokens as the usual implementation sees them (the prompt once per response), so tokens/s
    # compares directly with and without --share-prompt.
    tokens = sum(len(e.prompt_ids) + len(r) for e in encoded_items for r in e.responses)
    return {"inputs": inputs, "num_negatives": num_negatives, "tokens": tokens}


def split_rows(row_values, num_negatives):
    """Per-row values in item order (chosen, then its negatives) -> chosen [B], rejected [B, K], mask [B, K]."""
    num_negatives = num_negatives.to(row_values.device)
    starts = torch.cumsum(num_negatives + 1, 0) - (num_negatives + 1)
    width = int(num_negatives.max())
    offsets = torch.arange(1, width + 1, device=row_values.device)
    mask = offsets[None, :] <= num_negatives[:, None]
    index = torch.where(mask, starts[:, None] + offsets[None, :], starts[:, None])
    return row_values[starts], row_values[index], mask


def response_logps(module, batch, device):
    """Policy (or reference) log-probs: chosen [B], rejected [B, K], mask [B, K], chosen tokens [B]."""
    inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
    logps, counts = module(**inputs)
    chosen, rejected, mask = split_rows(logps, batch["num_negatives"])
    chosen_tokens, _, _ = split_rows(counts, batch["num_negatives"])
    return chosen, rejected, mask, chosen_tokens


def apo_step_loss(module, batch, reference, device, beta, nll_weight, loss="apo"):
    """The APO objective of one micro-batch: per-instance losses [B] and summed statistics.

    reference: (chosen [B], rejected [B, K]) cached log-probs of the initial weights.
    Returns (losses, stats) with stats a tensor of STATS sums (for metrics across processes).
    """
    chosen, rejected, mask, chosen_tokens = response_logps(module, batch, device)
    ref_chosen, ref_rejected = (t.to(device) for t in reference)
    losses, chosen_rewards, rejected_rewards = LOSSES[loss](chosen, rejected, ref_chosen,
                                                            ref_rejected[:, :rejected.shape[1]],
                                                            beta=beta, rejected_mask=mask)
    nll = -chosen / chosen_tokens.clamp(min=1)
    if nll_weight:
        losses = losses + nll_weight * nll
    hardest = rejected_rewards.masked_fill(~mask, float("-inf")).max(1).values
    stats = torch.stack([
        torch.tensor(float(len(losses)), device=device),
        losses.detach().sum(),
        (chosen_rewards > hardest).float().sum(),
        (chosen_rewards - hardest).sum(),
        chosen_rewards.sum(),
        rejected_rewards.sum(),
        mask.sum().float(),
        chosen.detach().sum(),
        nll.detach().sum(),
        torch.tensor(float(batch["tokens"]), device=device),
    ])
    return losses, stats


STATS = ("instances", "loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward", "negatives",
         "chosen_logp", "chosen_nll", "tokens")


def step_metrics(totals, seconds):
    t = dict(zip(STATS, totals.tolist()))
    n = t["instances"]
    return {"loss": t["loss"] / n, "reward_accuracy": t["reward_accuracy"] / n, "margin": t["margin"] / n,
            "chosen_reward": t["chosen_reward"] / n, "rejected_reward": t["rejected_reward"] / max(1.0, t["negatives"]),
            "chosen_logp": t["chosen_logp"] / n, "chosen_nll": t["chosen_nll"] / n,
            "tokens_per_s": t["tokens"] / max(seconds, 1e-9)}


# ---------------------------------------------------------------------------------------------
# Reference log-probs: once, from the initial weights, cached with what they depend on


def reference_key(config, precision):
    """The metadata a cached reference must match: everything the log-probs depend on."""
    key = {k: str(config[k]) for k in ("data_sha256", "model", "model_fingerprint", "max_length", "max_negatives",
                                       "share_prompt")}
    return dict(key, precision=precision, version=REFERENCE_VERSION)


def load_reference(path, key, examples):
    """The cached tensors if the file exists and matches key and data, else None."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if f.metadata() != key:
                return None
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception:  # a torn or foreign file is recomputed, not trusted
        return None
    lines = torch.tensor([ex.record["_line"] for ex in examples])
    if tensors.get("line") is None or not torch.equal(tensors["line"], lines):
        return None
    return tensors


def save_reference(path, tensors, key):
    from safetensors.torch import save_file

    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with disk_full_reported(path, leftovers=[tmp], resumes="the same command computes the reference pass again"):
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=key)
        os.replace(tmp, path)


@torch.no_grad()
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
    pad_id = tokenizer_of(processor).pad_token_id
    for i in range(accelerator.process_index, len(batches), accelerator.num_processes):
        idx = batches[i]
        batch = make_batch(encode_examples(processor, [examples[j] for j in idx], args, data_path), pad_id,
                           args.share_prompt)
        c, r, mask, _ = response_logps(module, batch, accelerator.device)
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


# ---------------------------------------------------------------------------------------------
# Setup helpers


def disable_dropout(model):
    """Rewards compare the policy with the reference on the same weights at step 0: dropout noise
    would make them differ, so it is switched off (as TRL's DPO does by default)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def check_inputs(records, model_is_vlm, args, data_path):
    if not model_is_vlm:
        for r in records:
            if r.get("images"):
                raise RecordError(data_path, r["_line"], "images", f"{args.model} is a text model and cannot read images")
    if args.share_prompt and model_is_vlm:
        fail("--share-prompt is for text models (a VLM's image positions are computed from its own rows)")


def kill_if_asked(micro):
    if os.environ.get(KILL_ENV) == str(micro):
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# The stage


def run_config(args, accelerator, data_sha256):
    """The settings that decide the trained weights; a checkpoint resumes only under the same ones."""
    return {
        "model": str(Path(args.model).resolve()), "model_fingerprint": model_fingerprint(args.model),
        "data_sha256": data_sha256, "max_length": args.max_length, "max_negatives": args.max_negatives,
        "beta": args.beta, "loss": args.loss, "nll_weight": args.nll_weight, "share_prompt": args.share_prompt,
        "micro_batch": args.batch_size * accelerator.num_processes,  # global, so the GPU count may change
        "grad_accum": args.grad_accum, "lr": args.lr, "epochs": args.epochs, "max_steps": args.max_steps,
        "warmup": args.warmup, "schedule": args.schedule, "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm, "freeze_vision": args.freeze_vision, "seed": args.seed,
        **training.lora_config(args),
    }


def run(args):
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(args.out)
    data_path = Path(args.data)

    # Data first: a bad line ends the run before any model is loaded.
    records = load_preferences(data_path)
    examples = build_examples(records, args.max_negatives, data_path)
    if not (Path(args.model) / "config.json").is_file():
        raise RecordError(args.model, None, None, "not a model folder (no config.json)")
    vision = is_vision_model(args.model)
    check_inputs(records, vision, args, data_path)
    text_only_rows = any(not r.get("images") for r in records)

    accelerator = training.build_accelerator(
        args, out, find_unused_parameters=vision and not (args.freeze_vision or args.lora_rank) and text_only_rows)
    training.claim_output(accelerator, out, "apo.py", inputs={"--data": data_path}, model_dirs={"--model": args.model})
    is_main = accelerator.is_main_process
    training.seed_everything(args.seed)
    data_sha256 = file_hash(data_path)
    config = run_config(args, accelerator, data_sha256)

    training.checkpoint_state(out, config)  # a folder of another run is refused now, not after the reference pass

    processor = load_processor(args.model)
    examples, skipped, truncated = measure_examples(processor, examples, args, data_path, accelerator)
    if is_main:
        for line in skipped:
            print(f"skipped {line}", file=sys.stderr)
    if not examples:
        raise RecordError(data_path, None, None, f"no usable preference ({len(skipped)} prompts longer than --max-length)")
    micro_global = args.batch_size * accelerator.num_processes
    if not args.reference_only and len(examples) < micro_global:
        raise RecordError(data_path, None, None, f"{len(examples)} usable preferences, fewer than one micro-batch "
                                                 f"over all processes ({micro_global})")
    total = 0 if args.reference_only else training.total_steps(len(examples), micro_global, args)

    model = training.prepare_model_for_training(
        load_model(args.model, dtype=training.weights_dtype(args, accelerator.device)), args)
    disable_dropout(model)
    # After disable_dropout, so --lora-dropout holds. lora_B starts at zero: until the first update the
    # policy computes exactly the base's log-probs, so the reference pass below needs no second model.
    lora = training.add_lora(model, args, accelerator)
    model.train()
    if args.share_prompt:
        if model.config._attn_implementation not in SHARED_PROMPT_ATTENTION:
            fail(f"--share-prompt needs the sdpa or eager attention, {args.model} uses "
                 f"{model.config._attn_implementation}")
        module = SharedPromptLogps(model, args.chunk_size)
    else:
        module = ResponseLogps(model, args.chunk_size)
    optimizer = training.build_optimizer(module, args.lr, args.weight_decay)
    scheduler = training.build_scheduler(optimizer, args, total)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)

    # Reference log-probs: from the initial weights, so before a checkpoint's weights are loaded.
    # bf16 base weights (LoRA on GPU) give other log-probs than fp32 ones under the same autocast.
    weights = next(model.parameters()).dtype
    key = reference_key(config, accelerator.mixed_precision + ("" if weights == torch.float32 else f", {weights} weights"))
    reference_path = out / REFERENCE_FILE
    reference = load_reference(reference_path, key, examples)
    # Decided together: the pass is collective, and a node without a shared disk sees no cache.
    missing = training.global_count(accelerator, reference is None)
    reference_state = "reused"
    if missing:
        reference_state = "computed"
        with tqdm(total=len(examples), desc="reference log-probs", disable=not is_main) as bar:
            reference = compute_reference(accelerator, module, processor, examples, args, data_path, bar)
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_reference(reference_path, reference, key)
        accelerator.wait_for_everyone()
    accelerator.print(f"reference log-probs: {reference_state} ({reference_path})", flush=True)
    if args.reference_only:
        accelerator.print(f"apo: reference log-probs {reference_state} for {len(examples)} preferences "
                          f"({len(skipped)} skipped: prompt too long; {truncated} responses truncated) "
                          f"-> {reference_path}")
        return

    state = training.resume_from_checkpoint(accelerator, out, config) or {}
    start = state.get("step", 0)
    metrics = training.Metrics(accelerator, out, resumed_step=start)
    if args.report_to:
        accelerator.init_trackers("apo", config={k: v for k, v in config.items() if v is not None})
    accelerator.print(
        f"apo: {len(examples)} preferences, {total} steps of {micro_global * args.grad_accum} "
        f"({args.batch_size} x {accelerator.num_processes} processes x {args.grad_accum} accumulation), "
        f"mixed precision {accelerator.mixed_precision}" + (f", resuming from step {start}" if start else ""),
        flush=True)

    lengths = [ex.length for ex in examples]
    micro_batch = training.MicroBatches(lengths, micro_global, args.seed)
    per_epoch = micro_batch.per_epoch
    pad_id = tokenizer_of(processor).pad_token_id

    last = None
    stop = training.stop_on_signal()
    progress = tqdm(total=total, initial=start, desc="apo", disable=not accelerator.is_local_main_process)
    for step in range(start, total):
        began = time.perf_counter()
        totals = torch.zeros(len(STATS), device=accelerator.device)
        for k in range(args.grad_accum):
            micro = step * args.grad_accum + k
            rows = training.shard(micro_batch(micro), accelerator)
            batch = make_batch(encode_examples(processor, [examples[i] for i in rows], args, data_path), pad_id,
                               args.share_prompt)
            ref = (reference["chosen"][rows], reference["rejected"][rows])
            with accelerator.accumulate(module):
                losses, stats = apo_step_loss(module, batch, ref, accelerator.device, args.beta, args.nll_weight,
                                             args.loss)
                # The mean over this process's instances; accelerate divides by grad_accum and DDP
                # averages over processes, so the step's gradient is the global batch mean.
                accelerator.backward(losses.mean())
                totals += stats
                kill_if_asked(micro)
                if accelerator.sync_gradients:
                    totals = accelerator.reduce(totals, reduction="sum")
                    training.check_finite(totals[STATS.index("loss")], step + 1, out)
                    grad_norm = training.clip_gradients(accelerator, module, args.max_grad_norm)
                    if grad_norm is not None and not torch.isfinite(grad_norm):
                        raise training.NonFiniteLoss(
                            f"gradient norm is {grad_norm.item()} at step {step + 1}; stopping before the update, "
                            f"nothing is saved after it: check the data, or lower --lr in a new output folder.")
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        done = step + 1
        last = step_metrics(totals, time.perf_counter() - began)
        progress.update(1)
        progress.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['reward_accuracy']:.2f}")
        if done % args.log_every == 0 or done == total:
            metrics.log(done, dict(last, lr=lr, grad_norm=None if grad_norm is None else float(grad_norm),
                                   epoch=done * args.grad_accum / per_epoch))
        training.end_of_step(accelerator, out, done, total, {"config": config}, args, stop)
    progress.close()

    if start < total or not training.checkpoint_dirs(out):
        training.save_checkpoint(accelerator, out, total, {"config": config}, keep=args.keep_checkpoints)
    training.save_hf_folder(accelerator, module, processor, out, lora=lora)
    accelerator.end_training()
    result = (f"last step loss {last['loss']:.4f}, reward accuracy {last['reward_accuracy']:.2f}, "
              f"margin {last['margin']:.4f}" if last else "nothing left to train")
    accelerator.print(f"apo: {total} steps on {len(examples)} preferences ({len(skipped)} skipped: prompt too long; "
                      f"{truncated} responses truncated), reference log-probs {reference_state}; {result}; "
                      f"model in {out}")



def main(argv=None):
    training.run_stage(run, parse_args(argv))


if __name__ == "__main__":
    main()
