"""Stage 5 of APO: the paper's table. Every source and every model, scored per finding on the same
held-out instances.

    accelerate launch evaluate.py --models runs/bootstrap apo=runs/apo --data trajectories.jsonl --out runs/eval
    python evaluate.py --sources-only --data trajectories.jsonl --out runs/eval_sources
    python evaluate.py --models boot=runs/bootstrap@http://127.0.0.1:8000/v1 apo=runs/apo@http://127.0.0.1:8001/v1 ...

Sources are scored from the trajectories in --data; each model answers every labelled instance of
--split (greedy, batched, the chat format of training; DIR@URL: through that OpenAI-compatible
server), its answers journalled in predictions.jsonl. Every answer is parsed and scored per finding
against the labels, the same way for sources and models; an answer the parser cannot read counts
as unparsed and is wrong on every finding. The paper reports accuracy per finding; precision,
recall, F1 and the unparsed count are added here. Resume and refusals: docs/RELIABILITY.md.
"""

import argparse
import gc
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from common import chat_client
from common import journal
from common import reports
from common.answers import CHANGE_FINDINGS, FINDINGS, normalize, parse_answer, score, task_of
from common.records import (SPLITS, RecordError, check_output_paths, content_key, disk_full_reported, lazy_import,
                            load_instances, on_main_process, write_json_atomic, write_text_atomic)
from common.run import Run

# Loaded on first use, so that --help and a wrong flag answer at once (torch alone takes seconds).
torch = lazy_import("torch")
modeling = lazy_import("common.modeling")

TASK_FINDINGS = {"presence": FINDINGS, "change": CHANGE_FINDINGS}
# The flags that change a model's answers, recorded per model in models.json: predictions made
# under other values are never mixed in. A new decoding flag goes here.
# Each with the value it had before it was recorded (None: always recorded).
DECODING_ARGS = {"max_new_tokens": None, "repetition_penalty": 1.0}
OUTPUT_FILES = ("predictions.jsonl", "models.json", "metrics.json", "table.md", "accuracy.png")


# ---------------------------------------------------------------------------------------------
# The step: every source and every model answers the same held-out instances; each answer is
# parsed and scored per finding against the labels


def load_eval_instances(path, split, check_images):
    """The labelled instances of the split, with their task; unlabelled ones are only counted."""
    records = load_instances(path, check_images=check_images)
    in_split = [r for r in records if r["split"] == split]
    if not in_split:
        raise RecordError(path, None, "split", f"no instances of split {split!r} (choose another with --split)")
    labelled = [r for r in in_split if r.get("labels") is not None]
    if not labelled:
        raise RecordError(path, None, "labels", f"none of the {len(in_split)} {split} instances has labels; "
                                                "evaluation needs the ground truth")
    for r in labelled:
        r["labels"] = normalize(r["labels"])  # valid: load_instances checked them (records.check_labels)
        r["_task"] = task_of(r["labels"])
    return labelled, len(in_split) - len(labelled)


def source_names(instances):
    """Every source that answered an instance, in order of first appearance."""
    names = {}
    for r in instances:
        for t in r.get("trajectories") or []:
            names.setdefault(t["source"], None)
    return list(names)


def source_texts(instances, source):
    """{id: text} of one source; the first trajectory counts when a source answered twice."""
    texts = {}
    for r in instances:
        for t in r.get("trajectories") or []:
            if t["source"] == source:
                texts.setdefault(r["id"], t["text"])
    return texts


def score_row(instances, texts):
    """{task: score} of one row; `texts` maps id -> output text, an absent id counts as missing."""
    out = {}
    for task in ("presence", "change"):
        group = [r for r in instances if r["_task"] == task]
        if not group:
            continue
        result = score([parse_answer(texts.get(r["id"])) for r in group], [r["labels"] for r in group])
        result["missing"] = sum(r["id"] not in texts for r in group)
        out[task] = result
    return out


