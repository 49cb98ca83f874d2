"""Stage 1 of APO, collect: several source models answer the same instances with chain-of-thought
trajectories, whose disagreements and drift the later stages turn into constraints.

    python collect.py --sources sim:all --n-train 2000 --n-test 500 --out runs/trajectories.jsonl
    python collect.py --data instances.jsonl --sources qwen72b=hf:Qwen/Qwen2.5-VL-72B-Instruct \\
        gpt5=openai:gpt-5-nano --out runs/trajectories.jsonl
    python collect.py --import-swift apo_dpo.jsonl --out runs/trajectories.jsonl

Instances come from --data, from an importer, or from the drift simulator; the output is
trajectories.jsonl (docs/DESIGN.md, "Files between stages"): train then test in input order, each
instance with the trajectories it had plus one per source, in --sources order. Departures from
the paper: none in the step; the drift simulator (sim:) stands in for the paper's seven source
MLLMs where none are at hand, and the importers read answers collected elsewhere. Every answer is
journalled as it arrives, so the same command resumes (docs/RELIABILITY.md).
"""

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from collections import Counter, defaultdict
from datetime import datetime, timezone

from common import chat_client
from common import records
from common import sources
from common import reports
from common.records import RecordError
from common.run import Run
from common.sources import SourceError


# ---------------------------------------------------------------------------------------------
# The step: the instances, every source asked for the pairs it has not answered, the output rows


def load_stream(args):
    """The instances in stream order (train, then test, each in input order) and the file they
    came from (image paths are relative to it; None for the simulator)."""
    if args.data:
        origin, instances = args.data, records.load_instances(args.data)
    elif args.import_swift:
        origin, instances = args.import_swift, sources.import_swift(args.import_swift, args.import_source)
    elif args.import_jsonl:
        mapping = sources.parse_mapping(args.map)
        origin, instances = args.import_jsonl, sources.import_mapped(args.import_jsonl, mapping, args.import_source)
    else:
        from common import simulator

        n_train = 1000 if args.n_train is None else args.n_train
        n_test = 200 if args.n_test is None else args.n_test
        if n_train < 0 or n_test < 0 or n_train + n_test == 0:
            raise SourceError("--n-train/--n-test: need at least one instance (and no negative counts)")
        origin, instances = None, simulator.make_instances(n_train, n_test, args.seed, task=args.sim_task)
    return [r for r in instances if r["split"] == "train"] + [r for r in instances if r["split"] == "test"], origin


def check_sources(srcs, instances, origin, key_envs, allow_outside_images=False):
    """Everything a source needs, checked before the first one is asked; images sent to an API
    source must lie inside the data file's folder unless allowed."""
    unlabelled = next((r for r in instances if not r.get("labels")), None)
    if unlabelled is not None and any(s.kind == "sim" for s in srcs):
        raise RecordError(origin, unlabelled.get("_line"), "labels",
                          "missing or empty: sim: sources simulate answers from the hidden truth, so every instance "
                          "needs labels")
    with_images = sum(bool(r.get("images")) for r in instances)
    for s in srcs:
        if s.kind == "hf":
            try:
                text_only = sources.is_text_model(s)
            except OSError as e:
                raise SourceError(f"{s}: cannot read the model's config ({' '.join(str(e).split())[:300]})") from None
            if text_only and with_images:
                raise SourceError(f"{s} is a text model but {with_images} instances have images; name a VLM "
                                  "(its config has a vision_config) or instances without images")
            from common import modeling

            modeling.load_processor(s.target)  # its tokenizer checked now, not after the other sources' answers
        if s.kind == "openai" and api_key(s, key_envs) is None and (
                s.name in key_envs or (s.base_url is None and not os.environ.get("OPENAI_BASE_URL"))):
            # a local server may need no key; OpenAI itself, or a key named for this source, does
            raise SourceError(f"{s}: no API key: set ${key_envs.get(s.name, key_envs[None])} "
                              "(or name another variable with --api-key-env)")
    if with_images and any(s.kind == "openai" for s in srcs) and not allow_outside_images:
        for r in instances:
            records.check_images_inside(r, origin)


def parse_key_envs(entries, srcs):
    """--api-key-env: {None: default variable, source name: variable}."""
    out, names = {None: "OPENAI_API_KEY"}, {s.name for s in srcs}
    for entry in entries:
        name, eq, var = entry.rpartition("=")
        if eq and name not in names:
            raise SourceError(f"--api-key-env {entry!r}: no source is named {name!r}")
        out[name if eq else None] = var
    return out


def api_key(source, key_envs):
    return os.environ.get(key_envs.get(source.name, key_envs[None])) or None


