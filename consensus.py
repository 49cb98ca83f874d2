"""Stage 3 of APO, consensus synthesis (the paper's Eq. (5)): the source trajectories as negative constraints.

For every train instance the bootstrapped model reads the question (and its images) and all source
trajectories in one context, labelled "Response A", "Response B" ... in a seeded shuffled order, and
writes one consensus trajectory: the `chosen` of preferences.jsonl; the source trajectories become
`rejected`, each with its `drift` from the chosen answer, the constraints apo.py pushes away from.

    accelerate launch consensus.py --model runs/bootstrap --data trajectories.jsonl --out preferences.jsonl
    python consensus.py --server http://127.0.0.1:8000/v1 --model runs/bootstrap ...   # `vllm serve runs/bootstrap`
    python consensus.py --consensus vote --data trajectories.jsonl --out preferences.jsonl   # no model

Departures from the paper: a model consensus is the chosen only when it is clean, else the
sources' vote picks it; each negative carries its drift; --consensus vote / model+vote,
--negatives drifting and --server are options. The modes, skips, summary and output format are in
docs/consensus.md; each instance is journalled as it is settled (docs/RELIABILITY.md).
"""

import argparse
import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common import answers
from common import chat_client
from common import journal
from common import records
from common import reports
from common.records import RecordError
from common.run import Run

# What the bootstrapped model reads to write the consensus (Eq. (5)): the question and every source
# trajectory of the instance, in one context.
CONSENSUS_PROMPT = """Several assistants answered the question below independently. Their responses follow, in random order and under neutral labels.

Question:
{question}

{responses}

Now write your own response to the question, reconciling the responses above:
- keep the reasoning and the findings that several responses agree on;
- drop claims that only one response makes;
- where the responses conflict, follow the side that more responses support.
Write it as a direct answer to the question, without mentioning the responses or their labels.
Reason step by step, then end with {answer_format}."""
# {question}: the instance's prompt; {responses}: the trajectories as "Response A:\n<text>" blocks;
# {answer_format}: how the task's Answer line reads (ANSWER_FORMATS; the task is the one most
# parsed source answers have). No example names a finding, so the prompt suggests none.
PLACEHOLDER_RE = re.compile(r"\{(question|responses|answer_format)\}")

ANSWER_FORMATS = {
    "presence": 'one final line: "Answer:" followed by the findings present, separated by commas '
                '("No Finding" when there is none)',
    "change": 'one final line: "Answer:" followed by each finding and its change as "<finding>: <improving, '
              'stable or worsening>", separated by semicolons',
}

# The flags that change what is written, as recorded in <out>.run.json: a resume under other
# values is refused (it would mix two runs' lines). A new flag that changes the output goes here;
# MODEL_ARGS count only when a model writes the consensus.
OUTPUT_ARGS = ("consensus", "negatives", "min_agreement", "seed")
MODEL_ARGS = ("max_new_tokens", "max_prompt_tokens", "temperature", "top_p", "repetition_penalty")

SKIP_REASONS = ("no trajectories", "prompt too long", "no answer to vote on", "no negatives")


# ---------------------------------------------------------------------------------------------
# The paper's step: the consensus prompt over every trajectory, the consensus chosen (--consensus
# model), every source trajectory rejected (--negatives all)


def prepare_instances(train, seed):
    """Blank trajectories dropped, each one's answer parsed and the instance's response order fixed;
    returns {id: "no trajectories"} for those left with none."""
    skips = {}
    for record in train:
        record["trajectories"] = [t for t in record["trajectories"] if t["text"].strip()]
        record["_answers"] = [answers.parse_answer(t["text"]) for t in record["trajectories"]]
        record["_order"] = response_order(record["id"], len(record["trajectories"]), seed)
        if not record["trajectories"]:
            skips[record["id"]] = "no trajectories"
    return skips


