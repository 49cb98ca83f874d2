"""The source backends of collect.py, and the importers of trajectories collected elsewhere.

A source is named on the command line as `[name=]kind:target` (DESIGN, "Sources"):

    hf:<path or hub id>             local transformers generation, batched, text models and VLMs
    openai:<model>[@<base url>]     any OpenAI-compatible chat endpoint (OpenAI, vLLM, SGLang,
                                    `transformers serve`, Anthropic / Gemini / DashScope compat …)
    sim:<profile> | sim:all         the drift simulator (simulator.py)

The trajectory's `source` field is the part after the prefix (the model, without the base URL),
unless a `name=` is given: `gpt5=openai:gpt-5-nano@https://api.openai.com/v1`.

Each backend is a generator of (id, text, error) for the instances it is given, one per instance
as soon as it is finished, so collect.py can journal it at once: error is None for an answer and
a short reason (never containing an API key) for a pair that failed.

Importers turn dumps made elsewhere into instance records with `trajectories`: ms-swift JSON /
JSONL (the format of the official APO scripts) and any JSONL through a field mapping.
"""

import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common import records
# the OpenAI-compatible client, shared with consensus.py and evaluate.py --server
from common.chat_client import (ServerError, answer_all, api_messages, image_data_url,  # noqa: F401 (image_data_url: sources.*)
                         make_client, refuse_credentials)
from common.records import RecordError

KINDS = ("hf", "openai", "sim")


class SourceError(ValueError):
    """A bad --sources entry or importer option; collect.py reports it and exits 2."""


@dataclass
class Source:
    name: str  # the `source` field of its trajectories
    kind: str  # hf | openai | sim
    target: str  # model folder or hub id, API model name, simulator profile name
    base_url: str = None  # openai: the endpoint, None = the client's default (OPENAI_BASE_URL or OpenAI)
    profile: object = None  # sim: the simulator.Profile

    def __str__(self):
        return f"{self.kind}:{self.target}" + (f"@{self.base_url}" if self.base_url else "")


# A base URL starts at the first "@http(s)://", so model names may hold "@" (e.g. "org/model@rev").
_OPENAI_RE = re.compile(r"^(?P<model>.+?)@(?P<url>https?://\S+)$")
_NAME_RE = re.compile(r"^[^\s:=]+$")


def parse_sources(specs, sim_profiles=None):
    """Source objects for the --sources entries, checked before anything runs.

    `sim:all` expands to one source per default profile (plus those of sim_profiles). Names must
    be unique: seven sources need seven names in the output.
    """
    out = []
    for spec in specs:
        name, _, rest = spec.partition("=") if "=" in spec.split(":", 1)[0] else ("", "", spec)
        kind, colon, target = rest.partition(":")
        if not colon or kind not in KINDS:
            raise SourceError(f"--sources {spec!r}: expected [name=]kind:target with kind one of "
                              f"{', '.join(KINDS)} (e.g. hf:Qwen/Qwen2.5-VL-7B-Instruct, "
                              "gpt5=openai:gpt-5-nano, sim:all)")
        if not target:
            raise SourceError(f"--sources {spec!r}: nothing after '{kind}:'")
        if name and not _NAME_RE.match(name):
            raise SourceError(f"--sources {spec!r}: a source name may not contain spaces, ':' or '='")
        if kind == "hf":
            out.append(Source(name or target.rstrip("/"), "hf", target))
        elif kind == "openai":
            m = _OPENAI_RE.match(target)
            model, url = (m["model"], m["url"]) if m else (target, None)
            try:
                refuse_credentials(url or os.environ.get("OPENAI_BASE_URL"), f"--sources {name or model}:")
            except ServerError as e:
                raise SourceError(str(e)) from None
            out.append(Source(name or model, "openai", model, base_url=url))
        else:
            from common import simulator

            try:
                profiles = simulator.resolve([target], sim_profiles)
            except ValueError as e:
                raise SourceError(f"--sources {spec!r}: {e}") from None
            if name and len(profiles) > 1:
                raise SourceError(f"--sources {spec!r}: sim:all expands to several sources; "
                                  "it cannot take one name")
            out.extend(Source(name or p.name, "sim", p.name, profile=p) for p in profiles)
    seen = Counter(s.name for s in out)
    twice = [n for n, c in seen.items() if c > 1]
    if twice:
        raise SourceError(f"--sources: source name {twice[0]!r} is used twice; rename one with "
                          f"NAME=kind:target (e.g. {twice[0]}-2={next(str(s) for s in out if s.name == twice[0])})")
    if any(s.kind == "openai" for s in out):
        require_openai()
    return out


