"""Smells of preference data that are not errors: rows that repeat an earlier row, and rows that order two
responses the other way than an earlier row. `data.load_preferences` counts them into its `LoadReport`; a run
reports them in one warning line (`data.warn_smells`)."""

from __future__ import annotations

import json


def _preferences(record):
    """Every (better, worse) pair of responses the record's (possibly partial) ranking states."""
    unranked = [i for i in range(len(record.responses)) if i not in record.ranking]
    order = list(record.ranking) + unranked
    for a, better in enumerate(record.ranking):
        for worse in order[a + 1 :]:
            yield record.responses[better], record.responses[worse]


def count_smells(records) -> tuple[int, int, list[str]]:
    """(duplicated rows, contradictory rows, up to two examples). A duplicate states the same ranking of the
    same responses to the same prompt as an earlier row of the same annotator (rows without annotator count as
    one annotator); a contradiction orders some two responses the other way than an earlier row of that
    annotator. Different annotators may disagree: that is data, not a smell."""

    def key(*parts) -> str:
        return json.dumps(parts, sort_keys=True, ensure_ascii=False)

    seen_rows: dict[str, int] = {}
    seen_pairs: dict[str, int] = {}
    duplicates = contradictions = 0
    examples: dict[str, str] = {}  # the first duplicate and the first contradiction

    def name(i):
        return records[i].origin or f"record {i}"

    for i, r in enumerate(records):
        unranked = sorted(key(r.responses[j]) for j in range(len(r.responses)) if j not in r.ranking)
        row_key = key(r.annotator, r.prompt, [r.responses[j] for j in r.ranking], unranked)
        if row_key in seen_rows:
            duplicates += 1
            examples.setdefault("repeats", f"{name(i)} repeats {name(seen_rows[row_key])}")
            continue
        seen_rows[row_key] = i
        pairs = [
            (key(r.annotator, r.prompt, a, b), key(r.annotator, r.prompt, b, a)) for a, b in _preferences(r)
        ]
        earlier = [seen_pairs[backward] for _, backward in pairs if backward in seen_pairs]
        for forward, _ in pairs:
            seen_pairs.setdefault(forward, i)
        if earlier:
            contradictions += 1
            examples.setdefault("contradicts", f"{name(i)} contradicts {name(min(earlier))}")
    return duplicates, contradictions, list(examples.values())
