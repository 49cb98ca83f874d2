"""Tests of study.py's pieces: the validation split, the preference variants, the statistics.

The whole study runs end to end in CI (`python study.py --size smoke`, .ci/run); these check that
what it reports is computed right.
"""

import json

import numpy as np
import pytest

import answers
import collect
import consensus
import records
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


def test_validation_is_the_last_slice_of_the_train_stream(simulated, tmp_path):
    study.carve_validation(simulated, tmp_path / "data.jsonl", 4)
    before = [r for _, r in records.read_jsonl(simulated)]
    after = [r for _, r in records.read_jsonl(tmp_path / "data.jsonl")]
    assert [r["id"] for r in after] == [r["id"] for r in before]  # stream order kept
    assert [r["split"] for r in after] == ["train"] * 8 + ["val"] * 4 + ["test"] * 6
    assert all(a == dict(b, split=a["split"]) for a, b in zip(after, before))  # nothing else changed
    # the training stages read train only: consensus on this file never sees a val instance
    consensus.main(["--consensus", "vote", "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "p.jsonl")])
    assert {p["id"] for _, p in records.read_jsonl(tmp_path / "p.jsonl")} <= {r["id"] for r in after[:8]}


def test_drifting_variant_equals_consensus_drifting(simulated, tmp_path):
    data = tmp_path / "data.jsonl"
    study.carve_validation(simulated, data, 2)
    for which in ("all", "drifting"):
        consensus.main(["--consensus", "vote", "--negatives", which, "--data", str(data),
                        "--out", str(tmp_path / f"{which}.jsonl")])
    kept = study.drifting_only(tmp_path / "all.jsonl", tmp_path / "derived.jsonl")
    derived = [p for _, p in records.read_jsonl(tmp_path / "derived.jsonl")]
    direct = [p for _, p in records.read_jsonl(tmp_path / "drifting.jsonl")]
    assert derived == direct and kept == len(direct)
    assert all(d > 0 for p in derived for d in p["drift"])
    # and the SFT file holds exactly the chosen texts, one trajectory per instance
    n = study.consensus_as_trajectories(tmp_path / "drifting.jsonl", tmp_path / "sft.jsonl")
    sft = records.load_instances(tmp_path / "sft.jsonl", require_trajectories=True)
    assert n == len(direct) and [r["trajectories"] for r in sft] == [[{"source": "consensus", "text": p["chosen"]}]
                                                                      for p in direct]


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


def test_paired_interval_exact_cases():
    rng = np.random.default_rng(0)
    a = (rng.random((40, 14)) > 0.3).astype(float)
    idx = study.resample_indices(40, 2000, seed=1)
    assert study.paired_difference(a, a, idx) == (0.0, (0.0, 0.0))  # a model against itself
    b = a.copy()
    b[:, 0] = 1 - b[:, 0]  # b flips one finding on every instance
    diff, (lo, hi) = study.paired_difference(a, b, idx)
    assert diff == pytest.approx((a[:, 0].mean() - b[:, 0].mean()) / 14, abs=1e-12)
    assert lo <= diff <= hi and lo < hi
    # a constant per-instance gap has no spread at all
    c = a.copy()
    c[:, 1] = 0.0
    d = c.copy()
    d[:, 1] = 1.0
    assert study.paired_difference(d, c, idx) == (pytest.approx(1 / 14), (pytest.approx(1 / 14), pytest.approx(1 / 14)))


def test_stream_windows_split_in_order():
    m = np.zeros((10, 14))
    m[5:] = 1.0
    assert study.stream_windows(m, 2) == [0.0, 1.0]
