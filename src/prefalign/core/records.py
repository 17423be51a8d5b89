"""Preference records and row-level validation: one raw row of any accepted layout -> `PreferenceRecord`.

The layouts and the row/line convention of every message are described in `core.data` (which loads sources
and re-exports these names).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections import Counter
from dataclasses import dataclass

from prefalign.core.data_files import RowError
from prefalign.core.data_files import short_repr as _short
from prefalign.core.errors import DataError

LAYOUTS = "prompt/chosen/rejected, chosen/rejected (implicit prompt), prompt/responses/ranking, prompt/responses/scores"
SFT_LAYOUTS = "messages, prompt/completion, text"  # TRL's SFT rows (loss.name: sft only)
ANNOTATOR_COLUMNS = ("annotator", "annotator_id", "user_id")
SFT_FIELDS = ("messages", "completion", "text")
FIELDS = (
    "prompt", "chosen", "rejected", "responses", "ranking", "scores", "weight", *ANNOTATOR_COLUMNS, *SFT_FIELDS,
)  # fmt: skip
TIE_POLICIES = ("error", "skip", "any-order", "truncate")


def located_error(error: RowError, source: str, row: int, line: int | None = None) -> DataError:
    message = f"{source}: row {row}: field '{error.field}': {error.expected}"
    if line is not None:
        message += f" (line {line})"
    located = DataError(message, source=source, row=row, field=error.field, reason=error.reason)
    located.line = line
    return located


def where(source: str, row: int, line: int | None = None) -> str:
    """How messages name a row: `source row N` (0-based), plus `(line L)` for JSONL/CSV files."""
    return f"{source} row {row}" + (f" (line {line})" if line is not None else "")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_finite(x) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer too large for a float
        return False


@dataclass
class PreferenceRecord:
    prompt: str | list[dict]
    responses: list[str | list[dict]]
    ranking: list[int]  # indices into responses, best first; unranked responses are below all ranked ones
    annotator: str | None = None
    weight: float = 1.0
    # where the record came from ("prefs.jsonl row 2 (line 3)"), for later messages; not part of its value
    origin: str | None = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def pair(cls, prompt, chosen, rejected, annotator=None, weight=1.0) -> PreferenceRecord:
        return cls(prompt, [chosen, rejected], [0, 1], annotator, weight)

    @property
    def chosen(self):
        return self.responses[self.ranking[0]]

    @property
    def rejected(self):
        """A worst response: of the worst tier as `core.metrics.ranked_ends` defines it (the last ranked one;
        for a partial ranking the unranked ones, tied last, of which this is the last)."""
        unranked = [i for i in range(len(self.responses)) if i not in self.ranking]
        return self.responses[unranked[-1] if unranked else self.ranking[-1]]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)  # a deep copy: editing the dict leaves the record alone
        out.pop("origin")
        return out


@dataclass
class LoadReport:
    n_rows: int
    n_loaded: int
    skipped: dict[str, int]  # reason -> number of rows dropped for it
    source: str = ""
    duplicates: int = 0  # loaded rows equal to an earlier one (same annotator, prompt and ranking)
    contradictions: int = 0  # loaded rows ordering two responses the other way than an earlier row
    smell_examples: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.source}: loaded {self.n_loaded} of {self.n_rows} rows"
        if self.skipped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
            text += f"; skipped {self.n_rows - self.n_loaded} ({reasons})"
        return text

    def smells(self) -> str:
        """One line about duplicated and contradictory rows ('' when there are none)."""
        parts = []
        if self.duplicates:
            parts.append(f"{self.duplicates} rows repeat an earlier row")
        if self.contradictions:
            parts.append(f"{self.contradictions} rows order two responses the other way than an earlier row")
        if not parts:
            return ""
        examples = "; ".join(self.smell_examples)
        return f"{self.source}: {' and '.join(parts)} (kept; e.g. {examples})"


class PreferenceData(list):
    """The list of records returned by `load_preferences`, with its `.report` (a `LoadReport`); a mixture
    of several sources (`load_records`) also has `.mixture`: one dict per source (see `mix_records`)."""

    report: LoadReport | None = None
    mixture: list[dict] | None = None
    held_out: str | None = None  # eval records: the DatasetDict split(s) they came from (`load_records`)


# ---------------------------------------------------------------------------------------------- validation


def _text_or_messages(value, field: str):
    if isinstance(value, str):
        if not value.strip():
            raise RowError(field, "empty text", f"expected non-empty text, got {_short(value)}")
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        messages = []
        for i, m in enumerate(value):
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or not role.strip() or not isinstance(content, str):
                expected = "expected {'role': str, 'content': str}"
                raise RowError(field, "wrong type", f"message {i}: {expected}, got {_short(m)}")
            messages.append({k: v for k, v in m.items() if v is not None})  # None: arrow filler
        if not any(m["content"].strip() for m in messages):
            raise RowError(field, "empty text", "expected a message with non-empty content, all are empty")
        return messages
    if isinstance(value, (list, tuple)) and not value:
        raise RowError(field, "empty text", "expected text or a non-empty list of messages, got []")
    expected = "expected text or a list of {'role', 'content'} messages"
    raise RowError(field, "wrong type", f"{expected}, got {_short(value)}")


def ranking_from_scores(scores, tie_policy: str = "error") -> list[int]:
    """Indices sorted by score, best first. Ties: "error" raises; "any-order" orders tied responses as they
    appear (an arbitrary strict order: it invents preferences between equals); "truncate" keeps only the
    ranked prefix above the first tie (a partial ranking, so nothing is invented; an error if the top is tied).
    ("skip" is handled by `load_preferences`, which drops and counts tied rows.)"""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: earlier first among ties
    ties = [k for k in range(len(order) - 1) if scores[order[k]] == scores[order[k + 1]]]
    if not ties or tie_policy == "any-order":
        return order
    if tie_policy == "truncate" and ties[0] > 0:
        return order[: ties[0]]
    hint = "the top is tied" if tie_policy == "truncate" else "set tie_policy to skip/any-order/truncate"
    raise RowError("scores", "tied scores", f"tied scores {_short(list(scores))} ({hint})")


def _check_ranking(value, n: int) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(_is_int(i) for i in value):
        raise RowError("ranking", "wrong type", f"expected a list of integer indices, got {_short(value)}")
    ranking = [int(i) for i in value]
    if not ranking:
        raise RowError("ranking", "bad ranking", "expected at least one index (the best response), got []")
    for i in ranking:
        if not 0 <= i < n:
            what = f"{'negative index' if i < 0 else 'index out of range'} {i} in {ranking}"
            raise RowError("ranking", "bad ranking", f"{what}; expected indices 0..{n - 1} ({n} responses)")
    duplicates = [i for i, count in Counter(ranking).items() if count > 1]
    if duplicates:
        raise RowError(
            "ranking", "bad ranking", f"duplicate index {duplicates[0]} in {ranking}; expected unique"
        )
    return ranking


def _check_scores(value, n: int) -> list[float]:
    if not isinstance(value, (list, tuple)) or not all(_is_real(s) for s in value):
        raise RowError("scores", "wrong type", f"expected a list of numbers (one each), got {_short(value)}")
    if len(value) != n:
        raise RowError("scores", "wrong type", f"expected {n} scores (one per response), got {len(value)}")
    if not all(_is_finite(s) for s in value):
        raise RowError("scores", "non-finite score", f"expected finite numbers, got {_short(list(value))}")
    return [float(s) for s in value]


# the start of an assistant turn in Anthropic-HH style dialogues ("\n\nHuman: ...\n\nAssistant: ...")
ASSISTANT_TURN = re.compile(r"(?:^|\n)[ \t]*Assistant:")


def _split_implicit_prompt(chosen, rejected):
    """The prompt of an implicit-prompt row: the shared beginning of chosen and rejected, cut back to a
    boundary so that neither response starts inside a word or a turn.

    Messages: the shared leading messages. Text: the shared characters up to the end of the last
    "Assistant:" turn marker they contain (the HH convention), else up to the last whitespace they contain
    (the whitespace goes to the responses). So "...Assistant: yes it is." / "...Assistant: yeah no." split
    after "Assistant:", never inside "ye", and " hi" / " hi there" is a valid pair."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if isinstance(chosen, str):
        shared = chosen[:k]
        turns = list(ASSISTANT_TURN.finditer(shared))
        if turns:
            k = turns[-1].end()
        else:
            k = max((i for i, ch in enumerate(shared) if ch.isspace()), default=0)
    if k == 0:
        raise RowError(
            "prompt", "missing field", "missing, and chosen/rejected share no prefix to use as prompt"
        )
    return chosen[:k], chosen[k:], rejected[k:]


