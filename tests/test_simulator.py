"""Tests of the drift simulator: determinism, the truth in the prompts, drift along the stream,
the shared bias that beats the majority vote, parse-back, styles and user profiles."""
import json
import re
import statistics

import pytest

from common.answers import FINDINGS, POSITIVE_FINDINGS, format_answer, majority_vote, parse_answer, score
from common.simulator import (DISTRACTORS, PROFILES, SIGNS, Profile, load_profiles, make_instances, resolve,
                       simulate, simulate_detail)
from common import simulator

N_STREAM = 3000      # thirds of 1,000: the refuser's refusals alone move a third's accuracy by ~2 points
SEED = 0
SHARED_BIAS_FINDING = "Lung Opacity"


@pytest.fixture(scope="module")
def stream():
    """Every default profile on one presence stream: texts, intended and parsed answers."""
    recs = make_instances(N_STREAM, 0, SEED)
    out = {}
    for name, prof in PROFILES.items():
        texts, meant = [], []
        for i, r in enumerate(recs):
            t, m = simulate_detail(prof, r, i / (N_STREAM - 1), SEED)
            texts.append(t)
            meant.append(m)
        out[name] = {"texts": texts, "meant": meant, "parsed": [parse_answer(t) for t in texts]}
    return recs, out


def test_determinism():
    a, b = make_instances(50, 10, seed=3), make_instances(50, 10, seed=3)
    assert a == b
    c = make_instances(50, 10, seed=4)
    assert [r["prompt"] for r in a] != [r["prompt"] for r in c]
    assert len({r["id"] for r in a + c}) == 120                 # ids unique across seeds too
    for prof in PROFILES.values():
        t1 = [simulate(prof, r, i / 59, seed=7) for i, r in enumerate(a)]
        t2 = [simulate(prof, r, i / 59, seed=7) for i, r in enumerate(b)]
        t3 = [simulate(prof, r, i / 59, seed=8) for i, r in enumerate(a)]
        assert t1 == t2
        assert sum(x != y for x, y in zip(t1, t3)) > 30          # another seed, other texts


def test_records_shape_and_order():
    recs = make_instances(20, 5, seed=1)
    assert [r["split"] for r in recs] == ["train"] * 20 + ["test"] * 5
    for r in recs:
        assert set(r) == {"id", "split", "prompt", "system", "images", "labels"}
        assert r["images"] == [] and isinstance(r["system"], str)
        assert set(r["labels"]) == set(FINDINGS)
        assert r["prompt"].rstrip().endswith('"Answer: <findings, comma-separated, or No Finding>".')
        assert "step by step" in r["prompt"]
    with pytest.raises(ValueError):
        make_instances(5, 5, 0, task="segmentation")


def test_prompt_length_and_prevalence():
    recs = make_instances(1500, 0, seed=2)
    words = [len(r["prompt"].split()) for r in recs]
    assert 55 <= min(words) and max(words) <= 135 and 65 <= statistics.mean(words) <= 95
    prev = {f: sum(r["labels"][f] for r in recs) / len(recs) for f in FINDINGS}
    assert 0.25 <= prev["No Finding"] <= 0.5
    for common in ("Support Devices", "Pleural Effusion", "Cardiomegaly", "Lung Opacity", "Atelectasis"):
        assert 0.1 <= prev[common] <= 0.3, (common, prev[common])
    for rare in ("Fracture", "Pleural Other", "Lung Lesion"):
        assert 0.003 <= prev[rare] <= 0.05, (rare, prev[rare])
    # co-occurrence: edema raises the chance of cardiomegaly
    with_edema = [r for r in recs if r["labels"]["Edema"]]
    assert sum(r["labels"]["Cardiomegaly"] for r in with_edema) / len(with_edema) > prev["Cardiomegaly"] + 0.1


def test_signs_are_unambiguous():
    signs = [(f, s) for f, ss in SIGNS.items() for s in ss]
    assert set(SIGNS) == set(POSITIVE_FINDINGS) and all(len(ss) >= 3 for ss in SIGNS.values())
    others = [d for d, _ in DISTRACTORS] + simulator._EXAMS + simulator._INDICATIONS + \
        [simulator._QUESTION, simulator.SYSTEM]
    for f, s in signs:
        assert s == s.lower() or "Kerley" in s
        assert not any(s.lower() in o.lower() for o in others), s
        assert not any(s.lower() in t.lower() for g, t in signs if t != s), s


