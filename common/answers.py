"""Findings, the tolerant `Answer:` parser, answer formatting, agreement and scoring.

Pure Python on purpose: the simulator, the consensus vote, collect.py and evaluate.py all import
it, and none of them should pay for torch to read an answer line.

Two answer shapes exist (DESIGN, "Answers and labels"):

* presence (MIMIC-CXR 14 findings): ``{finding: 0 | 1}`` over ALL of ``FINDINGS``;
  "No Finding" is 1 exactly when no other finding is 1.
  Line: ``Answer: Atelectasis, Pleural Effusion`` or ``Answer: No Finding``.
* change (MS-CXR-T): ``{finding: "improving" | "stable" | "worsening"}`` for the findings named
  (a subset of ``CHANGE_FINDINGS``).
  Line: ``Answer: Consolidation: worsening; Edema: stable``.

Labels use the same shapes, so ``score(predictions, labels)`` compares like with like.
"""
from __future__ import annotations

import re
from typing import Iterable

FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "Pleural Effusion", "Pneumonia", "Pneumothorax",
    "Pleural Other", "Support Devices", "No Finding",
)
NO_FINDING = "No Finding"
# The 13 findings that can be present; No Finding is derived from them.
POSITIVE_FINDINGS = tuple(f for f in FINDINGS if f != NO_FINDING)
CHANGE_FINDINGS = ("Consolidation", "Pleural Effusion", "Pneumonia", "Pneumothorax", "Edema")
CHANGE_CLASSES = ("improving", "stable", "worsening")

__all__ = [
    "FINDINGS", "NO_FINDING", "POSITIVE_FINDINGS", "CHANGE_FINDINGS", "CHANGE_CLASSES",
    "parse_answer", "answer_line_start", "format_answer", "task_of", "normalize", "presence", "answer_distance",
    "majority_vote", "score",
]

# ---------------------------------------------------------------------------------------------
# Vocabulary. Order matters: longer / more specific phrases come first, and every match is
# replaced by a marker so that e.g. "lung opacity" is not read again as "opacity", or
# "enlarged cardiomediastinum" as "enlarged ...".
_W = r"(?<![a-z0-9])"          # word start that also works next to our \x00 markers
_E = r"(?![a-z0-9])"           # word end
_SYNONYMS: list[tuple[str, str]] = [
    ("Pleural Other", r"pleural[ _-]other|other pleural (?:abnormalit(?:y|ies)|findings?)|"
                      r"pleural (?:thickening|plaques?|scarring|calcifications?|abnormalit(?:y|ies))|"
                      r"fibrothorax"),
    ("Enlarged Cardiomediastinum",
     r"enlarged[ _-]cardiomediastinum|cardiomediastinal (?:enlargement|widening)|"
     r"(?:enlarged|widened) cardiomediastinal (?:silhouette|contours?)|"
     r"(?:widened|enlarged|wide) mediastinum|mediastinal (?:widening|enlargement)"),
    ("Cardiomegaly", r"cardiomegaly|cardiac enlargement|heart enlargement|"
                     r"enlarged (?:heart|cardiac (?:silhouette|shadow|size))|"
                     r"enlargement of the (?:heart|cardiac silhouette)|heart is enlarged"),
    ("Support Devices",
     r"support(?:ing)?[ _-]devices?|lines?\s*(?:and|&|/|,)\s*tubes?|tubes?\s*(?:and|&|/|,)\s*lines?|"
     r"(?:endotracheal|et|ng|og|nasogastric|orogastric|enteric|feeding|chest|tracheostomy) tubes?|"
     r"(?:central(?: venous)?|picc|venous|arterial|midline|dialysis) (?:lines?|catheters?)|"
     r"picc|catheters?|pacemakers?|pacers?|a?icds?|defibrillators?|(?:ecg|ekg) leads|"
     r"medical devices?|devices?"),
    ("Pleural Effusion", r"pleural[ _-]effusions?|effusions?|hydrothorax|pleural fluid"),
    ("Pneumothorax", r"pneumothora(?:x|ces)|ptx|pnx"),
    ("Lung Opacity", r"(?:lung|pulmonary|airspace|air-space|parenchymal|basilar|hazy)[ _-]opacit(?:y|ies)|"
                     r"opacit(?:y|ies)|opacification|infiltrates?"),
    ("Lung Lesion", r"(?:lung|pulmonary)[ _-](?:lesions?|nodules?|mass(?:es)?)|"
                    r"nodules?|mass(?:es)?|lesions?|tumou?rs?"),
    ("Consolidation", r"consolidations?|consolidative"),
    ("Pneumonia", r"pneumonias?|pna|pneumonic"),
    ("Atelectasis", r"atelectas[ie]s|atelectatic|collapse|volume loss"),
    ("Edema", r"(?:pulmonary |interstitial |alveolar )?o?edema|(?:pulmonary )?vascular congestion|"
              r"fluid overload"),
    ("Fracture", r"fractures?|fx"),
]
# Phrases that mean "nothing abnormal" wherever they appear.
_NO_FINDING_RE = re.compile(
    _W + r"(?:no[ _-]findings?|no (?:acute |significant |active |other |radiographic )*"
    r"(?:cardiopulmonary |intrathoracic |thoracic )?(?:findings?|abnormalit(?:y|ies)|disease|"
    r"process|pathology)|normal (?:study|chest|exam(?:ination)?|radiograph|chest radiograph|"
    r"chest x-?ray|cxr|findings)|unremarkable(?: study| chest(?: x-?ray| radiograph)?)?|"
    r"within normal limits|none of the (?:above|listed findings|findings))" + _E)
