"""Preference instances as apo.py trains on them (scripts/export_preferences.py writes them in the
same order): a prompt, its consensus as the positive, and the negatives it keeps."""

from dataclasses import dataclass

from common.records import RecordError


@dataclass
class Example:
    record: dict
    negatives: list  # indices into record["rejected"], in training order
    length: int = 0  # forward_length: the cost used to group batches


def build_examples(records, max_negatives, data_path):
    return [Example(r, select_negatives(r, max_negatives, data_path)) for r in records]


def select_negatives(record, max_negatives, data_path):
    """The negatives an instance trains on: the most drifted first, since an answer far from the
    consensus is the constraint the method is about; ties (and records without drift) keep file order."""
    order = list(range(len(record["rejected"])))
    drift = record.get("drift")
    if drift is not None:
        if not all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in drift):
            raise RecordError(data_path, record["_line"], "drift", "must be a list of numbers")
        order.sort(key=lambda i: -drift[i])
    return order[:max_negatives] if max_negatives else order


def responses_of(example):
    return [example.record["chosen"]] + [example.record["rejected"][i] for i in example.negatives]