def build_prompts(train, skips, template, generator, args, is_main):
    """({id: consensus prompt}, how many were shortened): every trajectory of an instance in one
    prompt, fitted to the model's window; an instance that does not fit is added to `skips`."""
    from tqdm.auto import tqdm

    from common import modeling

    processor = generator.processor
    tok = modeling.tokenizer_of(processor)
    prompts, shortened, saved = {}, 0, []
    for record in tqdm(train, desc="prompts", disable=not is_main):
        if record["id"] in skips:
            continue
        task = task_hint(record["_answers"])

        def build(texts, record=record, task=task):
            return render_prompt(template, record["prompt"], texts, task)

        count = token_counter(processor, record, args.data)
        texts = [record["trajectories"][i]["text"] for i in record["_order"]]
        prompt, cut = fit_prompt(build, count, texts, generator.budget, tok)
        shortened += prompt is not None and cut
        if prompt is None:
            skips[record["id"]] = "prompt too long"
            continue
        prompts[record["id"]] = prompt
        chat = modeling.prompt_text(processor, consensus_chat(record, prompt))
        saved.append({"id": record["id"], "prompt": chat, "tokens": count(prompt), "shortened": cut})
    if args.save_prompts and is_main:
        records.write_jsonl_atomic(args.save_prompts, saved)
    return prompts, shortened


def response_label(i):
    """A, B, ... Z, AA, AB ...: neutral names that say nothing about the source."""
    label = ""
    i += 1
    while i:
        i, rem = divmod(i - 1, 26)
        label = chr(ord("A") + rem) + label
    return label


def response_order(record_id, n, seed):
    """The instance's own shuffle of its n trajectories, fixed by (seed, id) alone, so it is the same
    on every process and after a resume, and differs from instance to instance."""
    order = list(range(n))
    random.Random(f"{seed}:{record_id}").shuffle(order)
    return order


def render_prompt(template, question, texts, task):
    blocks = "\n\n".join(f"Response {response_label(i)}:\n{text.strip()}" for i, text in enumerate(texts))
    values = {"question": question, "responses": blocks, "answer_format": ANSWER_FORMATS[task]}
    # one pass, so braces inside the question or the responses are never read as placeholders
    return PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)


def task_hint(parsed):
    """The task the sources answered (most parsed answers); presence when none parses."""
    vote = answers.majority_vote(parsed)
    return answers.task_of(vote) if vote is not None else "presence"


def consensus_chat(record, prompt):
    """The record generate() formats: the consensus prompt, with the instance's system and images."""
    return {"prompt": prompt, "system": record.get("system"), "images": record["images"]}


def settle(record, consensus, args):
    """The preference record of one instance, or the reason it is skipped (a string): the consensus
    is chosen, the source trajectories are rejected, each with its drift from the chosen answer.
    consensus: the model's (text, ended), None in vote mode."""
    choice = choose(record, consensus, args.consensus, args.min_agreement)
    if choice is None:
        return "no answer to vote on"
    chosen, chosen_answer, chosen_index, by = choice
    negatives = pick_negatives(record, chosen, chosen_answer, chosen_index, args.negatives)
    if not negatives:
        return "no negatives"
    return {
        "id": record["id"],
        "prompt": record["prompt"],
        "system": record.get("system"),
        "images": records.rebase_images(record["images"], args.data, args.out),
        "chosen": chosen,
        "rejected": [text for _, text, _ in negatives],
        "rejected_sources": [source for source, _, _ in negatives],
        "drift": [drift for _, _, drift in negatives],
        "labels": record.get("labels"),
        "consensus_by": by,
    }


def choose(record, consensus, mode, min_agreement):
    """(chosen text, its answer, index of the source it is or None, consensus_by), or None when the
    vote is needed and no source answer parses. consensus: the model's (text, ended) or None."""
    if mode == "vote":
        return vote_choice(record, "vote")
    consensus_text, ended = consensus
    answer = answers.parse_answer(consensus_text)
    defect = consensus_defect(consensus_text, ended, record)
    if defect is not None:  # not in the paper: APO would teach the model to write it
        return vote_choice(record, "vote:" + defect)
    if mode == "model+vote" and majority_support(answer, record["_answers"]) < min_agreement:
        return vote_choice(record, "vote:disagreed")
    return consensus_text, answer, None, "model"