def model_rows(path, models, instances, keys):
    """The models' rows, scored from predictions.jsonl, which is rewritten in (model, instance) order."""
    if not models:
        return []
    predictions = read_predictions(path, keys)
    rows = []
    for name, model_path in models:
        texts = {i: row["text"] for (m, i), row in predictions.items() if m == name}
        rows.append({"name": name, "kind": "model", "path": model_path, **score_row(instances, texts)})
    rewrite_in_order(path, predictions.values(),
                     {n: k for k, (n, _) in enumerate(models)}, {r["id"]: k for k, r in enumerate(instances)})
    return rows


def answer_missing(run, accelerator, models, served, instances, done, out, args):
    """(answers generated, Counter of failed requests): each model answers the instances it has not
    answered yet (done: {(model, id)}), appended to predictions.jsonl on the main process. A bad
    prompt is found by every process (each checks the same prompts), so all stop together."""
    generated, failed = 0, Counter()
    appender = (run.journal(out / "predictions.jsonl", kept="finished predictions").open()
                if accelerator.is_main_process and models else None)
    for name, path in models:
        if name in served:
            generated += ask_missing(name, served[name], instances, done, appender, failed, args)
        else:
            generated += generate_missing(accelerator, name, path, instances, done, appender, args)
    if appender:
        appender.close()
    accelerator.wait_for_everyone()
    return generated, failed


def generate_missing(accelerator, name, path, instances, done, appender, args):
    """Answers of one model loaded here, shared out across processes; every batch is gathered on the
    main process and appended at once."""
    todo = [r for r in instances if (name, r["id"]) not in done]
    if not todo:
        return 0
    from accelerate.utils import gather_object

    processor = modeling.load_processor(path)
    model = modeling.load_model(path, dtype=modeling.default_dtype(accelerator)).to(accelerator.device).eval()
    check_context(model, processor, todo, args)
    mine = todo[accelerator.process_index :: accelerator.num_processes]
    # Every process runs the same number of steps (some with an empty batch) because each step
    # ends in a collective gather.
    steps = math.ceil(math.ceil(len(todo) / accelerator.num_processes) / args.batch_size)
    bar = tqdm(total=len(todo), desc=name, disable=not accelerator.is_main_process)
    for step in range(steps):
        batch = mine[step * args.batch_size : (step + 1) * args.batch_size]
        texts, ended = modeling.generate(model, processor, batch, data_path=args.data, batch_size=args.batch_size,
                                         max_new_tokens=args.max_new_tokens, return_ended=True,
                                         repetition_penalty=args.repetition_penalty) if batch else ([], [])
        rows = gather_object([prediction_row(name, r["id"], t, content_key(r), e)
                              for r, t, e in zip(batch, texts, ended)])
        if accelerator.is_main_process:
            for row in rows:
                appender.append(row)
        bar.update(len(rows))
    bar.close()
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(todo)


def check_context(model, processor, instances, args):
    """A prompt that leaves no room for the answer would fail deep inside generate: name it here."""
    limit = modeling.max_positions(model)
    if not limit:
        return
    for r in instances:
        length = len(modeling.encode_prompt(processor, r, args.data)[0])
        if length + args.max_new_tokens > limit:
            raise RecordError(args.data, r.get("_line"), "prompt",
                              f"{length} tokens + --max-new-tokens {args.max_new_tokens} exceed the model's "
                              f"{limit} positions")


def ask_missing(name, served, instances, done, appender, failed, args):
    """generate_missing through a server (one process): each answer is appended as it comes, a
    failure is counted in `failed` and left for the next run."""
    todo = [r for r in instances if (name, r["id"]) not in done]
    api_key = os.environ.get(args.api_key_env)
    # repetition_penalty is sent only when set: `transformers serve` refuses the field
    request = chat_client.request_fields(args.max_new_tokens, 0.0, repetition_penalty=(
        args.repetition_penalty if args.repetition_penalty != 1.0 else None))
    client = chat_client.make_client(served.url, api_key, args.timeout, args.max_response_mb)
    bar = tqdm(total=len(todo), desc=name)
    try:
        for r, text, error in chat_client.answer_all(
                client, served.name, todo, lambda r: chat_client.api_messages(r, args.data, args.allow_outside_images),
                lambda r: request,
                args.concurrency, args.max_retries, args.backoff, secrets=[api_key], generation=True):
            if error:
                failed[error] += 1
            else:
                answer, ended = text
                appender.append(prediction_row(name, r["id"], answer, content_key(r), ended))
            bar.update(1)
    finally:
        bar.close()
        client.close()
    return len(todo) - sum(failed.values())


