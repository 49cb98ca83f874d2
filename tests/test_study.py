"""Tests of study.py's pieces: the validation split, the preference variants, the statistics.

The whole study runs end to end in CI (`python study.py --size smoke`, .ci/run); these check that
what it reports is computed right.
"""

import json
import sys

import numpy as np
import pytest

from common import answers
import collect
import consensus
from common import records
from common import simulator
import study


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A real simulator stream: 12 train and 6 test instances, seven sources."""
    path = tmp_path_factory.mktemp("sim") / "collected.jsonl"
    collect.main(["--sources", "sim:all", "--n-train", "12", "--n-test", "6", "--out", str(path), "--seed", "3"])
    return path


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    """The study's testbed at small size: a 20-instance stream (5 val) and an 8-instance benchmark."""
    out = tmp_path_factory.mktemp("testbed")
    paths = study.write_instances(out, 20, 8, seed=5)
    collected = {}
    for split, path in paths.items():
        collected[split] = out / f"collected-{split}.jsonl"
        collect.main(["--sources", "sim:all", "--data", str(path), "--out", str(collected[split]), "--seed", "5"])
    study.carve_validation(collected["train"], collected["test"], out / "trajectories.jsonl", 5)
    return out / "trajectories.jsonl"


def test_training_stream_spans_the_drift_and_val_is_interleaved(testbed):
    rows = [r for _, r in records.read_jsonl(testbed)]
    stream, bench = rows[:20], rows[20:]
    assert [r["split"] for r in bench] == ["test"] * 8
    val = [i for i, r in enumerate(stream) if r["split"] == "val"]
    assert val == [2, 6, 10, 14, 18]  # every 4th, mid-block: val spans the stream as train does
    assert stream[0]["split"] == stream[-1]["split"] == "train"  # train reaches both ends, 0 and 1
    # each source answered stream instance i at position i / 19 and benchmark instance j at j / 7:
    # the sudden drifter (switch at 0.5) is drifted on the second half of the training data
    sudden = simulator.PROFILES["sudden"]
    for part, n in ((stream, 20), (bench, 8)):
        for i, r in enumerate(part):
            text = next(t["text"] for t in r["trajectories"] if t["source"] == "sudden")
            assert text == simulator.simulate(sudden, r, i / (n - 1), seed=5)
    train_positions = [i / 19 for i, r in enumerate(stream) if r["split"] == "train"]
    # positions 10/19 .. 19/19 are past the switch at 0.5: ten instances, less val 10, 14 and 18
    assert sum(sudden.weight(p) for p in train_positions) == 7
    # the benchmark is its own draw: no prompt is shared with the stream
    assert not {r["prompt"] for r in stream} & {r["prompt"] for r in bench}


def test_validation_rows_are_evenly_spaced():
    assert study.validation_rows(10, 2) == {2, 7}
    assert study.validation_rows(164, 100) == {int((k + 0.5) * 1.64) for k in range(100)}
    assert len(study.validation_rows(164, 100)) == 100
    with pytest.raises(ValueError, match="n_val"):
        study.validation_rows(5, 5)
    assert study.evenly(list("abcdefghij"), 2) == ["c", "h"] and study.evenly([1, 2], 5) == [1, 2]


def test_training_reads_train_only(testbed, tmp_path):
    consensus.main(["--consensus", "vote", "--data", str(testbed), "--out", str(tmp_path / "p.jsonl")])
    train = {r["id"] for _, r in records.read_jsonl(testbed) if r["split"] == "train"}
    assert {p["id"] for _, p in records.read_jsonl(tmp_path / "p.jsonl")} <= train
    # and the SFT file holds exactly the chosen texts, one trajectory per instance
    direct = [p for _, p in records.read_jsonl(tmp_path / "p.jsonl")]
    n = study.consensus_as_trajectories(tmp_path / "p.jsonl", tmp_path / "sft.jsonl")
    sft = records.load_instances(tmp_path / "sft.jsonl", require_trajectories=True)
    assert n == len(direct) and [r["trajectories"] for r in sft] == [[{"source": "consensus", "text": p["chosen"]}]
                                                                      for p in direct]


def test_source_stream_accuracy_windows(testbed):
    by = study.source_stream_accuracy(testbed, 4)
    rows = [r for _, r in records.read_jsonl(testbed) if r["split"] != "test"]
    first = rows[:5]  # window 1 of 20 stream instances
    preds = [answers.parse_answer(next(t["text"] for t in r["trajectories"] if t["source"] == "concise")) for r in first]
    assert by["concise"][0] == pytest.approx(answers.score(preds, [r["labels"] for r in first])["macro"]["accuracy"])
    assert set(by) == set(simulator.PROFILES) and all(len(v) == 4 for v in by.values())


