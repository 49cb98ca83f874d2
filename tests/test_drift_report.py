"""drift_report.py: the simulator's known drift onsets found without labels across seeds, exact
agreement values on hand-made streams, the consensus as reference, times from a real API source on
loopback, and bad input (no test split, a partial source, a source that refuses everything, bad
times, foreign preferences)."""

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from scripts import drift_report
from common import simulator
from loopback_servers import completion, server_env

REPO = Path(__file__).resolve().parent.parent
OVERALL = drift_report.OVERALL
STABLE = ("concise", "expansive", "refuser", "confuser")


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def simulated_stream(path, n, seed, profiles=None):
    """What `collect.py --sources sim:all` writes (test_collect checks that it is exactly this),
    built in process: n instances, a fifth of them test, each source at place i / (n - 1)."""
    profiles = profiles or simulator.PROFILES
    rows = []
    for i, r in enumerate(simulator.make_instances(n - n // 5, n // 5, seed)):
        rows.append({**r, "trajectories": [{"source": name, "text": simulator.simulate(p, r, i / (n - 1), seed)}
                                           for name, p in profiles.items()]})
    return write_jsonl(path, rows)


def report_of(path, *flags, preferences=None):
    args = drift_report.parse_args(["--trajectories", str(path), "--out", str(Path(path).parent / "drift"), *map(str, flags)]
                                   + (["--preferences", str(preferences)] if preferences else []))
    return drift_report.build_report(drift_report.load_stream(args.trajectories, args.preferences, args.by), args)


def run_report(*args):
    return subprocess.run([sys.executable, "-m", "scripts.drift_report", *map(str, args)], cwd=REPO, env=server_env(),
                          capture_output=True, text=True, timeout=300)


def overall_changes(report, source):
    return [c for c in report["sources"][source]["changes"] if c["finding"] == OVERALL]


def answer(*findings):
    return "Reasoning.\nAnswer: " + (", ".join(findings) or "No Finding")


# ---------------------------------------------------------------------------------------------
# The simulator's drifters, whose onsets are known (simulator.PROFILES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_simulators_drift_is_found_without_labels(tmp_path, seed):
    n = 1000
    report = report_of(simulated_stream(tmp_path / "t.jsonl", n, seed))
    place = lambda share: share * (n - 1)  # noqa: E731  (collect's position of place k is k / (n - 1))
    # 3% of the stream: the least-squares place of a step of 0.18 in per-instance agreements with a
    # spread near 0.1 is off by (0.1 / 0.18)^2 < 1 instance on average; 30 instances is far wider
    near = lambda k, share: abs(k - place(share)) <= 0.03 * n  # noqa: E731

    # sudden: one fall at drift_at 0.5. Its drifted regime over-calls five findings at about 0.45
    # on the ~80% of studies without them and misses 45% of the present ones: about 0.13 + 0.05 of
    # the 14 findings' agreement, so the fall is more than 0.1
    sudden = overall_changes(report, "sudden")
    assert [c["direction"] for c in sudden] == ["down"] and near(sudden[0]["onset"], 0.5)
    assert sudden[0]["size"] < -0.1 and sudden[0]["detected"] >= sudden[0]["onset"]
    by_finding = {c["finding"]: c for c in report["sources"]["sudden"]["changes"]}
    for finding in simulator.PROFILES["sudden"].drifted["overcall_by"]:  # on which findings: the over-called ones
        assert by_finding[finding]["direction"] == "down" and near(by_finding[finding]["onset"], 0.5), finding

    # recurring: drifted on [0.25, 0.5) and [0.75, 1] (drift_period 0.5): down, back up, down again
    recurring = overall_changes(report, "recurring")
    assert [c["direction"] for c in recurring] == ["down", "up", "down"]
    assert all(near(c["onset"], share) for c, share in zip(recurring, (0.25, 0.5, 0.75)))
    assert report["sources"]["recurring"]["came_back"] is False  # it fell again at the end
    assert drift_report.came_back(recurring[:2]) is True

    # gradual: errors grow linearly along the whole stream; every change found is a fall, and its
    # curve ends lower than it starts (the drifted regime costs about 0.2 of the agreement)
    gradual = report["sources"]["gradual"]
    assert overall_changes(report, "gradual") and {c["direction"] for c in gradual["changes"]
                                                   if c["finding"] != drift_report.REFUSALS} == {"down"}
    curve = [w["agreement"] for w in gradual["windows"]]
    assert curve[-1] < curve[0] - 0.1

    # the stable sources: no change over all findings, and at most one on any single finding per
    # 1,000 instances across the four (ADWIN's delta 0.002 bounds a false alarm per series)
    for name in STABLE:
        assert overall_changes(report, name) == [], name
    assert sum(len(report["sources"][s]["changes"]) for s in STABLE) <= 1
    # labels were only a check: the truth curves show the same falls (sudden, recurring)
    truth = [w["truth"] for w in report["sources"]["sudden"]["windows"]]
    assert truth[0] - truth[-1] > 0.1


def test_page_hinkley_finds_the_sudden_onset_too(tmp_path):
    n = 1000
    report = report_of(simulated_stream(tmp_path / "t.jsonl", n, 0), "--detector", "page-hinkley")
    sudden = overall_changes(report, "sudden")
    assert sudden and sudden[0]["direction"] == "down" and abs(sudden[0]["onset"] - 0.5 * (n - 1)) <= 0.03 * n
    assert all(overall_changes(report, s) == [] for s in STABLE)


def test_best_split_is_the_least_squares_place_of_one_step():
    assert drift_report.best_split([1.0] * 30 + [0.0] * 20) == 30
    assert drift_report.best_split([0.0] * 12 + [1.0] * 40) == 12
    # a lone outlier does not move it away from the step
    assert drift_report.best_split([1.0] * 25 + [0.0] + [1.0] * 4 + [0.0] * 30) == 30


# ---------------------------------------------------------------------------------------------
# Exact values on hand-made streams


def test_each_source_is_compared_with_the_others_never_itself(tmp_path):
    # two sources: a calls Cardiomegaly, b No Finding. a's reference is b's answer and b's is a's,
    # so each disagrees on Cardiomegaly and No Finding: 12 of 14 findings. A vote that let b vote
    # on itself would give b 14/14 (Cardiomegaly at 1 of 2 is no majority).
    rows = [{"id": f"i{k}", "prompt": "p", "trajectories": [{"source": "a", "text": answer("Cardiomegaly")},
                                                             {"source": "b", "text": answer()}]} for k in range(30)]
    report = report_of(write_jsonl(tmp_path / "t.jsonl", rows), "--window", 10)
    for s in ("a", "b"):
        e = report["sources"][s]
        assert e["agreement"] == round(12 / 14, 4) and e["changes"] == []
        assert [w["agreement"] for w in e["windows"]] == [round(12 / 14, 4)] * 3
        assert e["windows"][0]["per_finding"]["Cardiomegaly"] == 0.0 and e["windows"][0]["per_finding"]["Edema"] == 1.0
    assert report["sources"]["a"]["truth"] is None  # no labels, no truth curve


def test_the_consensus_is_the_reference_where_preferences_exist(tmp_path):
    # three sources agree on Edema; the consensus of the first 10 instances says No Finding
    rows = [{"id": f"i{k}", "split": "train", "prompt": "p",
             "trajectories": [{"source": s, "text": answer("Edema")} for s in ("a", "b", "c")]} for k in range(20)]
    prefs = [{"id": f"i{k}", "prompt": "p", "chosen": answer(), "rejected": [answer("Edema")],
              "rejected_sources": ["a"]} for k in range(10)]
    t = write_jsonl(tmp_path / "t.jsonl", rows)
    report = report_of(t, "--window", 10, preferences=write_jsonl(tmp_path / "p.jsonl", prefs))
    for s in ("a", "b", "c"):  # 12/14 against the consensus (Edema, No Finding), 14/14 against the others
        assert [w["agreement"] for w in report["sources"][s]["windows"]] == [round(12 / 14, 4), 1.0]
    assert any("the consensus on 10 instances" in n for n in report["notes"])
    # preferences of another run are refused, naming the file
    other = write_jsonl(tmp_path / "other.jsonl", [{**prefs[0], "id": "elsewhere"}])
    result = run_report("--trajectories", t, "--preferences", other, "--out", tmp_path / "d")
    assert result.returncode == 2 and f"{other}: field 'id': no preference has the id" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_pipelines_own_preferences(tmp_path):
    """collect.py, then consensus.py --consensus vote (no model), then the report on both files."""
    traj, prefs = tmp_path / "t.jsonl", tmp_path / "p.jsonl"
    for command in (["collect.py", "--sources", "sim:all", "--n-train", 400, "--n-test", 100, "--seed", 4, "--out", traj],
                    ["consensus.py", "--data", traj, "--consensus", "vote", "--out", prefs]):
        done = subprocess.run([sys.executable, *map(str, command)], cwd=REPO, env=server_env(), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    report = report_of(traj, preferences=prefs)
    kept = sum(1 for line in prefs.read_text().splitlines() if line.strip())
    assert any(n.startswith(f"reference: the consensus on {kept} instances") for n in report["notes"])
    sudden = overall_changes(report, "sudden")
    assert [c["direction"] for c in sudden] == ["down"] and abs(sudden[0]["onset"] - 0.5 * 499) <= 0.03 * 500
    assert [c["direction"] for c in overall_changes(report, "recurring")] == ["down", "up", "down"]


# ---------------------------------------------------------------------------------------------
# Bad input: a clear note in the report, or exit 2 with file, line and field


def test_no_test_split_a_partial_source_and_one_that_refuses_everything(tmp_path):
    n = 400
    base = Path(simulated_stream(tmp_path / "sim.jsonl", n, 0, {k: simulator.PROFILES[k] for k in
                                                                 ("concise", "confuser", "expansive", "sudden")}))
    rows = [json.loads(line) for line in base.read_text().splitlines()]
    for k, r in enumerate(rows):
        r["split"] = "train"
        if k < 150:  # "sudden" joins the stream late: it answered only the last 250
            r["trajectories"] = [t for t in r["trajectories"] if t["source"] != "sudden"]
        r["trajectories"].append({"source": "mute", "text": "I cannot give a medical opinion."})
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    result = run_report("--trajectories", data, "--out", tmp_path / "drift", "--window", 50)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    report = json.loads((tmp_path / "drift" / "drift_report.json").read_text())
    notes = "\n".join(report["notes"])
    assert "splits: train 400 (no test split" in notes
    assert "sudden answered 250 of 400 instances (places 150 to 399)" in notes
    assert "mute gave no parseable answer (400 refused, 0 unparsed)" in notes
    mute, sudden = report["sources"]["mute"], report["sources"]["sudden"]
    assert (mute["refused"], mute["answered"], mute["agreement"], mute["changes"]) == (400, 0, None, [])
    assert all(w["refused"] == w["asked"] == 50 and w["agreement"] is None for w in mute["windows"])
    assert sudden["not_asked"] == 150 and [w["asked"] for w in sudden["windows"]] == [0, 0, 0, 50, 50, 50, 50, 50]
    assert sudden["windows"][0]["agreement"] is None and sudden["windows"][-1]["agreement"] is not None
    assert "no agreement measured" in (tmp_path / "drift" / "drift_report.md").read_text()
    # a refusal is counted apart, never as disagreement: the others' agreement ignores mute
    assert report["sources"]["concise"]["refused"] == 0 and report["sources"]["concise"]["agreement"] > 0.9


@pytest.mark.parametrize("rows, flags, message", [
    ([{"id": "a", "prompt": "p", "time": "yesterday", "trajectories": [{"source": "s", "text": "Answer: Edema"}]}],
     [], "t.jsonl:1: field 'time': 'yesterday' is not an ISO 8601 time"),
    ([{"id": "a", "prompt": "p", "time": "2025-01-01T00:00:00Z", "trajectories": [{"source": "s", "text": "x"}]},
      {"id": "b", "prompt": "p", "trajectories": []}], ["--by", "time"], "t.jsonl:2: field 'time': missing"),
    ([{"id": "a", "prompt": "p", "trajectories": []}], [], "field 'trajectories': every instance has an empty list"),
    ([{"id": "a", "prompt": "p"}], [], "t.jsonl:1: field 'trajectories': missing"),
])
def test_bad_input_exits_2_naming_file_line_and_field(tmp_path, rows, flags, message):
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    result = run_report("--trajectories", data, "--out", tmp_path / "drift", *flags)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "drift").exists()


def test_out_over_the_input_is_refused(tmp_path):
    # the folder would hold drift_report.json; an input of that name is never written over
    data = write_jsonl(tmp_path / "d" / "drift_report.json", [{"id": "a", "prompt": "p", "trajectories": []}])
    before = data.read_bytes()
    result = run_report("--trajectories", data, "--out", tmp_path / "d")
    assert result.returncode == 2 and "is also the input --trajectories" in result.stderr
    assert data.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Times: recorded by collect.py from a real API source, read by the report


def test_collect_dates_api_answers_and_the_report_windows_by_time(tmp_path, chat_server):
    server = chat_server(lambda prompt, n, body: (200, completion(answer("Edema")), {}, 0))
    rows = [{"id": f"q{k}", "prompt": f"question {k}"} for k in range(4)]
    data, out = write_jsonl(tmp_path / "data.jsonl", rows), tmp_path / "t.jsonl"
    collect = [sys.executable, "collect.py", "--data", data, "--sources", f"api=openai:m@{server.url}", "--out", out]
    start = datetime.now(timezone.utc).replace(microsecond=0)
    done = subprocess.run(collect, cwd=REPO, env=server_env(), capture_output=True, text=True, timeout=300)
    end = datetime.now(timezone.utc)
    assert done.returncode == 0, done.stderr
    written = [json.loads(line) for line in out.read_text().splitlines()]
    times = [datetime.fromisoformat(r["time"]) for r in written]
    assert all(start <= t <= end for t in times) and all(t.tzinfo == timezone.utc for t in times)
    journal = [json.loads(line) for line in Path(str(out) + ".parts.jsonl").read_text().splitlines()]
    assert sorted(line["time"] for line in journal) == sorted(r["time"] for r in written)
    # a rerun asks nothing and keeps the times of the first
    again = subprocess.run(collect, cwd=REPO, env=server_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and out.read_text() == "".join(json.dumps(r) + "\n" for r in written)
    assert len(server.requests) == 4

    # the report orders by time when every instance has one, and names the onset's time
    t0 = datetime(2025, 3, 1, tzinfo=timezone.utc)
    stream = []
    for k in range(300):  # listed out of order: the report sorts by time; b goes wrong from hour 150
        hour = (k * 7) % 300
        wrong = hour >= 150
        stream.append({"id": f"i{k}", "prompt": "p", "time": (t0 + timedelta(hours=hour)).isoformat().replace("+00:00", "Z"),
                       "trajectories": [{"source": "b", "text": answer("Cardiomegaly", "Fracture") if wrong
                                         else answer("Edema")}]
                       + [{"source": s, "text": answer("Edema")} for s in ("a", "c", "d", "e")]})
    report = report_of(write_jsonl(tmp_path / "s.jsonl", stream), "--window-time", "1d")
    assert report["by"] == "time" and len(report["window_bounds"]) == 13  # 300 hours in windows of a day
    (change,) = overall_changes(report, "b")
    assert change["onset_time"] == "2025-03-07T06:00:00Z" and change["size"] == round(-3 / 14, 4)
    assert [w["agreement"] for w in report["sources"]["b"]["windows"]][:6] == [1.0] * 6
    # the other four still agree with the vote of the rest (Edema 3 of 4): no change for them
    assert all(report["sources"][s]["changes"] == [] for s in ("a", "c", "d", "e"))


def test_the_script_writes_its_report_and_picture(tmp_path):
    data = simulated_stream(tmp_path / "t.jsonl", 500, 1)
    result = run_report("--trajectories", data, "--out", tmp_path / "drift")
    assert result.returncode == 0, result.stderr
    assert "7 sources" in result.stdout and "drifted (all findings): sudden, gradual, recurring ->" in result.stdout
    from PIL import Image

    with Image.open(tmp_path / "drift" / "drift_report.png") as image:
        assert image.format == "PNG" and image.height > image.width / 2  # seven rows, two columns
    md = (tmp_path / "drift" / "drift_report.md").read_text()
    assert "| sudden |" in md and "| recurring | all findings |" in md



def test_help_documents_every_flag():
    shown = [a for a in drift_report.build_parser()._actions if a.option_strings]
    result = run_report("--help")
    assert result.returncode == 0 and len(shown) >= 12
    for action in shown:
        assert action.help and action.help.strip(), action.option_strings
        assert all(flag in result.stdout for flag in action.option_strings), action.option_strings


def test_the_benchmark_runs_and_reports_what_it_found(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "benchmarks/bench_drift_report.py", "--n", "500", "--seeds", "0",
                           "--json", str(out)], cwd=REPO, env=server_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(out.read_text())["results"]
    assert all(result[k] > 0 for k in ("cli_s", "load_s", "answers_and_vote_s", "detection_and_windows_s", "picture_s"))
    assert [round(p, 1) for p, _ in result["sudden"]] == [0.5]
    assert [d for _, d in result["recurring"]] == ["down", "up", "down"]
    assert "| 0 |" in done.stdout
