"""Tests of answers.py: the tolerant parser on real-world-looking outputs, exact round trips,
distances, the vote and exact scores on hand-computed cases."""
import itertools
import random

import pytest

from common.answers import (CHANGE_CLASSES, CHANGE_FINDINGS, FINDINGS, POSITIVE_FINDINGS, answer_distance,
                     answer_line_start, format_answer, majority_vote, normalize, parse_answer, presence, score, task_of)


def present(text):
    """Parsed presence answer as the sorted list of present findings (None stays None)."""
    a = parse_answer(text)
    if a is None:
        return None
    assert task_of(a) == "presence", a
    assert set(a) == set(FINDINGS) and set(a.values()) <= {0, 1}
    assert a["No Finding"] == int(not any(a[f] for f in POSITIVE_FINDINGS))
    return sorted(f for f in FINDINGS if a[f])


def test_constants():
    assert len(FINDINGS) == 14 and FINDINGS[0] == "Atelectasis" and FINDINGS[-1] == "No Finding"
    assert FINDINGS[8] == "Pleural Effusion" and FINDINGS[12] == "Support Devices"
    assert CHANGE_FINDINGS == ("Consolidation", "Pleural Effusion", "Pneumonia", "Pneumothorax", "Edema")
    assert CHANGE_CLASSES == ("improving", "stable", "worsening")


PRESENCE_CASES = [
    # plain, case, punctuation
    ("Answer: Atelectasis, Pleural Effusion", ["Atelectasis", "Pleural Effusion"]),
    ("Answer: Effusion.", ["Pleural Effusion"]),
    ("answer: atelectasis, pleural effusions", ["Atelectasis", "Pleural Effusion"]),
    ("ANSWER: CARDIOMEGALY", ["Cardiomegaly"]),
    ("Answer: No Finding", ["No Finding"]),
    ("Answer - Edema", ["Edema"]),
    # markdown (GPT / Claude style)
    ("**Answer:** Cardiomegaly, PTX", ["Cardiomegaly", "Pneumothorax"]),
    ("**Final Answer**: enlarged heart and lines and tubes", ["Cardiomegaly", "Support Devices"]),
    ("- **Answer:** Atelectasis; Lung Opacity", ["Atelectasis", "Lung Opacity"]),
    ("### Final answer: `Pneumonia`", ["Pneumonia"]),
    ("> Answer: *Fracture*", ["Fracture"]),
    ("The final answer is: Edema", ["Edema"]),
    ("1. Answer: Fracture", ["Fracture"]),
    ("Final answer: \\boxed{Pneumothorax}", ["Pneumothorax"]),
    # answers spread over the following lines
    ("Reasoning here.\n\n### Final Answer\n\n- Atelectasis\n- Pleural effusion\n\n"
     "This is not medical advice.", ["Atelectasis", "Pleural Effusion"]),
    ("**Answer:**\n1. Consolidation\n2. Pneumonia\nNote: correlate clinically with a mass workup.",
     ["Consolidation", "Pneumonia"]),
    ("Answer: the findings are:\n* Edema\n* Cardiac enlargement", ["Cardiomegaly", "Edema"]),
    ("Answer:\n- Atelectasis: yes\n- Cardiomegaly: no\n- Pneumothorax: absent\n- Edema: present\n"
     "- Fracture: not seen", ["Atelectasis", "Edema"]),
    # synonyms
    ("Answer: cardiac enlargement, widened mediastinum", ["Cardiomegaly", "Enlarged Cardiomediastinum"]),
    ("Answer: pulmonary nodule, rib fracture, pleural thickening",
     ["Fracture", "Lung Lesion", "Pleural Other"]),
    ("Answer: ET tube and central line", ["Support Devices"]),
    ("Answer: airspace opacities, pulmonary oedema, PNA", ["Edema", "Lung Opacity", "Pneumonia"]),
    ("Answer: bibasilar atelectasis and small bilateral effusions", ["Atelectasis", "Pleural Effusion"]),
    ("Answer: Enlarged Cardiomediastinum, Lung Lesion, Pleural Other, Support Devices, Fracture",
     ["Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Pleural Other", "Support Devices"]),
    # normal
    ("Answer: Normal", ["No Finding"]),
    ("Answer: none", ["No Finding"]),
    ("Answer: No acute cardiopulmonary process.", ["No Finding"]),
    ("Answer: no acute findings", ["No Finding"]),
    ("Answer: Unremarkable chest radiograph", ["No Finding"]),
    # negations inside the answer are not positive calls; hedges are
    ("Answer: Cardiomegaly, no pneumothorax or effusion", ["Cardiomegaly"]),
    ("Answer: Cardiomegaly with no effusion", ["Cardiomegaly"]),
    ("Answer: Edema; negative for pneumothorax", ["Edema"]),
    ("Answer: no pneumothorax", ["No Finding"]),
    ("Answer: Pneumothorax: no", ["No Finding"]),
    ("Answer: Pneumonia cannot be excluded, lung opacity", ["Lung Opacity", "Pneumonia"]),
    ("Answer: possible consolidation but no effusion", ["Consolidation"]),
    ("Answer: No Finding, Support Devices", ["Support Devices"]),
    # text after the answer line, and justification clauses on it
    ("Answer: Support Devices, cardiac enlargement. Additional text about a mass.",
     ["Cardiomegaly", "Support Devices"]),
    ("Answer: Pleural Effusion because the costophrenic angle is blunted and there is an enlarged heart",
     ["Pleural Effusion"]),
    ("Answer: Edema\n\nDisclaimer: I am an AI and cannot replace a radiologist's reading of a mass.",
     ["Edema"]),
    # multiple answer lines: the last one wins
    ("Answer: Edema\nWait, let me reconsider.\nFinal answer: Normal", ["No Finding"]),
    ("Answer: No Finding\n...on second look the angle is blunted.\nAnswer: Effusion",
     ["Pleural Effusion"]),
]