def _annotator(row: dict):
    found = {}
    for column in ANNOTATOR_COLUMNS:
        value = row.get(column)
        if value is None:
            continue
        if _is_int(value):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise RowError(
                column, "wrong type", f"expected a non-empty string or integer, got {_short(value)}"
            )
        found[column] = value
    if len(set(found.values())) > 1:
        raise RowError("annotator", "ambiguous layout", f"conflicting annotator columns {found}")
    return next(iter(found.values()), None)


def _weight(row: dict) -> float:
    weight = row.get("weight")
    if weight is None:
        return 1.0
    if not _is_real(weight) or not _is_finite(weight) or weight <= 0:
        raise RowError("weight", "bad weight", f"expected a finite number > 0, got {_short(weight)}")
    return float(weight)


def _sft_record(row: dict, present: set) -> PreferenceRecord:
    """A TRL SFT row as a record with ONE response (ranking [0]):
    - `messages`: the conversation's last message (an assistant turn) is the response, the messages before
      it the prompt (earlier assistant turns are context, not trained on);
    - `prompt`/`completion`: text, or messages (TRL's conversational prompt-completion);
    - `text`: language modelling on the whole text (an empty prompt)."""
    if present & {"chosen", "rejected", "responses", "ranking", "scores"}:
        found = sorted(present & set(SFT_FIELDS))
        raise RowError(found[0], "ambiguous layout", f"an SFT column {found} beside preference columns")
    if "messages" in present:
        if present & {"prompt", "completion", "text"}:
            raise RowError(
                "messages", "ambiguous layout", "'messages' beside prompt/completion/text; keep one"
            )
        messages = _text_or_messages(row["messages"], "messages")
        if isinstance(messages, str) or messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise RowError(
                "messages", "bad conversation",
                "expected a conversation ending in an assistant message, with at least one message before it",
            )  # fmt: skip
        if not messages[-1]["content"].strip():
            raise RowError("messages", "empty text", "the last (assistant) message is empty")
        prompt, response = messages[:-1], [messages[-1]]
    elif "completion" in present:
        if "prompt" not in present:
            raise RowError("prompt", "missing field", "missing (layout prompt/completion needs 'prompt')")
        if "text" in present:
            raise RowError("text", "ambiguous layout", "'text' beside prompt/completion; keep one")
        prompt = _text_or_messages(row["prompt"], "prompt")
        response = _text_or_messages(row["completion"], "completion")
        if isinstance(prompt, str) != isinstance(response, str):
            raise RowError(
                "completion", "mixed text and messages", "expected prompt and completion of one kind"
            )
    else:
        if "prompt" in present:
            raise RowError("text", "ambiguous layout", "'text' beside 'prompt'; for prompt + completion rows "
                           "name the response column 'completion'")  # fmt: skip
        prompt, response = "", _text_or_messages(row["text"], "text")
        if not isinstance(response, str):
            raise RowError("text", "wrong type", "expected text; for conversations use a 'messages' column")
    return PreferenceRecord(prompt, [response], [0], _annotator(row), _weight(row))