def test_finding_present_exactly_when_a_sign_is_described():
    recs = make_instances(1500, 200, seed=5)
    for r in recs:
        low = r["prompt"].lower()
        for f in POSITIVE_FINDINGS:
            described = any(s.lower() in low for s in SIGNS[f])
            assert described == bool(r["labels"][f]), (f, r["prompt"])
        assert r["labels"]["No Finding"] == int(not any(r["labels"][f] for f in POSITIVE_FINDINGS))


def test_at_least_seven_profiles_with_the_published_behaviours():
    assert len(PROFILES) >= 7
    assert {p.drift for p in PROFILES.values()} >= {"none", "sudden", "gradual", "recurring"}
    assert {"concise", "expansive", "refuser", "confuser", "sudden", "gradual", "recurring"} <= set(PROFILES)
    assert PROFILES["refuser"].refusal > 0.2 and PROFILES["confuser"].confusion > 0.3
    assert PROFILES["expansive"].overcall > 5 * PROFILES["concise"].overcall
    assert PROFILES["concise"].miss > 2 * PROFILES["expansive"].miss


def test_drift_weights():
    s, g, r = PROFILES["sudden"], PROFILES["gradual"], PROFILES["recurring"]
    assert [s.weight(x) for x in (0, 0.49, 0.5, 1)] == [0, 0, 1, 1]
    assert g.weight(0) == 0 and g.weight(0.5) == pytest.approx(0.5) and g.weight(1) == 1
    assert [r.weight(x) for x in (0.1, 0.3, 0.6, 0.9)] == [0, 1, 0, 1]   # the degraded concept recurs
    assert PROFILES["concise"].weight(0.9) == 0


def _acc(preds, labels):
    return score(preds, labels)["macro"]["accuracy"]


def test_drifters_drift_and_stable_profiles_do_not(stream):
    recs, out = stream
    labels = [r["labels"] for r in recs]
    k = len(recs) // 3
    for name, prof in PROFILES.items():
        p = out[name]["parsed"]
        first, last = _acc(p[:k], labels[:k]), _acc(p[-k:], labels[-k:])
        if prof.drift == "none":
            assert abs(first - last) <= 0.05, (name, first, last)
        else:
            assert abs(first - last) >= 0.10, (name, first, last)


def test_majority_vote_beats_the_average_source_but_not_on_the_shared_bias(stream):
    recs, out = stream
    labels = [r["labels"] for r in recs]
    names = list(PROFILES)
    vote = [majority_vote([out[n]["parsed"][i] for n in names]) for i in range(len(recs))]
    sv = score(vote, labels)
    per_source = [score(out[n]["parsed"], labels) for n in names]
    avg_macro = statistics.mean(s["macro"]["accuracy"] for s in per_source)
    assert sv["macro"]["accuracy"] > avg_macro + 0.05
    worse = []
    for f in FINDINGS:
        avg_f = statistics.mean(s["per_finding"][f]["accuracy"] for s in per_source)
        if sv["per_finding"][f]["accuracy"] < avg_f:
            worse.append(f)
    assert worse == [SHARED_BIAS_FINDING]


def test_trajectories_parse_back(stream):
    _, out = stream
    for name, o in out.items():
        answered = [(p, m) for p, m in zip(o["parsed"], o["meant"]) if m is not None]
        assert answered, name
        ok = sum(p == m for p, m in answered) / len(answered)
        assert ok >= 0.99, (name, ok)
        for t, m in zip(o["texts"], o["meant"]):
            if m is None:
                assert parse_answer(t) is None               # a refusal has no Answer line
    refusals = sum(m is None for m in out["refuser"]["meant"]) / N_STREAM
    assert 0.2 <= refusals <= 0.4
    assert all(m is not None for m in out["concise"]["meant"])


def test_styles_differ(stream):
    _, out = stream
    mean_len = {n: statistics.mean(len(t) for t in o["texts"]) for n, o in out.items()}
    bullets = {n: statistics.mean(bool(re.search(r"^\s*[-*] ", t, re.M)) for t in o["texts"])
               for n, o in out.items()}
    numbered = {n: statistics.mean(bool(re.search(r"^\d+\. ", t, re.M)) for t in o["texts"])
                for n, o in out.items()}
    assert max(mean_len.values()) > 3 * min(mean_len.values())
    assert mean_len["expansive"] > 2 * mean_len["concise"]
    assert bullets["confuser"] > 0.9 and bullets["expansive"] > 0.9 and bullets["concise"] == 0
    assert numbered["sudden"] > 0.9 and numbered["gradual"] == 0
    assert len({t.splitlines()[-1].split(":")[0] for t in out["expansive"]["texts"]}) >= 2   # answer heads vary