@pytest.mark.parametrize("text,expected", PRESENCE_CASES)
def test_parse_presence(text, expected):
    assert present(text) == expected


@pytest.mark.parametrize("text", [
    "",
    None,
    "I'm sorry, but I can't provide a medical diagnosis from this image.",
    "As an AI, I cannot interpret radiographs. Please consult a radiologist.",
    "Answer: I am not able to determine this.",
    "Answer:",
    "The heart is enlarged and there is an effusion.",  # no answer line at all
    "Answer: Edema\nFinal answer: cannot say",            # the last line wins, even unreadable
])
def test_parse_none(text):
    assert parse_answer(text) is None


@pytest.mark.parametrize("text,expected", [
    ("Answer: Consolidation: worsening; Edema: stable", {"Consolidation": "worsening", "Edema": "stable"}),
    ("answer: improving consolidation, stable edema", {"Consolidation": "improving", "Edema": "stable"}),
    ("Answer: Consolidation, Edema: unchanged", {"Consolidation": "stable", "Edema": "stable"}),
    ("Answer: Pleural effusion - better; PTX worse",
     {"Pleural Effusion": "improving", "Pneumothorax": "worsening"}),
    ("**Answer:**\n* Consolidation — Improved\n* Edema: No change\n",
     {"Consolidation": "improving", "Edema": "stable"}),
    ("Answer: Pneumonia: worsened.", {"Pneumonia": "worsening"}),
    ("Answer: no progression of edema", {"Edema": "stable"}),
    ("Final Answer: Pleural Effusion: Stable; Pneumothorax: resolving",
     {"Pleural Effusion": "stable", "Pneumothorax": "improving"}),
])
def test_parse_change(text, expected):
    got = parse_answer(text)
    assert got == expected and task_of(got) == "change"


def test_presence_round_trip_exhaustive():
    # every one of the 2^13 presence answers, not a sample
    for bits in itertools.product((0, 1), repeat=len(POSITIVE_FINDINGS)):
        a = presence(f for f, b in zip(POSITIVE_FINDINGS, bits) if b)
        assert parse_answer(format_answer(a)) == a


