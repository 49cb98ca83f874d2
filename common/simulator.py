"""The drift simulator: an offline multi-source stream with a known truth (`sim:` sources).

MIMIC-CXR and CXR-MAX need credentials and a network; this module gives every user the paper's
structure offline (DESIGN, "The drift simulator"):

* `make_instances(n_train, n_test, seed)` draws studies with realistic finding prevalence and
  writes each as a short radiology-style description whose *signs* imply the findings
  ("blunted costophrenic angle" → Pleural Effusion). A finding is present exactly when one of its
  signs (`SIGNS`) is in the prompt; the normal distractor sentences never contain a sign.
* `PROFILES` are simulated source models after the behaviours reported for the CXR-MAX sources
  (concise, expansive, refusing, confusing, and three drifters), `simulate(profile, record,
  position, seed)` writes one source's chain-of-thought trajectory for one instance at a given
  place in the stream, ending with an `Answer:` line that `answers.parse_answer` reads back.
* `load_profiles(path)` / `resolve(names, extra_file)` add user-defined profiles from JSON.

Everything is seeded and pure Python: 2,500 instances × 7 sources take a few seconds on one core
(benchmarks/bench_simulator.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field

from common.answers import (CHANGE_CLASSES, CHANGE_FINDINGS, FINDINGS, NO_FINDING, POSITIVE_FINDINGS,
                     presence)

__all__ = ["SIGNS", "PREVALENCE", "DISTRACTORS", "Profile", "PROFILES", "STYLES", "DRIFTS",
           "make_instances", "simulate", "simulate_detail", "load_profiles", "resolve"]

# ---------------------------------------------------------------------------------------------
# Instances

# Marginal prevalence per study, close to the MIMIC-CXR / CheXpert label frequencies of frontal
# studies (Support Devices, Lung Opacity, Effusion, Atelectasis and Cardiomegaly common; Fracture,
# Pleural Other rare). The two clusters below add the co-occurrence real reports show.
PREVALENCE = {
    "Atelectasis": 0.20, "Cardiomegaly": 0.15, "Consolidation": 0.04, "Edema": 0.09,
    "Enlarged Cardiomediastinum": 0.04, "Fracture": 0.03, "Lung Lesion": 0.03,
    "Lung Opacity": 0.20, "Pleural Effusion": 0.18, "Pneumonia": 0.05, "Pneumothorax": 0.04,
    "Pleural Other": 0.02, "Support Devices": 0.24,
}
_NORMAL_SHARE = 0.20          # studies drawn normal outright; with the draws below ~35% are normal
_CLUSTERS = [                 # (probability, {finding: probability given the cluster})
    (0.10, {"Cardiomegaly": 0.8, "Edema": 0.7, "Pleural Effusion": 0.6}),       # heart failure
    (0.08, {"Pneumonia": 0.7, "Consolidation": 0.5, "Lung Opacity": 0.5}),      # infection
]

# Signs: noun phrases a report would use. Each is specific to its finding and none is contained in
# another sign, a distractor or an indication (test_simulator checks it), so the truth is exactly
# "which findings have a sign in the prompt".
SIGNS = {
    "Atelectasis": ["linear band-like densities at the lung base", "subsegmental volume loss",
                    "crowding of the bronchovascular markings",
                    "discoid densities with elevation of the hemidiaphragm"],
    "Cardiomegaly": ["an enlarged cardiac silhouette", "a cardiothoracic ratio above 0.55",
                     "enlargement of the heart shadow", "an increased transverse cardiac diameter"],
    "Consolidation": ["dense airspace filling with air bronchograms",
                      "a homogeneous lobar density obscuring the vessels",
                      "confluent density effacing the adjacent vessels"],
    "Edema": ["perihilar haziness with Kerley B lines", "cephalization of the pulmonary vessels",
              "peribronchial cuffing with indistinct vascular margins",
              "bilateral interstitial thickening in a batwing pattern"],
    "Enlarged Cardiomediastinum": ["a widened mediastinal contour",
                                   "a prominent superior mediastinal silhouette",
                                   "a mediastinum wider than expected for the projection"],
    "Fracture": ["cortical discontinuity of a rib", "a step-off in the clavicular cortex",
                 "a displaced lateral rib segment"],
    "Lung Lesion": ["a well-circumscribed rounded nodule", "a spiculated mass",
                    "a solitary round density"],
    "Lung Opacity": ["a patchy ill-defined opacity", "hazy increased density",
                     "ground-glass attenuation"],
    "Pleural Effusion": ["a blunted costophrenic angle", "a meniscus at the lung base",
                         "layering fluid along the lateral chest wall",
                         "blunting of the costophrenic sulcus"],
    "Pneumonia": ["a focal airspace process in a febrile patient",
                  "lobar airspace disease with clinical signs of infection",
                  "a new focal infiltrate with fever and productive cough"],
    "Pneumothorax": ["a visceral pleural line with absent markings beyond it", "a deep sulcus sign",
                     "an apical lucency without vascular markings"],
    "Pleural Other": ["calcified pleural plaques", "smooth apical pleural thickening",
                      "a localized pleural-based thickening"],
    "Support Devices": ["an endotracheal tube ending above the carina",
                        "a right internal jugular central venous catheter",
                        "a left chest wall pacemaker with leads",
                        "a nasogastric tube coursing below the diaphragm"],
}
_SIGN_TEMPLATES = ["There is {s}{loc}.", "{S} is noted{loc}.", "Notable for {s}{loc}.",
                   "The image shows {s}{loc}.", "{S} is present{loc}.", "We see {s}{loc}."]
_LOC = ["", "", "", " on the right", " on the left", " bilaterally"]
_LOC_FREE = {"Cardiomegaly", "Enlarged Cardiomediastinum", "Support Devices"}  # no side for these

# Normal statements, each with the findings it denies: left out when one of those is present.
DISTRACTORS = [
    ("The osseous structures are intact.", {"Fracture"}),
    ("No acute osseous abnormality is seen.", {"Fracture"}),
    ("The heart size is within normal limits.", {"Cardiomegaly"}),
    ("The cardiomediastinal silhouette is unremarkable.", {"Cardiomegaly", "Enlarged Cardiomediastinum"}),
    ("The costophrenic angles are sharp.", {"Pleural Effusion"}),
    ("The lungs are clear.", {"Atelectasis", "Consolidation", "Edema", "Lung Lesion", "Lung Opacity",
                              "Pneumonia"}),
    ("No focal airspace disease is seen.", {"Consolidation", "Pneumonia", "Lung Opacity"}),
    ("There is no pneumothorax.", {"Pneumothorax"}),
    ("Pulmonary vascularity is normal.", {"Edema"}),
    ("The visualized upper abdomen is unremarkable.", set()),
    ("Soft tissues are within normal limits.", set()),
    ("The trachea is midline.", set()),
    ("The diaphragm contours are smooth.", {"Atelectasis", "Pleural Effusion"}),
    ("No lines or tubes are present.", {"Support Devices"}),
    ("The hila are normal in size.", {"Enlarged Cardiomediastinum"}),
    ("No suspicious pulmonary nodule is identified.", {"Lung Lesion"}),
]
_EXAMS = ["Portable AP chest radiograph", "PA and lateral chest radiographs",
          "Single frontal view of the chest", "Upright AP chest film"]
_INDICATIONS = ["shortness of breath", "chest pain", "preoperative evaluation", "cough",
                "follow-up", "hypoxia", "weakness", "altered mental status", "fall", "dyspnea"]
_OPTIONS = ", ".join(POSITIVE_FINDINGS)
_QUESTION = ("Question: Which of these findings are present: {opts}, or No Finding? Reason step by "
             "step, then end with a final line \"Answer: <findings, comma-separated, or No Finding>\".")
SYSTEM = "You are an expert radiology assistant reading chest X-ray studies."

# Change task (MS-CXR-T style): the previous and current study of one finding.
_CHANGE_TEMPLATES = {
    "improving": ["{s} has decreased since the prior study", "{s} is smaller than before",
                  "{s} shows interval regression"],
    "stable": ["{s} is similar to the prior study", "{s} is unchanged in extent",
               "{s} persists at the same size"],
    "worsening": ["{s} has increased since the prior study", "{s} is larger than before",
                  "{s} shows interval progression"],
}
_CHANGE_QUESTION = ("Question: For {names}, is each improving, stable or worsening compared with the "
                    "prior study? Reason step by step, then end with a final line "
                    "\"Answer: <Finding: improving|stable|worsening; ...>\".")


def _draw_findings(rng: random.Random) -> set[str]:
    if rng.random() < _NORMAL_SHARE:
        return set()
    # marginals scaled so that, with the normal share and the clusters, they land near PREVALENCE
    found = {f for f, p in PREVALENCE.items() if rng.random() < p}
    for p_cluster, members in _CLUSTERS:
        if rng.random() < p_cluster:
            found |= {f for f, p in members.items() if rng.random() < p}
    return found


def _sign_sentence(rng: random.Random, finding: str, sign: str) -> str:
    loc = "" if finding in _LOC_FREE else rng.choice(_LOC)
    t = rng.choice(_SIGN_TEMPLATES)
    return t.format(s=sign, S=sign[0].upper() + sign[1:], loc=loc)


def _presence_instance(rng: random.Random) -> tuple[str, dict]:
    found = _draw_findings(rng)
    sentences = [_sign_sentence(rng, f, rng.choice(SIGNS[f])) for f in sorted(found)]
    allowed = [d for d, denies in DISTRACTORS if not denies & found]
    sentences += rng.sample(allowed, min(len(allowed), rng.randint(1, 3) if found else rng.randint(2, 4)))
    rng.shuffle(sentences)
    prompt = (f"{rng.choice(_EXAMS)}. Indication: {rng.choice(_INDICATIONS)}. Findings: "
              f"{' '.join(sentences)}\n{_QUESTION.format(opts=_OPTIONS)}")
    return prompt, presence(found)


def _change_instance(rng: random.Random) -> tuple[str, dict]:
    k = 1 if rng.random() < 0.7 else 2
    names = rng.sample(CHANGE_FINDINGS, k)
    labels, sentences = {}, []
    for f in names:
        c = rng.choices(CHANGE_CLASSES, weights=(0.3, 0.4, 0.3))[0]
        labels[f] = c
        sign = rng.choice(SIGNS[f])
        text = rng.choice(_CHANGE_TEMPLATES[c]).format(s=sign)
        sentences.append(text[0].upper() + text[1:] + ".")
    denied = set(names)
    allowed = [d for d, denies in DISTRACTORS if not denies & denied]
    sentences += rng.sample(allowed, rng.randint(1, 2))
    rng.shuffle(sentences)
    ordered = [f for f in CHANGE_FINDINGS if f in labels]
    prompt = (f"{rng.choice(_EXAMS)}, compared with the prior study. Indication: "
              f"{rng.choice(_INDICATIONS)}. Findings: {' '.join(sentences)}\n"
              f"{_CHANGE_QUESTION.format(names=' and '.join(ordered))}")
    return prompt, {f: labels[f] for f in ordered}


def make_instances(n_train: int, n_test: int, seed: int = 0, task: str = "presence") -> list[dict]:
    """Seeded instances in stream order (train then test): {"id", "split", "prompt", "system",
    "images": [], "labels"}. task "presence" (14 findings, the default) or "change" (MS-CXR-T
    style: previous vs current study, labels {finding: improving|stable|worsening})."""
    if task not in ("presence", "change"):
        raise ValueError(f"task must be 'presence' or 'change', got {task!r}")
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    rng = random.Random(f"apo-sim-instances|{seed}|{task}")
    make = _presence_instance if task == "presence" else _change_instance
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            prompt, labels = make(rng)
            out.append({"id": f"sim{seed}-{task[0]}-{split}-{i:05d}", "split": split, "prompt": prompt,
                        "system": SYSTEM, "images": [], "labels": labels})
    return out


# ---------------------------------------------------------------------------------------------
# Profiles

STYLES = ("terse", "paragraph", "bullets", "numbered", "markdown")
DRIFTS = ("none", "sudden", "gradual", "recurring")
_DRIFTABLE = ("miss", "overcall", "confusion", "refusal", "hallucination", "shared_bias")
_CONFUSABLE = ("Atelectasis", "Consolidation", "Pneumonia")
# The CheXpert label hierarchy makes Lung Opacity the parent of the parenchymal findings, and a
# layering effusion looks like a basal opacity: sources trained that way call Lung Opacity along
# with any of these, which the truth here (Lung Opacity only for its own signs) does not.
_PARENCHYMAL = ("Atelectasis", "Consolidation", "Edema", "Pneumonia", "Lung Lesion", "Pleural Effusion")


@dataclass
class Profile:
    """One simulated source. Probabilities are in [0, 1]; JSON files use the same field names.

    name          unique name (`sim:<name>`)
    behaviour     one line saying what it imitates
    style         how it writes: "terse" (one or two sentences), "paragraph" (prose), "bullets"
                  (markdown bullets, answer items on bullet lines), "numbered" (numbered steps),
                  "markdown" (headed sections, long)
    verbosity     scale of the reasoning length (1 = normal; 0.5 shorter, 2 longer)
    miss          probability of leaving out a present finding
    overcall      probability of calling an absent finding
    miss_by, overcall_by   per-finding overrides of miss / overcall {finding: probability}
    confusion     probability that a present Atelectasis / Consolidation / Pneumonia is called as
                  another of the three
    refusal       probability of refusing (a disclaimer and no Answer line)
    disclaimer    probability of a safety disclaimer in an answered trajectory
    hallucination probability that an over-call is backed by invented evidence (a sign that is not
                  in the study)
    synonyms      probability of writing a finding by a synonym ("effusion", "enlarged heart")
    shared_bias   probability of calling Lung Opacity when an atelectasis, consolidation, edema,
                  pneumonia, lung lesion or effusion sign is described but no Lung Opacity sign
                  (the CheXpert parent-label habit): strong in most default sources, so the
                  majority vote inherits it
    drift         "none", "sudden" (switch at drift_at), "gradual" (linear from drift_at to
                  drift_end), "recurring" (alternates between the two regimes every drift_period/2)
    drift_at, drift_end, drift_period   where in the stream (position in [0, 1])
    drifted       the values the drifting fields take in the drifted regime: any of miss, overcall,
                  confusion, refusal, hallucination, shared_bias, miss_by, overcall_by
    """
    name: str
    behaviour: str = ""
    style: str = "paragraph"
    verbosity: float = 1.0
    miss: float = 0.1
    overcall: float = 0.01
    miss_by: dict = field(default_factory=dict)
    overcall_by: dict = field(default_factory=dict)
    confusion: float = 0.0
    refusal: float = 0.0
    disclaimer: float = 0.0
    hallucination: float = 0.3
    synonyms: float = 0.2
    shared_bias: float = 0.0
    drift: str = "none"
    drift_at: float = 0.5
    drift_end: float = 1.0
    drift_period: float = 0.5
    drifted: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "") -> None:
        pre = f"{where}profile {self.name!r}: "
        if not isinstance(self.name, str) or not self.name or ":" in self.name or "," in self.name:
            raise ValueError(f"{pre}name must be a non-empty string without ':' or ','")
        if self.style not in STYLES:
            raise ValueError(f"{pre}style {self.style!r} is not one of {STYLES}")
        if self.drift not in DRIFTS:
            raise ValueError(f"{pre}drift {self.drift!r} is not one of {DRIFTS}")
        probs = {k: getattr(self, k) for k in ("miss", "overcall", "confusion", "refusal", "disclaimer",
                                               "hallucination", "synonyms", "shared_bias",
                                               "drift_at", "drift_end")}
        for k, v in self.drifted.items():
            if k not in _DRIFTABLE + ("miss_by", "overcall_by"):
                raise ValueError(f"{pre}drifted.{k} cannot drift; drifting fields are "
                                 f"{_DRIFTABLE + ('miss_by', 'overcall_by')}")
            if k in _DRIFTABLE:
                probs[f"drifted.{k}"] = v
        for name, d in (("miss_by", self.miss_by), ("overcall_by", self.overcall_by),
                        ("drifted.miss_by", self.drifted.get("miss_by", {})),
                        ("drifted.overcall_by", self.drifted.get("overcall_by", {}))):
            if not isinstance(d, dict):
                raise ValueError(f"{pre}{name} must be an object {{finding: probability}}")
            for f, v in d.items():
                if f not in POSITIVE_FINDINGS:
                    raise ValueError(f"{pre}{name}: unknown finding {f!r}; expected one of {POSITIVE_FINDINGS}")
                probs[f"{name}.{f}"] = v
        for k, v in probs.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                raise ValueError(f"{pre}{k} must be a number in [0, 1], got {v!r}")
        if not isinstance(self.verbosity, (int, float)) or not 0 < self.verbosity <= 5:
            raise ValueError(f"{pre}verbosity must be in (0, 5], got {self.verbosity!r}")
        if not isinstance(self.drift_period, (int, float)) or not 0 < self.drift_period <= 2:
            raise ValueError(f"{pre}drift_period must be in (0, 2], got {self.drift_period!r}")
        if self.drift == "gradual" and self.drift_end <= self.drift_at:
            raise ValueError(f"{pre}gradual drift needs drift_at < drift_end")

    def weight(self, position: float) -> float:
        """How far into the drifted regime the source is at `position` (0 = base, 1 = drifted)."""
        if self.drift == "sudden":
            return float(position >= self.drift_at)
        if self.drift == "gradual":
            return min(1.0, max(0.0, (position - self.drift_at) / (self.drift_end - self.drift_at)))
        if self.drift == "recurring":
            return float(math.floor(position / (self.drift_period / 2)) % 2 == 1)
        return 0.0

    def at(self, position: float) -> dict:
        """The effective probabilities at `position`: base and drifted regimes mixed by weight()."""
        w = self.weight(position)
        p = {k: getattr(self, k) for k in _DRIFTABLE}
        p["miss_by"], p["overcall_by"] = dict(self.miss_by), dict(self.overcall_by)
        if w == 0.0:
            return p
        for k in _DRIFTABLE:
            if k in self.drifted:
                p[k] = (1 - w) * p[k] + w * self.drifted[k]
        for k, base_rate in (("miss_by", self.miss), ("overcall_by", self.overcall)):
            base_by = getattr(self, k)
            for f, v in self.drifted.get(k, {}).items():
                # a finding without a base override starts from the profile's base rate
                p[k][f] = (1 - w) * base_by.get(f, base_rate) + w * v
        return p


# Defaults. Each imitates a behaviour reported for the CXR-MAX source models; the names are neutral
# on purpose (the simulator does not claim to reproduce any vendor's model).
# Shared biases, so that not every error is independent: every source usually misses subtle
# fractures (miss_by Fracture 0.6), and a majority of them (expansive, confuser, sudden, gradual)
# almost always add Lung Opacity to any atelectasis / consolidation / edema / pneumonia / lesion /
# effusion (shared_bias): the majority vote inherits that one and is worse on Lung Opacity than the
# average source.
_FRACTURE = {"Fracture": 0.6, "Lung Opacity": 0.02}
PROFILES: dict[str, Profile] = {p.name: p for p in [
    # Precise but concise: short answers, rarely over-calls, leaves out secondary findings.
    Profile("concise", "precise but concise: few false positives, misses secondary findings",
            style="terse", verbosity=0.6, miss=0.3, overcall=0.004, hallucination=0.1, synonyms=0.1,
            miss_by=_FRACTURE, shared_bias=0.1),
    # Expansive high-recall: long structured markdown, lists nearly everything it can imagine.
    Profile("expansive", "expansive high recall: long markdown, over-calls findings",
            style="markdown", verbosity=1.8, miss=0.04, overcall=0.06, hallucination=0.6,
            synonyms=0.3, miss_by=_FRACTURE, shared_bias=0.95),
    # Safety-tuned refuser: disclaims medical advice, often gives no answer at all.
    Profile("refuser", "safety-tuned: disclaims and often refuses to give an answer",
            style="paragraph", verbosity=1.0, miss=0.12, overcall=0.01, refusal=0.3, disclaimer=0.9,
            hallucination=0.1, miss_by=_FRACTURE, shared_bias=0.1),
    # Confuses the related airspace findings (atelectasis / consolidation / pneumonia).
    Profile("confuser", "confuses atelectasis, consolidation and pneumonia with each other",
            style="bullets", verbosity=1.0, miss=0.1, overcall=0.01, confusion=0.55,
            hallucination=0.4, miss_by=_FRACTURE, shared_bias=0.95),
    # Sudden drift: a model update half-way through the stream makes it careless and alarmist
    # (misses findings, reads heart failure and infection into normal studies).
    Profile("sudden", "sudden drift: accurate, then after a version switch at 0.5 over-calls and misses",
            style="numbered", verbosity=1.0, miss=0.08, overcall=0.008, drift="sudden", drift_at=0.5,
            drifted={"miss": 0.45, "hallucination": 0.8, "overcall_by": {
                "Cardiomegaly": 0.5, "Edema": 0.5, "Pleural Effusion": 0.45, "Atelectasis": 0.45,
                "Pneumonia": 0.35}}, miss_by=_FRACTURE,
            shared_bias=0.95),
    # Gradual drift: accuracy decays steadily along the stream (a slowly degrading endpoint that
    # misses more and more and hallucinates devices, lesions and fractures).
    Profile("gradual", "gradual drift: errors grow linearly along the whole stream",
            style="paragraph", verbosity=1.3, miss=0.06, overcall=0.006, drift="gradual", drift_at=0.0,
            drift_end=1.0, drifted={"miss": 0.6, "confusion": 0.3, "overcall_by": {
                "Support Devices": 0.55, "Enlarged Cardiomediastinum": 0.5, "Lung Lesion": 0.5,
                "Fracture": 0.45, "Pleural Other": 0.45}},
            miss_by=_FRACTURE, shared_bias=0.95),
    # Recurring drift: alternates between a good and a degraded regime (e.g. load-dependent
    # fallback to a smaller model that over-calls pneumothorax, consolidation, edema ...), the
    # degraded concept returning every half stream.
    Profile("recurring", "recurring drift: good and degraded regimes alternate every quarter stream",
            style="bullets", verbosity=0.8, miss=0.07, overcall=0.006, drift="recurring",
            drift_period=0.5, drifted={"miss": 0.6, "refusal": 0.1, "overcall_by": {
                "Pneumothorax": 0.5, "Consolidation": 0.55, "Edema": 0.5, "Lung Lesion": 0.45,
                "Cardiomegaly": 0.45}},
            miss_by=_FRACTURE, shared_bias=0.1),
]}


def load_profiles(path: str) -> dict[str, Profile]:
    """User-defined profiles from a JSON file: either a list of objects with a "name", or an
    object {name: {fields}}. Fields are those of `Profile` (unset ones take its defaults, which
    include no shared bias); a ValueError names the file and the offending profile/field."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if isinstance(data, dict) and "profiles" in data and isinstance(data["profiles"], (list, dict)):
        data = data["profiles"]
    if isinstance(data, dict):
        data = [{"name": k, **v} if isinstance(v, dict) else v for k, v in data.items()]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of profiles or an object {{name: profile}}")
    known = {f.name for f in dataclasses.fields(Profile)}
    out: dict[str, Profile] = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"{path}: profile #{i}: must be an object with a \"name\"")
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"{path}: profile {entry['name']!r}: unknown field(s) {sorted(unknown)}; "
                             f"known fields: {sorted(known)}")
        try:
            p = Profile(**entry)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None
        if p.name in out:
            raise ValueError(f"{path}: profile {p.name!r} defined twice")
        out[p.name] = p
    return out


