"""Smells of preference data that are not errors: rows that repeat an earlier row, and rows that order two
responses the other way than an earlier row. `data.load_preferences` counts them into its `LoadReport`; a run
reports them in one warning line (`data.warn_smells`).

Memory: `SmellCounter` keeps one 64-bit hash per row and two per stated preference (about 40 bytes per pair
row), not the texts, so a million-row file costs tens of MB; the counts are computed once at the end with
numpy. Two different keys share a hash with probability about n^2 / 2^64 (negligible; a shared hash would
count one false smell, never hide an error). Python's `hash` of strings is salted per process, which is fine:
the hashes never leave the pass that made them.
"""

from __future__ import annotations

import json
from array import array

import numpy as np


def _preferences(record):
    """Every (better, worse) pair of responses the record's (possibly partial) ranking states."""
    unranked = [i for i in range(len(record.responses)) if i not in record.ranking]
    order = list(record.ranking) + unranked
    for a, better in enumerate(record.ranking):
        for worse in order[a + 1 :]:
            yield better, worse


def _text(value) -> str:
    """Text as itself; chat messages as canonical JSON (key order does not matter)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


class SmellCounter:
    """Feed records in order (`add`), then `result()`: (duplicated rows, contradictory rows, up to two examples).

    A duplicate states the same ranking of the same responses to the same prompt as an earlier row of the same
    annotator (rows without annotator count as one annotator); a contradiction orders some two responses the
    other way than an earlier row of that annotator that is not itself a duplicate. Different annotators may
    disagree: that is data, not a smell. `name(i)` names record i in the examples."""

    def __init__(self):
        self.rows = array("q")  # row key hash, one per record
        self.pair_row = array("q")  # for every stated preference: its record's index,
        self.forward = array("q")  # hash of (annotator, prompt, better, worse)
        self.backward = array("q")  # and of the opposite preference

    def add(self, record) -> None:
        i = len(self.rows)
        responses = [_text(r) for r in record.responses]
        who, prompt = record.annotator, _text(record.prompt)
        unranked = tuple(sorted(responses[j] for j in range(len(responses)) if j not in record.ranking))
        self.rows.append(hash((who, prompt, tuple(responses[j] for j in record.ranking), unranked)))
        for better, worse in _preferences(record):
            self.pair_row.append(i)
            self.forward.append(hash((who, prompt, responses[better], responses[worse])))
            self.backward.append(hash((who, prompt, responses[worse], responses[better])))

    def result(self, name) -> tuple[int, int, list[str]]:
        rows = np.frombuffer(self.rows, dtype=np.int64)
        if not len(rows):
            return 0, 0, []
        _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
        first_of_row = first[inverse.reshape(-1)]  # the earliest record with the same row key
        is_duplicate = first_of_row < np.arange(len(rows))
        examples: list[tuple[int, str]] = []
        if is_duplicate.any():
            i = int(np.argmax(is_duplicate))
            examples.append((i, f"{name(i)} repeats {name(int(first_of_row[i]))}"))
        pair_row = np.frombuffer(self.pair_row, dtype=np.int64)
        kept = ~is_duplicate[pair_row]  # duplicates state nothing new: their preferences are not registered
        pair_row = pair_row[kept]
        forward = np.frombuffer(self.forward, dtype=np.int64)[kept]
        backward = np.frombuffer(self.backward, dtype=np.int64)[kept]
        contradictions = 0
        if len(pair_row):
            keys, first_pair = np.unique(forward, return_index=True)  # pairs are in record order
            first_row = pair_row[first_pair]  # the earliest record stating each preference
            at = np.minimum(np.searchsorted(keys, backward), len(keys) - 1)
            earlier = np.where(keys[at] == backward, first_row[at], np.iinfo(np.int64).max)
            hit = earlier < pair_row  # the opposite preference was stated by an earlier record
            contradicting = np.unique(pair_row[hit])
            contradictions = len(contradicting)
            if contradictions:
                i = int(contradicting[0])
                j = int(earlier[hit & (pair_row == i)].min())
                examples.append((i, f"{name(i)} contradicts {name(j)}"))
        return int(is_duplicate.sum()), contradictions, [text for _, text in sorted(examples)]


def count_smells(records) -> tuple[int, int, list[str]]:
    """(duplicated rows, contradictory rows, up to two examples) of a list of records (see `SmellCounter`)."""
    counter = SmellCounter()
    for record in records:
        counter.add(record)
    return counter.result(lambda i: records[i].origin or f"record {i}")
