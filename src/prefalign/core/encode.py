"""Tokenize preference records: prompt and each response tokenized SEPARATELY, then concatenated.

So the prompt/response boundary is exact even for tokenizers (BPE) that would merge tokens across it when
given the joined text. Response ids end with EOS once.

Truncation (TRL's convention): the prompt keeps its last `max_prompt_length` tokens (the end of the
prompt is what the response follows); then each response keeps its first `max_length - len(prompt)`
tokens (`truncation="keep_start"`; a truncated response loses its EOS), or `truncation="error"` raises.
"""

from dataclasses import dataclass

from tqdm.auto import tqdm


@dataclass
class EncodedRecord:
    prompt_ids: list[int]
    response_ids: list[list[int]]
    ranking: list[int]
    weight: float = 1.0
    annotator: str | None = None
    reference_logps: list[float] | None = None


def is_chat(value) -> bool:
    """Chat messages: a list of {"role", "content"} dicts."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def _chat_template(tokenizer, messages, where, **kwargs) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where}: chat messages given, but the tokenizer has no chat_template")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, **kwargs)


def encode_prompt(tokenizer, prompt, max_prompt_length: int = 256, where: str = "prompt") -> list[int]:
    """Token ids of a prompt (text or chat messages), left-truncated to `max_prompt_length`."""
    if is_chat(prompt):  # the rendered template already holds any BOS text
        text = _chat_template(tokenizer, prompt, where, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    else:
        raise ValueError(f"{where}: prompt must be text or chat messages, got {type(prompt).__name__}")
    if not ids:  # nothing to condition the first response token on: start from BOS (GPT-2 style)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start]
    return list(ids[-max_prompt_length:])


def _response_text(tokenizer, prompt, response, where) -> str:
    if isinstance(response, str):
        return response
    if not is_chat(response):
        raise ValueError(f"{where}: response must be text or chat messages, got {type(response).__name__}")
    if not is_chat(prompt):
        raise ValueError(f"{where}: a conversational response needs a conversational (messages) prompt")
    # the response is what the template adds after the prompt's generation prompt
    prompt_text = _chat_template(tokenizer, prompt, where, add_generation_prompt=True)
    full_text = _chat_template(tokenizer, list(prompt) + list(response), where)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            f"{where}: the chat template's rendering of prompt+response does not start with its rendering "
            "of the prompt (with add_generation_prompt=True), so the response text cannot be isolated"
        )
    return full_text[len(prompt_text) :]


def encode_records(tokenizer, records, max_length=512, max_prompt_length=256, truncation="keep_start"):
    """Records (`PreferenceRecord`-like: prompt, responses, ranking, annotator, weight) -> `EncodedRecord`s."""
    if truncation not in ("keep_start", "error"):
        raise ValueError(f"truncation must be 'keep_start' or 'error', got {truncation!r}")
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token")
    encoded = []
    # disable=None: tqdm draws no bar when stderr is not a terminal (a log file gets no redraws)
    for i, record in enumerate(tqdm(records, desc="tokenize", disable=True if len(records) < 5000 else None)):
        where = f"record {i}"
        prompt_ids = encode_prompt(tokenizer, record.prompt, max_prompt_length, f"{where}, field 'prompt'")
        budget = max_length - len(prompt_ids)
        response_ids = []
        for j, response in enumerate(record.responses):
            text = _response_text(tokenizer, record.prompt, response, f"{where}, field 'responses[{j}]'")
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if not ids or ids[-1] != eos:
                ids.append(eos)
            if len(ids) > budget and truncation == "error":
                raise ValueError(
                    f"{where}, field 'responses[{j}]': {len(prompt_ids)} prompt + {len(ids)} response tokens "
                    f"exceed max_length={max_length}"
                )
            response_ids.append(ids[:budget])
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