def require_openai():
    try:
        import openai  # noqa: F401
    except ImportError:
        raise SourceError("openai: sources need the `openai` package: pip install openai") from None


def seed_for(*parts):
    """A 63-bit seed from strings, stable across runs and machines (unlike hash())."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


# ---------------------------------------------------------------------------------------------
# hf: local generation


def fixed_batches(instances, batch_size):
    """Batches of similar length, fixed by the whole instance list rather than by what is left.

    A resumed run thus regenerates a batch with the same rows and the same seed as the first run
    would have, and sampled answers come out identical.
    """
    order = sorted(range(len(instances)),
                   key=lambda i: (-len(instances[i]["prompt"]) - len(instances[i].get("system") or ""), i))
    return [[instances[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


def hf_answers(source, instances, todo, data_path=None, batch_size=8, max_new_tokens=1024, temperature=0.0,
               top_p=1.0, seed=0):
    """Yield (id, text, error) for the instances whose id is in `todo`, one model in memory.

    `instances` is every instance asked of this source (done ones included) so that batches are
    the same on a resumed run; a batch whose rows are all done is skipped. The model is freed when
    the generator ends, before the next source loads its own.
    """
    import gc

    import torch

    from common import modeling

    cuda = torch.cuda.is_available()
    processor = modeling.load_processor(source.target)
    # device_map="auto" spreads a model too big for one GPU (Qwen2.5-VL-72B) over all of them.
    model = modeling.load_model(source.target, dtype=torch.bfloat16 if cuda else torch.float32,
                                device_map="auto" if cuda else None)
    model.eval()
    try:
        for batch in fixed_batches(instances, batch_size):
            if not any(r["id"] in todo for r in batch):
                continue
            torch.manual_seed(seed_for(seed, source.name, batch[0]["id"]))
            texts = modeling.generate(model, processor, batch, data_path=data_path, batch_size=len(batch),
                                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
            for r, text in zip(batch, texts):
                if r["id"] in todo:
                    yield r["id"], text or None, None if text else "empty answer"
    finally:
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def is_text_model(source):
    from common import modeling

    return not modeling.is_vision_model(source.target)


# ---------------------------------------------------------------------------------------------
# openai: OpenAI-compatible chat endpoints


def openai_answers(source, instances, data_path=None, api_key=None, concurrency=8, max_retries=5, timeout=120.0,
                   backoff=1.0, request=None, allow_outside_images=False, max_response_mb=None):
    """Yield (id, text, error) for each instance as its request finishes, at most `concurrency` in
    flight. `request` holds the extra chat.completions fields (max_completion_tokens, temperature …);
    `timeout` is each request's total deadline. The key is removed from every answer and error,
    whatever the server echoes back.
    """
    client = make_client(source.base_url, api_key, timeout,
                         *(() if max_response_mb is None else (max_response_mb,)))
    try:
        # the one bounded-concurrency loop of every stage that asks a server (chat_client.answer_all)
        for record, text, error in answer_all(
                client, source.target, instances, lambda r: api_messages(r, data_path, allow_outside_images),
                lambda r: request or {}, concurrency=concurrency, max_retries=max_retries, backoff=backoff,
                secrets=[api_key]):
            yield record["id"], text, error
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------
# sim: the drift simulator


def sim_answers(source, instances, positions, seed=0, delay=0.0):
    """Yield (id, text, None): the profile's trajectory at each instance's stream position."""
    from common import simulator

    for r in instances:
        if delay:
            time.sleep(delay)
        yield r["id"], simulator.simulate(source.profile, r, positions[r["id"]], seed), None


# ---------------------------------------------------------------------------------------------
# Importers

IMPORT_FIELDS = ("id", "prompt", "text", "source", "images", "split", "labels", "system")


def json_items(path):
    """(line, object) for each item of a JSON array file, or each line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(path, None, None, "no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(path, data[: e.start].count(b"\n") + 1, None,
                          f"not UTF-8 ({e.reason} at byte {e.start})") from None
    pos = len(text) - len(text.lstrip())
    if not text[pos:].startswith("["):
        yield from records.read_jsonl(path)
        return
    decoder, pos, line, counted = json.JSONDecoder(), pos + 1, 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted, pos)
        counted = pos
        if pos >= len(text):
            raise RecordError(path, line, None, "malformed JSON (the array is not closed)")
        if text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise RecordError(path, e.lineno, None, f"malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise RecordError(path, line, None, f"expected a JSON object, got {type(obj).__name__}")
        yield line, obj


def _text_of(content, path, line, field):
    """Text and image count of a message content: a string (ms-swift's <image> tags) or parts."""
    if isinstance(content, str):
        return re.sub(r"<image>", "", content).strip(), content.count("<image>")
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        n_images = sum(isinstance(p, dict) and p.get("type") in ("image", "image_url") for p in content)
        return "\n".join(t for t in texts if t).strip(), n_images
    raise RecordError(path, line, field, "must be a string or a list of {type, text} parts")


def _swift_images(obj, path, line):
    images = obj.get("images") or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list):
        raise RecordError(path, line, "images", "must be a list of paths")
    out = []
    for i, img in enumerate(images):
        img = img.get("path") if isinstance(img, dict) else img
        if not isinstance(img, str) or not img:
            raise RecordError(path, line, f"images[{i}]", "must be a path (or {\"path\": …})")
        if re.match(r"^[a-z]+://", img):
            raise RecordError(path, line, f"images[{i}]", f"{img!r} is a URL; download the images and "
                                                          "name local files")
        out.append(img)
    return out