def test_positive_control_preferences_come_from_the_labels(testbed, tmp_path):
    n = study.label_preferences(testbed, tmp_path / "labels.jsonl", seed=0)
    prefs = records.load_preferences(tmp_path / "labels.jsonl")
    rows = {r["id"]: r for _, r in records.read_jsonl(testbed)}
    assert n == len(prefs) > 0
    for p in prefs:
        r = rows[p["id"]]
        assert r["split"] == "train" and p["consensus_by"] == "labels (positive control)"
        texts = {t["source"]: t["text"] for t in r["trajectories"]}
        assert texts[p["chosen_source"]] == p["chosen"]
        assert answers.normalize(answers.parse_answer(p["chosen"])) == answers.normalize(r["labels"])
        wrong = [s for s, t in texts.items() if study.finding_errors(answers.parse_answer(t), r["labels"]) > 0]
        assert p["rejected_sources"] == wrong and p["rejected"] == [texts[s] for s in wrong]
        assert all(0 < d <= 1 for d in p["drift"])
    # every train instance with a right and a wrong source is there, and only those
    expected = set()
    for r in rows.values():
        if r["split"] != "train":
            continue
        errs = [study.finding_errors(answers.parse_answer(t["text"]), r["labels"]) for t in r["trajectories"]]
        if 0 in errs and any(e > 0 for e in errs):
            expected.add(r["id"])
    assert {p["id"] for p in prefs} == expected


def test_finding_errors_exact():
    label = {f: 0 for f in answers.FINDINGS} | {"Cardiomegaly": 1}
    assert study.finding_errors(None, label) == 1.0
    assert study.finding_errors(dict(label), label) == 0.0
    assert study.finding_errors(dict(label, Edema=1, Fracture=1), label) == 2 / 14


def test_correctness_mean_is_the_macro_accuracy(simulated):
    instances = [r for _, r in records.read_jsonl(simulated)]
    labels = [r["labels"] for r in instances]
    for source in ("concise", "refuser", "expansive"):
        preds = [answers.parse_answer(next(t["text"] for t in r["trajectories"] if t["source"] == source))
                 for r in instances]
        matrix = study.correctness(preds, labels)
        assert matrix.shape == (len(instances), len(answers.FINDINGS))
        assert matrix.mean() == pytest.approx(answers.score(preds, labels)["macro"]["accuracy"], abs=1e-12)
    # an unparsed answer is wrong on every finding, as in answers.score
    assert study.correctness([None], [labels[0]]).sum() == 0


def one_seed(m):
    return m[None]


def test_paired_contrast_exact_cases():
    rng = np.random.default_rng(0)
    a = (rng.random((40, 14)) > 0.3).astype(float)
    inst = study.resample_indices(40, 2000, seed=1)
    one = study.resample_indices(1, 2000, seed=2)
    same = study.paired_contrast(one_seed(a), one_seed(a), inst, one)
    assert (same["difference"], same["interval"], same["p"]) == (0.0, (0.0, 0.0), 1.0)  # an arm against itself
    b = a.copy()
    b[:, 0] = 1 - b[:, 0]  # b flips one finding on every instance
    c = study.paired_contrast(one_seed(a), one_seed(b), inst, one)
    assert c["difference"] == pytest.approx((a[:, 0].mean() - b[:, 0].mean()) / 14, abs=1e-12)
    assert c["interval"][0] <= c["difference"] <= c["interval"][1] and c["interval"][0] < c["interval"][1]
    # a constant per-instance gap has no spread at all, and every resample lies above 0: p = 0
    lo, hi = a.copy(), a.copy()
    lo[:, 1], hi[:, 1] = 0.0, 1.0
    gap = study.paired_contrast(one_seed(hi), one_seed(lo), inst, one)
    assert gap["difference"] == pytest.approx(1 / 14) and gap["interval"] == (pytest.approx(1 / 14), pytest.approx(1 / 14))
    assert gap["p"] == 0.0