def answers_of(source, instances, todo, origin, positions, args, key_envs):
    """The backend's (id, text, error) stream for the pairs still to do."""
    todo_records = [r for r in instances if r["id"] in todo]
    if source.kind == "hf":
        return sources.hf_answers(source, instances, todo, data_path=origin, batch_size=args.batch_size,
                                  seed=args.seed, **hf_generation(args))
    if source.kind == "openai":
        return sources.openai_answers(source, todo_records, data_path=origin, api_key=api_key(source, key_envs),
                                      concurrency=args.concurrency, max_retries=args.max_retries,
                                      timeout=args.timeout, backoff=args.backoff, request=api_request(args),
                                      max_response_mb=args.max_response_mb,
                                      allow_outside_images=args.allow_outside_images)
    return sources.sim_answers(source, todo_records, positions, seed=args.seed, delay=args.sim_delay)


def collect(srcs, instances, have, parts, origin, positions, keys, args, key_envs, times):
    """Ask every source for the pairs not in `have`, journalling each answer as it arrives (an API
    source's with the time it came back, into `times` too).

    Returns the number of answers received and {source name: Counter of failure reasons}.
    """
    from tqdm import tqdm

    answered, failures = 0, defaultdict(Counter)
    for s in srcs:
        todo = {r["id"] for r in instances if (r["id"], s.name) not in have}
        if not todo:
            continue
        with tqdm(total=len(todo), desc=s.name, unit="answer", dynamic_ncols=True) as bar:
            for rec_id, text, error in answers_of(s, instances, todo, origin, positions, args, key_envs):
                line = {"id": rec_id, "source": s.name, "h": keys[rec_id]}
                if text:
                    have[(rec_id, s.name)] = text
                    if s.kind == "openai":  # an endpoint's model can change under its name: date its answers
                        times[(rec_id, s.name)] = line["time"] = now_iso()
                    parts.append({**line, "text": text})
                    answered += 1
                else:
                    failures[s.name][error] += 1
                    parts.append({**line, "error": error})
                bar.update(1)
    return answered, failures


def now_iso():
    # one format and zone for every stamp, so that the earliest of an instance is also the least string
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def assemble(instances, srcs, have, origin, out, times):
    """The output records: input fields, images relative to OUT's folder, `time` (the input's, else
    when an API source first answered the instance, ISO 8601 UTC; none for sim: and hf: sources,
    whose answers do not depend on when they were asked), then the trajectories the instance came
    with followed by one per source in --sources order."""
    rows = []
    for r in instances:
        row = records.public(r)
        row.pop("trajectories", None)
        if origin is not None:
            row["images"] = records.rebase_images(r.get("images") or [], origin, out)
        stamps = [times[(r["id"], s.name)] for s in srcs if (r["id"], s.name) in times]
        if stamps and "time" not in row:
            row["time"] = min(stamps)
        given = list(r.get("trajectories") or [])
        asked = [{"source": s.name, "text": have[(r["id"], s.name)]}
                 for s in srcs if (r["id"], s.name) in have and not any(t["source"] == s.name for t in given)]
        row["trajectories"] = given + asked
        rows.append(row)
    return rows



# ---------------------------------------------------------------------------------------------
# The run: its output claimed and tied to each source's settings, the journal resumed, the file written


def collect_all(args):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        records.fail("collect.py runs as one process (python collect.py …): an hf: model is spread over all "
                     "visible GPUs by itself, and one journal must have one writer")
    with Run("collect", args, journaled=True, bad_input=(SourceError,)) as run:
        out = records.output_file(args.out)
        parts = run.journal(out.with_name(out.name + ".parts.jsonl"), kept="finished answers")
        srcs = sources.parse_sources(args.sources, args.sim_profiles)
        key_envs = parse_key_envs(args.api_key_env, srcs)
        records.check_output_paths(
            files=[out, parts.path, records.manifest_path(out)],
            inputs={"--data": args.data, "--import-swift": args.import_swift, "--import-jsonl": args.import_jsonl,
                    "--sim-profiles": args.sim_profiles},
            model_dirs={f"--sources {s.name}": s.target for s in srcs if s.kind == "hf"})
        instances, origin = load_stream(args)
        check_sources(srcs, instances, origin, key_envs, args.allow_outside_images)
        if any(s.kind == "hf" for s in srcs):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        output_images = {r["id"]: records.rebase_images(r.get("images") or [], origin, out) if origin else []
                         for r in instances}
        keys = {r["id"]: records.content_key(r, output_images[r["id"]]) for r in instances}
        times = {}
        have = claim_output(run, out, parts, srcs, keys, args, times)
        reused = len(have)
        for r in instances:
            for t in r.get("trajectories") or []:
                have.setdefault((r["id"], t["source"]), t["text"])
        positions = {r["id"]: i / max(len(instances) - 1, 1) for i, r in enumerate(instances)}
        try:
            answered, failures = collect(srcs, instances, have, parts.open(), origin, positions, keys, args,
                                         key_envs, times)
        except RuntimeError as e:
            if "out of memory" not in str(e).lower():
                raise
            print(f"error: out of memory ({' '.join(str(e).split())[:200]}); lower --batch-size or --max-new-tokens "
                  f"and run the same command again (finished answers are kept in {parts.path})", file=sys.stderr)
            raise SystemExit(1)
        rows = assemble(instances, srcs, have, origin, out, times)
        try:
            records.write_jsonl_atomic(out, rows)
        except records.DiskFull as e:
            records.fail(f"{e} (every answer is in {parts.path}: nothing is asked again)")
        failed = reports.print_collect(rows, srcs, failures)
        n_train = sum(r["split"] == "train" for r in rows)
        print(f"\ncollect: {len(rows)} instances ({n_train} train, {len(rows) - n_train} test), "
              f"{sum(len(r['trajectories']) for r in rows)} trajectories from {len(srcs)} sources -> {out}; "
              f"{answered} answered this run, {reused} resumed from the journal, {failed} failed"
              + (" (run the same command again to retry them)" if failed else ""))
        return 3 if failed else 0