def pick_negatives(record, chosen_text, chosen_answer, chosen_index, which):
    """[(source, text, drift)] in the sources' order: all of them (the paper), or with --negatives
    drifting only those whose answer departs from the chosen one."""
    out = []
    for i, (traj, answer) in enumerate(zip(record["trajectories"], record["_answers"])):
        if i == chosen_index or traj["text"].strip() == chosen_text.strip():
            continue  # rejecting the chosen text itself would push the objective both ways
        if not traj["text"].strip():
            continue  # an empty answer is no constraint to push away from (and apo.py refuses one)
        drift = answers.answer_distance(answer, chosen_answer)
        if which == "all" or drift > 0:
            out.append((traj["source"], traj["text"], drift))
    return out


# ---------------------------------------------------------------------------------------------
# This project's additions: the clean-consensus rule and the vote it falls back to, --consensus
# vote and model+vote (--negatives drifting is the one test in pick_negatives)


LABEL_ECHO_RE = re.compile(r"\b(?i:responses?)\s+[A-Z]{1,2}\b")


SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+|\n")
LIST_MARK_RE = re.compile(r"^(?:[-*#>]+|\d+[.)])\s*")
# A sentence said a fourth time is a loop: the most verbose simulated source (expansive) writes
# three "To be thorough, I re-checked ..." sentences, which can happen to be the same words.
MAX_REPEATS = 3


def most_repeats(text):
    """How often the most repeated sentence of text occurs (list marks, case and spacing aside)."""
    sentences = [" ".join(LIST_MARK_RE.sub("", s.strip()).lower().split()) for s in SENTENCE_END_RE.split(text)]
    counts = Counter(s for s in sentences if s)
    return max(counts.values(), default=0)


# A consensus that calls a finding on a text-only instance must show where in the report it read
# it: a run of this many words it shares with the prompt ("blunting of the costophrenic angle").
# One shared word is too easy (the finding names are in the question itself), a whole shared
# sentence too strict (a source that quotes a sign rarely quotes its whole sentence).
EVIDENCE_NGRAM = 3