def test_paired_contrast_resamples_training_seeds():
    """Seed 0 is 1/14 better on every instance, seed 1 equal: instance resampling changes nothing,
    seed resampling draws the two seeds' mean from {0, 1/28, 1/14} with chances 1/4, 1/2, 1/4."""
    base = np.zeros((30, 14))
    better = base.copy()
    better[:, 3] = 1.0
    a = np.stack([better, base])  # arm with two training seeds
    b = np.stack([base, base])
    resamples = 4000
    inst = study.resample_indices(30, resamples, seed=1)
    seeds = study.resample_indices(2, resamples, seed=2)
    c = study.paired_contrast(a, b, inst, seeds)
    assert c["difference"] == pytest.approx(1 / 28)
    assert c["interval"] == (pytest.approx(0.0), pytest.approx(1 / 14))
    # p = 2 * P(mean <= 0) = 2 * 1/4; the share of 4000 draws has sd sqrt(.25 * .75 / 4000) = 0.007,
    # so 2 * (0.25 +- 0.035) is five sd wide
    assert c["p"] == pytest.approx(0.5, abs=0.07)
    # an arm without seeds (the bootstrap) is the same against every seed of the other
    single = study.paired_contrast(a, b[:1], inst, seeds)
    assert single == c
    flipped = study.paired_contrast(b[:1], a, inst, seeds)
    assert flipped["difference"] == pytest.approx(-1 / 28) and flipped["interval"] == (pytest.approx(-1 / 14), pytest.approx(0.0))


def test_holm_exact():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    assert study.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert study.holm([0.5, 0.01]) == pytest.approx([0.5, 0.02])
    assert study.holm([0.9, 0.6, 0.4]) == pytest.approx([1.0, 1.0, 1.0])  # capped at 1, order kept
    assert study.holm([0.02]) == [0.02]


def contrast(diff, lo, hi):
    return {"difference": diff, "interval": (lo, hi), "p": 0.0}


def verdict_of(primary, dpo, control, apo_unparsed=0.05, sft_unparsed=0.05, boot_unparsed=0.05):
    table = {"apo": {"unparsed_rate": apo_unparsed}, "sft-consensus": {"unparsed_rate": sft_unparsed},
             "bootstrap": {"unparsed_rate": boot_unparsed}}
    return study.verdict({"apo - sft-consensus": contrast(*primary), "dpo-pairs - sft-consensus": contrast(*dpo),
                          "positive-control - bootstrap": contrast(*control)}, table)


def test_verdict_criteria():
    nothing = (0.0, -0.02, 0.02)
    assert verdict_of((0.012, 0.001, 0.03), nothing, nothing) == "support"
    assert verdict_of((0.009, 0.001, 0.02), nothing, nothing) == "inconclusive"  # under +0.01
    assert verdict_of((0.02, -0.001, 0.04), nothing, nothing) == "inconclusive"  # interval reaches 0
    assert verdict_of((0.02, 0.005, 0.04), nothing, nothing, apo_unparsed=0.06) == "inconclusive"  # more unparsed
    control_helps = (0.03, 0.01, 0.05)
    assert verdict_of(nothing, nothing, control_helps) == "refutation at this scale"
    # a pre-registered APO variant (the official scripts' dpo-pairs + NLL) that beats sft-consensus
    assert verdict_of(nothing, (0.02, 0.005, 0.03), control_helps) == "inconclusive"
    assert verdict_of((0.005, 0.001, 0.01), nothing, control_helps) == "inconclusive"
    assert verdict_of(nothing, nothing, (0.03, -0.01, 0.05)) == "inconclusive"  # control does not help


def presence(*called):
    return {f: int(f in called) for f in answers.FINDINGS}


def test_endpoints_exact():
    labels = [presence("Cardiomegaly"), presence("No Finding"), presence("Edema", "Atelectasis")]
    preds = [presence("Cardiomegaly"), None, presence("Edema")]  # exact, unparsed, one miss
    e = study.endpoints([preds], labels, [["abcd", "", "ab"]])
    assert e["macro_accuracy"] == pytest.approx((14 + 0 + 13) / 42)
    assert e["unparsed_rate"] == pytest.approx(1 / 3)
    assert e["parsed_accuracy"] == pytest.approx(27 / 28)
    assert e["exact_match"] == pytest.approx(1 / 3)
    assert e["no_finding_rate"] == 0.0 and e["length"] == 2.0
    assert e["finding/Atelectasis"] == pytest.approx(1 / 3) and e["finding/Cardiomegaly"] == pytest.approx(2 / 3)
    # two seeds: every endpoint is the mean of the two
    two = study.endpoints([preds, labels], labels, [["a", "b", "c"], ["abc", "abc", "abc"]])
    assert two["macro_accuracy"] == pytest.approx(((14 + 0 + 13) / 42 + 1) / 2)
    assert two["unparsed_rate"] == pytest.approx(1 / 6) and two["no_finding_rate"] == pytest.approx(1 / 6)
    assert two["length"] == 2.0