def claim_output(run, out, parts, srcs, keys, args, times):
    """Lock OUT and tie it to each source's settings, before any source is asked; returns the
    journal's answers that still match their instance (and fills `times`, see read_journal)."""
    output = run.output(out)
    have = read_journal(parts, keys, times)
    output.tie({s.name: source_settings(s, args) for s in srcs},
               f"its answers are in {parts.path}: rerun with those settings, give the source another NAME=, or "
               f"delete {parts.path} and {output.manifest} to ask every source afresh",
               used={source for _, source in have})
    return have


def read_journal(parts, keys, times):
    """{(id, source): text} of the journal's answers that still match their instance; `times`
    gets {(id, source): time} of those that carry when they were answered."""
    done = {}
    for line in parts.complete():
        pair = (line.get("id"), line.get("source"))
        if line.get("text") and keys.get(pair[0]) == line.get("h") and pair not in done:
            done[pair] = line["text"]
            if line.get("time"):
                times[pair] = line["time"]
    return done


def source_settings(source, args):
    """What decides a source's answers besides the instance it is asked, recorded per source name in
    OUT.run.json: journal answers of a name asked under other values are refused, never reused."""
    settings = {"spec": str(source)}
    if source.kind == "sim":
        profile = json.dumps(dataclasses.asdict(source.profile), sort_keys=True, default=str)
        settings.update(seed=args.seed, profile_sha256=hashlib.sha256(profile.encode()).hexdigest()[:16])
    elif source.kind == "hf":
        from common.modeling import model_fingerprint

        settings.update(seed=args.seed, model_fingerprint=model_fingerprint(source.target), **hf_generation(args))
    else:  # API endpoints are not seeded; they get only the flags given
        settings["request"] = api_request(args)
    return settings


def hf_generation(args):
    return {"max_new_tokens": 1024 if args.max_new_tokens is None else args.max_new_tokens,
            "temperature": args.temperature or 0.0, "top_p": 1.0 if args.top_p is None else args.top_p}


def api_request(args):
    return {k: v for k, v in (("max_completion_tokens", args.max_new_tokens), ("temperature", args.temperature),
                              ("top_p", args.top_p)) if v is not None}



# ---------------------------------------------------------------------------------------------
# The command line


EPILOG = """\
sources (--sources, each [NAME=]KIND:TARGET; NAME is the trajectories' `source` field):
  hf:PATH_OR_HUB_ID           local generation (text model or VLM), batched, one model loaded at a
                              time; a big model is spread over all visible GPUs
  openai:MODEL[@BASE_URL]     an OpenAI-compatible chat endpoint; the key comes from the variable
                              named by --api-key-env (a local server may need none)
  sim:PROFILE | sim:all       the drift simulator's simulated sources (needs labels); profiles:
                              {profiles}

resume: every finished (instance, source) answer is journalled in OUT.parts.jsonl; the same
  command skips the pairs already there (docs/RELIABILITY.md)

exit status: 0 all pairs answered; 2 bad input or options (nothing asked); 3 some pairs failed
(the file is written without them; run the same command again to retry them); 130 interrupted.
"""



