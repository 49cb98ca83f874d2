"""Export preferences.jsonl (consensus.py's output) to the formats people train with elsewhere, so the
official `swift rlhf` step or TRL's DPOTrainer can run on this project's consensus for comparison.

    python export_preferences.py --data runs/preferences.jsonl --format swift --out runs/dpo_swift.jsonl
    python export_preferences.py --data runs/preferences.jsonl --format trl --out runs/dpo_trl.jsonl

Both formats are pairwise (DPO), so each instance gives one line per (consensus, negative) pair,
the negatives in the order apo.py trains them (--max-negatives as in apo.py).

swift  ms-swift's DPO JSONL, as the official APO scripts consume it (`swift rlhf --rlhf_type dpo
       --dataset FILE`): `messages` (system, the user turn with one <image> tag per image before the
       prompt, the consensus as the assistant turn), `images`, `rejected_response`. `id`, `source` and
       `rejected_source` ride along, so `collect.py --import-swift FILE` reads the file back to the
       same instances (labels are not exported: no training stage reads them).
trl    TRL's conversational preference format: `prompt` (the chat apo.py trains on, system and user
       turn, images as {"type": "image"} parts), `chosen` and `rejected` (one assistant message
       each) and, when any instance has images, `images`.

Image paths are written absolute, so the file works from any working directory.
"""

import argparse
from pathlib import Path

from common.records import (OutputLock, RecordError, check_output_paths, fail, load_preferences, manifest_path, output_file,
                     release_locks, resolve_image, tie_to_run, write_json_atomic, write_jsonl_atomic)

FORMATS = ("swift", "trl")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="preferences.jsonl written by consensus.py")
    parser.add_argument("--format", required=True, choices=FORMATS, help="swift: ms-swift DPO JSONL; trl: TRL's "
                        "conversational preference format")
    parser.add_argument("--out", required=True, help="the JSONL file to write (an earlier export there is replaced; "
                        "any other file, the input or a model folder is refused)")
    parser.add_argument("--max-negatives", type=int, default=None,
                        help="keep at most this many negatives per instance, chosen as apo.py chooses them "
                             "(highest drift first); default: all")
    parser.add_argument("--seed", type=int, default=0, help="unused (the export is deterministic); for the "
                        "common interface of the scripts")
    args = parser.parse_args(argv)
    if args.max_negatives is not None and args.max_negatives < 1:
        parser.error("--max-negatives must be at least 1")
    return args


def pairs(record, max_negatives, data_path):
    """(negative text, its source name) in apo.py's training order."""
    from common.preferences import select_negatives

    names = record.get("rejected_sources") or [None] * len(record["rejected"])
    return [(record["rejected"][i], names[i]) for i in select_negatives(record, max_negatives, data_path)]


def absolute_images(record, data_path):
    return [str(resolve_image(data_path, p).resolve()) for p in record.get("images") or []]


def swift_rows(record, max_negatives, data_path):
    images = absolute_images(record, data_path)
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    messages += [{"role": "user", "content": "<image>" * len(images) + record["prompt"]},
                 {"role": "assistant", "content": record["chosen"]}]
    for text, source in pairs(record, max_negatives, data_path):
        row = {"id": record["id"], "messages": messages, "images": images, "rejected_response": text,
               "source": "consensus"}
        if source:
            row["rejected_source"] = source
        yield row


def trl_rows(record, max_negatives, data_path, with_images):
    from common.modeling import messages_for  # imports torch: here, so that --help answers at once

    prompt = messages_for(record)  # exactly the chat apo.py encodes
    for text, _ in pairs(record, max_negatives, data_path):
        row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": record["chosen"]}],
               "rejected": [{"role": "assistant", "content": text}]}
        if with_images:
            row["images"] = absolute_images(record, data_path)
        yield row


def claim_output(out, data_path, fmt, max_negatives):
    """The output contract of every stage, before anything is read: never over the input, never
    into a model folder, never over a file another tool wrote (an existing output without its
    <out>.run.json), and locked against a second export to the same file."""
    out = output_file(out)
    manifest = manifest_path(out)
    model_dir = {"(a model folder: config.json)": out.parent} if (out.parent / "config.json").is_file() else {}
    check_output_paths(files=[out, manifest], inputs={"--data": data_path}, model_dirs=model_dir)
    OutputLock(out, "export_preferences.py")
    # used=set(): a rerun with other flags simply replaces the export (it is rebuilt whole, in seconds)
    saved = tie_to_run(out, manifest, {"run": {"data": str(Path(data_path).resolve()), "format": fmt,
                                               "max_negatives": max_negatives}},
                       "export_preferences.py", "", used=set())
    return out, manifest, saved


def export(data_path, fmt, out, max_negatives=None):
    """Write the export (whole, then renamed over OUT); returns (instances, lines)."""
    out, manifest, saved = claim_output(out, data_path, fmt, max_negatives)
    records = load_preferences(data_path)
    with_images = any(r.get("images") for r in records)
    rows = [row for record in records
            for row in (swift_rows(record, max_negatives, data_path) if fmt == "swift"
                        else trl_rows(record, max_negatives, data_path, with_images))]
    write_json_atomic(manifest, saved)
    write_jsonl_atomic(out, rows)
    return len(records), len(rows)


def main(argv=None):
    args = parse_args(argv)
    try:
        instances, lines = export(args.data, args.format, args.out, args.max_negatives)
    except RecordError as e:
        fail(str(e))
    finally:
        release_locks()
    print(f"export_preferences: {instances} instances -> {lines} {args.format} pairs in {args.out}")


if __name__ == "__main__":
    main()
