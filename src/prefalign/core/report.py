"""Reports: `summary.json`, `report.md` tables and matplotlib plots, shared by every demo and `prefalign eval`."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from prefalign.core import extras


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def pm(mean: float, std: float, digits: int = 3, signed: bool = False) -> str:
    """`mean ± std` over seeds; the mean alone when the spread is exactly 0 (`mean_std` of one seed: a
    report never shows a "± 0" that only means one seed was run)."""
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if std == 0 else f"{text} ± {std:.{digits}f}"


def fmt(value, digits: int = 3) -> str:
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float)) for v in value)
    ):
        return pm(*value, digits=digits)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str], digits: int = 3) -> str:
    """A markdown table; a cell holding (mean, std) prints as `mean ± std` (see `pm`)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, ""), digits) for c in columns) + " |")
    return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):  # 0-d torch tensor
        return obj.item()
    return obj


def write_summary(out_dir: str | Path, summary: dict) -> Path:
    path = Path(out_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    return path


def write_report(out_dir: str | Path, title: str, sections: Sequence[str]) -> Path:
    path = Path(out_dir) / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n" + "\n\n".join(s.strip() for s in sections) + "\n")
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (servers and CI have no display)."""
    extras.require("demos", "drawing a report's figures")
    import matplotlib  # lazy: only reports draw plots, and the backend must be chosen first (prefalign[demos])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write the PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_lines(
    path: str | Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    bands: dict[str, Sequence[float]] | None = None,
    markers: bool = False,
    steps: dict[str, Sequence[int]] | None = None,
) -> Path:
    """One line per series name -> (x, y); optional +-band per series (e.g. seed std). `steps` (per series,
    the training step of each point) marks where each path starts and ends and which way it runs: for
    curves over training drawn against something other than the step (reward vs KL)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, (x, y) in series.items():
        (line,) = ax.plot(x, y, marker="o" if markers else None, ms=3, label=name)
        if steps and name in steps and len(x) > 1:
            mark_time(ax, x, y, steps[name], line.get_color())
        if bands and name in bands:
            y_arr, b_arr = np.asarray(y, float), np.asarray(bands[name], float)
            ax.fill_between(x, y_arr - b_arr, y_arr + b_arr, alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def mark_time(ax, x, y, steps, color) -> None:
    """The direction of time on a path over training: an arrow on its last segment and the step numbers of
    its first and last points."""
    ax.annotate("", xy=(x[-1], y[-1]), xytext=(x[-2], y[-2]),
                arrowprops={"arrowstyle": "-|>", "color": color, "lw": 1.2})  # fmt: skip
    for i in (0, len(x) - 1):
        ax.annotate(f"step {steps[i]}", (x[i], y[i]), fontsize=6, color=color, xytext=(3, -8),
                    textcoords="offset points")  # fmt: skip


def plot_bars(path: str | Path, values: dict[str, tuple[float, float]], ylabel: str, title: str = "") -> Path:
    """Bar chart of name -> (mean, std)."""
    plt = pyplot()
    names = list(values)
    means = [values[n][0] for n in names]
    stds = [values[n][1] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.8))
    ax.bar(names, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The lines of `metrics.jsonl` of a run directory."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ model card, eval.md


def _version() -> str:
    try:
        return metadata.version("prefalign")
    except metadata.PackageNotFoundError:
        return "unknown"


def _numbers(metrics: dict) -> dict[str, float]:
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
    }


def metrics_table(metrics: dict, digits: int = 4) -> str:
    """A two-column markdown table of the numeric entries of `metrics`."""
    rows = [f"| {k} | {v:.{digits}g} |" for k, v in _numbers(metrics).items()]
    return "\n".join(["| metric | value |", "|---|---|", *rows]) if rows else "(none)"


def _data_text(data: dict) -> str:
    train = data.get("train")
    items = train if isinstance(train, list) else [train]
    names = []
    for item in items:
        if isinstance(item, dict):
            names.append(f"`{item.get('path')}` (weight {item.get('weight')})")
        elif item:
            names.append(f"`{item}`")
    text = " + ".join(names) or "in-memory records (passed to `prefalign.run`)"
    if data.get("eval"):
        text += f"; eval: `{data['eval']}`"
    elif data.get("eval_fraction"):
        text += f"; eval: {data['eval_fraction']:.0%} of train held out"
    return text


def card_data(cfg: dict, folder: Path, license: str | None = None):
    """The hub's metadata of a model folder (`huggingface_hub.ModelCardData`): base_model (a hub id),
    datasets (the hub datasets of data.train/data.eval), library_name (what loads the folder: transformers,
    peft or diffusers), tags (prefalign, the method, the loss) and license (when given)."""
    from huggingface_hub import ModelCardData  # lazy: only model cards need it

    model, loss = cfg.get("model", {}), cfg.get("loss") or {}
    base = model.get("name_or_path", "")
    folder = Path(folder)
    adapter = (folder / "adapter_config.json").is_file()
    diffusion = (folder / "pytorch_lora_weights.safetensors").is_file() or (folder / "unet").is_dir()
    library = "peft" if adapter else "transformers" if (folder / "config.json").is_file() else None
    library = "diffusers" if diffusion else library
    hub_id = base and not base.startswith(("world:", ".", "/", "~")) and library is not None
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    names = [data.get("eval")] + [
        s.get("path") if isinstance(s, dict) else s
        for s in (data.get("train") if isinstance(data.get("train"), list) else [data.get("train")])
    ]
    datasets = [n.removeprefix("hf://") for n in names if isinstance(n, str) and n and _is_hub_name(n)]
    tags = ["prefalign", cfg.get("method", ""), loss.get("name")]
    return ModelCardData(
        base_model=base if hub_id else None,
        datasets=datasets or None,
        library_name=library,
        tags=[t for t in dict.fromkeys(tags) if t],
        license=license,
    )


def _is_hub_name(text: str) -> bool:
    if text.startswith("hf://"):
        return True
    path = Path(text).expanduser()
    return not path.exists() and not path.suffix and text.count("/") == 1 and not text.startswith(("/", "."))


def model_card(cfg: dict, summary: dict, folder: Path, evaluation: dict | None = None, license=None) -> str:
    """README.md of a model folder (`final/` or an export): the hub's metadata (`card_data`), then base model,
    method, data, key settings and the evaluation numbers. How to load it follows from what the folder holds
    (an adapter or a full model). Built and checked as a `huggingface_hub.ModelCard`."""
    from huggingface_hub import ModelCard  # lazy: only model cards need it

    model, train, loss = cfg.get("model", {}), cfg.get("train", {}), cfg.get("loss") or {}
    base = model.get("name_or_path", "")
    adapter = (Path(folder) / "adapter_config.json").is_file()
    is_lm = adapter or (Path(folder) / "config.json").is_file()
    lora = (model.get("lora") or {}).get("enabled", False)
    options = ", ".join(f"{k} {v}" for k, v in loss.items() if k != "name" and v is not None)
    loss_text = f"`{loss.get('name')}`" + (f" ({options})" if options else "") if loss else "-"
    front = ["---", card_data(cfg, folder, license).to_yaml(), "---"]
    lora_text = (
        f"LoRA r {model['lora'].get('r')}, alpha {model['lora'].get('alpha')}, "
        f"targets {model['lora'].get('target_modules') or 'all linear layers'}"
        + ("" if adapter or not is_lm else " (merged into the base here)")
        if lora
        else "full fine-tuning"
    )
    rows = {
        "base model": f"`{base}`" if base else "-",
        "method": f"{cfg.get('method')} (prefalign {_version()})",
        "loss": loss_text,
        "fine-tuning": lora_text if base else "-",
        "data": _data_text(cfg.get("data") if isinstance(cfg.get("data"), dict) else {}),
        "training": (
            f"{summary.get('steps')} optimizer steps, batch {train.get('batch_size')} x grad_accum "
            f"{train.get('grad_accum')}, learning rate {train.get('learning_rate')} ({train.get('lr_scheduler')}, "
            f"warmup {train.get('warmup_steps')}), seed {train.get('seed')}"
        ),
        "precision": f"weights {model.get('dtype', 'float32')}, mixed precision {train.get('mixed_precision')}",
    }
    lines = [
        *front,
        f"# {Path(base).name if base else cfg.get('method')} aligned with {cfg.get('method')}",
        "",
        "Trained with prefalign (`prefalign train`); the run's full config is `config.yaml` in the run "
        "directory that holds this folder.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows.items()],
        "",
        "## Results",
        "",
        "Training metrics of the last logging window:",
        "",
        metrics_table(summary.get("final", {})),
    ]
    if summary.get("eval"):
        lines += ["", "Held-out evaluation at the end of training:", "", metrics_table(summary["eval"])]
    if evaluation:
        lines += ["", "`prefalign eval` (eval.json):", "", metrics_table(evaluation)]
    if is_lm:
        loader = "AutoPeftModelForCausalLM" if adapter else "AutoModelForCausalLM"
        module = "peft" if adapter else "transformers"
        lines += [
            "",
            "## Use",
            "",
            "```python",
            f"from {module} import {loader}",
            f'model = {loader}.from_pretrained("PATH/TO/THIS/FOLDER")',
            "```",
        ]
        if adapter and base.startswith("world:"):
            lines.append(
                f"\nThe base is `{base}`, a prefalign world: load it with prefalign, or write a merged copy "
                "with `prefalign export RUN_DIR OUT --merge-lora`."
            )
    lines += _diffusion_use(Path(folder), base)
    return ModelCard("\n".join(lines) + "\n").content


def _diffusion_use(folder: Path, base: str) -> list[str]:
    """How to load a diffusion run trained on a Stable Diffusion pipeline: its LoRA through the pipeline's
    `load_lora_weights`, or its UNet (a bare-UNet run, with `scheduler/` beside it, has no pipeline)."""
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        load = ['pipe.load_lora_weights("PATH/TO/THIS/FOLDER")']
    elif (folder / "unet").is_dir() and not (folder / "scheduler").is_dir():
        load = ['pipe.unet = UNet2DConditionModel.from_pretrained("PATH/TO/THIS/FOLDER/unet")']
    else:
        return []
    where = (
        f"prefalign world `{base}` (its pipeline folder is in prefalign's cache)"
        if base.startswith("world:")
        else f"`{base}`"
    )
    return [
        "", "## Use", "", f"The base pipeline is {where}.", "", "```python",
        "from diffusers import DiffusionPipeline, UNet2DConditionModel",
        f'pipe = DiffusionPipeline.from_pretrained("{base if not base.startswith("world:") else "BASE_PIPELINE"}")',
        *load, 'image = pipe("a prompt").images[0]', "```",
    ]  # fmt: skip


def eval_markdown(run_dir: Path, method: str, result: dict) -> str:
    """eval.md: the numbers of eval.json in a table, what they measure, and the generated samples."""
    result = dict(result)
    samples = result.pop("samples", None)
    notes = result.pop("notes", [])
    lines = [f"# Evaluation of `{run_dir}` ({method})", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", metrics_table(result)]
    if samples:
        lines += ["", "## Samples (policy beside reference, same prompt, sampled at temperature 1)", ""]
        for i, sample in enumerate(samples):
            lines += [
                f"**{i + 1}. prompt:** {sample['prompt']}",
                "",
                f"- policy: {sample['policy']}",
                f"- reference: {sample['reference']}",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"