def build_parser():
    try:
        from common import simulator

        profiles = ", ".join(simulator.PROFILES)
    except ImportError:
        profiles = "(simulator.py missing)"
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG.format(profiles=profiles),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", nargs="+", default=[], metavar="[NAME=]KIND:TARGET",
                   help="the sources to ask (see below); sim:all is one source per default profile")
    p.add_argument("--out", required=True, help="trajectories.jsonl to write (and OUT.parts.jsonl, the resume journal)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the simulator's instances and sources and hf sampling (API endpoints are not seeded)")

    data = p.add_argument_group("instances (one of; default: the drift simulator)")
    origin = data.add_mutually_exclusive_group()
    origin.add_argument("--data", help="instances JSONL (id, split, prompt, system, images, labels); "
                                       "trajectories already in it are kept, and not asked again")
    origin.add_argument("--import-swift", metavar="FILE",
                        help="ms-swift JSON/JSONL (messages, images, response, rejected_response): the user "
                             "turn is the prompt, the answers become trajectories")
    origin.add_argument("--import-jsonl", metavar="FILE",
                        help="any JSONL dump, one row per (instance, source) or per instance; needs --map")
    data.add_argument("--map", metavar="FIELD=DUMP_FIELD,...",
                      help="for --import-jsonl: which dump field holds each record field, e.g. "
                           "prompt=question,text=response,source=model,id=study_id,images=image_path"
                           "[,split=…,labels=…,system=…]; dotted names reach nested fields")
    data.add_argument("--import-source", metavar="NAME",
                      help="source name for imported answers whose row names none (default: swift-chosen "
                           "for ms-swift, the file name for --import-jsonl)")
    data.add_argument("--n-train", type=int, metavar="N", help="simulator: number of train instances (default 1000)")
    data.add_argument("--n-test", type=int, metavar="N", help="simulator: number of test instances (default 200)")
    data.add_argument("--sim-task", choices=("presence", "change"), default="presence",
                      help="simulator: 14-finding presence (MIMIC-CXR) or change over time (MS-CXR-T)")
    data.add_argument("--sim-profiles", metavar="FILE",
                      help="JSON file of extra simulator profiles, usable as sim:NAME (and part of sim:all)")
    # Tests only (a run slow enough to interrupt mid-way): hidden from --help.
    data.add_argument("--sim-delay", type=float, default=0.0, help=argparse.SUPPRESS)

    gen = p.add_argument_group("generation (hf: always; API sources only get the ones given explicitly, "
                               "since reasoning models reject temperature and token limits)")
    gen.add_argument("--max-new-tokens", type=int, metavar="N", help="answer length limit in tokens (hf default 1024; "
                                                        "sent to APIs as max_completion_tokens)")
    gen.add_argument("--temperature", type=float, metavar="T", help="sampling temperature; 0 is greedy (hf default 0)")
    gen.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling threshold (hf default 1.0)")
    gen.add_argument("--batch-size", type=int, default=8, metavar="N", help="hf: prompts generated together (left padded)")

    api = p.add_argument_group("API sources (openai:)")
    api.add_argument("--api-key-env", nargs="+", default=["OPENAI_API_KEY"], metavar="[NAME=]VAR",
                     help="environment variable(s) holding API keys: VAR for every API source, NAME=VAR for "
                          "the source named NAME (keys are never written anywhere)")
    api.add_argument("--concurrency", type=int, default=8, metavar="N", help="requests in flight per API source")
    api.add_argument("--max-retries", type=int, default=5, metavar="N",
                     help="retries of a request after 429, 5xx, timeouts and refused connections")
    api.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                     help="total deadline of one request in seconds, however slowly the server sends; a request "
                          "cut there counts as a timeout and is retried")
    api.add_argument("--allow-outside-images", action="store_true",
                     help="send images whose path leads outside the data file's folder (absolute, ../ or a "
                          "symlink out); without it such an instance stops the run before anything is sent")
    api.add_argument("--backoff", type=float, default=1.0, metavar="SECONDS",
                     help="first retry delay in seconds, doubled each retry (capped at 60, or the server's "
                          "Retry-After)")
    api.add_argument("--max-response-mb", type=float, default=chat_client.MAX_RESPONSE_MB, metavar="MIB",
                     help="largest answer body read from an API source, in MiB; a larger one is cut off and "
                          "counted as a failure, not retried (default %(default)g)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.map and not args.import_jsonl:
        p.error("--map goes with --import-jsonl")
    if args.import_jsonl and not args.map:
        p.error("--import-jsonl needs --map (e.g. --map prompt=question,text=response,source=model,id=study_id)")
    if (args.n_train is not None or args.n_test is not None) and (args.data or args.import_swift or args.import_jsonl):
        p.error("--n-train/--n-test size the simulator's instances; they do not apply to --data or imports")
    if not args.sources and not (args.import_swift or args.import_jsonl):
        p.error("nothing to do: name --sources, or import a dump with --import-swift / --import-jsonl")
    for flag in ("batch_size", "concurrency"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not args.timeout > 0:
        p.error("--timeout must be a positive number of seconds")
    return args


def main(argv=None):
    return collect_all(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
