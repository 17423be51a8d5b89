"""The parts of `prefalign eval RUN_DIR [--data FILE] [--samples N]` every language-model method shares:
which records the held-out metrics use, the world's ground truth for the annotator type the data had, and
generated samples of the policy beside the reference's.

A run knows which world and annotator types made its data when a `world.json` lay beside its training data
(a demo writes one: `{"world": "world:reviews-quick", "annotator_types": {"enthusiast": 1.0}, ...}`); the
runner copies it into the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefalign.core import sources
from prefalign.core.data import load_preferences, load_records
from prefalign.core.errors import ConfigError
from prefalign.core.logprobs import generate_responses
from prefalign.core.models import load_base_model


def held_out_records(
    data_cfg, seed: int, path: str | None = None, sft_rows: bool = False
) -> tuple[list, str]:
    """(records, what they are): the records of `path` (--data), else the run's eval split or data.eval.
    `sft_rows`: SFT rows are accepted (see `core.data.load_preferences`)."""
    if path:
        records = load_preferences(
            path,
            split=data_cfg.split,
            tie_policy=data_cfg.tie_policy,
            on_bad_row=data_cfg.on_bad_row,
            columns=data_cfg.columns or None,
            sft_rows=sft_rows,
        )
        return records, f"eval/*: preference metrics on {path} ({len(records)} records, --data)"
    if not data_cfg.train:
        return [], "no held-out data: the run's records were passed in memory (give --data FILE)"
    _, records = load_records(data_cfg, seed, sft_rows=sft_rows)
    if not records:
        return (
            [],
            "no held-out data: the run held none out (data.eval_fraction 0 or < 10 records; give --data FILE)",
        )
    if data_cfg.eval:
        where = f"data.eval {data_cfg.eval}"
    elif getattr(records, "held_out", None):
        where = records.held_out
    else:
        where = f"the {data_cfg.eval_fraction:g} of data.train held out"
    return records, f"eval/*: preference metrics on {where} ({len(records)} records)"


def world_of_data(run_dir: Path) -> dict:
    """The run's `world.json` (which world and annotator types made its data), or {}."""
    path = Path(run_dir) / "world.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def world_truth(model_name: str, policy, run_dir: Path, **options) -> dict:
    """The world's ground truth of `policy` when the run's model is a world's (else {}), for the annotator
    types of the run's data when the run knows them (world.json of the same world) — with notes saying so."""
    if not sources.is_source(model_name):
        return {}
    source = sources.get(model_name, "causal_lm")
    if source.evaluate is None:
        return {}
    made_by = world_of_data(run_dir)
    same_world = bool(made_by.get("world")) and source.evaluate is _evaluator(made_by["world"])
    if same_world and made_by.get("annotator_types"):
        options["annotator_types"] = made_by["annotator_types"]
    result = sources.ground_truth(model_name, "causal_lm", policy, **options)
    notes = list(result.pop("notes", []))
    if same_world:
        notes.insert(0, f"the data was made by {made_by.get('made_by', made_by['world'])} (world.json)")
    else:
        notes.insert(0, "the run does not know who labelled its data (no world.json): every type is shown")
    return {**result, "notes": notes}


def truth_notes_and_samples(out: dict, note: str, cfg, run_dir, policy, tokenizer, eval_records, samples: int,
                            reference=None) -> dict:  # fmt: skip
    """The end of a language-model method's `evaluate_run`: the world's ground truth (`world_truth`), the
    notes (held-out `note` first) and `samples` samples beside those of `reference` (default: the base)."""
    truth = world_truth(cfg.model.name_or_path, policy, Path(run_dir))
    out.update(truth)
    out["notes"] = [note, *truth.get("notes", [])]
    if samples:
        prompts = sample_prompts(eval_records, cfg.data, cfg.train.seed)
        reference = reference if reference is not None else load_base_model(cfg.model)
        out["samples"] = side_by_side(policy, reference, tokenizer, prompts, samples, sample_length(cfg.data))
    return out


def sample_prompts(eval_records, data_cfg, seed: int) -> list:
    """Prompts for `--samples`: the held-out ones, else the training data's."""
    if eval_records:
        return [r.prompt for r in eval_records]
    if not data_cfg.train:
        raise ConfigError("eval --samples: the run names no data to take prompts from; give --data FILE")
    return [r.prompt for r in load_records(data_cfg, seed)[0]]


def sample_length(data_cfg) -> int:
    """New tokens per sample: the response budget of the run's data settings (at most 256)."""
    return max(1, min(256, data_cfg.max_length - data_cfg.max_prompt_length))


def _evaluator(name: str):
    try:
        return sources.get(name, "causal_lm").evaluate
    except ConfigError:  # a world not installed here
        return None


def side_by_side(policy, reference, tokenizer, prompts, n: int, max_new_tokens: int, seed: int = 0) -> list:
    """`n` prompts (the first distinct ones) with one sample of the policy and one of the reference each,
    at temperature 1 with fixed seeds."""
    unique: dict = {}
    for prompt in prompts:  # chat prompts (lists of messages) keyed by their JSON text
        unique.setdefault(prompt if isinstance(prompt, str) else json.dumps(prompt), prompt)
    keys = list(unique)[:n]
    chosen = [unique[k] for k in keys]
    ours = generate_responses(policy, tokenizer, chosen, 1, max_new_tokens, seed=seed)
    theirs = generate_responses(reference, tokenizer, chosen, 1, max_new_tokens, seed=seed + 1)
    return [{"prompt": keys[i], "policy": ours[i][0], "reference": theirs[i][0]} for i in range(len(keys))]