# Single words that mean "nothing abnormal" only when they are the whole item ("Answer: None").
_NO_FINDING_ALONE = re.compile(r"^(?:none|normal|nothing|negative|nil|no|clear|healthy)$")
_SYN_RE = [(f, re.compile(_W + r"(?:" + p + r")" + _E)) for f, p in _SYNONYMS]

# Hedges must read as present ("pneumonia cannot be excluded" is a positive call), so they are
# neutralised before the negation cues below could fire on "not"/"excluded".
_HEDGE_RE = re.compile(
    r"can(?:not|'t| not)\s+(?:be\s+)?(?:excluded|exclude|ruled out|rule out|rule it out)|"
    r"not\s+(?:be\s+)?(?:excluded|ruled out)|may not be excluded")
_PREFIX_NEG_RE = re.compile(
    _W + r"(?:no|not|without|negative for|free of|absence of|rules? out|ruled out|"
    r"excluding|excludes?|denies|neither|nor)" + _E)
_POSTFIX_NEG_RE = re.compile(
    _W + r"(?:absent|not (?:seen|present|identified|visible|detected|noted|evident|found|"
    r"appreciated)|ruled out|excluded|negative(?! for)|none|unlikely)" + _E)
# Short verdicts only count at the end of an item ("Pneumothorax: no"), never mid-item where
# "no" starts a new negated mention ("Cardiomegaly with no effusion").
_END_NEG_RE = re.compile(r"[\s:=(\-]+(?:no|false|0|n)\W*$")

_CHANGE_WORDS: list[tuple[str, str]] = [
    # "no change" before anything else so its "no" never reads as a negation.
    ("stable", r"no (?:significant |interval )?change|not changed|stable|unchanged|stationary|"
               r"no progression"),
    ("improving", r"improv(?:ing|ed|ement|es)|better|resolv(?:ing|ed|es)|resolution|"
                  r"decreas(?:ing|ed|e|es)|regress(?:ing|ed|ion|es)|reduc(?:ing|ed|tion)|"
                  r"lessening|diminish(?:ing|ed)|clearing"),
    ("worsening", r"worsen(?:ing|ed|s)?|worse|increas(?:ing|ed|e|es)|progress(?:ing|ed|ion|ive|es)|"
                  r"deteriorat(?:ing|ed|ion|es)|enlarging"),
]
_CHANGE_RE = [(c, re.compile(_W + r"(?:" + p + r")" + _E)) for c, p in _CHANGE_WORDS]
_ANY_CHANGE_RE = re.compile(_W + r"(?:" + "|".join(p for _, p in _CHANGE_WORDS) + r")" + _E)

_ANSWER_LINE_RE = re.compile(
    r"^(?:(?:my|the|our)\s+)?(?:final\s+)?answer(?:\s+is)?\s*[*_]*\s*(?:\([^)]*\)\s*)?[*_]*\s*"
    r"(?:[:：=\-–—]|$)\s*[*_]*\s*(.*)$", re.IGNORECASE)
_LEAD_RE = re.compile(r"^[\s>#*_+•·‣◦\-]*(?:\(?\d{1,2}[.)]\s+|\(?[a-z][.)]\s+)?[\s*_]*")
_BULLET_RE = re.compile(r"^\s*(?:[-*+•·‣◦]|\(?\d{1,2}[.)])\s+")
# Where an answer line stops being the answer: end of sentence or a
# justification clause (whose evidence words would otherwise be read as extra findings).
_CUT_RE = re.compile(
    r"\.(?:\s|$)|\s(?:because|since|due to|based on|as evidenced|as seen|"
    r"as shown|as indicated|given (?:that|the)|which|indicating|suggesting|with confidence)\b",
    re.IGNORECASE)