def resolve(names: list[str], extra_file: str | None = None) -> list[Profile]:
    """Profiles for `sim:` names. "all" means every default profile plus every profile of
    extra_file; a user profile with a default's name replaces it. Unknown names raise ValueError
    listing the known ones."""
    table = dict(PROFILES)
    extra = load_profiles(extra_file) if extra_file else {}
    table.update(extra)
    out: list[Profile] = []
    for n in names:
        if n == "all":
            chosen = list(PROFILES) + [k for k in extra if k not in PROFILES]
        elif n in table:
            chosen = [n]
        else:
            raise ValueError(f"unknown simulator profile {n!r}; known: all, {', '.join(table)}"
                             + ("" if extra_file else " (user profiles come from a JSON file)"))
        for c in chosen:
            if all(p.name != c for p in out):
                out.append(table[c])
    return out


# ---------------------------------------------------------------------------------------------
# Trajectories

_ALIASES = {
    "Atelectasis": ["atelectasis"], "Cardiomegaly": ["cardiomegaly", "enlarged heart", "cardiac enlargement"],
    "Consolidation": ["consolidation"], "Edema": ["edema", "pulmonary edema"],
    "Enlarged Cardiomediastinum": ["enlarged cardiomediastinum", "widened mediastinum"],
    "Fracture": ["fracture", "rib fracture"], "Lung Lesion": ["lung lesion", "pulmonary nodule"],
    "Lung Opacity": ["lung opacity", "airspace opacity"],
    "Pleural Effusion": ["pleural effusion", "effusion", "pleural effusions"],
    "Pneumonia": ["pneumonia"], "Pneumothorax": ["pneumothorax", "PTX"],
    "Pleural Other": ["pleural other", "pleural thickening"],
    "Support Devices": ["support devices", "lines and tubes"],
    NO_FINDING: ["No Finding", "normal", "no acute findings"],
}
_REFUSALS = [
    "I'm sorry, but I can't provide a diagnostic interpretation of medical images.",
    "I am not able to give a medical diagnosis from this study.",
    "As an AI model I cannot responsibly determine which findings are present here.",
]
_DISCLAIMERS = [
    "Note: this is not a medical diagnosis; a qualified radiologist should review the study.",
    "Please consult a radiologist; the following is for educational purposes only.",
    "I am not a substitute for professional medical advice.",
]
_OPENERS = ["Let me review the described findings step by step.", "I will go through the study systematically.",
            "Reviewing the report sentence by sentence.", "Let's think step by step."]