def word_ngrams(text, n=EVIDENCE_NGRAM):
    """The text's runs of n words (lowercase alphabetic runs: case, digits and punctuation aside)."""
    words = re.findall(r"[a-z]+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def quotes_the_prompt(reasoning, prompt):
    """Whether the reasoning shares a run of EVIDENCE_NGRAM words with the prompt."""
    return not word_ngrams(reasoning).isdisjoint(word_ngrams(prompt))


def calls_a_finding(answer):
    """Whether a parsed answer claims something the report must show: a present finding other than
    No Finding; in a change answer every class, "stable" included (it too compares two studies)."""
    if answers.task_of(answer) == "change":
        return bool(answer)
    return any(present for finding, present in answer.items() if finding != answers.NO_FINDING)


def consensus_defect(text, ended, record):
    """Why a model consensus of the instance `record` (its prompt and images) cannot be the positive
    ("cut", "no-answer", "echo", "repeats", "answers", "answer-not-last", "ungrounded"), or None
    when it is clean."""
    if not ended:
        return "cut"
    answer = answers.parse_answer(text)
    if answer is None:
        return "no-answer"
    if LABEL_ECHO_RE.search(text):
        return "echo"
    if most_repeats(text) > MAX_REPEATS:
        return "repeats"
    lines = [line for line in text.splitlines() if line.strip()]
    if sum(answers.answer_line_start(line) is not None for line in lines) > 1:
        return "answers"
    if answers.answer_line_start(lines[-1]) is None:
        return "answer-not-last"
    reasoning, _ = split_answer(text)
    # with images the evidence is in the image, which no text can be checked against
    if calls_a_finding(answer) and not record["images"] and not quotes_the_prompt(reasoning, record["prompt"]):
        return "ungrounded"
    return None


def vote_choice(record, by):
    """choose()'s answer when the sources' vote picks the chosen trajectory (by: consensus_by)."""
    parsed = record["_answers"]
    pick = vote_pick(parsed, record["_order"])
    if pick is None:
        return None
    return record["trajectories"][pick]["text"], parsed[pick], pick, by


def vote_pick(parsed, order):
    """Index of the trajectory whose answer is closest to the sources' majority vote, or None.
    Ties go to a parsed answer, then to the first in the instance's shuffled order."""
    vote = answers.majority_vote(parsed)
    if vote is None:
        return None
    rank = {i: r for r, i in enumerate(order)}
    return min(range(len(parsed)),
               key=lambda i: (answers.answer_distance(parsed[i], vote), parsed[i] is None, rank[i]))


def majority_support(answer, parsed):
    """The weakest backing the sources give `answer`: over the findings, the least share of the
    parsed source answers that make the same call on that finding (present/absent, or the change
    class, or not naming it). Answers of the other task back nothing; 0.0 when none parses."""
    votes = [answers.normalize(a) for a in parsed if a is not None]
    if not votes:
        return 0.0
    answer = answers.normalize(answer)
    task = answers.task_of(answer)
    votes = [v if answers.task_of(v) == task else None for v in votes]
    if task == "presence":
        keys = answers.FINDINGS
    else:
        keys = set(answer).union(*(v for v in votes if v is not None))
    return min(sum(v is not None and v.get(k) == answer.get(k) for v in votes) / len(votes) for k in keys)


# ---------------------------------------------------------------------------------------------
# The consensus prompt: a --prompt-file, and shortening what does not fit


def load_template(path):
    if path is None:
        return CONSENSUS_PROMPT
    try:
        template = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(path, None, None, f"cannot read the prompt file ({e})") from None
    for name in ("question", "responses"):
        if "{" + name + "}" not in template:
            raise RecordError(path, None, None, f"the prompt must contain {{{name}}}")
    return template


CUT_MARK = " [...] "


def split_answer(text):
    """(reasoning, answer part): the answer part starts at the last Answer line."""
    start = answers.answer_line_start(text)
    return (text, "") if start is None else (text[:start], text[start:])


def cut_middle(ids, keep, tok):
    """The first and last halves of `keep` tokens of the reasoning, the middle replaced by a mark."""
    if keep >= len(ids):
        return tok.decode(ids)
    head, tail = (keep + 1) // 2, keep // 2
    return tok.decode(ids[:head]) + CUT_MARK + (tok.decode(ids[len(ids) - tail:]) if tail else "")


def shorten(texts, keep_fraction, tok):
    """Each text cut to the same fraction of its reasoning tokens; its Answer line is always kept."""
    out = []
    for text in texts:
        reasoning, answer = split_answer(text)
        ids = tok(reasoning, add_special_tokens=False)["input_ids"]
        kept = cut_middle(ids, int(len(ids) * keep_fraction), tok)
        out.append(kept + ("\n" if answer and not kept.endswith("\n") else "") + answer)
    return out


def fit_prompt(build, count, texts, budget, tok, tries=8):
    """(prompt, shortened) with count(prompt) <= budget, or (None, True) when even the Answer lines
    alone do not fit. build(texts) renders the prompt; count(prompt) is its length in tokens."""
    prompt = build(texts)
    n = count(prompt)
    if n <= budget:
        return prompt, False
    reasoning = sum(len(tok(split_answer(t)[0], add_special_tokens=False)["input_ids"]) for t in texts)
    keep = 1.0
    for attempt in range(tries + 1):
        # remove the overshoot in proportion; the cut marks and token boundaries make it a little
        # short of exact, hence the few tries (the last one keeps no reasoning at all)
        keep = 0.0 if attempt == tries or not reasoning else max(0.0, keep - (n - budget) / reasoning - 0.01)
        prompt = build(shorten(texts, keep, tok))
        n = count(prompt)
        if n <= budget:
            return prompt, True
        if keep == 0.0:
            break
    return None, True


def token_counter(processor, record, data_path):
    """count(prompt): the length in tokens of the chat the model sees for a consensus prompt of this
    record (template, system and image tokens included)."""
    from common.modeling import load_images, prompt_text, tokenizer_of

    tok = tokenizer_of(processor)
    extra = 0
    if record["images"]:  # each image placeholder expands to its patches inside the processor
        probe = prompt_text(processor, consensus_chat(record, "x"))
        expanded = processor(text=[probe], images=load_images(record, data_path), return_tensors="pt")
        extra = expanded["input_ids"].shape[1] - len(tok(probe, add_special_tokens=False)["input_ids"])
    def count(prompt):
        chat = prompt_text(processor, consensus_chat(record, prompt))
        return len(tok(chat, add_special_tokens=False)["input_ids"]) + extra

    return count


# ---------------------------------------------------------------------------------------------
# The generator: the model loaded here, or an OpenAI-compatible server


@dataclass
class Generator:
    processor: object
    model: object  # None when a server generates
    served: object  # chat_client.Served, or None
    budget: int  # prompt tokens a consensus prompt may take


def load_generator(args, accelerator):
    """The Generator of the model modes.

    With --server only the processor is loaded here, to fit the prompts: from --model, which the
    server must serve, or else from the folder or hub id the server names."""
    import transformers

    from common import modeling

    transformers.utils.logging.disable_progress_bar()
    model = served = None
    if args.server:
        if accelerator.num_processes > 1:
            raise RecordError("--server", None, None, "the server generates: run consensus.py with python, "
                                                      "not with several processes")
        served = served_model(args)
        path = args.model or served.root or served.name
    else:
        path = args.model
    try:
        processor = modeling.load_processor(path)
        if served is None:
            model = modeling.load_model(path, dtype=modeling.default_dtype(accelerator))
            model.to(accelerator.device).eval()
    except (OSError, ValueError) as e:
        what = "the model" if served is None else "the served model's tokenizer (give --model, its folder)"
        raise RecordError(path, None, None, f"cannot load {what} ({e})") from None
    budget = args.max_prompt_tokens
    if budget is None:
        config = model.config if model is not None else transformers.AutoConfig.from_pretrained(path)
        positions = (served and served.max_model_len) or getattr(config.get_text_config(), "max_position_embeddings",
                                                                   None)
        if positions is None:
            raise RecordError(path, None, None, "config has no max_position_embeddings: give --max-prompt-tokens")
        budget = positions - args.max_new_tokens
    return Generator(processor, model, served, budget)


def served_model(args):
    """The server's model for this run: the one --model names, refused if it serves another."""
    if not chat_client.have_openai():
        raise RecordError("--server", None, None, "the `openai` package is needed: pip install openai")
    client = chat_client.make_client(args.server, os.environ.get(args.api_key_env), args.timeout,
                                     args.max_response_mb)
    try:
        return chat_client.served_model(client, args.server, want=args.model, name=args.served_model,
                                        max_retries=args.max_retries, backoff=args.backoff)
    finally:
        client.close()


def ask_server(args, served, todo, prompts):
    """(record, (consensus text, ended), error) from the server as requests finish, what
    modeling.generate gives in-process (an empty answer is kept: it falls back to the vote)."""
    from common import sources

    api_key = os.environ.get(args.api_key_env)
    sampling = args.temperature > 0
    # repetition_penalty is sent only when set: `transformers serve` refuses the field
    request = chat_client.request_fields(args.max_new_tokens, args.temperature, args.top_p if sampling else None,
                                         args.repetition_penalty if args.repetition_penalty != 1.0 else None)

    def request_of(record):  # a seed per instance: a resumed sampled run asks exactly what the first did
        return {**request, "seed": sources.seed_for(args.seed, record["id"])} if sampling else request

    client = chat_client.make_client(served.url, api_key, args.timeout, args.max_response_mb)
    try:
        yield from chat_client.answer_all(
            client, served.name, todo,
            lambda r: chat_client.api_messages(consensus_chat(r, prompts[r["id"]]), args.data,
                                               args.allow_outside_images), request_of,
            args.concurrency, args.max_retries, args.backoff, secrets=[api_key], generation=True)
    finally:
        client.close()


def consensuses(args, accelerator, todo, settled, prompts, generator):
    """(record, consensus, error) on the main process for every instance of `todo` not yet settled;
    consensus: the model's (text, ended), None in vote mode; error: why a server request failed."""
    if generator is not None and generator.served is not None:
        # the server batches the requests itself: every instance still to do is asked at once
        return ask_server(args, generator.served, [r for r in todo if r["id"] not in settled], prompts)
    return generate_rounds(args, accelerator, todo, settled, prompts, generator)


def generate_rounds(args, accelerator, todo, settled, prompts, generator):
    """consensuses() without a server (in vote mode nothing is generated). Fixed rounds of --batch-size
    prompts per process, so a resumed run generates exactly the batches an uninterrupted one would;
    each consensus is made by one process and gathered once."""
    from accelerate.utils import gather_object, set_seed

    round_size = args.batch_size * accelerator.num_processes
    for start in range(0, len(todo), round_size):
        batch = todo[start:start + round_size]
        if all(r["id"] in settled for r in batch):
            continue
        generated = {}
        if prompts:
            from common import modeling

            set_seed(args.seed + start, device_specific=True)
            with accelerator.split_between_processes(batch) as share:
                texts, ended = modeling.generate(
                    generator.model, generator.processor, share, data_path=args.data, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, return_ended=True,
                    prompt_fn=lambda r: consensus_chat(r, prompts[r["id"]]))
            pairs = gather_object([(r["id"], (text, end)) for r, text, end in zip(share, texts, ended)])
            generated = dict(pairs)
            assert len(pairs) == len(generated) == len(batch), "each consensus must be gathered exactly once"
        if accelerator.is_main_process:
            for record in batch:
                if record["id"] not in settled:
                    yield record, generated.get(record["id"]), None


# ---------------------------------------------------------------------------------------------
# The run: the input validated and the output claimed before a model is loaded, then each
# instance settled and journalled as its consensus comes


def synthesize(args):
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    with Run("consensus", args, journaled=True, bad_input=(chat_client.ServerError,)) as run:
        accelerator = Accelerator()
        is_main = accelerator.is_main_process

        # Every line is validated, and the output claimed, before a model is loaded.
        template = load_template(args.prompt_file)
        train = load_train(args)
        claim_output(run, args, train, template, accelerator)
        skips = prepare_instances(train, args.seed)  # id -> reason

        # Each process holds the whole model and generates its share (model modes).
        generator, prompts, shortened = None, {}, 0
        if args.consensus != "vote":
            generator = load_generator(args, accelerator)
            prompts, shortened = build_prompts(train, skips, template, generator, args, is_main)

        # Resume: what an earlier run wrote or skipped is settled and not generated again.
        outputs = run.settled(args.out, train, "train instance", kept="finished preferences")
        settled = outputs.resume(accelerator, skips)

        todo = [r for r in train if r["id"] not in skips]
        progress = tqdm(total=len(todo), initial=sum(r["id"] in settled for r in todo), desc="consensus",
                        disable=not is_main)
        failed = Counter()
        # Each instance is written as soon as its consensus is settled, so an interrupted run loses none.
        for record, consensus, error in consensuses(args, accelerator, todo, settled, prompts, generator):
            if error:  # written nowhere: the same command asks it again
                failed[error] += 1
            else:
                outputs.add(record["id"], settle(record, consensus, args))
            progress.update(1)
        progress.close()
        accelerator.wait_for_everyone()
        if not is_main:
            return

        written, skipped = outputs.finish()
        report(args, train, written, skipped, shortened, failed, generator, accelerator.num_processes)


def load_train(args):
    """The train instances; only they get preferences."""
    data = records.load_instances(args.data, require_trajectories=True)
    train = [r for r in data if r["split"] == "train"]
    if not train:
        raise RecordError(args.data, None, "split", "no instance of split train")
    return train


# ---------------------------------------------------------------------------------------------
# The output: tied to what decides it, resumed, rewritten in input order; the summary


def run_settings(args, train, template):
    """What decides the output: the train instances' content, the model, the prompt and the flags."""
    content = json.dumps([records.public(r) for r in train], ensure_ascii=False, sort_keys=True)
    settings = {"train_sha256": hashlib.sha256(content.encode()).hexdigest(),
                **{k: getattr(args, k, None) for k in OUTPUT_ARGS}}
    if args.consensus != "vote":
        from common.modeling import model_fingerprint

        settings.update({"model": str(Path(args.model).resolve()), "model_fingerprint": model_fingerprint(args.model),
                         "prompt_sha256": hashlib.sha256(template.encode()).hexdigest()},
                        **{k: getattr(args, k, None) for k in MODEL_ARGS})
    return settings


def claim_output(run, args, train, template, accelerator):
    """Lock the output and tie it to this run's settings (main process), before any model work."""
    out = records.output_file(args.out)
    if args.consensus != "vote" and args.model:
        from common import modeling

        modeling.load_processor(args.model)  # a folder without its tokenizer is refused before the manifest
    records.check_output_paths(
        files=[out, journal.skipped_path(out), records.manifest_path(out), args.save_prompts, args.summary],
        inputs={"--data": args.data, "--prompt-file": args.prompt_file}, model_dirs={"--model": args.model})
    settings = run_settings(args, train, template)

    def claim():
        output = run.output(out)
        output.tie({"run": settings}, f"rerun with those settings to resume, or use another --out (or delete {out}, "
                                      f"{journal.skipped_path(out)} and {output.manifest} to start over)")

    records.on_main_process(accelerator, claim)


def report(args, train, written, skipped, shortened, failed, generator, processes):
    """The summary, printed and (--summary) written; the one-line result; exit 3 while a server
    request failed, 2 when nothing was written."""
    served = generator.served if generator is not None else None
    summary = reports.consensus_summary(train, written, Counter(r["reason"] for r in skipped), shortened,
                                          SKIP_REASONS)
    summary["processes"] = processes
    # what wrote the consensuses: the model folder loaded here, or the server and the model it serves
    summary["generator"] = (served.record() if served is not None else
                            {"model": args.model} if args.consensus != "vote" else None)
    summary["failed"] = sum(failed.values())
    reports.print_consensus(summary)
    if args.summary:
        records.write_json_atomic(args.summary, summary)
    skipped_text = ", ".join(f"{n} {reason}" for reason, n in summary["skipped"].items() if n) or "none"
    fallbacks = sum(n for by, n in summary["consensus_by"].items() if by.startswith("vote:"))
    line = (f"consensus ({args.consensus}, negatives {args.negatives}): {len(written)} preferences written to "
            f"{args.out}, " + (f"{len(skipped)} instances skipped ({skipped_text})" if skipped else "none skipped"))
    if args.consensus != "vote":
        line += f", {shortened} shortened, {fallbacks} fell back to the vote"
    if served is not None:
        line += f"; generated by {served.name} at {served.url}"
    if failed:
        line += f"; {summary['failed']} failed (run the same command again to ask them again)"
    print(line)
    if failed:
        for reason, n in failed.most_common():
            print(f"  {n} failed: {reason}")
        raise SystemExit(3)
    if not written:
        records.fail(f"{args.data}: no preference written: every train instance was skipped ({skipped_text})")


# ---------------------------------------------------------------------------------------------
# The command line


EPILOG = """\
--consensus (docs/consensus.md has the whole rule):
  model       the paper: the model's consensus is the chosen trajectory, when it is clean (it ended
              on its own, has one parseable Answer line, as its last line, echoes no response label,
              repeats no sentence more than three times and, where it calls a finding on a
              text-only instance, shares a run of three words with the prompt); else the vote's
              chosen, counted in consensus_by as vote:<reason>
  vote        (an addition) no model: the source trajectory closest to the per-finding majority vote
  model+vote  (an addition) the model's consensus where the sources back each of its calls by at
              least --min-agreement, else the vote's chosen (vote:disagreed)

--negatives:
  all         the paper: every source trajectory except the chosen one itself
  drifting    (an addition) only those whose answer differs from the chosen one (drift > 0)

Skipped train instances are listed with their reason in <out>.skipped.jsonl: no trajectories,
prompt too long, no answer to vote on, no negatives. Exit status: 0 done; 2 bad input, or nothing
written; 3 some server requests failed (the same command asks them again); 130 interrupted (Ctrl-C:
at once, the preferences written so far kept for the same command to continue).
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="trajectories.jsonl (collect.py); only split train is used")
    p.add_argument("--out", required=True, help="preferences.jsonl to write (resumed when it exists)")
    p.add_argument("--model", help="the bootstrapped model folder (bootstrap.py); not needed with --consensus vote")
    p.add_argument("--consensus", choices=("model", "vote", "model+vote"), default="model",
                   help="where the chosen trajectory comes from (see below; default: model, the paper; vote "
                        "and model+vote are this project's additions)")
    p.add_argument("--negatives", choices=("all", "drifting"), default="all",
                   help="which source trajectories become negatives (default: all, the paper; drifting is this "
                        "project's addition)")
    p.add_argument("--min-agreement", type=float, default=0.5,
                   help="model+vote: least share of the parsed source answers that must make the consensus' "
                        "call on every finding (default 0.5)")
    p.add_argument("--prompt-file", help="text file replacing CONSENSUS_PROMPT; must hold {question} and "
                                         "{responses}, may hold {answer_format}")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="length limit of a consensus (default 1024)")
    p.add_argument("--max-prompt-tokens", type=int,
                   help="prompt limit before trajectories are shortened (default: the model's max positions "
                        "minus --max-new-tokens)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together per process (default 8)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="transformers' repetition penalty (> 1 discourages repeating any token already in the "
                        "prompt or the answer; default 1.0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when --temperature > 0")
    p.add_argument("--seed", type=int, default=0, help="seed of the response order and of sampling (default 0)")
    p.add_argument("--save-prompts", help="model modes: also write the consensus prompts, as the model sees "
                                          "them, to this JSONL file ({id, prompt, tokens, shortened})")
    p.add_argument("--summary", help="also write the summary as JSON to this file")
    server = chat_client.add_server_options(p, "runs/bootstrap")
    server.add_argument("--served-model", metavar="NAME",
                        help="the server's name for the model, where it differs from --model (vLLM's "
                             "--served-model-name); default: the one model the server lists")
    args = p.parse_args(argv)
    if args.consensus != "vote" and not (args.model or args.server):
        p.error(f"--model (or --server) is required with --consensus {args.consensus}")
    if args.server and args.consensus == "vote":
        p.error("--server generates consensuses; --consensus vote asks no model")
    try:
        chat_client.refuse_credentials(args.server, "--server")
    except chat_client.ServerError as e:
        p.error(str(e))
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if args.save_prompts and args.consensus == "vote":
        p.error("--save-prompts needs a model mode (vote builds no prompt)")
    if not 0.0 <= args.min_agreement <= 1.0:
        p.error("--min-agreement must be in [0, 1]")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--batch-size and --max-new-tokens must be positive")
    return args


def main(argv=None):
    synthesize(parse_args(argv))


if __name__ == "__main__":
    main()