def _clean(text: str) -> str:
    text = text.replace("’", "'").replace("‘", "'")
    text = re.sub(r"\\boxed\{([^}]*)\}", r"\1", text)
    text = re.sub(r"[*`~]|__", "", text)
    return text


def _cut(text: str) -> str:
    m = _CUT_RE.search(text)
    return text[:m.start()] if m else text


def _answer_block(text: str) -> list[str] | None:
    """The content of the LAST answer line, as a list of item lines (following lines included
    when the answer line itself is only a heading), or None when there is no answer line."""
    lines = text.splitlines()
    found = _last_answer_line(lines)
    if found is not None:
        i, m = found
        rest = _cut(_clean(m.group(1)).strip())
        if _has_content(rest):
            return [rest]
        # "Answer:" / "### Final answer" / "Answer: the findings are:" followed by the items.
        block, bulleted = [], None
        for line in lines[i + 1:i + 25]:
            if not line.strip():
                if block:
                    break
                continue
            is_bullet = bool(_BULLET_RE.match(line))
            if bulleted is None:
                bulleted = is_bullet
            elif bulleted and not is_bullet:
                break  # prose after the bullet list (disclaimers, notes) is not the answer
            block.append(_cut(_clean(_LEAD_RE.sub("", line.strip()))))
        return block if block else [rest]
    return None


def _last_answer_line(lines: list[str]):
    """(index, match) of the last line that is an answer line, or None."""
    for i in range(len(lines) - 1, -1, -1):
        m = _ANSWER_LINE_RE.match(_LEAD_RE.sub("", lines[i].strip()))
        if m:
            return i, m
    return None


def answer_line_start(text: str) -> int | None:
    """Character offset where the last answer line (the one parse_answer reads) begins, or None.
    text[offset:] is the answer part, text[:offset] the reasoning."""
    if not text:
        return None
    lines = text.splitlines(keepends=True)
    found = _last_answer_line([l.rstrip("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029") for l in lines])
    return None if found is None else sum(len(l) for l in lines[:found[0]])


def _has_content(text: str) -> bool:
    low = text.lower()
    if _NO_FINDING_RE.search(low) or _NO_FINDING_ALONE.match(low.strip(" .!:;,")):
        return True
    return any(r.search(low) for _, r in _SYN_RE)


def _mark(text: str) -> tuple[str, list[str]]:
    """Replace every finding mention by a marker \\x00<k>\\x00; returns the text and the findings."""
    found: list[str] = []

    def repl(m):
        found.append(current)
        return f" \x00{len(found) - 1}\x00 "

    for current, rx in _SYN_RE:
        if rx.search(text):          # most findings are absent from a given item: search is cheap
            text = rx.sub(repl, text)
    return text, found


_MARK_RE = re.compile(r"\x00(\d+)\x00")
_SEGMENT_SPLIT_RE = re.compile(r"[,;\n]|\s(?:but|however|although|whereas|while)\s|\.\s")


def _parse_change(items: list[str]) -> dict | None:
    result: dict[str, str] = {}
    for item in items:
        for part in re.split(r"[;\n]", item.lower()):
            pending: list[str] = []   # findings waiting for a class ("Consolidation, Edema: stable")
            for sub in part.split(","):
                marked, found = _mark(sub)
                # classes are consumed in turn too, so "no progression" is one stable, not also
                # a worsening
                for c, rx in _CHANGE_RE:
                    marked = rx.sub(f" \x01{CHANGE_CLASSES.index(c)}\x01 ", marked)
                classes = [(m.start(), CHANGE_CLASSES[int(m.group(1))])
                           for m in re.finditer(r"\x01(\d)\x01", marked)]
                mentions = [(m.start(), found[int(m.group(1))]) for m in _MARK_RE.finditer(marked)]
                mentions = [(p, f) for p, f in mentions if f in CHANGE_FINDINGS]
                if not classes:
                    pending.extend(f for _, f in mentions)
                    continue
                for pos, finding in mentions:
                    after = [c for p, c in classes if p > pos]
                    result[finding] = after[0] if after else classes[-1][1]
                for finding in pending:
                    result[finding] = classes[0][1]
                pending = []
    return result or None