def test_change_round_trip_exhaustive():
    for choice in itertools.product((None,) + CHANGE_CLASSES, repeat=len(CHANGE_FINDINGS)):
        a = {f: c for f, c in zip(CHANGE_FINDINGS, choice) if c}
        if a:
            assert parse_answer(format_answer(a)) == a


def test_round_trip_inside_text():
    rng = random.Random(0)
    for _ in range(300):
        a = presence(rng.sample(POSITIVE_FINDINGS, rng.randint(0, 4)))
        text = "Reasoning: the heart is enlarged, no effusion.\n\n" + format_answer(a) + "\n"
        assert parse_answer(text) == a


def test_answer_line_start():
    text = "Reasoning: no effusion.\r\nAnswer: Edema\nmore\n**Final answer:** Normal\nThanks."
    start = answer_line_start(text)
    assert text[start:].startswith("**Final answer:**")
    assert parse_answer(text[start:]) == parse_answer(text) == presence([])
    assert answer_line_start("Answer: Edema") == 0
    assert answer_line_start("no answer line") is None and answer_line_start("") is None
    bullets = "Thinking.\n### Answer\n- Edema\n- Effusion"
    assert bullets[answer_line_start(bullets):] == "### Answer\n- Edema\n- Effusion"


def test_format_answer():
    assert format_answer(presence(["Pleural Effusion", "Atelectasis"])) == "Answer: Atelectasis, Pleural Effusion"
    assert format_answer(presence([])) == "Answer: No Finding"
    assert format_answer({"Edema": 1}) == "Answer: Edema"                      # partial dicts allowed
    assert format_answer({"Edema": "stable", "Consolidation": "worsening"}) == \
        "Answer: Consolidation: worsening; Edema: stable"
    with pytest.raises(ValueError):
        format_answer({"Edema": "unsure"})
    with pytest.raises(ValueError):
        format_answer({"Fracture": "stable"})                                  # not a change finding
    with pytest.raises(ValueError):
        format_answer({"Heart": 1})


def test_task_of_and_normalize():
    assert task_of(presence(["Edema"])) == "presence"
    assert task_of({"Edema": "stable"}) == "change"
    n = normalize({"Edema": 1, "No Finding": 1})
    assert n["Edema"] == 1 and n["No Finding"] == 0 and len(n) == 14


def test_answer_distance():
    ref = presence(["Edema", "Cardiomegaly"])
    assert answer_distance(ref, ref) == 0.0
    assert answer_distance(None, ref) == 1.0
    # misses Edema: Edema differs; No Finding still 0 on both
    assert answer_distance(presence(["Cardiomegaly"]), ref) == pytest.approx(1 / 14)
    # says nothing: Edema, Cardiomegaly and No Finding differ
    assert answer_distance(presence([]), ref) == pytest.approx(3 / 14)
    cref = {"Consolidation": "worsening", "Edema": "stable"}
    assert answer_distance({"Consolidation": "worsening", "Edema": "improving"}, cref) == 0.5
    assert answer_distance({"Consolidation": "worsening"}, cref) == 0.5      # leaving one out departs
    assert answer_distance({"Consolidation": "worsening", "Edema": "stable", "Pneumonia": "stable"},
                           cref) == 0.0                                        # over b's findings
    assert answer_distance(ref, cref) == 1.0                                   # other task


def test_majority_vote_presence():
    a = presence(["Edema", "Cardiomegaly"])
    b = presence(["Edema"])
    c = presence(["Edema", "Fracture"])
    assert majority_vote([a, b, c, None]) == presence(["Edema"])
    # a 1-1 tie is absent (documented); None entries are not voters
    assert majority_vote([a, b, None, None]) == presence(["Edema"])
    assert majority_vote([a, b], min_share=0.4) == presence(["Edema", "Cardiomegaly"])
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    assert majority_vote([presence([]), presence([]), a]) == presence([])     # No Finding recomputed