_EVIDENCE = ["The study describes {s}, which indicates {n}.", "{S} is reported, consistent with {n}.",
             "Given {s}, I call {n}.", "{S} points to {n}."]
_HALLU = ["I also notice {s}, suggesting {n}.", "There appears to be {s}, so {n} is likely.",
          "Subtle {s} raises concern for {n}."]
_MISSED = ["{S} is mentioned but seems of little significance.", "I do not consider {s} relevant."]
_NEGATIVE = ["No sign of {n} is described.", "There is no evidence of {n}.", "{N} is not supported."]
_CLOSERS = ["Putting this together gives the final answer below.", "Summary of the positive findings follows.",
            "Overall, the findings are listed below."]
_SHARED_BIAS = ["The density described also counts as lung opacity.",
                "Any such density implies lung opacity as well."]
# How the findings read inside a sentence.
_PROSE = {f: f.lower() for f in FINDINGS}
_PROSE.update({"Pleural Other": "another pleural abnormality", "Support Devices": "a support device",
               "Enlarged Cardiomediastinum": "an enlarged cardiomediastinum", "Lung Lesion": "a lung lesion",
               "Fracture": "a fracture", "Pleural Effusion": "a pleural effusion",
               "Pneumothorax": "a pneumothorax"})


def _cap(s: str) -> str:
    return s[0].upper() + s[1:] if s else s


