"""The supervised examples bootstrap.py trains on: one per (train instance, trajectory), the union
of every source's answers; read from trajectories.jsonl (or TRL's SFT conversations), measured
against --max-length, and batched.

read_data checks the file (and the model's config) before any model is loaded; usable_examples
keeps the examples that fit, as a TrajectoryData whose batch() gives the model's inputs.
"""

import sys
from collections import Counter, defaultdict
from dataclasses import dataclass

from common.answers import parse_answer
from common.records import RecordError, lazy_import
from common.trl_format import read_instances

modeling = lazy_import("common.modeling")  # loaded on first use: bootstrap.py's --help answers before torch loads


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


def training_data(run, args, settings):
    """The training examples that fit (TrajectoryData), what was left out (counted) and the held-out
    examples, with the run started (settings: the stage's, for training.run_config); (None, None,
    None) when OUT already holds this run, finished. The file is read and checked before any model
    is loaded."""
    from common import training

    examples, counts, held_out, vision = read_data(args)  # a bad line ends the run here
    accelerator = run.start(vision, text_only_rows=any(not ex.record.get("images") for ex in examples))
    if run.finished(training.run_config(args, accelerator, settings)):  # another run's folder is refused now
        return None, None, None
    processor = modeling.load_processor(args.model)
    data = usable_examples(processor, examples, args, accelerator, args.batch_size * accelerator.num_processes)
    return data, counts, held_out


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


def held_out_examples(path, drop_unanswered):
    """--eval-data's examples: the trajectories of its val and test instances, or of all of them
    when it has only train ones (a file held out as a whole, e.g. TRL's SFT messages)."""
    records = read_instances(path)
    held = [r for r in records if r["split"] != "train"] or records
    return collect_examples([dict(r, split="train") for r in held], drop_unanswered)[0]


# ---------------------------------------------------------------------------------------------
# Measured against --max-length, and batched


@dataclass
class TrajectoryData:
    """One file's examples that fit --max-length (their lengths set), what was left out, and how
    they are put into the model: batch(examples) encodes them and pads their rows."""
    examples: list
    skipped: list  # ("file:line: why", prompt tokens) of each instance whose prompt leaves no room
    truncated: int  # responses cut at --max-length
    too_long: int  # examples skipped with their instance's prompt
    processor: object
    path: object
    max_length: int

    def batch(self, examples):
        return make_batch(encode_examples(self.processor, examples, self.max_length, self.path),
                          modeling.tokenizer_of(self.processor).pad_token_id)


def usable_examples(processor, examples, args, accelerator, micro_global):
    """measure_examples on the training data, as TrajectoryData: the skipped prompts reported, one
    micro-batch required; too_long counts the examples skipped (the summary's unit, not instances)."""
    measured = len(examples)
    examples, skipped, truncated = measure_examples(processor, examples, args, args.data, accelerator)
    too_long = measured - len(examples)
    if accelerator.is_main_process:
        for message, _ in skipped:
            print(f"skipped {message}", file=sys.stderr)
    if len(examples) < micro_global:
        raise RecordError(args.data, None, None, too_few_examples(len(examples), micro_global, too_long, skipped, args))
    return TrajectoryData(examples, skipped, truncated, too_long, processor, args.data, args.max_length)


def usable_held_out(processor, examples, args, accelerator):
    """--eval-data's examples that fit, as TrajectoryData (None without --eval-data)."""
    if examples is None:
        return None
    examples, skipped, truncated = measure_examples(processor, examples, args, args.eval_data, accelerator)
    if not examples:
        raise RecordError(args.eval_data, None, None, "no usable held-out example (no trajectory of split train "
                                                      "whose prompt fits --max-length)")
    return TrajectoryData(examples, skipped, truncated, 0, processor, args.eval_data, args.max_length)


def measure_examples(processor, examples, args, data_path, accelerator):
    """The examples that fit, with their lengths; the skipped instances ((message, prompt tokens),
    one per instance); responses cut.

    Each process encodes a share of the instances (the prompt and images once for all of an
    instance's trajectories) and the results are gathered, so images are processed once in all
    rather than once per GPU. A prompt that leaves no room under --max-length is skipped.
    """
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

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


def encode_examples(processor, examples, max_length, data_path):
    # Encoded again when used (cheap next to a forward), so the whole data set's ids and image
    # tensors never sit in memory at once.
    return [modeling.encode(processor, ex.record, [ex.text], max_length, data_path) for ex in examples]


def make_batch(encoded_items, pad_id):
    """Right-padded rows of these examples: labels are the response tokens, -100 elsewhere."""
    return modeling.collate(encoded_items, pad_id)