def _parse_presence(items: list[str]) -> dict | None:
    present: set[str] = set()
    recognised = False
    for item in items:
        low = _HEDGE_RE.sub(" possible ", item.lower())
        for seg in _SEGMENT_SPLIT_RE.split(low):
            if _NO_FINDING_RE.search(seg):
                recognised = True
                seg = _NO_FINDING_RE.sub(" ", seg)
            marked, found = _mark(seg)
            mentions = [(m.start(), m.end(), found[int(m.group(1))]) for m in _MARK_RE.finditer(marked)]
            if not mentions:
                if _NO_FINDING_ALONE.match(seg.strip(" .!:;-()[]")):
                    recognised = True
                continue
            recognised = True
            prefix = [m.start() for m in _PREFIX_NEG_RE.finditer(marked)]
            postfix = [m.start() for m in _POSTFIX_NEG_RE.finditer(marked)]
            end_neg = _END_NEG_RE.search(marked)
            if end_neg:
                postfix.append(end_neg.start())
            for start, end, finding in mentions:
                if any(p < start for p in prefix) or any(p >= end for p in postfix):
                    continue
                present.add(finding)
    return presence(present) if recognised else None


def parse_answer(text: str | None) -> dict | None:
    """Parse the LAST `Answer:` line of a model output.

    Returns a presence dict over all 14 findings, a change dict {finding: class}, or None when
    there is no answer line or nothing recognisable in it. Tolerates case, markdown, bullets,
    "Final answer:", answers listed on the following bullet lines, text after the answer,
    synonyms ("effusion", "enlarged heart", "PTX", "lines and tubes", "normal") and negations
    ("no pneumothorax" is not a positive call; "cannot be excluded" is).
    """
    if not text:
        return None
    items = _answer_block(text)
    if items is None:
        return None
    items = [i for i in items if i.strip()]
    if not items:
        return None
    # A change answer needs a change finding and a class word in the same item; anything else
    # is read as presence (so "Answer: increased opacity" stays a presence answer).
    change = _parse_change(items) if any(_ANY_CHANGE_RE.search(i.lower()) for i in items) else None
    if change:
        return normalize(change)
    return _parse_presence(items)


def presence(found: Iterable[str]) -> dict:
    """Presence dict over all 14 findings from the names of the present ones."""
    found = set(found)
    unknown = found - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown finding(s) {sorted(unknown)}; expected names from {FINDINGS}")
    out = {f: int(f in found) for f in POSITIVE_FINDINGS}
    out[NO_FINDING] = int(not any(out.values()))
    return out


def task_of(answer_or_labels: dict) -> str:
    """"change" when the values are change classes, else "presence" (an empty dict is presence)."""
    if answer_or_labels is None:
        raise ValueError("task_of(None): no answer")
    if any(isinstance(v, str) for v in answer_or_labels.values()):
        return "change"
    return "presence"


def normalize(answer: dict) -> dict:
    """Validated canonical form: presence → all 14 findings as 0/1 with No Finding recomputed
    (missing findings are absent); change → {finding: class} in CHANGE_FINDINGS order."""
    if task_of(answer) == "change":
        out = {}
        for f, c in answer.items():
            if f not in CHANGE_FINDINGS:
                raise ValueError(f"{f!r} is not a change finding; expected one of {CHANGE_FINDINGS}")
            if c not in CHANGE_CLASSES:
                raise ValueError(f"{f}: {c!r} is not a change class; expected one of {CHANGE_CLASSES}")
        for f in CHANGE_FINDINGS:
            if f in answer:
                out[f] = answer[f]
        return out
    for f, v in answer.items():
        if f not in FINDINGS:
            raise ValueError(f"unknown finding {f!r}; expected names from {FINDINGS}")
        if v not in (0, 1, True, False):
            raise ValueError(f"{f}: presence value must be 0 or 1, got {v!r}")
    return presence(f for f in POSITIVE_FINDINGS if answer.get(f))


def format_answer(answer: dict) -> str:
    """The canonical answer line: "Answer: Atelectasis, Pleural Effusion", "Answer: No Finding",
    "Answer: Consolidation: worsening; Edema: stable"."""
    a = normalize(answer)
    if task_of(answer) == "change":
        if not a:
            raise ValueError("a change answer needs at least one finding")
        return "Answer: " + "; ".join(f"{f}: {c}" for f, c in a.items())
    present = [f for f in POSITIVE_FINDINGS if a[f]]
    return "Answer: " + (", ".join(present) if present else NO_FINDING)


def answer_distance(a: dict | None, b: dict) -> float:
    """Share of findings on which `a` departs from the reference `b` (e.g. the consensus), in
    [0, 1]. Presence: over the 14 findings. Change: over b's findings (one a leaves out counts as
    a departure). 1.0 when a is None or of the other task."""
    if a is None or task_of(a) != task_of(b):
        return 1.0
    a, b = normalize(a), normalize(b)
    keys = list(b) if task_of(b) == "change" else list(FINDINGS)
    if not keys:
        return 0.0
    return sum(a.get(k) != b[k] for k in keys) / len(keys)