def _signs_in(prompt: str, finding: str) -> list[str]:
    low = prompt.lower()
    return [s for s in SIGNS.get(finding, ()) if s in low]


def _answer_items(called: dict, rng: random.Random, synonyms: float, task: str) -> list[str]:
    if task == "change":
        return [f"{f}: {c}" for f, c in called.items()]
    present = [f for f in POSITIVE_FINDINGS if called[f]] or [NO_FINDING]
    return [rng.choice(_ALIASES[f]) if rng.random() < synonyms else f for f in present]


def _answer_text(items: list[str], style: str, rng: random.Random, task: str) -> str:
    sep = "; " if task == "change" else ", "
    if style == "bullets" and len(items) > 1 and rng.random() < 0.5:
        return "**Answer:**\n" + "\n".join(f"- {i}" for i in items)
    if style == "markdown":
        return rng.choice(["**Final answer:** ", "### Answer: ", "**Answer:** "]) + sep.join(items)
    if style == "numbered":
        return rng.choice(["Final answer: ", "Answer: "]) + sep.join(items) + rng.choice(["", "."])
    if style == "terse":
        return "Answer: " + sep.join(items)
    return rng.choice(["Answer: ", "Answer: ", "answer: "]) + sep.join(items) + rng.choice(["", ".", ""])