def record_from_row(row, tie_policy: str, sft_rows: bool = False) -> PreferenceRecord:
    """One raw row -> PreferenceRecord, or a RowError naming the field. The row's layout picks one function per
    row kind (`ROW_KINDS`); each validates and normalizes its fields, then the shared checks (prompt, one kind
    of text, annotator, weight) apply. `sft_rows`: TRL's SFT layouts (messages, prompt/completion, text) are
    accepted as one-response records (`_sft_record`, for `loss.name: sft`); otherwise such a row is an error
    saying so."""
    if not isinstance(row, dict):
        raise RowError(
            "row", "not an object", f"expected an object with named fields, got {type(row).__name__}"
        )
    present = {k for k in FIELDS if row.get(k) is not None}
    sft = present & set(SFT_FIELDS)
    if sft and (sft_rows or not present & {"chosen", "rejected", "responses", "ranking", "scores"}):
        if not sft_rows:
            raise RowError(
                sorted(sft)[0], "SFT row",
                f"an SFT row ({SFT_LAYOUTS}: one response); this loss needs preferences ({LAYOUTS}); "
                "to train on these rows set loss.name: sft",
            )  # fmt: skip
        return _sft_record(row, present)
    pair, listwise = present & {"chosen", "rejected"}, present & {"responses", "ranking", "scores"}
    if pair and listwise:
        raise RowError(
            "responses", "ambiguous layout", f"both {sorted(pair)} and {sorted(listwise)} are present"
        )
    if {"ranking", "scores"} <= present:
        raise RowError("scores", "ambiguous layout", "both 'ranking' and 'scores' are present; keep one")
    kind = "pair" if pair else "listwise" if listwise else None
    if kind is None:
        if "prompt" in present:
            raise RowError(
                "chosen", "missing field", "missing; expected chosen/rejected or responses+ranking/scores"
            )
        got = ", ".join(sorted(map(str, row))) or "none"
        accepted = f"{LAYOUTS}" + (
            f", and for loss.name sft {SFT_LAYOUTS}" if not sft_rows else f", {SFT_LAYOUTS}"
        )
        raise RowError(
            "columns", "unknown layout", f"none known (got: {got}); accepted column sets: {accepted}"
        )
    prompt, responses, ranking, kind_field = ROW_KINDS[kind](row, present, tie_policy)
    prompt = _text_or_messages(prompt, "prompt")
    if len({isinstance(x, str) for x in [prompt, *responses]}) > 1:
        raise RowError(
            kind_field, "mixed text and messages", "expected all text or all messages (with prompt)"
        )
    return PreferenceRecord(prompt, responses, ranking, _annotator(row), _weight(row))