def majority_vote(answers: list[dict | None], min_share: float = 0.5) -> dict | None:
    """Per-finding vote among the parsed answers (None entries are left out); None if none parsed.

    Task: the one most parsed answers have (a tie goes to presence); answers of the other task are
    ignored. Presence: a finding is present when MORE than `min_share` of the parsed answers call
    it present, so an exact tie (half/half with the default 0.5) is absent: most findings are
    absent most of the time, and absent is the conservative call. No Finding is recomputed from
    the other 13. Change: a finding is kept when at least `min_share` of the change answers name
    it; its class is the plurality class, a tie going to the first in "stable", "worsening",
    "improving" (stable is the most frequent class in MS-CXR-T and the least committal).
    """
    parsed = [normalize(a) for a in answers if a is not None]
    if not parsed:
        return None
    change = [a for a in parsed if task_of(a) == "change" and a]
    pres = [a for a in parsed if task_of(a) == "presence"]
    if len(change) > len(pres):
        n = len(change)
        out = {}
        for f in CHANGE_FINDINGS:
            votes = [a[f] for a in change if f in a]
            if not votes or len(votes) / n < min_share:
                continue
            out[f] = max(("stable", "worsening", "improving"), key=lambda c: votes.count(c))
        if out:
            return out
        # nobody's finding reached min_share: fall back to the most named one's plurality
        named = max(CHANGE_FINDINGS, key=lambda f: sum(f in a for a in change))
        votes = [a[named] for a in change if named in a]
        return {named: max(("stable", "worsening", "improving"), key=votes.count)}
    n = len(pres)
    return presence(f for f in POSITIVE_FINDINGS if sum(a[f] for a in pres) / n > min_share)


def score(predictions: list[dict | None], labels: list[dict]) -> dict:
    """Per-finding and macro scores of predictions against labels (all labels of one task).

    Returns {"task", "n", "unparsed", "per_finding": {f: {...}}, "macro": {...}}.
    Presence: every one of the 14 findings gets accuracy, n, support (positive labels),
    precision, recall and f1; macro accuracy averages the 14, macro f1 averages the findings with
    support > 0 (an F1 with no positive label is undefined, not zero). Change: the findings named
    by the labels get accuracy and n (the instances whose labels name them); macro accuracy
    averages them.
    A None prediction (unparsed, or of the other task) is wrong on every finding for accuracy —
    including those whose label is absent — and counts as a miss (false negative) for recall but
    not as a false positive: it claimed nothing. Precision with no positive prediction is 0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("score() needs at least one label")
    tasks = {task_of(l) for l in labels}
    if len(tasks) > 1:
        raise ValueError("labels mix presence and change tasks; score each task separately")
    task = tasks.pop()
    labels = [normalize(l) for l in labels]
    preds = []
    for p in predictions:
        preds.append(normalize(p) if p is not None and task_of(p) == task else None)
    unparsed = sum(p is None for p in preds)
    per: dict[str, dict] = {}
    if task == "presence":
        for f in FINDINGS:
            correct = tp = fp = fn = 0
            for p, l in zip(preds, labels):
                if p is None:
                    fn += l[f]
                    continue
                correct += p[f] == l[f]
                tp += p[f] and l[f]
                fp += p[f] and not l[f]
                fn += l[f] and not p[f]
            prec = tp / (tp + fp) if tp + fp else 0.0
            rec = tp / (tp + fn) if tp + fn else 0.0
            f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
            per[f] = {"accuracy": correct / len(labels), "n": len(labels), "support": tp + fn,
                      "precision": prec, "recall": rec, "f1": f1}
        supported = [per[f]["f1"] for f in FINDINGS if per[f]["support"]]
        macro = {"accuracy": sum(per[f]["accuracy"] for f in FINDINGS) / len(FINDINGS),
                 "f1": sum(supported) / len(supported) if supported else 0.0}
    else:
        for f in CHANGE_FINDINGS:
            pairs = [(p, l) for p, l in zip(preds, labels) if f in l]
            if not pairs:
                continue
            correct = sum(p is not None and p.get(f) == l[f] for p, l in pairs)
            per[f] = {"accuracy": correct / len(pairs), "n": len(pairs)}
        macro = {"accuracy": sum(v["accuracy"] for v in per.values()) / len(per) if per else 0.0}
    return {"task": task, "n": len(labels), "unparsed": unparsed, "per_finding": per, "macro": macro}