def _decide_presence(truth: dict, prompt: str, p: dict, rng: random.Random) -> tuple[dict, list]:
    """What the source calls, plus the reasoning notes (kind, finding, sign) behind it."""
    called: set[str] = set()
    notes = []
    present = [f for f in POSITIVE_FINDINGS if truth.get(f)]
    for f in present:
        signs = _signs_in(prompt, f) or SIGNS[f][:1]
        if rng.random() < p["miss_by"].get(f, p["miss"]):
            notes.append(("missed", f, signs[0]))
            continue
        if f in _CONFUSABLE and rng.random() < p["confusion"]:
            wrong = rng.choice([g for g in _CONFUSABLE if g != f])
            called.add(wrong)
            notes.append(("evidence", wrong, signs[0]))
            continue
        called.add(f)
        notes.append(("evidence", f, signs[0]))
    if ("Lung Opacity" not in present and any(f in present for f in _PARENCHYMAL)
            and rng.random() < p["shared_bias"]):
        called.add("Lung Opacity")
        notes.append(("shared", "Lung Opacity", ""))
    for f in POSITIVE_FINDINGS:
        if f in present or f in called:
            continue
        if rng.random() < p["overcall_by"].get(f, p["overcall"]):
            called.add(f)
            kind = "hallucinated" if rng.random() < p["hallucination"] else "vague"
            notes.append((kind, f, rng.choice(SIGNS[f])))
        else:
            notes.append(("negative", f, ""))
    return presence(called), notes


