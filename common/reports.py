"""What the stages report at the end of a run: what was written, what failed, and where
labels exist each source's accuracy beside it (answers.score; labels are reported, never used)."""

from collections import Counter, defaultdict

from common import answers


# ---------------------------------------------------------------------------------------------
# collect.py


def accuracy_by_source(rows):
    """{task: {source: (n, per-finding accuracy, macro, first-third macro, last-third macro)}} over
    the labelled instances in stream order, each source scored on the instances it answered."""
    out = {}
    labelled = [r for r in rows if r.get("labels") is not None]
    for task in sorted({answers.task_of(r["labels"]) for r in labelled}):
        stream = [r for r in labelled if answers.task_of(r["labels"]) == task]
        third = max(1, len(stream) // 3)
        by_source = defaultdict(list)  # source -> [(position in stream, parsed answer, labels)]
        for i, r in enumerate(stream):
            for t in r["trajectories"]:
                by_source[t["source"]].append((i, answers.parse_answer(t["text"]), r["labels"]))
        table = {}
        for name, items in by_source.items():
            def macro(part):
                return answers.score([p for _, p, _ in part], [l for _, _, l in part])["macro"]["accuracy"] if part else None

            full = answers.score([p for _, p, _ in items], [l for _, _, l in items])
            first = [x for x in items if x[0] < third]
            last = [x for x in items if x[0] >= len(stream) - third]
            per = {f: v["accuracy"] for f, v in full["per_finding"].items()}
            table[name] = (len(items), per, full["macro"]["accuracy"], macro(first), macro(last))
        out[task] = (len(stream), table)
    return out


def print_collect(rows, srcs, failures):
    """collect.py's table: per source the trajectories written, failed, their length and accuracy;
    returns the number of missing (instance, source) pairs."""
    names = list(dict.fromkeys([t["source"] for r in rows for t in r["trajectories"]] + [s.name for s in srcs]))
    count, chars = Counter(), Counter()
    for r in rows:
        for t in r["trajectories"]:
            count[t["source"]] += 1
            chars[t["source"]] += len(t["text"])
    asked = {s.name for s in srcs}
    missing = Counter()
    for r in rows:
        got = {t["source"] for t in r["trajectories"]}
        missing.update(n for n in asked if n not in got)
    scores = accuracy_by_source(rows)
    width = max([len(n) for n in names] + [6])
    fmt = lambda v: "   -  " if v is None else f"{v:6.3f}"  # noqa: E731
    print(f"\n{'source':<{width}}  written  failed  mean chars" + ("  accuracy  first 1/3  last 1/3" if scores else ""))
    main_task = max(scores, key=lambda t: scores[t][0]) if scores else None
    for n in names:
        line = f"{n:<{width}}  {count[n]:7d}  {missing[n]:6d}  {chars[n] / max(count[n], 1):10.0f}"
        if main_task and n in scores[main_task][1]:
            _, _, macro, first, last = scores[main_task][1][n]
            line += f"    {fmt(macro)}     {fmt(first)}    {fmt(last)}"
        print(line)
    for n in names:
        for reason, k in failures.get(n, Counter()).most_common(3):
            print(f"  {n}: {k} failed: {reason}")
    for task, (n_labelled, table) in scores.items():
        cols = [n for n in names if n in table]
        if not cols:
            continue
        findings = list(table[cols[0]][1])
        print(f"\nper-finding accuracy ({task}, {n_labelled} labelled instances; accuracy columns above: macro "
              "over findings, first / last third of the stream)")
        colw = max([len(c) for c in cols] + [6])
        fw = max(len(f) for f in findings)
        print(f"{'finding':<{fw}}  " + "  ".join(f"{c:>{colw}}" for c in cols))
        for f in findings:
            print(f"{f:<{fw}}  " + "  ".join(f"{table[c][1].get(f, 0.0):>{colw}.3f}" for c in cols))
    return sum(missing.values())


# ---------------------------------------------------------------------------------------------
# consensus.py


def consensus_summary(train, written, skipped, shortened, reasons):
    """consensus.py's summary: counts (skipped: {reason: n}, listed over `reasons`), and per source
    its drift from the consensus, how often it was a negative and, where labels exist, its accuracy
    beside the consensus' (macro accuracy, answers.score)."""
    by_id = {r["id"]: r for r in train}
    per_source = defaultdict(lambda: {"instances": 0, "negative": 0, "drift": 0.0})
    preds = defaultdict(lambda: defaultdict(lambda: ([], [])))  # task -> who -> (predictions, labels)
    for pref in written:
        record = by_id[pref["id"]]
        consensus = answers.parse_answer(pref["chosen"])
        labels = record.get("labels")
        task = answers.task_of(labels) if labels else None
        if task:
            preds[task]["consensus"][0].append(consensus)
            preds[task]["consensus"][1].append(labels)
        for traj, answer in zip(record["trajectories"], record["_answers"]):
            stats = per_source[traj["source"]]
            stats["instances"] += 1
            stats["drift"] += answers.answer_distance(answer, consensus)
            if task:
                preds[task][traj["source"]][0].append(answer)
                preds[task][traj["source"]][1].append(labels)
        for source in pref["rejected_sources"]:
            per_source[source]["negative"] += 1
    accuracy = {task: {who: answers.score(p, l)["macro"]["accuracy"] for who, (p, l) in table.items()}
                for task, table in preds.items()}
    sources = {}
    for name in sorted(per_source):
        s = per_source[name]
        sources[name] = {"instances": s["instances"], "negative": s["negative"],
                         "mean_drift": s["drift"] / s["instances"],
                         "accuracy": {t: a[name] for t, a in accuracy.items() if name in a}}
    return {
        "written": len(written),
        "skipped": {reason: skipped.get(reason, 0) for reason in reasons},
        "shortened": shortened,
        "consensus_by": dict(sorted(Counter(p["consensus_by"] for p in written).items())),
        "sources": sources,
        "consensus_accuracy": {t: a["consensus"] for t, a in accuracy.items()},
    }


def print_consensus(summary):
    tasks = sorted(summary["consensus_accuracy"])
    width = max([len("consensus")] + [len(s) for s in summary["sources"]])
    head = f"{'source':<{width}}  {'negative':>9}  {'mean drift':>10}" + "".join(f"  {'acc ' + t:>13}" for t in tasks)
    print(head)
    for name, s in summary["sources"].items():
        acc = "".join(f"  {s['accuracy'][t]:>13.3f}" if t in s["accuracy"] else f"  {'-':>13}" for t in tasks)
        print(f"{name:<{width}}  {s['negative']:>4}/{s['instances']:<4}  {s['mean_drift']:>10.3f}{acc}")
    if tasks:
        acc = "".join(f"  {summary['consensus_accuracy'][t]:>13.3f}" for t in tasks)
        print(f"{'consensus':<{width}}  {'':>9}  {'':>10}{acc}")
    print("(labels are only reported here, never used)" if tasks else "(no labels: accuracy not reported)")


# ---------------------------------------------------------------------------------------------
# evaluate.py


def plot_accuracy(rows, path, task_findings):
    """A heat map per task: rows (sources, then models) x findings, each cell's accuracy written in,
    then the average and the share of answers without a parseable Answer line (an unparsed answer
    is wrong on every finding, so it reads as a low row, never as missing data; a finding not
    scored is a blank cell with a dash). task_findings: {task: findings in column order}. False when
    matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    tasks = [t for t in ("presence", "change") if any(t in r for r in rows)]
    heights = [0.42 * sum(task in r for r in rows) + 1.9 for task in tasks]
    widths = [len([f for f in task_findings[t] if any(f in r[t]["per_finding"] for r in rows if t in r)]) for t in tasks]
    fig, axes = plt.subplots(len(tasks), 1, squeeze=False, figsize=(2.6 + 0.62 * (max(widths) + 2), sum(heights)),
                             gridspec_kw={"height_ratios": heights})
    for ax, task in zip(axes[:, 0], tasks):
        scored = [r for r in rows if task in r]
        findings = [f for f in task_findings[task] if any(f in r[task]["per_finding"] for r in scored)]
        accuracy = np.array([[r[task]["per_finding"][f]["accuracy"] if f in r[task]["per_finding"] else np.nan
                              for f in findings] + [r[task]["macro"]["accuracy"]] for r in scored])
        unparsed = np.array([[r[task]["unparsed"] / max(1, r[task]["n"])] for r in scored])
        cols = len(findings) + 1
        ax.imshow(np.ma.masked_invalid(accuracy), cmap="RdYlGn", vmin=0.5, vmax=1.0, aspect="auto",
                  extent=(-0.5, cols - 0.5, len(scored) - 0.5, -0.5))
        ax.imshow(unparsed, cmap="Greys", vmin=0, vmax=1.5, aspect="auto",
                  extent=(cols - 0.5, cols + 0.5, len(scored) - 0.5, -0.5))
        colours = plt.get_cmap("RdYlGn")
        for i, r in enumerate(scored):
            for j in range(cols):
                value = accuracy[i, j]
                red, green, blue, _ = colours(np.clip((value - 0.5) / 0.5, 0, 1)) if not np.isnan(value) else (1, 1, 1, 1)
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # white text on dark cells
                ax.text(j, i, "–" if np.isnan(value) else cell_text(value), ha="center", va="center", fontsize=8,
                        color="white" if dark else "black", fontweight="bold" if j == cols - 1 else None)
            ax.text(cols, i, f"{r[task]['unparsed']}/{r[task]['n']}", ha="center", va="center", fontsize=8,
                    color="white" if unparsed[i, 0] > 0.5 else "black")
        models = [i for i, r in enumerate(scored) if r["kind"] == "model"]
        if models and models[0] > 0:  # sources above the line, trained models below
            ax.axhline(models[0] - 0.5, color="black", linewidth=2)
        ax.axvline(cols - 1.5, color="white", linewidth=3)
        ax.axvline(cols - 0.5, color="white", linewidth=3)
        ax.set_xlim(-0.5, cols + 0.5)
        ax.set_ylim(len(scored) - 0.5, -0.5)
        ax.set_xticks(range(cols + 1), findings + ["average", "unparsed"], rotation=35, ha="right")
        ax.set_yticks(range(len(scored)), [f"{r['name']} ({r['kind']})" for r in scored])
        ax.tick_params(length=0)
        ax.set_title(f"{task}: accuracy per finding on {scored[0][task]['n']} instances "
                     f"(colour from 0.5 red to 1 green; unparsed: answers without an Answer line)", fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format="png")
    finally:
        plt.close(fig)
    return True


def cell_text(value):
    """An accuracy as a heat-map cell writes it: 1, 0, or two decimals without the leading zero."""
    return "1" if value == 1 else "0" if value == 0 else f"{value:.2f}".lstrip("0")