def _names(value, n, path, line, field):
    """Source names from a field: one string, or a list as long as the texts it names."""
    if value is None:
        return [None] * n
    if isinstance(value, str):
        return [value] * n
    if isinstance(value, list) and len(value) == n and all(isinstance(v, str) and v for v in value):
        return value
    raise RecordError(path, line, field, f"must be a string or a list of {n} names")


def _rejected_texts(value, path, line):
    """The texts of rejected_response: a string, or a list of strings or of assistant messages
    ({"role": "assistant", "content": …}, ms-swift 3.12 and later), each one rejected answer."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise RecordError(path, line, "rejected_response", "must be a string or a list of strings or of "
                                                           "assistant messages")
    texts = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("role") == "assistant" and "content" in item:
            texts.append(_text_of(item["content"], path, line, f"rejected_response[{i}].content")[0])
        else:
            raise RecordError(path, line, f"rejected_response[{i}]", "must be a string or an assistant message "
                                                                     "{\"role\": \"assistant\", \"content\": …}")
    return texts


def swift_row(obj, path, line, source_name=None):
    """One ms-swift row as an instance with its trajectories.

    Layouts: {"messages": [system?, user, assistant?], "images", "response"?, "rejected_response"?}
    or {"query", "response", "rejected_response", "system"}. The user turn is the prompt (its
    <image> tags dropped: images come first, as everywhere in this project); `response` (a model's
    output in ms-swift inference dumps) or else the assistant turn is the chosen trajectory;
    rejected_response (a string, or a list of strings or of assistant messages) gives the rejected ones. Names come from "source" /
    "rejected_source(s)" fields when present, else source_name / "swift-chosen", "swift-rejected".
    """
    messages = obj.get("messages")
    system, prompt, assistant = obj.get("system"), None, None
    if messages is not None:
        if not isinstance(messages, list):
            raise RecordError(path, line, "messages", "must be a list of {role, content}")
        users = 0
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RecordError(path, line, f"messages[{i}]", "must be {\"role\": system|user|assistant, "
                                                                "\"content\": …}")
            text, _ = _text_of(m.get("content"), path, line, f"messages[{i}].content")
            if m["role"] == "system":
                system = text
            elif m["role"] == "user":
                users += 1
                prompt = text
            elif users:
                assistant = text
        if users > 1:
            raise RecordError(path, line, "messages", f"{users} user turns; only single-turn conversations "
                                                      "can be imported")
    elif "query" in obj:
        prompt, _ = _text_of(obj["query"], path, line, "query")
    if not prompt:
        raise RecordError(path, line, "messages", "no user turn (or 'query') to use as the prompt")
    chosen = obj.get("response", assistant)
    if chosen is not None and not isinstance(chosen, str):
        raise RecordError(path, line, "response", "must be a string")
    rejected = _rejected_texts(obj.get("rejected_response"), path, line)
    chosen_name = _names(obj.get("source"), 1, path, line, "source")[0] or source_name or "swift-chosen"
    rejected_field = "rejected_sources" if "rejected_sources" in obj else "rejected_source"
    rejected_names = _names(obj.get(rejected_field), len(rejected), path, line, rejected_field)
    trajectories = [{"source": chosen_name, "text": chosen.strip()}] if chosen and chosen.strip() else []
    trajectories += [{"source": n or "swift-rejected", "text": t.strip()}
                     for n, t in zip(rejected_names, rejected) if t.strip()]
    if not trajectories:
        raise RecordError(path, line, "response", "no trajectory: no assistant turn, 'response' or "
                                                  "'rejected_response' with text")
    record = {"id": obj.get("id"), "split": obj.get("split", "train"), "prompt": prompt,
              "images": _swift_images(obj, path, line)}
    if system:
        record["system"] = system
    if obj.get("labels") is not None:
        record["labels"] = obj["labels"]
    return record, trajectories


def parse_mapping(text):
    """--map "prompt=question,text=answer,source=model,id=study_id,images=image" as a dict.

    Keys are record fields (IMPORT_FIELDS); values are the dump's field names, dotted for nested
    objects ("meta.study_id"). prompt and text are required.
    """
    mapping = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise SourceError(f"--map: {part!r} is not FIELD=DUMP_FIELD")
        if key not in IMPORT_FIELDS:
            raise SourceError(f"--map: unknown field {key!r}; fields are {', '.join(IMPORT_FIELDS)}")
        if key in mapping:
            raise SourceError(f"--map: {key!r} is mapped twice")
        mapping[key] = value
    missing = [k for k in ("prompt", "text") if k not in mapping]
    if missing:
        raise SourceError(f"--map: {' and '.join(missing)} must be mapped (e.g. --map prompt=question,text=answer,"
                          "source=model,id=study_id,images=image_path)")
    return mapping


_MISSING = object()


def _lookup(obj, dotted):
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


def mapped_row(obj, path, line, mapping, source_name=None):
    """One row of a mapped JSONL dump (one row per (instance, source)) as (instance, [trajectory])."""
    values = {}
    for key, field in mapping.items():
        value = _lookup(obj, field)
        if value is _MISSING or value is None:
            if key in ("prompt", "text", "id", "source"):
                raise RecordError(path, line, field, f"missing (mapped to {key})")
            continue
        values[key] = value
    for key in ("prompt", "text", "source", "system", "split"):
        if key in values and not isinstance(values[key], str):
            raise RecordError(path, line, mapping[key], f"must be a string (mapped to {key})")
    if not values["text"].strip():
        raise RecordError(path, line, mapping["text"], "empty (mapped to text)")
    images = values.get("images", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise RecordError(path, line, mapping.get("images", "images"), "must be a path or a list of paths")
    record = {"id": values.get("id"), "split": values.get("split", "train"), "prompt": values["prompt"],
              "images": images}
    for key in ("system", "labels"):
        if key in values:
            record[key] = values[key]
    name = values.get("source") or source_name or Path(path).stem
    return record, [{"source": name, "text": values["text"].strip()}]


def group_rows(path, rows):
    """Instances from (line, record, trajectories) rows, rows of one instance merged in order.

    An instance is its id, or without one its system + prompt + images (stable across runs).
    Rows of one instance must agree on everything but the trajectories. A source name met again
    with a different text gets a suffix (-2, -3 …); the same text twice is kept once.
    """
    out, by_key = [], {}
    for line, record, trajectories in rows:
        if isinstance(record.get("id"), int) and not isinstance(record["id"], bool):
            record["id"] = str(record["id"])
        if record.get("id") is None:
            key = json.dumps([record.get("system"), record["prompt"], record["images"]], ensure_ascii=False)
            record["id"] = "imp-" + hashlib.sha256(key.encode()).hexdigest()[:12]
        records.check_instance(record, path, line)
        first = by_key.get(record["id"])
        if first is None:
            record["trajectories"], record["_line"] = [], line
            by_key[record["id"]] = first = record
            out.append(record)
        else:
            for field in ("prompt", "system", "images", "split", "labels"):
                if record.get(field) != first.get(field):
                    raise RecordError(path, line, field, f"differs from line {first['_line']} of the same "
                                                         f"instance {record['id']!r}")
        have = first["trajectories"]
        for t in trajectories:
            if any(h == t for h in have):
                continue
            name, k = t["source"], 1
            while any(h["source"] == name for h in have):
                k += 1
                name = f"{t['source']}-{k}"
            have.append({"source": name, "text": t["text"]})
    if not out:
        raise RecordError(path, None, None, "no records")
    return out


def import_swift(path, source_name=None):
    """Instances with trajectories from an ms-swift JSON or JSONL file (see swift_row)."""
    return group_rows(path, [(line, *swift_row(obj, path, line, source_name)) for line, obj in json_items(path)])


def import_mapped(path, mapping, source_name=None):
    """Instances with trajectories from any JSONL dump through a --map field mapping."""
    return group_rows(path, [(line, *mapped_row(obj, path, line, mapping, source_name))
                             for line, obj in json_items(path)])