def _decide_change(truth: dict, prompt: str, p: dict, rng: random.Random) -> tuple[dict, list]:
    # a miss reads the change as "stable"; an over-call invents a change where there is none
    called, notes = {}, []
    for f, c in truth.items():
        sign = (_signs_in(prompt, f) or SIGNS[f][:1])[0]
        if c != "stable" and rng.random() < p["miss_by"].get(f, p["miss"]):
            called[f] = "stable"
            notes.append(("missed", f, sign))
        elif c == "stable" and rng.random() < min(1.0, p["overcall_by"].get(f, p["overcall"]) * 10):
            called[f] = rng.choice(["improving", "worsening"])
            notes.append(("hallucinated", f, sign))
        elif c != "stable" and rng.random() < p["confusion"] * 0.5:
            called[f] = "improving" if c == "worsening" else "worsening"
            notes.append(("evidence", f, sign))
        else:
            called[f] = c
            notes.append(("evidence", f, sign))
    return called, notes


def _reasoning(notes: list, called: dict, profile: Profile, rng: random.Random, task: str) -> list[str]:
    out = []
    for kind, f, sign in notes:
        n = _PROSE[f]
        if task == "change" and kind != "negative":
            c = called[f]
            out.append(f"{_cap(sign)} is compared with the prior study; I judge {f.lower()} as {c}.")
        elif kind == "evidence":
            out.append(rng.choice(_EVIDENCE).format(s=sign, S=_cap(sign), n=n))
        elif kind == "hallucinated":
            out.append(rng.choice(_HALLU).format(s=sign, n=n))
        elif kind == "vague":
            out.append(f"{_cap(n)} cannot be entirely excluded.")
        elif kind == "shared":
            out.append(rng.choice(_SHARED_BIAS))
        elif kind == "missed":
            if rng.random() < 0.5:
                out.append(rng.choice(_MISSED).format(s=sign, S=_cap(sign)))
        elif kind == "negative":
            # verbose sources walk the whole checklist, terse ones mention few negatives
            if rng.random() < 0.12 * profile.verbosity:
                out.append(rng.choice(_NEGATIVE).format(n=n, N=_cap(n)))
    return out


