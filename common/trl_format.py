"""TRL's dataset formats read as this project's records, so a data set made for TRL trains here as is.

- Preferences (apo.py, TRL's DPOTrainer format): `prompt`, `chosen`, `rejected`, in the standard
  form (strings) or the conversational form (message lists: the prompt a system and one user turn,
  chosen and rejected one assistant message each), optional `images`. Lines that share the prompt
  (and images) and the chosen response are grouped into one instance with K negatives, in file
  order: TRL's pairwise rows of a 1 + K instance become that instance again. A standard-form prompt
  is taken as the user turn and put through the model's chat template, as every prompt here is.
- SFT conversations (bootstrap.py, TRL's SFTTrainer format): `messages` (optional system, one user
  turn, one assistant turn), optional `images`; each line is one instance with one trajectory.

JSONL is read line by line, so errors name file:line:field as for every input; any other file
`datasets` loads (parquet, json, csv, arrow) is read with it, and errors name the row instead.
"""

import json
from pathlib import Path

from common.records import RecordError, read_jsonl

ROLES_IN_A_PROMPT = ("system", "user")


def rows_of(path):
    """(line or row number, object) of a JSONL file or of any file `datasets` can load."""
    path = Path(path)
    if path.suffix in (".jsonl", ".ndjson") or not path.is_file():
        yield from read_jsonl(path)
        return
    try:
        import datasets
    except ImportError:
        raise RecordError(path, None, None, "reading this file type needs the datasets package (pip install "
                                            "datasets); JSONL needs nothing") from None
    kind = {".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}.get(path.suffix)
    if kind is None:
        raise RecordError(path, None, None, f"unknown file type {path.suffix!r} (JSONL, json, parquet, csv, arrow)")
    for i, row in enumerate(datasets.load_dataset(kind, data_files=str(path), split="train"), 1):
        yield i, dict(row)


def is_trl_preference(obj):
    """A TRL pairwise row: `rejected` is one response (a string or a message list), where this
    project's preferences.jsonl holds a list of strings."""
    rejected = obj.get("rejected")
    return "prompt" in obj and (isinstance(rejected, str) or (isinstance(rejected, list) and rejected
                                                                and isinstance(rejected[0], dict)))


def message_text(content, path, line, field):
    """The text of a message's content (a string, or a list of parts) and its number of image parts."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        raise RecordError(path, line, field, "content must be a string or a list of parts")
    texts, images = [], 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image":
            images += 1
        else:
            raise RecordError(path, line, field, f"a content part must be {{'type': 'text', 'text': …}} or "
                                                 f"{{'type': 'image'}}, got {part!r}")
    return "".join(texts), images


def prompt_of(messages, path, line, field):
    """(system or None, user text, image parts) of a conversational prompt: a system turn at most,
    then one user turn (the records here are single-turn)."""
    if isinstance(messages, str):
        return None, messages, 0
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RecordError(path, line, field, "must be a string or a list of messages")
    roles = [m.get("role") for m in messages]
    if roles not in (["user"], ["system", "user"]):
        raise RecordError(path, line, field, f"must be one user turn, after at most one system turn; got roles {roles}")
    system = message_text(messages[0]["content"], path, line, field)[0] if roles[0] == "system" else None
    text, images = message_text(messages[-1].get("content"), path, line, field)
    return system, text, images


def response_of(value, path, line, field):
    """The text of a completion: a string, or one assistant message."""
    if isinstance(value, str):
        return value
    if (not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict)
            or value[0].get("role") != "assistant"):
        raise RecordError(path, line, field, "must be a string or a list of one assistant message")
    text, images = message_text(value[0].get("content"), path, line, field)
    if images:
        raise RecordError(path, line, field, "a response cannot hold images")
    return text


def check_images(obj, image_parts, path, line):
    images = obj.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise RecordError(path, line, "images", "must be a list of image paths")
    if image_parts and image_parts != len(images):
        raise RecordError(path, line, "images", f"{len(images)} images for {image_parts} image parts in the prompt")
    return images


def preferences_from_trl(rows, path):
    """Preference records (id, prompt, system, images, chosen, rejected, _line) from TRL pairwise
    rows, grouped by (prompt, images, chosen) in order of first appearance."""
    groups = {}
    for line, obj in rows:
        if not is_trl_preference(obj):
            raise RecordError(path, line, "rejected", "a TRL preference row needs prompt, chosen and one rejected "
                                                      "response (a string or a list of one assistant message)")
        system, prompt, image_parts = prompt_of(obj.get("prompt"), path, line, "prompt")
        images = check_images(obj, image_parts, path, line)
        chosen = response_of(obj.get("chosen"), path, line, "chosen")
        rejected = response_of(obj.get("rejected"), path, line, "rejected")
        key = json.dumps([system, prompt, images, chosen])
        if key not in groups:
            groups[key] = {"id": f"line-{line}", "prompt": prompt, "images": images, "chosen": chosen, "rejected": [],
                           "_line": line, **({"system": system} if system else {})}
        groups[key]["rejected"].append(rejected)
    return list(groups.values())


def instances_from_sft(rows, path):
    """Instances (split train, one trajectory each) from TRL's SFT conversations (`messages`)."""
    out = []
    for line, obj in rows:
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RecordError(path, line, "messages", "must be a list of messages")
        if messages[-1].get("role") != "assistant":
            raise RecordError(path, line, "messages", "the last message must be the assistant's answer")
        system, prompt, image_parts = prompt_of(messages[:-1], path, line, "messages")
        images = check_images(obj, image_parts, path, line)
        text = response_of(messages[-1:], path, line, "messages")
        out.append({"id": str(obj.get("id") or f"line-{line}"), "split": "train", "prompt": prompt, "images": images,
                    "trajectories": [{"source": "data", "text": text}], **({"system": system} if system else {})})
    return out


def first_row(path):
    """The first row of a data file, or None when it has none."""
    return next(iter(rows_of(path)), (None, None))[1]


def read_preferences(path):
    """apo.py's data: preferences.jsonl (consensus.py's output) or TRL's preference format, told
    apart by their first row, validated whole as load_preferences validates."""
    from common.records import check_instance, load_preferences

    first = first_row(path)
    if first is None or not is_trl_preference(first):
        if Path(path).suffix not in (".jsonl", ".ndjson") and first is not None:
            raise RecordError(path, 1, "rejected", "not TRL's preference format (prompt, chosen, rejected)")
        return load_preferences(path)
    records = preferences_from_trl(rows_of(path), path)
    for record in records:
        check_instance(record, path, record["_line"])
        record.pop("split")  # preferences carry no split
    return records


def read_instances(path):
    """bootstrap.py's data: trajectories.jsonl, or TRL's SFT conversations (`messages`)."""
    from common.records import check_instance, load_instances

    first = first_row(path)
    if first is None or "messages" not in first or "trajectories" in first:
        return load_instances(path, require_trajectories=True)
    records = []
    for (line, _), record in zip(rows_of(path), instances_from_sft(rows_of(path), path)):
        check_instance(record, path, line)
        record["_line"] = line
        records.append(record)
    ids = {}
    for record in records:
        if record["id"] in ids:
            raise RecordError(path, record["_line"], "id", f"duplicate id {record['id']!r} (first on line {ids[record['id']]})")
        ids[record["id"]] = record["_line"]
    return records