def test_overcall_rates_exact():
    labels = [presence("No Finding"), presence("Cardiomegaly")]
    preds = [presence("Cardiomegaly", "Support Devices"), presence("Cardiomegaly")]
    rates = study.overcall_rates([preds], labels)
    # sudden over-calls Atelectasis, Cardiomegaly, Edema, Pleural Effusion, Pneumonia: 9 negatives, 1 called
    assert rates["sudden"] == pytest.approx(1 / 9)
    assert rates["gradual"] == pytest.approx(1 / 10)  # Support Devices on the first instance
    assert rates["recurring"] == pytest.approx(1 / 9)


def test_movement_and_heldout_rewards_exact():
    model, ref, counts = np.array([-10.0, -20.0]), np.array([-12.0, -19.0]), np.array([4, 6])
    assert study.movement(model, ref, counts) == pytest.approx((2 - 1) / 10)
    prefs = [{"rejected": ["x", "y"], "rejected_sources": ["sudden", "gradual"]},
             {"rejected": ["z"], "rejected_sources": ["sudden"]}]
    # rewards 0.1 * (model - ref) per item, laid out chosen, negatives... per preference
    model = np.array([-1.0, -5.0, -2.0, -3.0, -3.0])
    ref = np.array([-2.0, -4.0, -2.0, -3.0, -4.0])
    h = study.heldout_rewards(prefs, model, ref, 0.1)
    assert h["reward_accuracy"] == 0.5  # first: 0.1 > -0.1, 0; second: 0 < 0.1
    assert h["reward_by_source"] == pytest.approx({"(chosen)": 0.05, "gradual": 0.0, "sudden": 0.0})
    assert len(study.preference_items([dict(p, chosen="c") for p in prefs])) == 5


def test_a_lone_recipe_chooses_nothing_and_its_row_says_so():
    """With one recipe (--size cpu) no val answers of it are generated; with several, all of them."""
    one, two = [{"name": "a"}], [{"name": "a"}, {"name": "b"}]
    assert study.to_choose(one) == [] and study.to_choose(two) == two
    row = dict(name="full-2e-6", lr="2e-6", lora=None, nll=0.0, val_n=100, movement=-0.0006,
               training={"rewards/accuracies": 0.2, "rewards/margins": -0.031})
    lone = study.sweep_row(dict(row, val_macro_accuracy=None, val_unparsed=None))
    scored = study.sweep_row(dict(row, val_macro_accuracy=0.632, val_unparsed=23))
    assert lone == "| full-2e-6 | 2e-6 |  | 0.0 | (not generated: one recipe, nothing to choose) | | -0.0006 | 0.20 | -0.031 |"
    assert scored == "| full-2e-6 | 2e-6 |  | 0.0 | 0.632 | 23/100 | -0.0006 | 0.20 | -0.031 |"
    assert lone.count("|") == scored.count("|") == 10  # nine columns, as the table's header


def test_the_fixed_val_rows_alone_are_a_val_split_evaluate_answers(tiny_text_model, testbed, tmp_path):
    """--size cpu has the bootstrap answer only the val rows movement is read on: the file written
    for it holds exactly those rows, in stream order, and evaluate.py answers those and no others."""
    import evaluate

    val, _ = study.load_rows(testbed, "val")
    fixed = study.evenly(val, 3)
    path = tmp_path / "val-fixed.jsonl"
    records.write_jsonl_atomic(path, fixed)
    rows, _ = study.load_rows(path, "val")
    assert [r["id"] for r in rows] == [r["id"] for r in fixed] == [val[i]["id"] for i in (0, 2, 4)]
    evaluate.main(["--models", f"bootstrap={tiny_text_model}", "--data", str(path), "--split", "val",
                   "--max-new-tokens", "4", "--out", str(tmp_path / "eval")])
    texts = study.model_predictions(tmp_path / "eval", ["bootstrap"], fixed)["bootstrap"]
    assert len(texts) == 3 and len(list(records.read_jsonl(tmp_path / "eval" / "predictions.jsonl"))) == 3


def test_arm_logps_on_a_real_model(tiny_text_model, testbed, tmp_path):
    """The bootstrap against itself moves by exactly 0; the cache answers a second call."""
    rows = [r for _, r in records.read_jsonl(testbed) if r["split"] == "val"]
    items = [(r, r["trajectories"][0]["text"]) for r in rows]
    cache = tmp_path / "cache.json"
    logps, counts = study.cached_logps(cache, tiny_text_model, items, 1024)
    assert logps.shape == counts.shape == (len(rows),) and (logps < 0).all() and (counts > 0).all()
    assert study.movement(logps, logps, counts) == 0.0
    before = cache.read_text()
    again = study.cached_logps(cache, tiny_text_model, items, 1024)
    assert cache.read_text() == before and (again[0] == logps).all()


