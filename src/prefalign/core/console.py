"""What a run tells the person watching it: a block saying what will run, one compact line of the main
metrics every `log_every` steps, and a closing summary. Progress bars only on a terminal (a log file gets
the plain lines, never bar redraws); only the main process speaks.

    say("text")                          # one line on stdout, above any progress bar
    progress(iterable, desc="...")       # a tqdm bar on a terminal, nothing otherwise
    block("title", {"model": "...", ...})
    metrics_line(record, max_steps)      # "step  20/100  loss 0.6812  acc 0.625  margin 0.041 ..."
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from prefalign.core import packing

# metric name -> short label, in the order lines show them (any other numeric metric follows, up to a few)
MAIN_METRICS = {
    "loss": "loss",
    "rewards/accuracies": "acc",
    "rewards/margins": "margin",
    "true_reward": "true reward",
    "kl": "KL",
    "win_rate": "win rate",
    "grad_norm": "grad",
    "learning_rate": "lr",
}
MAX_EXTRA = 3  # other metrics shown when a method logs none of the main ones


def threads_for_tiny_models() -> str | None:
    """One torch intra-op thread for the built-in worlds' tiny models, unless OMP_NUM_THREADS says otherwise;
    returns the console line saying so (None when the user chose). Their matrices are too small to split:
    more threads only add synchronisation, and on a shared machine OpenMP's spinning threads take cores
    from everyone (a quick demo measured 30x more CPU time with torch's default threads on a busy box)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch  # only the commands that train load torch

    torch.set_num_threads(1)
    return "threads: 1 (torch intra-op; the worlds' models are tiny; OMP_NUM_THREADS=N sets another number)"


def is_main_process() -> bool:
    """The process that speaks (rank 0 under `accelerate launch` / torchrun; always true alone)."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") in ("0", "")


def bars() -> bool:
    """Progress bars are drawn only for a person at a terminal (stderr is a TTY), never into a log file."""
    return sys.stderr.isatty() and os.environ.get("PREFALIGN_NO_BARS", "") in ("", "0")


def progress(iterable=None, *, desc: str = "", total: int | None = None, initial: int = 0, disable=False):
    """A tqdm bar on a terminal on the main process; a silent pass-through otherwise."""
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        initial=initial,
        disable=bool(disable) or not bars() or not is_main_process(),
        dynamic_ncols=True,
        leave=False,
    )


def say(text: str = "") -> None:
    """Print a line on stdout (main process only), clearing and redrawing any progress bar around it."""
    if is_main_process():
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()


def block(title: str, rows: dict[str, str]) -> str:
    """A title line and aligned `name   value` rows (None values left out)."""
    rows = {k: v for k, v in rows.items() if v not in (None, "")}
    width = max((len(k) for k in rows), default=0)
    return "\n".join([title] + [f"  {k:<{width}}  {v}" for k, v in rows.items()])


def number(value: float) -> str:
    """A metric value in 4 significant digits (learning rates and tiny values in e-notation)."""
    if not isinstance(value, (int, float)):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.4g}"


def count(n: int) -> str:
    """12345678 -> '12.3M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def metric_items(record: dict, prefix: str = "") -> list[tuple[str, float]]:
    """(label, value) of a log record's main metrics (`prefix`: 'eval/' for evaluation records)."""
    values = {
        k.removeprefix(prefix): v
        for k, v in record.items()
        if k.startswith(prefix) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    values = {k: v for k, v in values.items() if k not in ("step", "epoch")}
    shown = [(MAIN_METRICS[k], values[k]) for k in MAIN_METRICS if k in values]
    if len(shown) <= 2:  # a method with its own names (MPO, PFM, diffusion): its first few metrics
        shown += [(k, v) for k, v in values.items() if k not in MAIN_METRICS][:MAX_EXTRA]
    return shown


def metrics_line(record: dict, max_steps: int, elapsed: float | None = None) -> str:
    """One compact line of a training log record: step, main metrics, time."""
    width = len(str(max_steps))
    items = "  ".join(f"{label} {number(v)}" for label, v in metric_items(record))
    when = f"  ({elapsed:.0f} s)" if elapsed is not None else ""
    return f"step {record['step']:>{width}}/{max_steps}  {items}{when}"


def eval_line(record: dict) -> str:
    items = "  ".join(f"{label} {number(v)}" for label, v in metric_items(record, "eval/"))
    return f"eval at step {record['step']}:  {items}"


def count_parameters(model) -> tuple[int, int]:
    """(all parameters, trainable ones) of a torch module (shared tensors counted once)."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in str(record.msg) for fragment in self.fragments)


NOISY_LOGS = {  # logger -> fragments of messages it logs that tell a user nothing to act on
    "transformers.modeling_utils": (
        # GPT-2 decoding steps inside `generate` (our calls pass an attention mask; finished rows hold pads)
        "We strongly recommend passing in an `attention_mask`",
        # a model without `loss_type` (GPT-2) computing its own LM loss: transformers uses the right default
        "`loss_type=None` was set in the config but it is unrecognized",
    ),
    "diffusers.loaders.lora_base": (
        # loading a UNet-only LoRA (what prefalign saves) into an SD pipeline: the text encoder has no LoRA keys,
        # as intended
        "No LoRA keys associated to",
    ),
    "transformers.utils.import_utils": (
        # importing diffusers' SD pipelines without torchvision: CLIP/SigLIP image processors fall back to PIL,
        # which is all prefalign uses them for (no image goes through them)
        "requires torchvision (not installed); falling back to",
    ),
}


def quiet_library_noise() -> None:
    """Silence third-party messages that tell a user nothing they can act on (each named here, no more):
    - peft: "fan_in_fan_out is set to False but the target module is `Conv1D`" (GPT-2's layers; peft sets
      the right value itself);
    - transformers: the `is_gradient_checkpointing` deprecation (raised inside peft, not our call), and the
      messages of NOISY_LOGS (also the image processors' torchvision fallback logged when the world modules
      import diffusers' pipelines: `sources` calls this before loading them);
    - transformers' "Loading weights" / "Writing model shards" and diffusers' "Loading pipeline components"
      bars: on a terminal they stay on screen after each load or save (tqdm's leave=True) between our own
      lines, and in a log file they are redraw noise."""
    warnings.filterwarnings("ignore", message=r"fan_in_fan_out is set to False", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*is deprecated")
    for name, starts in NOISY_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.fragments == starts for f in logger.filters):
            logger.addFilter(_DropMessages(starts))
    hf_logging.disable_progress_bar()
    if "diffusers" in sys.modules:  # its bars matter only once it is loaded (diffusion methods, worlds)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()


def data_rows(data_cfg, records, eval_records, seed: int) -> dict[str, str]:
    """Console rows about preference data: rows loaded/skipped per source (mixture shares), the split."""
    report, mixture = getattr(records, "report", None), getattr(records, "mixture", None)
    rows = {}
    if mixture:
        parts = []
        for m in mixture:
            used, have = m["used"], m["records"]
            gave = f"{used} of its {have}" if used <= have else f"{used} = its {have} x {used / have:.3g}"
            parts.append(f"{m['source']} {gave}" + (f" (weight {m['weight']:g})" if m["weight"] else ""))
        rows["data"] = "mixture: " + ", ".join(parts)
    if report is not None:
        skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(report.skipped.items()))
        loaded = f"{report.n_loaded} of {report.n_rows} rows loaded" + (
            f", {report.n_rows - report.n_loaded} skipped ({skipped})" if skipped else ", none skipped"
        )
        rows["data" if not mixture else "rows"] = (f"{report.source}: " if not mixture else "") + loaded
    else:
        named = f" (config data.train: {data_cfg.train})" if data_cfg.train else ""
        rows["data"] = f"{len(records)} records passed in memory{named}"
    n_train, n_eval = len(records), len(eval_records or [])
    held_out = getattr(eval_records, "held_out", None)
    if data_cfg.eval:
        rows["split"] = f"{n_train} train / {n_eval} eval (data.eval: {data_cfg.eval})"
    elif held_out:
        rows["split"] = (
            f"{n_train} train (split '{data_cfg.split}') / {n_eval} eval ({held_out}: the dataset's own "
            "held-out split; data.eval unset)"
        )
    elif n_eval:
        rows["split"] = (
            f"{n_train} train / {n_eval} eval ({data_cfg.eval_fraction:g} of data.train held out, seed {seed})"
        )
    else:
        why = "data.eval_fraction is 0" if not data_cfg.eval_fraction else "fewer than 10 records to split"
        rows["split"] = (
            f"{n_train} train, no held-out eval ({why})" if report is not None else f"{n_train} train"
        )
    return rows


def truncation_row(encoded) -> str:
    """What tokenization cut, from `encode_data`'s report: prompts cut to their last max_prompt_length
    tokens, responses cut to fit max_length, records dropped because truncation made them identical."""
    report, lengths = getattr(encoded, "report", None), getattr(encoded, "lengths", None)
    if report is None or lengths is None:
        return ""
    max_length, max_prompt_length = lengths
    text = (
        f"{report.prompts_cut} of {report.records} prompts cut to their last {max_prompt_length} tokens, "
        f"{report.responses_cut} of {report.responses} responses cut to fit max_length {max_length}"
    )
    dropped = report.records - len(encoded)
    return text + (f"; {dropped} records dropped (responses with identical token ids)" if dropped else "")


def lm_rows(
    cfg, records, eval_records, encoded, reference: str | None, packed: bool | None = None
) -> dict[str, str]:
    """The console rows of a language-model run: data, split, truncation, reference, packing.
    `reference`: None for a reference-free loss, else the configured strategy; `packed`: the layout the run
    uses (None: the one data.packing asks for)."""
    rows = data_rows(cfg.data, records, eval_records, cfg.train.seed)
    rows["truncated"] = truncation_row(encoded)
    if reference is None:
        rows["reference"] = "none (the loss is reference-free)"
    else:
        strategy = "precompute" if reference == "auto" else reference
        rows["reference"] = {
            "precompute": "the initial policy's log-probs, computed once before training and cached",
            "frozen": "a frozen copy of the initial policy, run on every batch",
            "adapter": "the policy with its LoRA adapters disabled",
        }[strategy] + f" (model.reference.strategy {reference})"
    packed = cfg.data.packing if packed is None else packed
    if packed:
        rows["packing"] = (
            "on (data.packing: true): padding-free rows, each prompt once; checked equal to padded batches"
        )
        paths = packing.paths_used()
        if paths:
            rows["packing"] += f"; attention path {paths}"
    elif cfg.data.packing:
        rows["packing"] = (
            "off: this model cannot run the packed layout (see the line above); right-padded batches"
        )
    else:
        rows["packing"] = "off: right-padded batches (data.packing: false)"
    return rows
