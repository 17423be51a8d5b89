"""Tokenize preference records: prompt and each response tokenized SEPARATELY, then concatenated.

So the prompt/response boundary is exact even for tokenizers (BPE) that would merge tokens across it when
given the joined text.

Special tokens, each exactly once:
- text prompt: the special tokens the tokenizer puts BEFORE a text (BOS for Llama-style tokenizers, nothing
  for GPT-2 style ones), never the ones it puts after it (a tokenizer that appends EOS/SEP to every text
  would otherwise end the prompt with EOS); a prompt whose text already starts with them gets none added;
- chat prompt: exactly the chat template's rendering with `add_generation_prompt=True` (the template writes
  BOS if the model wants one; nothing is added, as in `apply_chat_template(tokenize=True)`);
- chat response: the template's rendering of prompt + response minus its rendering of the prompt, so it
  holds the template's end-of-turn text (`<|im_end|>\\n`, `</s>`, ...);
- every response ends with EOS once: EOS is appended unless the response already holds it (a chat template
  that ends a turn with the EOS token, followed or not by more text, or a text response ending in EOS).

Truncation (TRL's convention): the prompt keeps its last `max_prompt_length` tokens (the end of the
prompt is what the response follows); then each response keeps its first `max_length - len(prompt)`
tokens (`truncation="keep_start"`; a truncated response loses its EOS), or `truncation="error"` raises.
`encode_data` does this for a run: it counts what was cut, drops or refuses records whose ranked responses
became identical, and keeps `max_length` within the model's position limit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from prefalign.core.data import DataConfig, is_template
from prefalign.core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass
class EncodedRecord:
    prompt_ids: list[int]
    response_ids: list[list[int]]
    ranking: list[int]
    weight: float = 1.0
    annotator: str | None = None
    reference_logps: list[float] | None = None


class EncodedData(list):
    """`encode_data`'s records, with `kept`: the index of each one's record among those given, `report`:
    what truncation cut (an `EncodeReport`), and `lengths`: the (max_length, max_prompt_length) used."""

    kept: list[int]
    report: EncodeReport | None = None
    lengths: tuple[int, int] | None = None


@dataclass
class EncodeReport:
    """What tokenization cut: counts over the records of one `encode_records` call."""

    records: int = 0
    responses: int = 0
    prompts_cut: int = 0
    responses_cut: int = 0
    longest_prompt: int = 0  # tokens, before truncation
    longest_sequence: int = 0  # prompt + response tokens, before truncation
    identical: list[int] = field(default_factory=list)  # records whose ranked responses became identical

    def summary(self, name: str, max_length: int, max_prompt_length: int) -> str:
        """One line about truncation ('' when nothing was cut)."""
        parts = []
        if self.prompts_cut:
            parts.append(
                f"{self.prompts_cut} of {self.records} prompts cut to their last {max_prompt_length} tokens "
                f"(data.max_prompt_length; longest {self.longest_prompt})"
            )
        if self.responses_cut:
            parts.append(
                f"{self.responses_cut} of {self.responses} responses cut to fit data.max_length {max_length} "
                f"(longest prompt + response {self.longest_sequence} tokens)"
            )
        return f"{name}: {'; '.join(parts)}" if parts else ""


def is_chat(value) -> bool:
    """Chat messages: a list of {"role", "content"} dicts."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def _record_name(record, i: int) -> str:
    return getattr(record, "origin", None) or f"record {i}"


def _render(tokenizer, messages, where, **kwargs) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            f"{where}: chat messages given, but the tokenizer has no chat_template; set data.chat_template "
            "(a Jinja template or a file holding one)"
        )
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, **kwargs)
    except Exception as e:  # jinja2 errors, and templates that raise on purpose (roles must alternate, ...)
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{where}: the chat template failed on these messages: {message}") from None


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (e.g. [BOS]); [] for GPT-2 style tokenizers."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return list(full[:k])
    return []


def encode_prompt(
    tokenizer, prompt, max_prompt_length: int = 256, where: str = "prompt", prefix: list[int] | None = None
) -> list[int]:
    """Token ids of a prompt (text or chat messages), left-truncated to `max_prompt_length` (see the module
    docstring for special tokens; `prefix` = `special_prefix(tokenizer)`, computed here when not given)."""
    return _prompt_ids(tokenizer, prompt, where, prefix)[-max_prompt_length:]