def _pair_row(row: dict, present: set, tie_policy: str):
    """prompt/chosen/rejected, or chosen/rejected with an implicit prompt -> (prompt, responses, ranking,
    the field named when text and messages are mixed)."""
    for name in ("chosen", "rejected"):
        if name not in present:
            raise RowError(name, "missing field", f"missing (layout prompt/chosen/rejected needs '{name}')")
    chosen = _text_or_messages(row["chosen"], "chosen")
    rejected = _text_or_messages(row["rejected"], "rejected")
    if chosen == rejected:
        raise RowError("chosen", "identical responses", "chosen == rejected; expected two distinct responses")
    if "prompt" in present:
        prompt = row["prompt"]
    elif isinstance(chosen, str) != isinstance(rejected, str):
        raise RowError("rejected", "mixed text and messages", "expected chosen and rejected of one kind")
    else:
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
    responses = [_text_or_messages(chosen, "chosen"), _text_or_messages(rejected, "rejected")]
    return prompt, responses, [0, 1], "chosen"


def _listwise_row(row: dict, present: set, tie_policy: str):
    """prompt/responses/ranking or prompt/responses/scores -> (prompt, responses, ranking, the field named
    when text and messages are mixed)."""
    for name in ("prompt", "responses"):
        if name not in present:
            raise RowError(name, "missing field", "missing (layouts prompt/responses/ranking or /scores)")
    if "ranking" not in present and "scores" not in present:
        raise RowError("ranking", "missing field", "missing (give 'ranking' or 'scores' with 'responses')")
    prompt, value = row["prompt"], row["responses"]
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        what = f"{len(value)}" if isinstance(value, (list, tuple)) else _short(value)
        raise RowError("responses", "too few responses", f"expected a list of >= 2 responses, got {what}")
    responses = [_text_or_messages(r, f"responses[{i}]") for i, r in enumerate(value)]
    if "ranking" in present:
        ranking = _check_ranking(row["ranking"], len(responses))
    else:
        ranking = ranking_from_scores(_check_scores(row["scores"], len(responses)), tie_policy)
    for i in range(len(responses)):  # a ranked response equal to another one contradicts itself
        for j in range(i):
            if responses[i] == responses[j] and (i in ranking or j in ranking):
                raise RowError("responses", "identical responses", f"responses {j} and {i} are identical")
    return prompt, responses, ranking, "responses"


# row kind -> its validation: (row, present fields, tie_policy) -> (prompt, responses, ranking, mixed-kind field)
ROW_KINDS = {"pair": _pair_row, "listwise": _listwise_row}


def validate_record(
    record_dict, row, source="<memory>", *, tie_policy="error", sft_rows=False
) -> PreferenceRecord:
    """One raw row (any accepted layout) -> PreferenceRecord, or a DataError naming source, row and field.
    `tie_policy` here is "error", "any-order" or "truncate" (see `ranking_from_scores`); `sft_rows`: see
    `record_from_row`."""
    try:
        return record_from_row(record_dict, tie_policy, sft_rows)
    except RowError as e:
        raise located_error(e, source, row) from None
