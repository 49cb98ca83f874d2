"""Tests of consensus.py (stage 3): exact preferences in vote mode, the model and model+vote modes
with tiny real models (a random one, a scripted one whose answer is known, a VLM with an image), the
prompt (no labels, no source names, seeded order, proportional shortening), the drift simulator,
bad input, SIGKILL and resume, and two processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import answers
import collect
import consensus
from common import records
import tiny_models

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("src-alpha", "src-beta", "src-gamma")


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def instance(rec_id, texts, split="train", labels=None, prompt=None, **extra):
    rec = {"id": rec_id, "split": split, "prompt": prompt or f"Study {rec_id}: what does the film show?",
           "trajectories": [{"source": s, "text": t} for s, t in zip(SOURCES, texts)], **extra}
    if labels is not None:
        rec["labels"] = labels
    return rec


def run(*argv):
    consensus.main([str(a) for a in argv])


def env():
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def first_in_order(rec_id, candidates, n=3, seed=0):
    """Which of the candidate indices comes first in the instance's seeded shuffle."""
    return next(i for i in consensus.response_order(rec_id, n, seed) if i in candidates)


@pytest.fixture
def one_thread():
    """Generation in this process on one thread: on two shared cores, faster than two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The scripted model's sign of edema, quoted from the report of every instance it answers (a consensus
# that calls a finding on a text-only instance must quote its prompt). A carriage return ends its
# reasoning line: the generation prompt ends with the newline token, and a scripted chain cannot
# use one token twice.
EDEMA_SIGN = "Kerley lines at the base"
EDEMA_CONSENSUS = EDEMA_SIGN + ".\rAnswer: Edema"


def edema_report(rec_id):
    return f"Study {rec_id}: {EDEMA_SIGN}. What does the film show?"


@pytest.fixture(scope="module")
def edema_model(tmp_path_factory):
    """A tiny Qwen2 whose greedy answer to every prompt is EDEMA_CONSENSUS."""
    return str(tiny_models.build_scripted_model(tmp_path_factory.mktemp("scripted") / "edema", EDEMA_CONSENSUS))


# ---------------------------------------------------------------------------------------------
# The pieces, exactly


def test_response_order_is_seeded_per_instance():
    ids = [f"case-{i}" for i in range(20)]
    orders = [consensus.response_order(i, 5, seed=0) for i in ids]
    assert orders == [consensus.response_order(i, 5, seed=0) for i in ids]  # same seed, same order
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert len({tuple(o) for o in orders}) > 5  # varies across instances
    assert orders != [consensus.response_order(i, 5, seed=1) for i in ids]  # and with the seed
    assert {o[0] for o in orders} == set(range(5))  # no position is reserved for anyone
    assert [consensus.response_label(i) for i in (0, 1, 25, 26, 27)] == ["A", "B", "Z", "AA", "AB"]


# the defects before "ungrounded", on an instance with an image (where the evidence is not in the text)
@pytest.mark.parametrize("text, ended, defect", [
    ("Kerley lines and fluid.\nAnswer: Edema", True, None),
    ("Kerley lines and fluid.\n**Answer:** Edema\n\n", True, None),
    ("Kerley lines and fluid.\nAnswer: Edema", False, "cut"),  # stopped by --max-new-tokens
    ("Kerley lines and fluid, so edema is likely.", True, "no-answer"),
    ("Response B is right about the Kerley lines.\nAnswer: Edema", True, "echo"),
    ("As responses A and C say, fluid.\nAnswer: Edema", True, "echo"),
    ("Answer: Edema\nAnswer: Edema", True, "answers"),
    ("Fluid.\nAnswer: Edema\nEdema is seen in heart failure.", True, "answer-not-last"),
    # a sentence said four times is a loop; three times the most verbose source may write itself
    ("Fluid. To be thorough, I re-checked the bones and the hila. " * 4 + "\nAnswer: Edema", True, "repeats"),
    ("Fluid. To be thorough, I re-checked the bones and the hila. " * 3 + "\nAnswer: Edema", True, None),
    ("- A fracture points to a pneumothorax.\n* a fracture points to a pneumothorax.\n"
     "3. A fracture  points to a pneumothorax.\n4) A fracture points to a pneumothorax.\nAnswer: Pneumothorax",
     True, "repeats"),  # list marks, case and spacing aside
])
def test_consensus_defect(text, ended, defect):
    assert consensus.consensus_defect(text, ended, {"prompt": "Study x: what does the film show?",
                                                    "images": ["img/cxr.png"]}) == defect


REPORT = ("PA and lateral chest radiographs. Indication: cough. Findings: There is blunting of the costophrenic "
          "angle on the left. The heart size is enlarged. No lines or tubes are present.\n"
          "Question: Which of these findings are present: Atelectasis, Cardiomegaly, Consolidation, Edema, "
          "Enlarged Cardiomediastinum, Fracture, Lung Lesion, Lung Opacity, Pleural Effusion, Pneumonia, "
          "Pneumothorax, Pleural Other, Support Devices, or No Finding?")
# a kept model consensus of the confirmatory study: reasoning that names no sign, then findings
FILLER = ("**Reasoning**\n- To be thorough, I re-checked the bones and the hila.\n"
          "- To be thorough, I re-checked the mediastinum and the cardiac borders.\n\n")
CALLS = "**Final answer:** Cardiomegaly, Edema, Lung Opacity, Pleural Effusion"
CHANGE_REPORT = ("Single frontal view of the chest, compared with the prior study. Indication: dyspnea. Findings: "
                 "A blunted costophrenic angle is unchanged in extent.\nQuestion: For Pleural Effusion, is each "
                 "improving, stable or worsening compared with the prior study?")


@pytest.mark.parametrize("text, prompt, images, defect", [
    (FILLER + CALLS, REPORT, [], "ungrounded"),
    ("**Reasoning**\n- There is blunting of the costophrenic angle.\n\n" + CALLS, REPORT, [], None),
    ("Blunting of the Costophrenic angle!\nAnswer: Pleural Effusion", REPORT, [], None),  # case, punctuation aside
    (FILLER + "**Final answer:** No Finding", REPORT, [], None),  # no finding needs no evidence
    (FILLER + "**Final answer:** normal", REPORT, [], None),
    (FILLER + CALLS, REPORT, ["img/cxr.png"], None),  # a VLM's evidence is in the image
    # the finding names alone are in the question: one shared word is no evidence
    ("Cardiomegaly and effusion.\nAnswer: Cardiomegaly, Pleural Effusion", REPORT, [], "ungrounded"),
    ("Answer: Cardiomegaly", REPORT, [], "ungrounded"),
    # a change class is a call too, "stable" included
    (FILLER + "Answer: Pleural Effusion: stable", CHANGE_REPORT, [], "ungrounded"),
    ("The blunted costophrenic angle is unchanged.\nAnswer: Pleural Effusion: stable", CHANGE_REPORT, [], None),
    # a defect found before keeps its label
    (FILLER + CALLS + "\nThat is all.", REPORT, [], "answer-not-last"),
])
def test_ungrounded_consensus(text, prompt, images, defect):
    assert consensus.consensus_defect(text, True, {"prompt": prompt, "images": images}) == defect


def test_an_ungrounded_consensus_falls_back_to_the_vote(tmp_path):
    sources = ["There is blunting of the costophrenic angle.\nAnswer: Pleural Effusion",
               "The heart size is enlarged, blunting of the costophrenic angle.\n"
               "Answer: Cardiomegaly, Pleural Effusion",
               "No lines or tubes are present.\nAnswer: No Finding"]
    record = instance("u1", sources, prompt=REPORT, images=[])
    consensus.prepare_instances([record], seed=0)
    filler = FILLER + CALLS
    for mode in ("model", "model+vote"):
        assert consensus.choose(record, (filler, True), mode, 0.5) == (
            sources[0], answers.parse_answer(sources[0]), 0, "vote:ungrounded")
    args = consensus.parse_args(["--model", "unused", "--consensus", "model+vote", "--data", str(tmp_path / "d.jsonl"),
                                 "--out", str(tmp_path / "p.jsonl")])
    assert consensus.settle(record, (filler, True), args) == {
        "id": "u1", "prompt": REPORT, "system": None, "images": [], "chosen": sources[0],
        "rejected": sources[1:], "rejected_sources": list(SOURCES[1:]), "drift": [1 / 14, 2 / 14],
        "labels": None, "consensus_by": "vote:ungrounded"}
    grounded = "**Reasoning**\n- There is blunting of the costophrenic angle.\n\n**Final answer:** Pleural Effusion"
    assert consensus.choose(record, (grounded, True), "model+vote", 0.5)[3] == "model"


def test_the_concise_source_quotes_its_prompt(tmp_path):
    """The evidence gate rejects little of what the best simulated source writes: of the concise
    source's answers that call a finding on a sim:all stream (collect.py), at least 85% pass the
    whole gate. Not all: the concise source keeps at most two sentences of reasoning, so a call whose
    evidence sentence came later has none left, and its rare over-calls ("A fracture cannot be
    entirely excluded.") quote nothing. 85% leaves room below the 0.89 to 0.94 of simulator seeds
    0 to 5 at this size (the confirmatory study's 128 train instances: 63 of 67)."""
    out = tmp_path / "collected.jsonl"
    collect.main(["--sources", "sim:all", "--n-train", "300", "--n-test", "1", "--out", str(out), "--seed", "0"])
    clean = []
    for record in records.load_instances(out, require_trajectories=True):
        for traj in record["trajectories"]:
            answer = answers.parse_answer(traj["text"])
            if traj["source"] == "concise" and answer is not None and consensus.calls_a_finding(answer):
                clean.append(consensus.consensus_defect(traj["text"], True, record) is None)
    assert len(clean) > 100 and sum(clean) / len(clean) >= 0.85, (sum(clean), len(clean))


def test_no_simulated_source_repeats_a_sentence_four_times():
    """The repeats gate never rejects a text any source of the simulator would write."""
    from common import simulator

    records_ = simulator.make_instances(300, 0, seed=11)
    for i, record in enumerate(records_):
        for profile in simulator.PROFILES.values():
            text = simulator.simulate(profile, record, i / 299, seed=11)
            assert consensus.most_repeats(text) <= consensus.MAX_REPEATS, (profile.name, text)


def test_majority_support_exact():
    ans = answers.parse_answer
    edema, card, both, none = ans("Answer: Edema"), ans("Answer: Cardiomegaly"), ans("Answer: Edema, Cardiomegaly"), None
    # Edema present: 3 of 3 agree; Cardiomegaly absent: 2 of 3; No Finding 0: 3 of 3 -> 2/3
    assert consensus.majority_support(edema, [edema, both, edema]) == pytest.approx(2 / 3)
    # Edema: 2 of 3 (both, edema); Cardiomegaly absent: 1 of 3 -> the weakest finding decides
    assert consensus.majority_support(edema, [edema, both, card]) == pytest.approx(1 / 3)
    assert consensus.majority_support(edema, [card, card, edema]) == pytest.approx(1 / 3)
    # unparsed answers are left out: the shares are of the parsed ones
    assert consensus.majority_support(edema, [edema, none, none]) == 1.0
    assert consensus.majority_support(edema, [none, none]) == 0.0
    change = ans("Answer: Edema: worsening; Pneumonia: stable")
    votes = [ans("Answer: Edema: worsening"), ans("Answer: Edema: worsening; Pneumonia: stable"),
             ans("Answer: Edema: improving; Pneumonia: stable")]
    # Edema worsening: 2/3; Pneumonia stable: 2/3 (the first names no Pneumonia)
    assert consensus.majority_support(change, votes) == pytest.approx(2 / 3)
    assert consensus.majority_support(change, [edema, edema]) == 0.0  # the other task backs nothing


def test_shortening_is_proportional_and_keeps_every_answer_line(tiny_text_model):
    from common import modeling

    tok = modeling.tokenizer_of(modeling.load_processor(tiny_text_model))
    texts = [("The film shows the left base. " * n) + f"\nAnswer: {a}"
             for n, a in ((60, "Pleural Effusion"), (20, "Edema"), (120, "No Finding"))]
    texts.append("No answer line here, only reasoning about the cardiac silhouette. " * 30)

    def count(t):
        return len(tok(t, add_special_tokens=False)["input_ids"])

    def build(ts):
        return "\n#####\n".join(ts)

    full = count(build(texts))
    prompt, cut = consensus.fit_prompt(build, count, texts, full, tok)
    assert (prompt, cut) == (build(texts), False)

    budget = full // 3
    prompt, cut = consensus.fit_prompt(build, count, texts, budget, tok)
    assert cut and count(prompt) <= budget
    parts = prompt.split("\n#####\n")
    assert len(parts) == 4
    for original, part in zip(texts, parts):
        start = answers.answer_line_start(original)
        if start is not None:
            assert part.endswith(original[start:])  # the answer line, whole
            assert answers.parse_answer(part) == answers.parse_answer(original)
        assert consensus.CUT_MARK in part and part.startswith(original[:10])
    kept = [count(consensus.split_answer(p)[0]) / count(consensus.split_answer(t)[0]) for p, t in zip(parts, texts)]
    assert max(kept) - min(kept) < 0.1  # one fraction for all (within token rounding)

    answer_lines = build([t[answers.answer_line_start(t):] for t in texts[:3]])
    assert consensus.fit_prompt(build, count, texts[:3], count(answer_lines) - 1, tok) == (None, True)


# ---------------------------------------------------------------------------------------------
# Vote mode: exact preferences


VOTE_DATA = [
    instance("v1", ["Fluid at the left base.\nAnswer: Pleural Effusion",
                    "Blunted angle, some collapse.\nAnswer: Pleural Effusion, Atelectasis",
                    "The heart is big.\nAnswer: Cardiomegaly"], labels={"Pleural Effusion": 1}),
    instance("v2", ["Interstitial markings.\nAnswer: Edema", "Kerley lines.\nAnswer: Edema",
                    "I cannot interpret medical images."], labels={"Edema": 1}),
    instance("v3", ["Clear lungs.\nAnswer: No Finding", "Nothing acute.\nAnswer: No Finding",
                    "Normal heart.\nAnswer: No Finding"], labels={"No Finding": 1}),
    {"id": "v4", "split": "train", "prompt": "Study v4?", "trajectories": [{"source": "src-alpha", "text": "  "}]},
    instance("v5", ["I cannot help.", "Please ask a doctor.", "No comment."]),
    instance("t1", ["Answer: Edema", "Answer: Edema", "Answer: Edema"], split="test"),
]


def expected_vote_records(negatives):
    def rec(rec_id, chosen_i, rejected, labels):
        texts = {r["id"]: r for r in VOTE_DATA}[rec_id]["trajectories"]
        rejected = [(i, d) for i, d in rejected if negatives == "all" or d > 0]
        return {"id": rec_id, "prompt": f"Study {rec_id}: what does the film show?", "system": None, "images": [],
                "chosen": texts[chosen_i]["text"], "rejected": [texts[i]["text"] for i, _ in rejected],
                "rejected_sources": [SOURCES[i] for i, _ in rejected], "drift": [d for _, d in rejected],
                "labels": labels, "consensus_by": "vote"}

    v2 = first_in_order("v2", {0, 1})  # a tie at distance 0: the instance's shuffled order decides
    v3 = first_in_order("v3", {0, 1, 2})
    out = [rec("v1", 0, [(1, 1 / 14), (2, 2 / 14)], {"Pleural Effusion": 1}),
           rec("v2", v2, [(1 - v2, 0.0), (2, 1.0)], {"Edema": 1})]
    if negatives == "all":
        out.append(rec("v3", v3, [(i, 0.0) for i in range(3) if i != v3], {"No Finding": 1}))
    return out


@pytest.mark.parametrize("negatives", ["all", "drifting"])
def test_vote_mode_exact_records_skips_and_summary(tmp_path, capsys, negatives):
    data = write_jsonl(tmp_path / "traj.jsonl", VOTE_DATA)
    out = tmp_path / "prefs.jsonl"
    run("--consensus", "vote", "--negatives", negatives, "--data", data, "--out", out, "--summary", tmp_path / "s.json")
    written = read_jsonl(out)
    assert written == expected_vote_records(negatives)
    assert [r["id"] for r in records.load_preferences(out)] == [r["id"] for r in written]
    for r in written:
        assert r["chosen"] not in r["rejected"]  # the vote's pick is never also a negative

    skips = read_jsonl(tmp_path / "prefs.skipped.jsonl")
    expect_skips = [{"id": "v4", "reason": "no trajectories"}]
    if negatives == "drifting":
        expect_skips.append({"id": "v3", "reason": "no negatives"})
    expect_skips.append({"id": "v5", "reason": "no answer to vote on"})
    assert sorted(skips, key=lambda s: s["id"]) == sorted(expect_skips, key=lambda s: s["id"])

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["written"] == len(written)
    assert summary["skipped"] == {"no trajectories": 1, "prompt too long": 0, "no answer to vote on": 1,
                                  "no negatives": int(negatives == "drifting")}
    for name, s in summary["sources"].items():
        assert s["negative"] == sum(name in r["rejected_sources"] for r in written)
    if negatives == "all":
        # drift of every trajectory from the chosen answer, over the written instances
        assert summary["sources"]["src-alpha"]["mean_drift"] == 0.0
        assert summary["sources"]["src-beta"]["mean_drift"] == pytest.approx((1 / 14) / 3)
        assert summary["sources"]["src-gamma"]["mean_drift"] == pytest.approx((2 / 14 + 1.0) / 3)
        acc = {name: s["accuracy"]["presence"] for name, s in summary["sources"].items()}
        assert acc == pytest.approx({"src-alpha": 1.0, "src-beta": (13 + 2 / 3) / 14,
                                     "src-gamma": (2 / 3 + 12 * 2 / 3) / 14})
        assert summary["consensus_accuracy"] == {"presence": 1.0}
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1].startswith(f"consensus (vote, negatives {negatives}): {len(written)} "
                                                      "preferences written")
    assert "1 no trajectories" in printed and "1 no answer to vote on" in printed


def test_vote_on_drift_simulator_beats_every_source(tmp_path):
    simulator = pytest.importorskip("common.simulator")
    stream = simulator.make_instances(150, 0, seed=5)
    for i, rec in enumerate(stream):
        rec["trajectories"] = [{"source": f"sim:{name}", "text": simulator.simulate(p, rec, i / (len(stream) - 1), seed=5)}
                               for name, p in simulator.PROFILES.items()]
    data = write_jsonl(tmp_path / "sim.jsonl", stream)
    for negatives in ("all", "drifting"):
        out = tmp_path / negatives / "prefs.jsonl"
        run("--consensus", "vote", "--negatives", negatives, "--data", data, "--out", out,
            "--summary", tmp_path / negatives / "s.json")
        summary = json.loads((tmp_path / negatives / "s.json").read_text())
        prefs = records.load_preferences(out)
        assert summary["written"] + sum(summary["skipped"].values()) == 150
        for p in prefs:
            assert p["chosen"] not in p["rejected"] and all(0 <= d <= 1 for d in p["drift"])
            if negatives == "drifting":
                assert all(d > 0 for d in p["drift"])
    best = max(s["accuracy"]["presence"] for s in summary["sources"].values())
    assert len(summary["sources"]) == len(simulator.PROFILES) >= 7
    assert summary["consensus_accuracy"]["presence"] >= best
    # the refuser often gives no answer: the furthest from the consensus on average
    drift = {name: s["mean_drift"] for name, s in summary["sources"].items()}
    assert max(drift, key=drift.get) == "sim:refuser"


# ---------------------------------------------------------------------------------------------
# Model modes with tiny real models


SECRET_LABELS = {"Fracture": 1}  # no question and no trajectory below mentions a fracture


def model_data(tmp_path, long_reasoning=0):
    rows = [instance(f"m{i}", [f"Region {i} looks {w}.\nAnswer: {a}" for w, a in
                               (("hazy", "Pleural Effusion"), ("dense", "Edema"), ("clear", "No Finding"))],
                     labels=SECRET_LABELS, system="You are a careful radiologist.") for i in range(3)]
    if long_reasoning:
        rows[1]["trajectories"] = [{"source": s, "text": "The left base is dense and hazy. " * long_reasoning * (k + 1)
                                    + f"\nAnswer: {a}"} for k, (s, a) in enumerate(zip(SOURCES, ("Edema", "Edema", "Atelectasis")))]
    rows.append(instance("test-0", ["Answer: Edema"] * 3, split="test", labels=SECRET_LABELS))
    return write_jsonl(tmp_path / "data" / "traj.jsonl", rows), rows


def test_model_mode_prompt_has_no_labels_no_sources_and_shortens(tmp_path, tiny_text_model, one_thread):
    data, rows = model_data(tmp_path, long_reasoning=40)
    out, prompts = tmp_path / "out" / "prefs.jsonl", tmp_path / "prompts.jsonl"
    budget = 1200
    run("--model", tiny_text_model, "--consensus", "model", "--data", data, "--out", out, "--max-new-tokens", 4,
        "--max-prompt-tokens", budget, "--save-prompts", prompts, "--summary", tmp_path / "s.json", "--seed", 3)
    saved = read_jsonl(prompts)
    assert [p["id"] for p in saved] == ["m0", "m1", "m2"]  # train only
    for p, rec in zip(saved, rows):
        text = p["prompt"]
        assert p["tokens"] <= budget
        assert rec["prompt"] in text and "You are a careful radiologist." in text
        for word in ("Fracture", "fracture", json.dumps(SECRET_LABELS), *SOURCES, "src-"):
            assert word not in text
        order = consensus.response_order(rec["id"], 3, seed=3)
        for label, i in zip("ABC", order):
            body = rec["trajectories"][i]["text"]
            answer = body[answers.answer_line_start(body):]
            block = text.split(f"Response {label}:\n", 1)[1]
            assert block.split("\n\nResponse ")[0].split("\n\nNow write")[0].endswith(answer)
            if not p["shortened"]:
                assert block.startswith(body)
    assert [p["shortened"] for p in saved] == [False, True, False]

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["shortened"] == 1 and summary["written"] == 3
    # the random model never ends within the budget (nor writes an Answer line): every instance
    # falls back to the vote, counted under the first defect found
    assert summary["consensus_by"] == {"vote:cut": 3}
    prefs = records.load_preferences(out)
    assert [p["id"] for p in prefs] == ["m0", "m1", "m2"]
    for p, rec in zip(prefs, rows):
        assert set(p) - {"_line"} == {"id", "prompt", "system", "images", "chosen", "rejected", "rejected_sources",
                                      "drift", "labels", "consensus_by"}
        assert p["labels"] == SECRET_LABELS and p["prompt"] == rec["prompt"] and p["system"] == rec["system"]
        assert len(p["rejected"]) == len(p["rejected_sources"]) == len(p["drift"]) >= 1


def test_model_and_model_vote_with_a_scripted_model(tmp_path, edema_model):
    rows = [
        # backed: Edema 2/3, Atelectasis absent 2/3, No Finding 0 2/3 -> support 2/3 >= 0.5, kept
        instance("k1", ["Kerley lines.\nAnswer: Edema", "Edema and collapse.\nAnswer: Edema, Atelectasis",
                        "Clear.\nAnswer: No Finding"], prompt=edema_report("k1")),
        # overruled: 2 of 3 say Cardiomegaly, the model says absent -> support 1/3: the vote's pick
        instance("k2", ["Big heart.\nAnswer: Cardiomegaly", "Wide heart.\nAnswer: Cardiomegaly",
                        "Wet lungs.\nAnswer: Edema"], prompt=edema_report("k2")),
        instance("k3", ["I cannot help.", "Ask a doctor.", "No comment."],  # nothing to check against
                 prompt=edema_report("k3")),
        # the report does not name the model's sign: its consensus is ungrounded
        instance("k4", ["Wet.\nAnswer: Edema", "Fluid.\nAnswer: Edema", "Lines.\nAnswer: Edema"]),
    ]
    data = write_jsonl(tmp_path / "traj.jsonl", rows)
    texts = {r["id"]: [t["text"] for t in r["trajectories"]] for r in rows}

    out = tmp_path / "mv.jsonl"
    run("--model", edema_model, "--consensus", "model+vote", "--negatives", "drifting", "--data", data,
        "--out", out, "--max-new-tokens", 32, "--batch-size", 3, "--summary", tmp_path / "mv.json")
    k2 = first_in_order("k2", {0, 1})
    assert read_jsonl(out) == [
        {"id": "k1", "prompt": rows[0]["prompt"], "system": None, "images": [], "chosen": EDEMA_CONSENSUS,
         "rejected": texts["k1"][1:], "rejected_sources": list(SOURCES[1:]), "drift": [1 / 14, 2 / 14],
         "labels": None, "consensus_by": "model"},
        {"id": "k2", "prompt": rows[1]["prompt"], "system": None, "images": [], "chosen": texts["k2"][k2],
         "rejected": [texts["k2"][2]], "rejected_sources": [SOURCES[2]], "drift": [2 / 14], "labels": None,
         "consensus_by": "vote:disagreed"},
    ]
    summary = json.loads((tmp_path / "mv.json").read_text())
    assert summary["consensus_by"] == {"model": 1, "vote:disagreed": 1}
    assert summary["skipped"] == {"no trajectories": 0, "prompt too long": 0, "no answer to vote on": 1,
                                  "no negatives": 1}
    assert read_jsonl(tmp_path / "mv.skipped.jsonl") == [{"id": "k3", "reason": "no answer to vote on"},
                                                       {"id": "k4", "reason": "no negatives"}]

    # the paper's mode keeps every clean consensus, and rejects every source
    out = tmp_path / "m.jsonl"
    run("--model", edema_model, "--consensus", "model", "--data", data, "--out", out, "--max-new-tokens", 32,
        "--summary", tmp_path / "m.json")
    prefs = read_jsonl(out)
    k4 = first_in_order("k4", {0, 1, 2})
    assert [(p["id"], p["chosen"], p["consensus_by"]) for p in prefs] == [
        *((k, EDEMA_CONSENSUS, "model") for k in ("k1", "k2", "k3")), ("k4", texts["k4"][k4], "vote:ungrounded")]
    assert [p["drift"] for p in prefs] == [[0.0, 1 / 14, 2 / 14], [2 / 14, 2 / 14, 0.0], [1.0] * 3, [0.0] * 2]
    assert [p["rejected"] for p in prefs] == [texts["k1"], texts["k2"], texts["k3"],
                                              [t for i, t in enumerate(texts["k4"]) if i != k4]]
    assert json.loads((tmp_path / "m.json").read_text())["consensus_by"] == {"model": 3, "vote:ungrounded": 1}
    assert not (tmp_path / "m.skipped.jsonl").exists()

    # a consensus cut by the token budget is never the positive
    out = tmp_path / "cut.jsonl"
    run("--model", edema_model, "--consensus", "model", "--data", data, "--out", out, "--max-new-tokens", 2,
        "--summary", tmp_path / "cut.json")
    assert json.loads((tmp_path / "cut.json").read_text())["consensus_by"] == {"vote:cut": 3}
    assert all(p["chosen"] in texts[p["id"]] for p in read_jsonl(out))


def test_vl_model_with_an_image_and_output_elsewhere(tmp_path, tiny_vl_model, one_thread):
    (tmp_path / "data" / "img").mkdir(parents=True)
    tiny_models.write_test_image(tmp_path / "data" / "img" / "cxr.png")
    rows = [instance("x1", ["The film is hazy. " * 40 + "\nAnswer: Edema", "Clear.\nAnswer: No Finding",
                            "Hazy.\nAnswer: Edema"], images=["img/cxr.png"], labels={"Edema": 1})]
    data = write_jsonl(tmp_path / "data" / "traj.jsonl", rows)
    out, prompts = tmp_path / "elsewhere" / "deep" / "prefs.jsonl", tmp_path / "prompts.jsonl"
    run("--model", tiny_vl_model, "--data", data, "--out", out, "--max-new-tokens", 4, "--max-prompt-tokens", 800,
        "--save-prompts", prompts)
    saved = read_jsonl(prompts)[0]
    assert saved["shortened"] and saved["tokens"] <= 800
    assert "<|vision_start|><|image_pad|><|vision_end|>" in saved["prompt"]  # the image, once, before the text
    from common import modeling  # the count includes the image's tokens as the processor expands them

    processor = modeling.load_processor(tiny_vl_model)
    expanded = processor(text=[saved["prompt"]], images=modeling.load_images(rows[0], data), return_tensors="pt")
    assert saved["tokens"] == expanded["input_ids"].shape[1]
    prefs = records.load_preferences(out)  # checks that the image path resolves from the output's folder
    assert prefs[0]["images"] == [os.path.join("..", "..", "data", "img", "cxr.png")]
    assert prefs[0]["labels"] == {"Edema": 1}


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_names_file_line_and_field(tmp_path, capsys):
    good = json.dumps(instance("a", ["Answer: Edema"] * 3))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + '{"id": "b", "prompt": "q", "trajectories": [\n')
    proc = subprocess.run([sys.executable, "consensus.py", "--consensus", "vote", "--data", bad, "--out",
                           tmp_path / "p.jsonl"], cwd=REPO, env=env(), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {bad}:2: malformed JSON") and "Traceback" not in proc.stderr

    cases = {
        "missing.jsonl": ({"id": "a", "prompt": "q"}, "missing.jsonl:1: field 'trajectories': missing"),
        "testonly.jsonl": (instance("a", ["Answer: Edema"], split="test"), "field 'split': no instance of split train"),
        "badtraj.jsonl": ({"id": "a", "prompt": "q", "trajectories": [{"source": "x"}]},
                          "badtraj.jsonl:1: field 'trajectories[0]'"),
    }
    for name, (row, message) in cases.items():
        with pytest.raises(SystemExit) as e:
            run("--consensus", "vote", "--data", write_jsonl(tmp_path / name, [row]), "--out", tmp_path / "p.jsonl")
        assert e.value.code == 2 and message in capsys.readouterr().err

    data = write_jsonl(tmp_path / "ok.jsonl", [instance("a", ["A.\nAnswer: Edema", "B.\nAnswer: Edema"])])
    template = tmp_path / "prompt.txt"
    template.write_text("Question: {question}\nNo trajectories here.")
    with pytest.raises(SystemExit) as e:
        run("--model", "unused", "--data", data, "--out", tmp_path / "p.jsonl", "--prompt-file", template)
    assert e.value.code == 2 and "prompt.txt: the prompt must contain {responses}" in capsys.readouterr().err

    stale = write_jsonl(tmp_path / "stale.jsonl", [{"id": "from-another-run", "chosen": "x"}])
    with pytest.raises(SystemExit) as e:
        run("--consensus", "vote", "--data", data, "--out", stale)
    assert e.value.code == 2 and "stale.jsonl: exists and was not written by consensus.py" in capsys.readouterr().err

    with pytest.raises(SystemExit) as e:  # every instance skipped: the next stage would have nothing
        run("--consensus", "vote", "--negatives", "drifting", "--data", data, "--out", tmp_path / "none.jsonl")
    assert e.value.code == 2 and "no preference written" in capsys.readouterr().err


@pytest.mark.parametrize("row, field, message", [
    # used to crash in the accuracy summary after every preference was written
    (instance("a", ["Answer: Edema"] * 3, labels={"Edemaa": 1}), "labels", "unknown finding 'Edemaa'"),
    # a source answering twice used to count twice in the vote
    (dict(instance("a", ["Answer: Edema", "Answer: Cardiomegaly", "Answer: Cardiomegaly"]),
          trajectories=[{"source": s, "text": t} for s, t in
                        [("src-alpha", "Answer: Edema"), ("src-beta", "Answer: Cardiomegaly"), ("src-alpha", "Answer: Edema")]]),
     "trajectories[2].source", "duplicate source 'src-alpha' (also trajectories[0])"),
    (instance("a", ["Answer: Edema"] * 3, score=float("nan")), "score", "NaN is not valid JSON"),
])
def test_bad_labels_a_source_twice_or_nan_are_refused_before_any_output(tmp_path, capsys, row, field, message):
    data = write_jsonl(tmp_path / "traj.jsonl", [instance("z", ["Answer: Edema"] * 3, labels={"Edema": 1}), row])
    out = tmp_path / "p.jsonl"
    with pytest.raises(SystemExit) as e:
        run("--consensus", "vote", "--data", data, "--out", out, "--summary", tmp_path / "summary.json")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {data}:2: field '{field}': {message}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["traj.jsonl"]


def test_prompt_file_replaces_the_prompt(tmp_path, edema_model):
    data = write_jsonl(tmp_path / "traj.jsonl", [instance("a", ["A {responses}.\nAnswer: Edema", "B.\nAnswer: Cardiomegaly"])])
    template = tmp_path / "prompt.txt"
    template.write_text("Q={question}\n{responses}\nEnd with {answer_format}.")
    run("--model", edema_model, "--data", data, "--out", tmp_path / "p.jsonl", "--prompt-file", template,
        "--save-prompts", tmp_path / "prompts.jsonl", "--max-new-tokens", 8, "--seed", 1)
    text = read_jsonl(tmp_path / "prompts.jsonl")[0]["prompt"]
    first, second = consensus.response_order("a", 2, seed=1)
    texts = ["A {responses}.\nAnswer: Edema", "B.\nAnswer: Cardiomegaly"]
    body = (f"Q=Study a: what does the film show?\nResponse A:\n{texts[first]}\n\nResponse B:\n{texts[second]}\n"
            f"End with {consensus.ANSWER_FORMATS['presence']}.")
    assert body in text  # braces inside a response are left alone


# ---------------------------------------------------------------------------------------------
# Interruption and processes


def many_instances(n):
    choices = ("Pleural Effusion", "Edema", "Cardiomegaly", "No Finding")
    return [instance(f"r{i:02d}", [f"Region {i * 3 + k} first.\nAnswer: {choices[(i + k * k) % 4]}" for k in range(3)],
                     prompt=edema_report(f"r{i:02d}")) for i in range(n)]


def test_sigkill_then_the_same_command_resumes(tmp_path, tiny_text_model, one_thread):
    data = write_jsonl(tmp_path / "traj.jsonl", many_instances(8))
    args = ["--model", tiny_text_model, "--data", data, "--max-new-tokens", 24, "--batch-size", 2]
    run(*args, "--out", tmp_path / "ref" / "prefs.jsonl")
    reference = (tmp_path / "ref" / "prefs.jsonl").read_bytes()

    out = tmp_path / "run" / "prefs.jsonl"
    cmd = [sys.executable, "consensus.py", *map(str, args), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # a guard against a hang, not a timing
    while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    partial = out.read_bytes()
    assert 2 <= partial.count(b"\n") < 8
    with open(out, "ab") as f:  # as if killed in the middle of a line
        f.write(b'{"id": "r07", "prompt": "tor')

    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "8 preferences written" in done.stdout
    assert out.read_bytes() == reference


def test_two_processes_split_and_gather_each_instance_once(tmp_path, edema_model):
    data = write_jsonl(tmp_path / "traj.jsonl", many_instances(5))
    args = ["--model", edema_model, "--data", str(data), "--max-new-tokens", "32", "--batch-size", "2"]
    run(*args, "--out", tmp_path / "one" / "prefs.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "consensus.py", *args,
           "--out", str(tmp_path / "two" / "prefs.jsonl"), "--summary", str(tmp_path / "two" / "s.json")]
    # accelerate launch runs torch.distributed.run the same way on GPUs; ACCELERATE_USE_CPU makes it gloo here
    proc = subprocess.run(cmd, cwd=REPO, env=dict(env(), ACCELERATE_USE_CPU="true"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "s.json").read_text())["processes"] == 2
    assert proc.stdout.count("preferences written") == 1  # one summary, from the main process
    two = (tmp_path / "two" / "prefs.jsonl").read_bytes()
    assert two == (tmp_path / "one" / "prefs.jsonl").read_bytes()
    assert [p["consensus_by"] for p in records.load_preferences(tmp_path / "two" / "prefs.jsonl")] == ["model"] * 5


# ---------------------------------------------------------------------------------------------
# Resume tied to what decides the output; outputs never over inputs; one writer per output


def refused(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        run(*argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_a_rerun_with_other_settings_or_data_is_refused_not_mixed(tmp_path, capsys):
    data = write_jsonl(tmp_path / "traj.jsonl", many_instances(12))
    out = tmp_path / "prefs.jsonl"
    run("--consensus", "vote", "--data", data, "--out", out)
    before = out.read_bytes()
    assert json.loads((tmp_path / "prefs.jsonl.run.json").read_text())["run"]["negatives"] == "all"

    err = refused(capsys, "--consensus", "vote", "--negatives", "drifting", "--data", data, "--out", out)
    assert "was written with other settings (negatives: 'all' -> 'drifting')" in err
    assert "seed: 0 -> 1" in refused(capsys, "--consensus", "vote", "--seed", 1, "--data", data, "--out", out)
    # the same ids, other trajectories: a resume would keep the stale chosen texts
    changed = many_instances(12)
    changed[3]["trajectories"][0]["text"] = "Something else.\nAnswer: Edema"
    write_jsonl(data, changed)
    assert "train_sha256: " in refused(capsys, "--consensus", "vote", "--data", data, "--out", out)
    assert out.read_bytes() == before

    write_jsonl(data, many_instances(12))  # back to the original: the same command is a no-op resume
    run("--consensus", "vote", "--data", data, "--out", out)
    assert out.read_bytes() == before


def test_model_settings_are_part_of_the_run(tmp_path, capsys, tiny_text_model, one_thread):
    data = write_jsonl(tmp_path / "traj.jsonl", many_instances(2))
    args = ["--model", tiny_text_model, "--data", data, "--out", tmp_path / "prefs.jsonl", "--batch-size", 2]
    run(*args, "--max-new-tokens", 4)
    assert "max_new_tokens: 4 -> 5" in refused(capsys, *args, "--max-new-tokens", 5)
    assert "temperature: 0.0 -> 0.7" in refused(capsys, *args, "--max-new-tokens", 4, "--temperature", 0.7)


def test_out_over_the_input_or_in_the_model_folder_is_refused_untouched(tmp_path, capsys, tiny_text_model):
    rows = many_instances(3)
    data = tmp_path / "traj.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))  # no final newline: a torn tail to a JsonlAppender
    before = data.read_bytes()
    err = refused(capsys, "--consensus", "vote", "--data", data, "--out", data)
    assert "is also the input --data" in err and data.read_bytes() == before

    model_files = sorted(p.name for p in Path(tiny_text_model).iterdir())
    err = refused(capsys, "--model", tiny_text_model, "--data", data, "--out", Path(tiny_text_model) / "prefs.jsonl")
    assert "lies in the model folder --model" in err
    assert sorted(p.name for p in Path(tiny_text_model).iterdir()) == model_files

    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"mine": 1}\n')
    err = refused(capsys, "--consensus", "vote", "--data", data, "--out", foreign)
    assert "exists and was not written by consensus.py" in err and foreign.read_text() == '{"mine": 1}\n'


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path, capsys):
    import fcntl

    data = write_jsonl(tmp_path / "traj.jsonl", many_instances(3))
    out = tmp_path / "prefs.jsonl"
    with open(tmp_path / "prefs.jsonl.lock", "a") as held:  # what a running consensus.py holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = refused(capsys, "--consensus", "vote", "--data", data, "--out", out)
    assert "another consensus.py is writing this output" in err and not out.exists()
    run("--consensus", "vote", "--data", data, "--out", out)  # released: the same command runs
    assert len(read_jsonl(out)) == 3