def test_majority_vote_change():
    v = majority_vote([{"Edema": "stable", "Consolidation": "worsening"},
                       {"Edema": "improving", "Consolidation": "worsening"},
                       {"Edema": "improving"}, None])
    assert v == {"Consolidation": "worsening", "Edema": "improving"}
    # 1-1-1 tie → stable, then worsening, then improving
    assert majority_vote([{"Edema": "improving"}, {"Edema": "worsening"}, {"Edema": "stable"}]) == \
        {"Edema": "stable"}
    assert majority_vote([{"Edema": "improving"}, {"Edema": "worsening"}]) == {"Edema": "worsening"}
    # the majority task wins; the other task's answers are ignored
    assert majority_vote([{"Edema": "stable"}, {"Edema": "stable"}, presence(["Edema"])]) == \
        {"Edema": "stable"}


def test_score_presence_exact():
    labels = [presence(["Edema"]), presence(["Edema", "Cardiomegaly"]), presence([]), presence(["Cardiomegaly"])]
    preds = [presence(["Edema"]), presence(["Edema"]), presence(["Edema"]), None]
    s = score(preds, labels)
    assert s["task"] == "presence" and s["n"] == 4 and s["unparsed"] == 1
    e = s["per_finding"]["Edema"]
    # Edema: labels 1 1 0 0; preds 1 1 1 None → correct 2 (the None is wrong)
    assert e["accuracy"] == 0.5 and e["n"] == 4 and e["support"] == 2
    assert e["precision"] == pytest.approx(2 / 3) and e["recall"] == 1.0 and e["f1"] == pytest.approx(0.8)
    c = s["per_finding"]["Cardiomegaly"]
    # Cardiomegaly: labels 0 1 0 1; preds 0 0 0 None → correct 2; tp 0, fn 2 (the None is a miss)
    assert c["accuracy"] == 0.5 and c["support"] == 2
    assert c["precision"] == 0.0 and c["recall"] == 0.0 and c["f1"] == 0.0
    nf = s["per_finding"]["No Finding"]
    # No Finding: labels 0 0 1 0; preds 0 0 0 None → correct 2; support 1, tp 0
    assert nf["accuracy"] == 0.5 and nf["support"] == 1 and nf["f1"] == 0.0
    fx = s["per_finding"]["Fracture"]
    # Fracture: all labels 0; preds 0 0 0 None → 3/4; no support → not in macro f1
    assert fx["accuracy"] == 0.75 and fx["support"] == 0
    # macro accuracy: Edema, Cardiomegaly, No Finding 0.5 each, the other 11 findings 0.75
    assert s["macro"]["accuracy"] == pytest.approx((3 * 0.5 + 11 * 0.75) / 14)
    # macro f1 over findings with support: Edema 0.8, Cardiomegaly 0, No Finding 0
    assert s["macro"]["f1"] == pytest.approx(0.8 / 3)


def test_score_perfect_and_other_task_prediction():
    labels = [presence(["Fracture"]), presence([])]
    s = score(labels, labels)
    assert s["macro"]["accuracy"] == 1.0 and s["unparsed"] == 0
    assert s["macro"]["f1"] == 1.0                                      # Fracture and No Finding
    s = score([{"Edema": "stable"}, presence([])], labels)              # change answer → unparsed
    assert s["unparsed"] == 1 and s["per_finding"]["Fracture"]["accuracy"] == 0.5


def test_score_change_exact():
    labels = [{"Consolidation": "worsening", "Edema": "stable"}, {"Consolidation": "improving"},
              {"Edema": "worsening"}]
    preds = [{"Consolidation": "worsening", "Edema": "improving"}, {"Edema": "stable"}, None]
    s = score(preds, labels)
    assert s["task"] == "change" and s["unparsed"] == 1
    assert set(s["per_finding"]) == {"Consolidation", "Edema"}
    assert s["per_finding"]["Consolidation"] == {"accuracy": 0.5, "n": 2}
    assert s["per_finding"]["Edema"] == {"accuracy": 0.0, "n": 2}
    assert s["macro"]["accuracy"] == 0.25


def test_score_errors():
    with pytest.raises(ValueError):
        score([None], [])
    with pytest.raises(ValueError):
        score([], [])
    with pytest.raises(ValueError):
        score([None, None], [presence([]), {"Edema": "stable"}])