def markdown_tables(rows):
    """One Markdown table per task: rows in order, columns the findings, average, unparsed."""
    parts = []
    for task in ("presence", "change"):
        scored = [r for r in rows if task in r]
        if not scored:
            continue
        columns = [f for f in TASK_FINDINGS[task] if any(f in r[task]["per_finding"] for r in scored)]
        extra = ["average", "macro F1", "unparsed"] if task == "presence" else ["average", "unparsed"]
        n = scored[0][task]["n"]
        lines = [f"### {task}: accuracy per finding, {n} instances", "",
                 "| | kind | " + " | ".join(columns + extra) + " |",
                 "|---|---|" + "---:|" * (len(columns) + len(extra))]
        for r in scored:
            s = r[task]
            cells = [f"{s['per_finding'][f]['accuracy']:.3f}" if f in s["per_finding"] else "–" for f in columns]
            cells.append(f"{s['macro']['accuracy']:.3f}")
            if task == "presence":
                cells.append(f"{s['macro']['f1']:.3f}")
            cells.append(f"{s['unparsed']}/{s['n']}")
            lines.append(f"| {r['name']} | {r['kind']} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# The models: names, folders, and the servers that answer for some of them


def check_models(args, instances, sources, accelerator):
    """([(name, path)], {name: chat_client.Served}) of --models, checked before any answer is asked."""
    models, urls = parse_models(args.models, args.server)
    if urls and accelerator.num_processes > 1:
        raise RecordError("--models", None, None, "a server answers for " + ", ".join(urls) + ": run "
                          "evaluate.py with python, not with several processes")
    served = connect(models, urls, args)
    check_text_models(models, instances, args.data, served)
    clash = sorted({n for n, _ in models} & set(sources))
    if clash:
        raise RecordError("--models", None, None, f"model name(s) {clash} are also source names in "
                                                  f"{args.data}; name the models with NAME=DIR")
    return models, served


# A server URL starts at the last "@http(s)://", as in collect.py's openai: sources.
_SERVED_RE = re.compile(r"^(?P<spec>.+?)@(?P<url>https?://\S+)$")


def parse_models(specs, server):
    """([(name, path)], {name: server URL}) from "DIR" or "NAME=DIR", each with an optional
    "@URL" (else --server, if given). A folder must hold a Hugging Face model; a served DIR may
    also be a folder on the server's machine or the server's name for it."""
    models, urls = [], {}
    for spec in specs:
        m = _SERVED_RE.match(spec)
        spec, url = (m["spec"], m["url"]) if m else (spec, server)
        chat_client.refuse_credentials(url, "--models" if m else "--server")
        name, sep, path = spec.partition("=")
        if not sep or "/" in name:  # a path that merely contains "="
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            raise RecordError("--models", None, None, f"{spec!r}: expected DIR or NAME=DIR")
        folder = Path(path)
        if folder.exists():
            if not (folder / "config.json").is_file():
                raise RecordError("--models", None, None, f"{path}: no config.json (not a Hugging Face model folder)")
        elif url:
            pass  # a folder on the server's machine or the server's name: served_model checks it
        elif path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise RecordError("--models", None, None, f"{path}: no such model folder")
        else:  # "org/name": a hub id, which must resolve now rather than after hours of generation
            try:
                modeling.is_vision_model(path)
            except OSError as e:
                raise RecordError("--models", None, None,
                                  f"{path}: no such model folder, and not loadable as a hub id ({e})") from None
        if any(name == n for n, _ in models):
            raise RecordError("--models", None, None, f"two models named {name!r}; name them with NAME=DIR")
        models.append((name, path))
        if url:
            urls[name] = url
    return models, urls


def check_text_models(models, instances, data_path, served):
    """Images go only to vision models."""
    with_images = sum(bool(r.get("images")) for r in instances)
    for name, path in models:
        if name in served and not Path(path).is_dir():
            continue  # a folder of the server's machine: the server refuses images its model cannot read
        if with_images and not modeling.is_vision_model(path):
            raise RecordError(data_path, None, "images",
                              f"{with_images} instances have images but model {name!r} ({path}) is a text model")
        if name not in served:
            modeling.load_processor(path)  # its tokenizer checked now, not after the other models' answers


def connect(models, urls, args):
    """{name: chat_client.Served} of the models answered by a server, each checked to serve its DIR."""
    served = {}
    for name, path in models:
        if name in urls:
            client = chat_client.make_client(urls[name], os.environ.get(args.api_key_env), args.timeout,
                                             args.max_response_mb)
            try:
                served[name] = chat_client.served_model(client, urls[name], want=path, max_retries=args.max_retries,
                                                        backoff=args.backoff)
            finally:
                client.close()
    return served


# ---------------------------------------------------------------------------------------------
# The run


def evaluate(args):
    import transformers  # here, not at the top: --help and a wrong flag answer before torch is loaded
    from accelerate.utils import set_seed

    transformers.utils.logging.disable_progress_bar()
    with Run("evaluate", args, journaled=True, bad_input=(chat_client.ServerError,)) as run:
        accelerator = run.accelerate()
        set_seed(args.seed)
        out = Path(args.out)
        instances, unlabelled = load_eval_instances(args.data, args.split, check_images=not args.sources_only)
        sources = source_names(instances)
        if args.sources_only and not sources:
            raise RecordError(args.data, None, "trajectories", f"none of the {len(instances)} {args.split} instances "
                                                               "has trajectories: --sources-only has nothing to score "
                                                               "(give --models, or the file collect.py wrote)")
        models, served = ([], {}) if args.sources_only else check_models(args, instances, sources, accelerator)
        check_output_paths(files=[out / name for name in OUTPUT_FILES], folders=[out], inputs={"--data": args.data},
                           model_dirs={f"--models {name}": path for name, path in models})
        keys = {r["id"]: content_key(r) for r in instances}

        # What an earlier run answered is not asked again (the same weights and settings: models.json).
        done = resume(run, out, models, keys, served, args, accelerator)
        reused = sum((n, r["id"]) in done for n, _ in models for r in instances)
        generated, failed = answer_missing(run, accelerator, models, served, instances, done, out, args)

        # Scored from the files, so a resumed run scores exactly what an uninterrupted one would.
        if accelerator.is_main_process:
            rows = [{"name": s, "kind": "source", **score_row(instances, source_texts(instances, s))} for s in sources]
            rows += model_rows(out / "predictions.jsonl", models, instances, keys)
            tasks = write_outputs(out, rows, instances, unlabelled, args)
            print(summary(rows, tasks, unlabelled, len(sources), len(models), generated, reused, args))
            if failed:
                print(f"{sum(failed.values())} answers failed (run the same command again to ask them again; "
                      "their rows count them as missing):")
                for reason, n in failed.most_common():
                    print(f"  {n} failed: {reason}")
        accelerator.end_training()
        if failed:
            raise SystemExit(3)


# ---------------------------------------------------------------------------------------------
# The predictions journal: what is already answered, under which weights and settings, in which order


def resume(run, out, models, keys, served, args, accelerator):
    """{(model, id)} already in predictions.jsonl, after locking the output and checking models.json.
    The main process alone touches the output files; the others learn from it what is done."""
    def claim():
        run.output(out, folder=True)
        if not models:
            return set()
        existing = read_predictions(out / "predictions.jsonl", keys)
        check_manifest(out, models, existing, args, served)
        return set(existing)  # the keys only: texts stay on disk

    return on_main_process(accelerator, claim, share=True)


def read_predictions(path, keys):
    """{(model, id): row} from predictions.jsonl after cutting a torn last line; first row wins.
    A row answering an instance of `keys` ({id: content_key}) that has changed since is dropped,
    so it is generated again."""
    predictions = journal.Journal(path)
    predictions.complete()
    rows = {}
    for lineno, row in predictions.lines():
        for field in ("id", "model", "text"):
            if not isinstance(row.get(field), str):
                raise RecordError(path, lineno, field, "missing or not a string")
        if row["id"] in keys and row.get("h") != keys[row["id"]]:
            continue
        rows.setdefault((row["model"], row["id"]), row)
    return rows


def fingerprint(path, served):
    """What predictions are tied to: the folder's fingerprint when it is here (whether loaded here or
    served from it), else the model id the server reports."""
    if served is not None and not Path(path).is_dir():
        return f"served:{served.root or served.name}"
    return modeling.model_fingerprint(path)


def decoding_settings(args):
    return {k: getattr(args, k) for k in DECODING_ARGS}


def check_manifest(out, models, existing, args, served):
    """Refuse to mix predictions of other weights or settings into a model's rows; record ours."""
    manifest_path = out / "models.json"
    try:
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    except json.JSONDecodeError:
        raise RecordError(manifest_path, None, None, "corrupt; move the output folder away to start over") from None
    for name, path in models:
        entry = {"path": path, "fingerprint": fingerprint(path, served.get(name)), **decoding_settings(args)}
        if name in served:
            entry["generator"] = served[name].record()
        old = manifest.get(name)
        if any(m == name for m, _ in existing):
            # a setting an older models.json lacks had its default then
            changed = [k for k, default in DECODING_ARGS.items() if (old or {}).get(k, default) != entry[k]]
            if old is None:
                made_with = "no record of the weights or settings (no entry in models.json)"
            elif old.get("fingerprint") != entry["fingerprint"]:
                made_with = f"other weights ({old.get('path')} when it ran)"
            elif changed:
                made_with = ", ".join(f"--{k.replace('_', '-')} {old.get(k, DECODING_ARGS[k])}" for k in changed)
            else:
                made_with = None
            if made_with:
                raise RecordError(out / "predictions.jsonl", None, None,
                                  f"holds predictions of model {name!r} made with {made_with}; use another "
                                  f"--out, rename the model (NAME=DIR), or delete its lines")
        manifest[name] = entry
    write_json_atomic(manifest_path, manifest)


def prediction_row(model, record_id, text, key, ended):
    """key: records.content_key of the instance answered; ended: the answer stopped on its own
    (False: cut at --max-new-tokens; None: not known)."""
    return {"id": record_id, "model": model, "text": text, "answer": parse_answer(text), "ended": ended, "h": key}


def rewrite_in_order(path, rows, model_order, id_order):
    """Rewrite predictions.jsonl in (model, instance) order, so a resumed or multi-process run
    leaves the very file an uninterrupted single-process run leaves. Rows of other models or
    instances are kept, at the end."""
    def key(row):
        m, i = row["model"], row["id"]
        return (model_order.get(m, len(model_order)), m if m not in model_order else "",
                id_order.get(i, len(id_order)), i)

    journal.Journal(path).rewrite([prediction_row(r["model"], r["id"], r["text"], r.get("h"), r.get("ended"))
                                   for r in sorted(rows, key=key)])


# ---------------------------------------------------------------------------------------------
# Outputs: metrics.json, the table, the summary line


def write_outputs(out, rows, instances, unlabelled, args):
    """metrics.json, table.md (also printed) and accuracy.png; returns the instances per task."""
    tasks = {t: sum(r["_task"] == t for r in instances) for t in ("presence", "change")}
    write_json_atomic(out / "metrics.json", {
        "data": str(args.data), "split": args.split, "instances": len(instances),
        "unlabelled_skipped": unlabelled, "tasks": {t: n for t, n in tasks.items() if n}, "rows": rows})
    table = markdown_tables(rows)
    write_text_atomic(out / "table.md", table)
    print("\n" + table)
    picture, tmp = out / "accuracy.png", out / "accuracy.png.tmp"
    with disk_full_reported(picture, leftovers=[tmp], resumes="the same command writes it from the predictions kept"):
        if not reports.plot_accuracy(rows, tmp, TASK_FINDINGS):
            print("note: matplotlib is not installed; accuracy.png skipped (pip install matplotlib)")
            return tasks
        os.replace(tmp, picture)  # a picture cut short by a full disk never replaces a good one
    return tasks


def summary(rows, tasks, unlabelled, n_sources, n_models, generated, reused, args):
    counts = ", ".join(f"{n} {t}" for t, n in tasks.items() if n)
    if unlabelled:
        counts += f", {unlabelled} unlabelled skipped"
    line = (f"evaluate: {sum(tasks.values())} {args.split} instances ({counts}), {n_sources} sources, "
            f"{n_models} models; {generated} answers generated, {reused} reused")
    if rows:
        def average(r):
            values = [r[t]["macro"]["accuracy"] for t in ("presence", "change") if t in r]
            return sum(values) / len(values)

        best = max(rows, key=average)
        line += f"; best average accuracy {average(best):.3f} ({best['name']})"
    return line + f"; outputs in {args.out}"


# ---------------------------------------------------------------------------------------------
# The command line


EPILOG = """\
outputs in --out:
  predictions.jsonl  one line per (model, instance): id, model, text, answer (parsed or null)
  models.json        what produced the predictions of each model (weights hash, settings)
  metrics.json       per row (sources, then models) and task: per-finding metrics, macro, unparsed, n
  table.md           the Markdown table, also printed
  accuracy.png       heat map of per-finding accuracy with the unparsed share (skipped with a note
                     without matplotlib)

Only the labelled instances of --split are scored; unlabelled ones are counted. Presence tasks
(14 findings) get accuracy, precision, recall and F1 per finding, change tasks (MS-CXR-T)
accuracy per finding, both the macro average. A served model (DIR@URL, or --server)
must serve DIR; a request that still fails is asked again by the next run (exit 3 until none
fails). The same command after an interruption (Ctrl-C: exit 130 at once) skips the (model,
instance) pairs already answered.
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[], metavar="DIR|NAME=DIR[@URL]",
                   help="model folders to evaluate (or hub ids); the table names a row after the folder, "
                        "or NAME when given as NAME=DIR; DIR@URL: the OpenAI-compatible server at URL serves "
                        "DIR and answers for it")
    p.add_argument("--data", required=True, help="trajectories.jsonl with `labels` on the instances to score")
    p.add_argument("--out", required=True, help="output folder (predictions.jsonl, metrics.json, table.md, accuracy.png)")
    p.add_argument("--split", default="test", choices=SPLITS, help="split to score (default test)")
    p.add_argument("--sources-only", action="store_true",
                   help="score the sources in --data only; load no model (useful right after collect.py)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call on each process")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="generation budget per answer (reasoning included)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="transformers' repetition penalty for every model (> 1 discourages repeating tokens already "
                        "in the prompt or the answer; default 1.0: off). Part of the decoding protocol: compare "
                        "models only under the same one")
    p.add_argument("--seed", type=int, default=0, help="random seed (decoding is greedy; set for completeness)")
    chat_client.add_server_options(p, "runs/apo")
    args = p.parse_args(argv)
    if not args.models and not args.sources_only:
        p.error("give --models DIR [DIR ...], or --sources-only to score the sources alone")
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.concurrency < 1:
        p.error("--batch-size, --max-new-tokens and --concurrency must be at least 1")
    return args


def main(argv=None):
    evaluate(parse_args(argv))


if __name__ == "__main__":
    main()
