"""Speed and detection of drift_report.py on the simulator's stream, whose drift onsets are known.

    python benchmarks/bench_drift_report.py                      # 2,000 instances x 7 sources, seeds 0-4
    python benchmarks/bench_drift_report.py --n 1000 --seeds 0 1 --json bench_drift_report.json

For each seed: the stream collect.py `--sources sim:all` writes (2,000 instances, a fifth of them
test; built in process, as test_drift_report does), then the report timed by phase in this
process (reading and validating the file, parsing answers and the leave-one-out vote, change
detection and windows, the picture), and once end to end as `python drift_report.py` (interpreter,
imports and files included). Then, per seed, what it found against the simulator's truth:
the sudden drifter's onset (true: 0.5 of the stream), the recurring drifter's three switches
(0.25, 0.5, 0.75), the gradual drifter's falls and its first and last window, and the stable
sources' alarms per 1,000 instances (over all findings, and on single findings).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripts import drift_report  # noqa: E402
from common import simulator  # noqa: E402

STABLE = ("concise", "expansive", "refuser", "confuser")


def write_stream(path, n, seed):
    rows = []
    for i, r in enumerate(simulator.make_instances(n - n // 5, n // 5, seed)):
        rows.append({**r, "trajectories": [{"source": name, "text": simulator.simulate(p, r, i / (n - 1), seed)}
                                           for name, p in simulator.PROFILES.items()]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def timed_report(path, out):
    args = drift_report.parse_args(["--trajectories", str(path), "--out", str(out)])
    t0 = time.perf_counter()
    stream = drift_report.load_stream(args.trajectories)
    t1 = time.perf_counter()
    by_source = drift_report.answers_by_source(stream)
    t2 = time.perf_counter()
    report = drift_report.build_report(stream, args, by_source)
    t3 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    drift_report.plot(report, out / "drift_report.png")
    t4 = time.perf_counter()
    return report, {"load_s": t1 - t0, "answers_and_vote_s": t2 - t1, "detection_and_windows_s": t3 - t2,
                    "picture_s": t4 - t3}


def findings(report, n):
    def overall(source):
        return [c for c in report["sources"][source]["changes"] if c["finding"] == drift_report.OVERALL]

    gradual = report["sources"]["gradual"]
    curve = [w["agreement"] for w in gradual["windows"]]
    stable_overall = sum(len(overall(s)) for s in STABLE)
    stable_single = sum(len(report["sources"][s]["changes"]) for s in STABLE) - stable_overall
    per_1000 = 1000 / (n * len(STABLE))  # alarms per 1,000 instances of one stable source
    return {"sudden": [(c["onset"] / (n - 1), c["size"]) for c in overall("sudden")],
            "recurring": [(c["onset"] / (n - 1), c["direction"]) for c in overall("recurring")],
            "gradual_falls": [c["onset"] / (n - 1) for c in overall("gradual")],
            "gradual_rises": sum(c["direction"] == "up" for c in overall("gradual")),
            "gradual_first_last": (curve[0], curve[-1]),
            "stable_alarms_per_1000": stable_overall * per_1000,
            "stable_single_finding_alarms_per_1000": stable_single * per_1000}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="instances in the stream (7 sources each)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="simulator seeds")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            path = Path(tmp) / f"t{seed}.jsonl"
            write_stream(path, args.n, seed)
            report, phases = timed_report(path, Path(tmp) / f"d{seed}")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "scripts.drift_report", "--trajectories", str(path), "--out",
                                   str(Path(tmp) / f"cli{seed}")], cwd=ROOT, capture_output=True, text=True,
                                  env=dict(os.environ, OMP_NUM_THREADS="1"))
            wall = time.perf_counter() - t0
            assert proc.returncode == 0, proc.stderr
            results.append({"seed": seed, "cli_s": wall, **phases, **findings(report, args.n)})
    print(f"{args.n} instances x {len(simulator.PROFILES)} sources, seeds {args.seeds}; places as shares of the stream\n")
    print("| seed | python drift_report.py | load | answers + vote | detection + windows | picture | sudden onset "
          "(0.5) | recurring switches (0.25 ▼, 0.5 ▲, 0.75 ▼) | gradual falls | gradual first → last window | "
          "stable: alarms / 1,000 (all findings; one finding) |")
    print("|---:|---:|---:|---:|---:|---:|---|---|---|---|---|")
    for r in results:
        print(f"| {r['seed']} | {r['cli_s']:.1f} s | {r['load_s']:.2f} s | {r['answers_and_vote_s']:.2f} s | "
              f"{r['detection_and_windows_s']:.2f} s | {r['picture_s']:.2f} s | "
              + ", ".join(f"{p:.3f} ({s:+.2f})" for p, s in r["sudden"]) + " | "
              + ", ".join(f"{p:.3f} {'▼' if d == 'down' else '▲'}" for p, d in r["recurring"]) + " | "
              + ", ".join(f"{p:.2f}" for p in r["gradual_falls"]) + (f" (+{r['gradual_rises']} rises)" if r["gradual_rises"] else "")
              + f" | {r['gradual_first_last'][0]:.3f} → {r['gradual_first_last'][1]:.3f} | "
              f"{r['stable_alarms_per_1000']:.3f}; {r['stable_single_finding_alarms_per_1000']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": args.n, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
