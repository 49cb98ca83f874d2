"""Drift report: which source drifted, on which findings, from when, and whether it came back,
without labels.

    python drift_report.py --trajectories runs/trajectories.jsonl --out runs/drift
    python drift_report.py --trajectories runs/trajectories.jsonl --preferences runs/preferences.jsonl \\
        --out runs/drift --by time --window-time 1d

For each source, along the stream (file order, or the instances' optional `time`), the report
measures how often its answer agrees with a label-free reference, per finding and over all
findings, in windows. The reference is the consensus (preferences.jsonl's `chosen`) where one
exists, else the majority vote of the OTHER sources on that instance, so that a source is never
compared with itself. Refusals (no `Answer:` line) and unparsed answers are counted apart and
never as disagreement. A change detector from river (ADWIN by default) runs along each series and
every change is reported with its source, finding, place in the stream, direction and size.
Labels are never read for any of that; where they exist, the same curves against them are drawn
beside the label-free ones as a check.

Writes OUT/drift_report.json (everything), OUT/drift_report.md (the tables) and
OUT/drift_report.png (one panel per source, change points marked). Needs river (change
detection) and matplotlib (the picture): `pip install river matplotlib`.
"""

import argparse
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from common import answers
from common import records
from common.records import RecordError

OVERALL = "all findings"
REFUSALS = "refusals"
DETECTORS = ("adwin", "page-hinkley")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$")
_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trajectories", required=True, metavar="FILE", help="trajectories.jsonl (collect.py's output)")
    p.add_argument("--preferences", metavar="FILE",
                   help="preferences.jsonl of the same run (consensus.py): its consensus is the reference on the "
                        "instances it holds; elsewhere the other sources' vote is")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for drift_report.json, .md and .png")
    p.add_argument("--by", choices=("auto", "position", "time"), default="auto",
                   help="order and window the stream by file position or by the instances' `time` (ISO 8601); "
                        "auto: time when every instance has one")
    p.add_argument("--window", type=int, metavar="N",
                   help="instances per window of the curves when by position (default: the stream / 40, at least 20)")
    p.add_argument("--window-time", metavar="DURATION",
                   help="window length when by time, e.g. 6h, 1d, 2w (default: the one of 1s, 10s, 1min, "
                        "10min, 1h, 6h, 12h, 1d, 1w, 4w nearest to the time span / 40)")
    p.add_argument("--detector", choices=DETECTORS, default="adwin",
                   help="river change detector run along each series: ADWIN (adaptive windows, two-sided) or "
                        "Page-Hinkley (cumulative deviation from the running mean)")
    p.add_argument("--delta", type=float, default=0.002,
                   help="ADWIN's confidence value (smaller: fewer, surer alarms); Page-Hinkley's tolerated "
                        "deviation")
    p.add_argument("--threshold", type=float, default=15.0,
                   help="Page-Hinkley's alarm threshold on the cumulative deviation (ADWIN ignores it)")
    p.add_argument("--min-change", type=float, default=0.0, metavar="SIZE",
                   help="leave out changes whose size (|agreement after - before|) is below SIZE")
    p.add_argument("--seed", type=int, default=0,
                   help="accepted as by every script; the report draws nothing at random")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.window is not None and args.window < 1:
        p.error("--window must be at least 1")
    if args.window_time is not None and parse_duration(args.window_time) is None:
        p.error(f"--window-time {args.window_time!r}: expected a number and a unit (s, min, h, d, w), e.g. 1d")
    if not args.delta > 0:
        p.error("--delta must be positive")
    return args


def parse_duration(text):
    """Seconds in "90s", "30min", "6h", "1d", "2w"; None when it does not read as one."""
    m = _DURATION_RE.match(text or "")
    return float(m.group(1)) * _SECONDS[m.group(2)] if m and float(m.group(1)) > 0 else None


# ---------------------------------------------------------------------------------------------
# The stream: instances in order, each source's answers, and the reference they are compared with


@dataclass
class Stream:
    """The instances in the report's order and what the report notes about its input."""
    instances: list
    sources: list
    by: str                                   # "position" or "time"
    times: list                               # datetime per instance (by time), else None
    consensus: dict = field(default_factory=dict)   # id -> parsed consensus answer
    notes: list = field(default_factory=list)


def parse_time(value, path, lineno):
    """An ISO 8601 time as an aware datetime (UTC when it names no zone)."""
    if not isinstance(value, str):
        raise RecordError(path, lineno, "time", f"must be an ISO 8601 string, got {type(value).__name__}")
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        raise RecordError(path, lineno, "time", f"{value!r} is not an ISO 8601 time "
                                                "(e.g. 2025-03-01T14:05:00Z)") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def load_stream(path, preferences_path=None, by="auto"):
    """The trajectories file, validated whole, in the report's order; RecordError on bad input."""
    instances = records.load_instances(path, require_trajectories=True, check_images=False)
    sources = list(dict.fromkeys(t["source"] for r in instances for t in r["trajectories"]))
    if not sources:
        raise RecordError(path, None, "trajectories", "every instance has an empty list: no source answered anything")
    notes = []
    with_time = [r for r in instances if r.get("time") is not None]
    if by == "time" and len(with_time) < len(instances):
        first = next(r for r in instances if r.get("time") is None)
        raise RecordError(path, first["_line"], "time", "missing (--by time needs a time on every instance; "
                                                        "--by position orders by the file)")
    times = [parse_time(r["time"], path, r["_line"]) for r in with_time]
    if by == "auto":
        by = "time" if instances and len(with_time) == len(instances) else "position"
        if with_time and by == "position":
            notes.append(f"{len(instances) - len(with_time)} of {len(instances)} instances have no time: "
                         "the stream is ordered and windowed by file position")
    if by == "time":
        order = sorted(range(len(instances)), key=lambda i: times[i])  # stable: equal times keep file order
        instances, times = [instances[i] for i in order], [times[i] for i in order]
    splits = Counter(r["split"] for r in instances)
    notes.append("splits: " + ", ".join(f"{s} {n}" for s, n in splits.items())
                 + ("" if splits.get("test") else " (no test split: the report covers the whole stream, it needs none)"))
    stream = Stream(instances, sources, by, times if by == "time" else None, notes=notes)
    if preferences_path:
        stream.consensus = load_consensus(preferences_path, {r["id"] for r in instances}, notes)
    if len(sources) == 1 and not stream.consensus:
        notes.append(f"only one source ({sources[0]}): without preferences it has no one to be compared with, "
                     "so no agreement is measured")
    return stream


def load_consensus(path, ids, notes):
    """{id: parsed consensus} of the preferences whose id is in the trajectories file."""
    prefs = records.load_preferences(path, check_images=False)
    known = [p for p in prefs if p["id"] in ids]
    if not known:
        raise RecordError(path, None, "id", "no preference has the id of an instance of the trajectories file: "
                                            "these are not its preferences")
    out = {p["id"]: answers.parse_answer(p["chosen"]) for p in known}
    unparsed = sum(v is None for v in out.values())
    notes.append(f"reference: the consensus on {len(out) - unparsed} instances"
                 + (f" ({unparsed} consensus answers unparsed)" if unparsed else "")
                 + "; the other sources' vote elsewhere")
    if len(known) < len(prefs):
        notes.append(f"{len(prefs) - len(known)} preferences name ids that are not in the trajectories file; "
                     "left out")
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Agreement of each answer with the reference (and, as a check only, with the labels)


@dataclass
class Answer:
    """One source's answer at one place of the stream."""
    k: int                  # place in the stream
    status: str             # "answered", "refused" (no Answer line) or "unparsed"
    agree: dict | None      # {finding: 1 agrees / 0 not} with the reference; None: not answered, or no reference
    truth: dict | None      # the same against the labels; None without labels


def status_of(text, parsed):
    if parsed is not None:
        return "answered"
    return "unparsed" if answers.answer_line_start(text) is not None else "refused"


def agreement(answer, reference):
    """{finding: 1 or 0}: presence over the 14 findings, change over the reference's findings
    (one the answer leaves out disagrees), as answers.answer_distance counts them."""
    keys = list(reference) if answers.task_of(reference) == "change" else answers.FINDINGS
    return {f: int(answer.get(f) == reference[f]) for f in keys}


def same_task(a, b):
    return answers.task_of(a) == answers.task_of(b)


def answers_by_source(stream):
    """{source: [Answer, ...]} in stream order."""
    from tqdm import tqdm

    out = {s: [] for s in stream.sources}
    for k, r in enumerate(tqdm(stream.instances, desc="answers", unit="instance", dynamic_ncols=True)):
        parsed = {t["source"]: answers.parse_answer(t["text"]) for t in r["trajectories"]}
        labels = answers.normalize(r["labels"]) if r.get("labels") else None
        consensus = stream.consensus.get(r["id"])
        for t in r["trajectories"]:
            s, mine = t["source"], parsed[t["source"]]
            reference = consensus if consensus is not None else answers.majority_vote(
                [a for name, a in parsed.items() if name != s])
            status = status_of(t["text"], mine)
            if mine is not None and reference is not None and not same_task(mine, reference):
                status = "unparsed"  # an answer to the other task says nothing about this one
            ok = status == "answered"
            out[s].append(Answer(
                k, status,
                agreement(mine, reference) if ok and reference is not None else None,
                agreement(mine, labels) if ok and labels and same_task(mine, labels) else None))
    return out


def series(items, name):
    """(places, values) of one series of a source: the mean agreement over findings (OVERALL), one
    finding's agreement, or REFUSALS (1 refused, 0 answered or unparsed)."""
    if name == REFUSALS:
        return [a.k for a in items], [float(a.status == "refused") for a in items]
    kept = [a for a in items if a.agree is not None and (name == OVERALL or name in a.agree)]
    if name == OVERALL:
        return [a.k for a in kept], [sum(a.agree.values()) / len(a.agree) for a in kept]
    return [a.k for a in kept], [float(a.agree[name]) for a in kept]


# ---------------------------------------------------------------------------------------------
# Change points: river raises the alarm, the onset is placed where the segment splits best


def make_detector(args):
    try:
        from river import drift
    except ImportError:
        records.fail("drift_report.py needs river for change detection: pip install river")
    if args.detector == "adwin":
        return lambda: drift.ADWIN(delta=args.delta)
    return lambda: drift.PageHinkley(delta=args.delta, threshold=args.threshold)


def best_split(values, min_side=5):
    """Index m splitting values into [:m] and [m:] with the largest between-part sum of squares,
    m(n-m)/n (mean1 - mean2)^2: the least-squares place of a single change in the mean."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n < 2 * min_side:
        return max(1, n // 2)
    m = np.arange(min_side, n - min_side + 1)
    c = np.concatenate([[0.0], np.cumsum(x)])
    mean1, mean2 = c[m] / m, (c[n] - c[m]) / (n - m)
    return int(m[np.argmax(m * (n - m) / n * (mean1 - mean2) ** 2)])


def detect_changes(places, values, new_detector, min_change=0.0):
    """Changes in the mean of one series: [{onset, detected, before, after, direction, size}].

    The detector reads the values in order; at each alarm the onset is placed in the segment since
    the previous onset (best_split) and the detector restarts from there, fed the values since the
    onset, so one change gives one alarm and the next change is measured against the new level."""
    changes, start, det = [], 0, new_detector()
    for j, v in enumerate(values):
        det.update(v)
        if not det.drift_detected or j - start < 10:
            continue
        onset = start + best_split(values[start:j + 1])
        before, after = float(np.mean(values[start:onset])), float(np.mean(values[onset:j + 1]))
        if abs(after - before) >= min_change:
            changes.append({"onset": places[onset], "detected": places[j], "before": round(before, 4),
                            "after": round(after, 4), "direction": "up" if after > before else "down",
                            "size": round(after - before, 4)})
        start, det = onset, new_detector()
        for w in values[onset:j + 1]:
            det.update(w)
    return changes


def came_back(changes):
    """Whether a series that fell rose again to within half its fall of the level before it."""
    downs = [c for c in changes if c["direction"] == "down"]
    if not downs:
        return None
    first = downs[0]
    later = [c for c in changes if c["onset"] > first["onset"]]
    return bool(later) and later[-1]["after"] >= first["before"] - abs(first["size"]) / 2


# ---------------------------------------------------------------------------------------------
# Windows


def window_of(stream, args):
    """(bin index per place, [(start label, end label)] per bin, description)."""
    n = len(stream.instances)
    if stream.by == "time":
        t0 = stream.times[0]
        span = (stream.times[-1] - t0).total_seconds()
        length = parse_duration(args.window_time) if args.window_time else round_duration(span / 40)
        bins = [int((t - t0).total_seconds() // length) for t in stream.times]
        labels = [((t0.timestamp() + b * length), (t0.timestamp() + (b + 1) * length)) for b in range(max(bins) + 1)]
        labels = [(iso(a), iso(b)) for a, b in labels]
        return bins, labels, f"windows of {format_duration(length)} from {iso(t0.timestamp())}"
    size = args.window or max(20, n // 40)
    bins = [k // size for k in range(n)]
    return bins, [(b * size, min(n, (b + 1) * size) - 1) for b in range(max(bins) + 1)], f"windows of {size} instances"


_ROUND_DURATIONS = [1, 10, 60, 600, 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400, 28 * 86400]


def round_duration(seconds):
    """The readable window length (1s, 10s, 1min, 10min, 1h, 6h, 12h, 1d, 1w, 4w) nearest to seconds."""
    return min(_ROUND_DURATIONS, key=lambda d: abs(math.log(d / max(seconds, 1.0))))


def iso(seconds):
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def format_duration(seconds):
    for unit in ("w", "d", "h", "min", "s"):
        if seconds >= _SECONDS[unit]:
            return f"{seconds / _SECONDS[unit]:g}{unit}"
    return f"{seconds:g}s"


def mean_or_none(values):
    return round(sum(values) / len(values), 4) if values else None


def windows(items, bins, n_bins):
    """Per window: instances asked, refused, unparsed, agreement (overall and per finding) and the
    same against the labels; None where the window holds no answer to average."""
    out = [{"asked": 0, "refused": 0, "unparsed": 0, "agree": [], "truth": [], "by": {}} for _ in range(n_bins)]
    for a in items:
        w = out[bins[a.k]]
        w["asked"] += 1
        w["refused"] += a.status == "refused"
        w["unparsed"] += a.status == "unparsed"
        if a.agree is not None:
            w["agree"].append(sum(a.agree.values()) / len(a.agree))
            for f, v in a.agree.items():
                w["by"].setdefault(f, []).append(v)
        if a.truth is not None:
            w["truth"].append(sum(a.truth.values()) / len(a.truth))
    return [{"asked": w["asked"], "refused": w["refused"], "unparsed": w["unparsed"],
             "agreement": mean_or_none(w["agree"]), "truth": mean_or_none(w["truth"]),
             "per_finding": {f: mean_or_none(v) for f, v in w["by"].items()}} for w in out]


# ---------------------------------------------------------------------------------------------
# The report


def build_report(stream, args, by_source=None):
    """The report as a dict; by_source: answers_by_source(stream) when already computed."""
    new_detector = make_detector(args)
    by_source = by_source or answers_by_source(stream)
    bins, bin_labels, window_text = window_of(stream, args)
    n = len(stream.instances)
    report = {"trajectories": str(args.trajectories), "preferences": args.preferences, "instances": n,
              "by": stream.by, "windows": window_text, "window_bounds": bin_labels,
              "detector": {"name": args.detector, "delta": args.delta,
                           **({"threshold": args.threshold} if args.detector == "page-hinkley" else {}),
                           "min_change": args.min_change},
              "notes": list(stream.notes), "sources": {}}
    for s, items in by_source.items():
        report["sources"][s] = source_report(s, items, stream, bins, len(bin_labels), new_detector, args, report["notes"])
    return report


def source_report(name, items, stream, bins, n_bins, new_detector, args, notes):
    n = len(stream.instances)
    status = Counter(a.status for a in items)
    compared = [a for a in items if a.agree is not None]
    if len(items) < n:
        notes.append(f"{name} answered {len(items)} of {n} instances (places {items[0].k} to {items[-1].k}); "
                     "its curve has gaps where it did not")
    if status["answered"] == 0:
        notes.append(f"{name} gave no parseable answer ({status['refused']} refused, {status['unparsed']} unparsed): "
                     "no agreement curve; only its refusals are followed")
    findings = list(dict.fromkeys(f for a in compared for f in a.agree))
    changes = []
    for s_name in [OVERALL] + findings + [REFUSALS]:
        places, values = series(items, s_name)
        if len(values) < 20:
            continue
        for c in detect_changes(places, values, new_detector, args.min_change):
            changes.append({"source": name, "finding": s_name, **c, **place_times(stream, c)})
    truth = [a for a in items if a.truth is not None]
    overall = [c for c in changes if c["finding"] == OVERALL]
    return {"asked": len(items), "answered": status["answered"], "refused": status["refused"],
            "unparsed": status["unparsed"], "not_asked": n - len(items), "compared": len(compared),
            "agreement": mean_or_none([sum(a.agree.values()) / len(a.agree) for a in compared]),
            "truth": mean_or_none([sum(a.truth.values()) / len(a.truth) for a in truth]) if truth else None,
            "came_back": came_back(overall), "changes": changes, "windows": windows(items, bins, n_bins)}


def place_times(stream, change):
    if stream.times is None:
        return {}
    return {"onset_time": iso(stream.times[change["onset"]].timestamp()),
            "detected_time": iso(stream.times[change["detected"]].timestamp())}


def verdict(entry):
    overall = [c for c in entry["changes"] if c["finding"] == OVERALL]
    if entry["compared"] == 0:
        return "no agreement measured"
    if not overall:
        return "stable"
    return {True: "drifted, came back", False: "drifted", None: "rose"}[entry["came_back"]]


def markdown(report):
    lines = ["# Drift report", "",
             f"{report['trajectories']}: {report['instances']} instances, by {report['by']}, {report['windows']}; "
             f"detector {report['detector']['name']} (river), delta {report['detector']['delta']}. Agreement is with "
             "the label-free reference (the consensus where preferences exist, else the other sources' vote); "
             "\"truth\" is against the labels, a check only.", ""]
    lines += [f"- {n}" for n in report["notes"]] + [""]
    lines += ["| source | answered | refused | unparsed | not asked | agreement | first window | last window | "
              "truth | changes (all findings) | findings with changes | verdict |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for s, e in report["sources"].items():
        curve = [w["agreement"] for w in e["windows"] if w["agreement"] is not None]
        overall = [c for c in e["changes"] if c["finding"] == OVERALL]
        per = Counter(c["finding"] for c in e["changes"] if c["finding"] not in (OVERALL, REFUSALS))
        lines.append(
            f"| {s} | {e['answered']} | {e['refused']} | {e['unparsed']} | {e['not_asked']} | {fmt(e['agreement'])} | "
            f"{fmt(curve[0] if curve else None)} | {fmt(curve[-1] if curve else None)} | {fmt(e['truth'])} | "
            + (", ".join(f"{'▼' if c['direction'] == 'down' else '▲'} {where(c)} ({c['size']:+.3f})" for c in overall)
               or "none")
            + " | " + (", ".join(f"{f} ×{k}" if k > 1 else f for f, k in per.most_common()) or "none")
            + f" | {verdict(e)} |")
    lines += ["", "Every change (onset: where the least-squares split puts it; detected: where the detector raised "
                  "the alarm; size: agreement after minus before):", "",
              "| source | series | onset | detected | direction | before | after | size |",
              "|---|---|---:|---:|---|---:|---:|---:|"]
    for e in report["sources"].values():
        for c in e["changes"]:
            lines.append(f"| {c['source']} | {c['finding']} | {where(c)} | {where(c, 'detected')} | {c['direction']} | "
                         f"{c['before']:.3f} | {c['after']:.3f} | {c['size']:+.3f} |")
    return "\n".join(lines) + "\n"


def where(change, key="onset"):
    return change.get(f"{key}_time") or str(change[key])


def fmt(v):
    return "-" if v is None else f"{v:.3f}"


# ---------------------------------------------------------------------------------------------
# The picture


def plot(report, path):
    """One row per source: the label-free agreement along the stream with its change points; the
    same curve against the labels in a second column where labels exist."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("drift_report: matplotlib is not installed; picture skipped (pip install matplotlib)")
        return False
    names = list(report["sources"])
    with_truth = any(e["truth"] is not None for e in report["sources"].values())
    ncols = 2 if with_truth else 1
    fig, axes = plt.subplots(len(names), ncols, figsize=(6.5 * ncols, 1.35 * len(names) + 1.2), sharex=True,
                             sharey=True, squeeze=False)
    centres = window_centres(report)
    curves = [w[key] for e in report["sources"].values() for w in e["windows"] for key in ("agreement", "truth")]
    low = max(0.0, min([v for v in curves if v is not None] + [0.9]) - 0.05)
    for row, name in enumerate(names):
        e = report["sources"][name]
        axes[row][0].set_ylim(low, 1.01)
        draw_panel(axes[row][0], centres, e, "agreement", "tab:blue", name, report)
        if with_truth:
            draw_panel(axes[row][1], centres, e, "truth", "0.35", name, report)
    axes[0][0].set_title("agreement with the label-free reference", fontsize=10)
    if with_truth:
        axes[0][1].set_title("accuracy against the labels (check only)", fontsize=10)
    for ax in axes[-1]:
        ax.set_xlabel("time" if report["by"] == "time" else "place in the stream (instances)")
    fig.suptitle("Which source drifted, and when: ▼/▲ change in agreement (all findings), "
                 "short ticks: a change on one finding (see the table)", fontsize=10)
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp")  # then renamed: never a half-written picture
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return True


def window_centres(report):
    bounds = report["window_bounds"]
    if report["by"] == "time":
        return [datetime.fromisoformat(a.replace("Z", "+00:00")) + (datetime.fromisoformat(b.replace("Z", "+00:00"))
                - datetime.fromisoformat(a.replace("Z", "+00:00"))) / 2 for a, b in bounds]
    return [(a + b) / 2 for a, b in bounds]


def change_x(report, change):
    if report["by"] == "time":
        return datetime.fromisoformat(change["onset_time"].replace("Z", "+00:00"))
    return change["onset"]


def draw_panel(ax, centres, entry, key, colour, name, report):
    ys = [np.nan if w[key] is None else w[key] for w in entry["windows"]]
    ax.plot(centres, ys, color=colour, lw=1.6)
    ax.text(0.005, 0.06, name, transform=ax.transAxes, fontsize=9, fontweight="bold", va="bottom")
    refused = entry["refused"] / entry["asked"] if entry["asked"] else 0.0
    if refused:
        ax.text(0.995, 0.06, f"refused {refused:.0%}", transform=ax.transAxes, fontsize=7, ha="right", color="0.4")
    # x in data, y in axes fraction: marks stay in the panel whatever its agreement scale
    frame = ax.get_xaxis_transform()
    for c in entry["changes"]:
        x, down = change_x(report, c), c["direction"] == "down"
        colour_c = "tab:red" if down else "tab:green"
        if c["finding"] == OVERALL:
            ax.axvline(x, color=colour_c, ls="--", lw=1.2)
            if key == "agreement":
                ax.text(x, 0.93, f" {'▼' if down else '▲'}{c['size']:+.2f}", transform=frame, fontsize=7,
                        ha="left", va="top", color=colour_c)
        elif c["finding"] != REFUSALS and key == "agreement":
            ax.plot([x, x], [0.0, 0.12], transform=frame, color=colour_c, lw=1.2)
    ax.grid(alpha=0.3)


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    files = [out / "drift_report.json", out / "drift_report.md", out / "drift_report.png"]
    try:
        records.check_output_paths(files=files, inputs={"--trajectories": args.trajectories,
                                                        "--preferences": args.preferences})
        stream = load_stream(args.trajectories, args.preferences, args.by)
    except RecordError as e:
        records.fail(str(e))
    report = build_report(stream, args)
    out.mkdir(parents=True, exist_ok=True)
    records.write_json_atomic(files[0], report)
    text = markdown(report)
    tmp = files[1].with_name(files[1].name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(files[1])
    pictured = plot(report, files[2])
    print(text[:text.index("Every change")].rstrip() + "\n")  # the list of every change stays in the .md
    n_changes = sum(len(e["changes"]) for e in report["sources"].values())
    drifted = [s for s, e in report["sources"].items() if any(c["finding"] == OVERALL for c in e["changes"])]
    print(f"drift_report: {report['instances']} instances, {len(report['sources'])} sources, {n_changes} changes "
          f"(each in the .md); "
          f"drifted (all findings): {', '.join(drifted) or 'none'} -> {files[0]}, {files[1]}"
          + (f", {files[2]}" if pictured else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