def test_stream_windows_split_in_order():
    m = np.zeros((10, 14))
    m[5:] = 1.0
    assert study.stream_windows(m, 2) == [0.0, 1.0]


def test_run_folder_of_another_design_size_or_seed_is_refused(tmp_path):
    args = study.parse_args(["--size", "cpu", "--seed", "3"])
    study.check_run_folder(tmp_path, args)
    study.check_run_folder(tmp_path, args)  # the same run resumes
    with pytest.raises(SystemExit, match="give another --out"):
        study.check_run_folder(tmp_path, study.parse_args(["--size", "cpu", "--seed", "4"]))
    old = tmp_path / "old"
    old.mkdir()
    (old / "trajectories.jsonl").write_text("{}\n")  # a folder of the first design has no study.json
    with pytest.raises(SystemExit, match="earlier design"):
        study.check_run_folder(old, args)


def test_a_training_stage_is_checkpointed_and_its_checkpoints_go_when_done(tiny_text_model, testbed, tmp_path,
                                                                          monkeypatch, capfd):
    """Every SAVE_EVERY steps a checkpoint (an interrupted study resumes from it); once the stage is
    done only the model folder and the run's records stay."""
    monkeypatch.setattr(study, "SAVE_EVERY", 1)
    out = tmp_path / "boot"
    study.train("bootstrap.py", out, "--model", tiny_text_model, "--data", testbed, "--max-steps", "3",
                "--batch-size", "2")
    printed = capfd.readouterr().out
    assert [f"checkpoint: step {k} -> " in printed for k in (1, 2, 3)] == [True, True, True]
    assert (out / "model.safetensors").is_file()
    assert (study.run_folder(out) / "training_summary.json").is_file()
    assert not (study.run_folder(out) / study.CHECKPOINTS).exists()
    [line] = (tmp_path / study.STAGE_TIMES).read_text().splitlines()  # the stage's wall time, in the study folder
    timed = json.loads(line)
    assert (timed["stage"], timed["finished"]) == (f"bootstrap.py {out}", True) and timed["seconds"] > 0
    assert study.compute_hours(tmp_path) == (timed["seconds"] / 3600, 0)


def test_compute_hours_skips_a_line_cut_short_by_a_kill(tmp_path):
    (tmp_path / study.STAGE_TIMES).write_text('{"stage": "a", "seconds": 5400.0, "finished": false}\n{"stage": "b", "sec')
    assert study.compute_hours(tmp_path) == (1.5, 1)
    (tmp_path / study.STAGE_TIMES).write_text('{"stage": "a", "seconds": 5400.0, "finished": false}\n{"stage": "b", "sec')
    with pytest.raises(SystemExit):  # the next stage run's line is appended whole after the torn one is cut
        study.run([sys.executable, "collect.py", "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "c.jsonl"],
                  tmp_path)
    hours, stopped = study.compute_hours(tmp_path)
    assert stopped == 2 and hours > 1.5


def test_a_stage_stopped_by_a_signal_stops_the_study_as_stopped_not_failed(tmp_path, capfd):
    """A stage that checkpointed and exited STOPPED_EXIT (SIGTERM, Ctrl-C) is not a failure: the
    study exits with the same status, says to rerun, and its time is kept as a stopped run."""
    stage = [sys.executable, "-c", f"raise SystemExit({study.STOPPED_EXIT})", "--out", tmp_path / "x"]
    with pytest.raises(SystemExit) as stopped:
        study.run(stage, tmp_path)
    assert stopped.value.code == study.STOPPED_EXIT == 75
    assert "stopped; rerun the same command to resume" in capfd.readouterr().err
    assert study.compute_hours(tmp_path)[1] == 1


def test_a_failed_stage_keeps_its_time_and_stops_the_study(tmp_path):
    """A stopped stage's time counts in what the study cost; the next stage does not start."""
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(SystemExit, match="rerun the same command to resume"):
        study.run([sys.executable, "collect.py", "--sources", study.SOURCES, "--data", missing,
                   "--out", tmp_path / "collected.jsonl"], tmp_path)
    [timed] = [json.loads(line) for line in (tmp_path / study.STAGE_TIMES).read_text().splitlines()]
    assert (timed["stage"], timed["finished"]) == (f"collect.py {tmp_path / 'collected.jsonl'}", False)
    hours, stopped = study.compute_hours(tmp_path)
    assert (hours, stopped) == (timed["seconds"] / 3600, 1)