def test_hallucinated_evidence(stream):
    recs, out = stream
    hallucinated = 0
    for r, t in zip(recs, out["expansive"]["texts"]):
        low, prompt = t.lower(), r["prompt"].lower()
        hallucinated += any(s.lower() in low and s.lower() not in prompt for ss in SIGNS.values() for s in ss)
    assert hallucinated > 0.05 * len(recs)


def test_simulate_needs_labels_and_a_position():
    r = make_instances(1, 0, 0)[0]
    with pytest.raises(ValueError, match="labels"):
        simulate(PROFILES["concise"], {"id": "x", "prompt": r["prompt"]}, 0.0, 0)
    with pytest.raises(ValueError, match="position"):
        simulate(PROFILES["concise"], r, 1.5, 0)


def test_change_task():
    recs = make_instances(300, 50, seed=2, task="change")
    for r in recs:
        assert r["labels"] and all(v in ("improving", "stable", "worsening") for v in r["labels"].values())
        low = r["prompt"].lower()
        assert all(any(s.lower() in low for s in SIGNS[f]) for f in r["labels"])
    labels = [r["labels"] for r in recs]
    for prof in PROFILES.values():
        results = [simulate_detail(prof, r, i / 349, 0) for i, r in enumerate(recs)]
        parsed = [parse_answer(t) for t, _ in results]
        assert all(p == m for p, (_, m) in zip(parsed, results) if m is not None), prof.name
        assert 0.4 < score(parsed, labels)["macro"]["accuracy"] <= 1.0


def test_load_profiles_and_resolve(tmp_path):
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps([
        {"name": "my-noisy", "behaviour": "over-calls effusions", "style": "bullets", "miss": 0.2,
         "overcall_by": {"Pleural Effusion": 0.5}},
        {"name": "my-drifter", "drift": "sudden", "drift_at": 0.3, "drifted": {"miss": 0.9}},
    ]))
    user = load_profiles(str(path))
    assert list(user) == ["my-noisy", "my-drifter"]
    assert user["my-noisy"].overcall_by == {"Pleural Effusion": 0.5} and user["my-noisy"].style == "bullets"
    assert user["my-drifter"].at(0.5)["miss"] == 0.9 and user["my-drifter"].at(0.1)["miss"] == 0.1
    # object form {name: fields}
    path2 = tmp_path / "p2.json"
    path2.write_text(json.dumps({"terse-one": {"style": "terse", "miss": 0.5}}))
    assert load_profiles(str(path2))["terse-one"].miss == 0.5
    # user profiles simulate like the defaults
    r = make_instances(3, 0, 0)
    text, meant = simulate_detail(user["my-noisy"], r[0], 0.0, 0)
    assert parse_answer(text) == meant
    # resolve: all = defaults + the file's; names; unknown names
    assert [p.name for p in resolve(["all"])] == list(PROFILES)
    assert [p.name for p in resolve(["all"], str(path))] == list(PROFILES) + ["my-noisy", "my-drifter"]
    assert [p.name for p in resolve(["my-drifter", "concise", "concise"], str(path))] == ["my-drifter", "concise"]
    with pytest.raises(ValueError, match="unknown simulator profile 'nope'.*concise"):
        resolve(["nope"])


@pytest.mark.parametrize("entry,match", [
    ({"name": "x", "mis": 0.2}, "unknown field"),
    ({"name": "x", "miss": 1.5}, "miss must be a number"),
    ({"name": "x", "style": "haiku"}, "style"),
    ({"name": "x", "drift": "sideways"}, "drift"),
    ({"name": "x", "overcall_by": {"Heart": 0.2}}, "unknown finding"),
    ({"name": "x", "drifted": {"style": "terse"}}, "cannot drift"),
    ({"miss": 0.2}, "name"),
])
def test_load_profiles_errors(tmp_path, entry, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=match) as e:
        load_profiles(str(path))
    assert str(path) in str(e.value)


def test_load_profiles_bad_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"name": "x",,}]')
    with pytest.raises(ValueError, match=r"bad\.json:1: not valid JSON"):
        load_profiles(str(path))


def test_profile_dataclass_defaults():
    p = Profile("plain")
    assert p.drift == "none" and p.at(0.7)["miss"] == p.miss
    text, meant = simulate_detail(p, make_instances(1, 0, 9)[0], 0.2, 1)
    assert format_answer(meant).split(":")[0] == "Answer" and parse_answer(text) == meant