def simulate_detail(profile: Profile, record: dict, position: float, seed: int = 0) -> tuple[str, dict | None]:
    """`simulate`, also returning the answer the source meant (None for a refusal)."""
    labels = record.get("labels")
    if not labels:
        raise ValueError(f"simulate: record {record.get('id')!r} has no 'labels'; the simulator needs "
                         "the hidden truth (make the records with simulator.make_instances)")
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"simulate: position must be in [0, 1], got {position!r}")
    rng = random.Random(f"{seed}|{profile.name}|{record['id']}|{position:.6f}")
    p = profile.at(position)
    task = "change" if any(isinstance(v, str) for v in labels.values()) else "presence"
    prompt = record.get("prompt", "")

    if rng.random() < p["refusal"]:
        parts = [rng.choice(_REFUSALS)]
        if rng.random() < 0.5:
            parts.append("The description mentions several radiographic features, but interpreting them "
                         "requires clinical context.")
        parts.append(rng.choice(_DISCLAIMERS))
        return " ".join(parts), None

    if task == "presence":
        called, notes = _decide_presence(labels, prompt, p, rng)
    else:
        called, notes = _decide_change(labels, prompt, p, rng)
    rng.shuffle(notes)
    steps = _reasoning(notes, called, profile, rng, task)
    # length: verbose sources restate and elaborate; the terse one keeps at most two sentences
    if profile.style == "terse":
        steps = steps[:2]
    elif profile.verbosity > 1.2:
        steps = steps + [f"To be thorough, I re-checked {rng.choice(['the lung bases', 'the apices', 'the mediastinum', 'the bones', 'the device positions'])} "
                         f"and the {rng.choice(['cardiac borders', 'costophrenic regions', 'hila'])}."
                         for _ in range(int(profile.verbosity * 2))]
    items = _answer_items(called, rng, profile.synonyms, task)
    answer = _answer_text(items, profile.style, rng, task)

    style = profile.style
    if style == "terse":
        body = " ".join(steps) if steps else "No abnormal sign is described."
        text = f"{body}\n{answer}"
    elif style == "paragraph":
        text = " ".join([rng.choice(_OPENERS)] + steps + [rng.choice(_CLOSERS)]) + "\n\n" + answer
    elif style == "bullets":
        text = "**Reasoning**\n" + "\n".join(f"- {s}" for s in (steps or ["No abnormal sign is described."])) \
            + "\n\n" + answer
    elif style == "numbered":
        text = rng.choice(_OPENERS) + "\n" + "\n".join(
            f"{i}. {s}" for i, s in enumerate(steps or ["No abnormal sign is described."], 1)) + "\n\n" + answer
    else:  # markdown
        text = ("## Systematic review\n" + rng.choice(_OPENERS) + "\n\n### Observations\n"
                + "\n".join(f"* {s}" for s in (steps or ["No abnormal sign is described."]))
                + "\n\n### Impression\n" + rng.choice(_CLOSERS) + "\n\n" + answer)
    if rng.random() < profile.disclaimer:
        text = rng.choice(_DISCLAIMERS) + "\n\n" + text
    return text, called


def simulate(profile: Profile, record: dict, position: float, seed: int = 0) -> str:
    """The trajectory of one source for one instance: deterministic from (seed, profile name,
    record id, position). position in [0, 1] is the instance's place in the stream (collect passes
    index / (N - 1)); the drifting profiles change behaviour along it. record["labels"] is the
    truth (ValueError when missing)."""
    return simulate_detail(profile, record, position, seed)[0]