def _prompt_ids(tokenizer, prompt, where: str, prefix: list[int] | None = None) -> list[int]:
    if is_chat(prompt):  # the rendered template holds every special token it wants
        text = _render(tokenizer, prompt, where, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    elif isinstance(prompt, str):
        prefix = special_prefix(tokenizer) if prefix is None else prefix
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if ids[: len(prefix)] != prefix:  # a text that already starts with BOS keeps that one
            ids = prefix + ids
    else:
        raise DataError(f"{where}: prompt must be text or chat messages, got {type(prompt).__name__}")
    if not ids:  # nothing to condition the first response token on: start from BOS (GPT-2 style)
        ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    return ids


def _response_text(tokenizer, prompt, response, where) -> str:
    if isinstance(response, str):
        return response
    if not is_chat(response):
        raise DataError(f"{where}: response must be text or chat messages, got {type(response).__name__}")
    if not is_chat(prompt):
        raise DataError(f"{where}: a conversational response needs a conversational (messages) prompt")
    # the response is what the template adds after the prompt's generation prompt
    prompt_text = _render(tokenizer, prompt, where, add_generation_prompt=True)
    full_text = _render(tokenizer, list(prompt) + list(response), where)
    if not full_text.startswith(prompt_text):
        raise DataError(
            f"{where}: the chat template's rendering of prompt+response does not start with its rendering "
            "of the prompt (with add_generation_prompt=True), so the response text cannot be isolated"
        )
    return full_text[len(prompt_text) :]


def encode_records(
    tokenizer,
    records,
    max_length=512,
    max_prompt_length=256,
    truncation="keep_start",
    *,
    report: EncodeReport | None = None,
):
    """Records (`PreferenceRecord`-like: prompt, responses, ranking, annotator, weight) -> `EncodedRecord`s.
    `report` (an `EncodeReport`), when given, receives what truncation cut."""
    if truncation not in ("keep_start", "error"):
        raise ValueError(f"truncation must be 'keep_start' or 'error', got {truncation!r}")
    if max_prompt_length >= max_length:
        raise ConfigError(
            f"config key 'data.max_prompt_length' ({max_prompt_length}) must be < data.max_length ({max_length})"
        )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token (eos_token_id is None); set tokenizer.eos_token")
    report = EncodeReport() if report is None else report
    prefix = special_prefix(tokenizer)
    encoded = []
    # disable=None: tqdm draws no bar when stderr is not a terminal (a log file gets no redraws)
    for i, record in enumerate(tqdm(records, desc="tokenize", disable=True if len(records) < 5000 else None)):
        name = _record_name(record, i)
        full_prompt = _prompt_ids(tokenizer, record.prompt, f"{name}, field 'prompt'", prefix)
        prompt_ids = full_prompt[-max_prompt_length:]
        report.records += 1
        report.prompts_cut += len(full_prompt) > len(prompt_ids)
        report.longest_prompt = max(report.longest_prompt, len(full_prompt))
        budget = max_length - len(prompt_ids)
        response_ids = []
        for j, response in enumerate(record.responses):
            where = f"{name}, field 'responses[{j}]'"
            text = _response_text(tokenizer, record.prompt, response, where)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if eos not in ids:  # a chat template (or the text itself) may have placed it already
                ids.append(eos)
            report.responses += 1
            report.responses_cut += len(ids) > budget
            report.longest_sequence = max(report.longest_sequence, len(full_prompt) + len(ids))
            if len(ids) > budget and truncation == "error":
                raise DataError(
                    f"{where}: {len(prompt_ids)} prompt + {len(ids)} response tokens exceed "
                    f"data.max_length={max_length}"
                )
            response_ids.append(ids[:budget])
        if _identical_ranked(response_ids, record.ranking):
            report.identical.append(i)
        annotator = getattr(record, "annotator", None)
        encoded.append(
            EncodedRecord(
                prompt_ids=prompt_ids,
                response_ids=response_ids,
                ranking=[int(r) for r in record.ranking],
                weight=float(getattr(record, "weight", 1.0)),
                annotator=None if annotator is None else str(annotator),
            )
        )
    return encoded


def _identical_ranked(response_ids, ranking) -> bool:
    """Two responses with the same token ids, one of them ranked: the ranking orders a response against itself
    (loss ln 2 for a pair, no signal), as `data.load_preferences` refuses for identical texts."""
    ranked = set(ranking)
    seen: dict[tuple, int] = {}
    for j, ids in enumerate(response_ids):
        other = seen.setdefault(tuple(ids), j)
        if other != j and (j in ranked or other in ranked):
            return True
    return False


# ---------------------------------------------------------------------------------- a run's data


def position_limit(model) -> int | None:
    """The longest sequence the model's config allows (learned positions, or the trained context of rotary
    ones); None when it names none (e.g. ALiBi models such as Bloom)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_lengths(data: DataConfig, model=None, log: bool = True) -> tuple[int, int]:
    """(max_length, max_prompt_length) for `model`: `data.max_length` lowered to the model's position limit,
    with one warning line saying so (and the prompt limit, if it does not fit either, to half of it). Longer inputs would
    index past the position table (GPT-2: an IndexError inside torch, on a GPU a device-side assert)."""
    max_length, max_prompt_length = data.max_length, data.max_prompt_length
    limit = position_limit(model) if model is not None else None
    if limit is None or max_length <= limit:
        return max_length, max_prompt_length
    prompt = max_prompt_length if max_prompt_length < limit else limit // 2
    if log:
        logger.warning(
            "data.max_length %d exceeds the model's position limit %d: sequences are cut to %d tokens%s",
            max_length,
            limit,
            limit,
            ""
            if prompt == max_prompt_length
            else f", prompts to {prompt} (data.max_prompt_length {max_prompt_length})",
        )
    return limit, prompt


def chat_template_text(value: str | None) -> str | None:
    """`data.chat_template` as template text (read from its file when it names one)."""
    if value is None or is_template(value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"config key 'data.chat_template': file not found: {value}")
    return path.read_text(encoding="utf-8")


def apply_chat_template(tokenizer, data: DataConfig):
    """Install `data.chat_template` (template text or a file) on the tokenizer; the tokenizer is returned."""
    template = chat_template_text(data.chat_template)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def encode_data(tokenizer, records, data: DataConfig, name: str, lengths: tuple[int, int]):
    """A run's records -> `EncodedRecord`s: tokenized under `lengths` (from `fit_lengths`), with one warning
    line counting what truncation cut. Records whose ranked responses became identical token sequences after
    truncation carry no preference: under `data.on_bad_row: skip` they are dropped and counted (one line),
    otherwise a DataError names them."""
    if not records:
        empty = EncodedData()
        empty.kept = []
        return empty
    if getattr(tokenizer, "chat_template", None) is None and any(is_chat(r.prompt) for r in records):
        raise ConfigError(
            f"{name}: chat messages given, but the tokenizer has no chat_template; set data.chat_template (a "
            "Jinja template or a file holding one)"
        )
    max_length, max_prompt_length = lengths
    report = EncodeReport()
    encoded = encode_records(tokenizer, records, max_length, max_prompt_length, report=report)
    cut = report.summary(name, max_length, max_prompt_length)
    if cut:
        logger.warning(cut)
    kept = list(range(len(encoded)))
    if report.identical:
        names = [_record_name(records[i], i) for i in report.identical]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        what = (
            f"{len(names)} of {len(records)} records have ranked responses whose token ids are identical after "
            f"tokenization and truncation to data.max_length {max_length} (no preference left): {shown}"
        )
        if data.on_bad_row != "skip":
            raise DataError(
                f"{name}: {what}; raise data.max_length, check that the tokenizer tells the responses apart "
                "(unknown tokens), or set data.on_bad_row: skip to drop them"
            )
        logger.warning("%s: skipped %s", name, what)
        drop = set(report.identical)
        kept = [i for i in kept if i not in drop]
        if not kept:
            raise DataError(f"{name}: no record left after dropping those with identical token ids")
    out = EncodedData(encoded[i] for i in kept)
    out.kept, out.report, out.lengths = kept, report, lengths
    return out
