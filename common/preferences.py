"""Preference instances as apo.py trains on them (scripts/export_preferences.py writes them in the
same order): a prompt, its consensus as the positive, and the negatives it keeps; read from
preferences.jsonl (or TRL's preference format), measured against --max-length, and batched.

read_data checks the file (and the model's kind) before any model is loaded; usable_preferences
keeps the instances that fit, as a PreferenceData whose batch() gives the model's inputs.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from common.records import RecordError, fail, lazy_import
from common.trl_format import read_preferences

# Loaded on first use: apo.py's --help and scripts/export_preferences.py need none of them.
torch = lazy_import("torch")
modeling = lazy_import("common.modeling")
shared_prompt = lazy_import("common.shared_prompt")


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


# ---------------------------------------------------------------------------------------------
# apo.py's data: preferences.jsonl read whole, each instance's negatives chosen, measured, batched


def training_data(run, args, settings):
    """The training preferences that fit (PreferenceData) and the held-out records, with the run
    started (settings: the stage's, for training.run_config); (None, None) when OUT already holds
    this run, finished. The file is read and checked before any model is loaded."""
    from common import training

    examples, eval_records, vision = read_data(args)
    accelerator = run.start(vision, text_only_rows=any(not ex.record.get("images") for ex in examples))
    # Another run's folder is refused here, not after the reference pass.
    config = training.run_config(args, accelerator, settings)
    if run.finished(config, say=not args.reference_only) and not args.reference_only:
        return None, None
    processor = modeling.load_processor(args.model)
    micro_global = 1 if args.reference_only else args.batch_size * accelerator.num_processes
    return usable_preferences(processor, examples, args.data, args, accelerator, micro_global), eval_records


def held_out(accelerator, processor, records, args, forward):
    """--eval-data's usable preferences and their reference log-probs (the initial weights'), or
    None. forward(data): compute_reference's forward over that data."""
    if records is None:
        return None
    from common.reference import compute_reference

    path = Path(args.eval_data)
    data = usable_preferences(processor, build_examples(records, args.max_negatives, path), path, args, accelerator)
    return data, compute_reference(accelerator, data.examples, args.batch_size, forward(data), "held-out reference")


def read_data(args):
    """The training instances (negatives chosen), the held-out records and whether the model reads
    images; a bad line, or an image for a text model, ends the run before any model is loaded."""
    records = read_preferences(args.data)  # preferences.jsonl or TRL's preference format
    eval_records = read_preferences(args.eval_data) if args.eval_data else None
    examples = build_examples(records, args.max_negatives, Path(args.data))
    try:
        vision = modeling.is_vision_model(args.model)  # a folder's config.json, or a hub id's config
    except (OSError, ValueError) as e:
        raise RecordError(args.model, None, None, f"not a model folder or hub id: cannot read its config ({e})") from None
    if not vision:
        for r in records:
            if r.get("images"):
                raise RecordError(args.data, r["_line"], "images", f"{args.model} is a text model and cannot read images")
    if args.share_prompt and vision:
        fail("--share-prompt is for text models (a VLM's image positions are computed from its own rows)")
    return examples, eval_records, vision


@dataclass
class PreferenceData:
    """One file's instances that fit --max-length (their lengths set), what was left out, and how
    they are put into the model: batch(examples) encodes them and lays out their rows."""
    examples: list
    skipped: list  # "file:line: why" of each prompt that leaves no room for a response
    truncated: int  # responses cut at --max-length
    processor: object
    path: Path
    max_length: int
    share_prompt: bool

    def described(self):
        return (f"{len(self.examples)} preferences ({len(self.skipped)} skipped: prompt too long; "
                f"{self.truncated} responses truncated)")

    def batch(self, examples):
        # Encoded again when used (cheap next to a forward), so the whole data set's ids and image
        # tensors never sit in memory at once.
        encoded = [modeling.encode(self.processor, ex.record, responses_of(ex), self.max_length, self.path)
                   for ex in examples]
        return make_batch(encoded, modeling.tokenizer_of(self.processor).pad_token_id, self.share_prompt)


def usable_preferences(processor, examples, path, args, accelerator, micro_global=None):
    """The instances that fit, as PreferenceData. With micro_global (the training data) the skipped
    prompts are reported and a micro-batch required.

    Each process encodes a share and the results are gathered, so images are processed once in
    all rather than once per GPU. A prompt that leaves no room under --max-length is skipped.
    """
    from accelerate.utils import gather_object

    path, rows = Path(path), []  # (example index, length or None, responses cut or skip message)
    for i in range(accelerator.process_index, len(examples), accelerator.num_processes):
        try:
            enc = modeling.encode(processor, examples[i].record, responses_of(examples[i]), args.max_length, path)
        except modeling.PromptTooLong as e:
            rows.append((i, None, f"{path}:{examples[i].record['_line']}: {e}"))
            continue
        rows.append((i, forward_length(enc, args.share_prompt), enc.truncated))
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    kept, skipped, truncated = [], [], 0
    for i, length, extra in sorted(rows, key=lambda row: row[0]):
        if length is None:
            skipped.append(extra)
        else:
            examples[i].length = length
            kept.append(examples[i])
            truncated += extra
    for line in skipped if micro_global and accelerator.is_main_process else []:
        print(f"skipped {line}", file=sys.stderr)
    if not kept:
        raise RecordError(path, None, None, f"no usable preference ({len(skipped)} prompts longer than --max-length)")
    if micro_global and len(kept) < micro_global:
        raise RecordError(path, None, None, f"{len(kept)} usable preferences, fewer than one micro-batch "
                                            f"over all processes ({micro_global})")
    return PreferenceData(kept, skipped, truncated, processor, path, args.max_length, args.share_prompt)


def forward_length(encoded, share_prompt):
    """Tokens an instance puts through the model: the cost that groups batches of similar length."""
    responses = sum(len(r) for r in encoded.responses)
    return len(encoded.prompt_ids) * (1 if share_prompt else len(encoded.responses)) + responses


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
