"""``sparsectx.sweep``: a pipeline called once with Sparse Context off and once per setting, every call with the same
inputs and seed, as a table of how far each setting moves the output from the full-context output and how long a
call takes (choosing a budget and a selector for a task on one's own inputs).

Built on the drop-in (``sparse_context`` per setting, the state of before restored after); no kernel of its own.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import operator
import statistics
import sys
from dataclasses import dataclass
from time import perf_counter
from typing import Any, NamedTuple, Optional, Sequence

import torch

from . import integration
from ._warn import warn as _warn

# the keys of one setting: ``enable``'s arguments (those a row leaves out take enable's defaults), and a label
SETTING_KEYS = ("budget", "selector", "seed", "attention", "signals")
LABEL_KEY = "label"
# output types the sweep compares: images as floats in [0, 1] (``pil`` read as 8-bit values / 255), or the latents
IMAGE_OUTPUT_TYPES = ("pt", "np", "pil")
OUTPUT_TYPES = IMAGE_OUTPUT_TYPES + ("latent",)
# what a modular pipeline's call returns (its ``output`` argument): the decoded images or the latents
MODULAR_OUTPUTS = ("images", "latents")
BASELINE_LABEL = "sparsectx off"
_ADD_NOTE = hasattr(BaseException, "add_note")  # (Python >= 3.11)


class SweepRow(NamedTuple):
    """One row: ``settings`` (``enable``'s arguments, without the label; None: Sparse Context off, the baseline),
    ``kept`` the share of the reference tokens the last call kept (over the batch and every selection the call made:
    GLM-Image selects each reference image in a forward of its own; 1.0 for the baseline), ``seconds`` the median
    time of a timed call, and the output against the baseline's: ``psnr`` in dB over the whole batch (images only,
    ``inf`` when equal; None for latents), ``rel_rmse`` (root of the mean squared difference over that of the
    baseline) and ``max_abs_diff`` (NaN where the output or the baseline holds NaN; a baseline holding NaN or inf
    warns)."""

    label: str
    settings: Optional[dict]
    kept: float
    seconds: float
    psnr: Optional[float]
    rel_rmse: float
    max_abs_diff: float


@dataclass
class Sweep:
    """``rows`` (the baseline first, then one per setting in the order given) and, with ``keep_outputs=True``, each
    row's output as a float32 CPU tensor (images ``[B, C, H, W]`` or ``[B, H, W, C]`` as the output type gives
    them, or the latents) and what its last call kept (``sparsectx.last_selection``'s ``Selection``, e.g.
    ``selections[2].grids()`` to view it; None for the baseline). ``table()`` is a markdown table; ``plot(path)``
    draws PSNR (or the relative RMSE) and the time of a call against the share kept."""

    rows: list
    outputs: Optional[list] = None
    selections: Optional[list] = None

    def table(self) -> str:
        """The rows as a markdown table: each setting's kept share, time per call, speed-up over the first row
        (its baseline), and its output's PSNR, relative RMSE and largest absolute difference against that baseline's
        output (``str(sweep)`` gives the same)."""
        baseline = self.rows[0].seconds
        lines = ["| setting | kept | time per call | speed-up | PSNR | rel. RMSE | max abs diff |",
                 "|---|---|---|---|---|---|---|"]
        for row in self.rows:
            psnr = "—" if row.psnr is None else ("inf" if math.isinf(row.psnr) else f"{row.psnr:.2f} dB")
            label = row.label.replace("|", "\\|")  # (a cell of its own)
            lines.append(f"| {label} | {100 * row.kept:.1f}% | {_duration(row.seconds)} | "
                         f"{baseline / row.seconds:.2f}x | {psnr} | {row.rel_rmse:.3g} | {row.max_abs_diff:.3g} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path=None):
        """A matplotlib ``Figure`` (no pyplot state touched), saved to ``path`` when given: fidelity and time per
        call against the share of reference tokens kept, one labelled point per setting; the baseline's time is the
        dashed line. Points of infinite PSNR (outputs equal to the baseline's) and of NaN (an output holding NaN:
        the table says so) are left out of the first panel."""
        try:
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError("Sweep.plot needs matplotlib (pip install 'sparsectx[plot]')") from e
        rows = self.rows[1:]
        images = rows[0].psnr is not None if rows else True
        fig = Figure(figsize=(10, 4), layout="constrained")
        fidelity, timing = fig.subplots(1, 2)
        for i, row in enumerate(rows):
            color = f"C{i % 10}"  # one colour per setting in both panels
            value = row.psnr if images else row.rel_rmse
            if math.isfinite(value):
                fidelity.plot(100 * row.kept, value, "o", color=color)
                fidelity.annotate(row.label, (100 * row.kept, value), fontsize=7, parse_math=False)
            timing.plot(100 * row.kept, row.seconds, "o", color=color)
            # (parse_math=False: a label's "$" is text, not the start of a formula)
            timing.annotate(row.label, (100 * row.kept, row.seconds), fontsize=7, parse_math=False)
        fidelity.set_xlabel("reference tokens kept (%)")
        fidelity.set_ylabel("PSNR against Sparse Context off (dB)" if images else "relative RMSE against off")
        timing.axhline(self.rows[0].seconds, linestyle="--", color="gray", label=BASELINE_LABEL)
        timing.set_xlabel("reference tokens kept (%)")
        timing.set_ylabel("seconds per call")
        timing.legend()
        if path is not None:
            fig.savefig(path)
        return fig


def _duration(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 1 else f"{1e3 * seconds:.1f} ms"


def _short(value) -> str:
    """A one-line description of a setting's value for its label (tensors by shape, also inside a budget object;
    callables by name)."""
    from .selection import AdaptiveBudget, FixedBudget

    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, FixedBudget):
        return f"{value.name}({_short(value.value)})"
    if isinstance(value, AdaptiveBudget):
        return f"adaptive({', '.join(f'{k}={_short(v)}' for k, v in value.settings().items())}, mass={value.mass!r})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_short(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(item) for item in value) + "]"
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    if isinstance(value, functools.partial):
        return f"partial({_short(value.func)})"
    text = " ".join((value if isinstance(value, str) else repr(value)).split())  # one line: a table cell
    return type(value).__name__ if " at 0x" in text else text  # (not a memory address)


def _label(setting: dict) -> str:
    if LABEL_KEY in setting:
        return " ".join(str(setting[LABEL_KEY]).split())
    return ", ".join(f"{key}={_short(value)}" for key, value in setting.items()) or "defaults"


def _labels(rows: list) -> list:
    """The rows' labels, the baseline's first; a label two settings share (or one with the baseline's) gets its
    setting's index appended (``settings[i]``), so that no two rows of the table or points of the plot read alike
    (where that still leaves two alike, a given label reading like another's appended form, every setting's label
    gets its index: labels then differ in the index at their end)."""
    labels = [_label(setting) for setting in rows]
    named = [label if (labels + [BASELINE_LABEL]).count(label) == 1 else f"{label} (settings[{i}])"
             for i, label in enumerate(labels)]
    if len(set(named + [BASELINE_LABEL])) < len(named) + 1:
        named = [f"{label} (settings[{i}])" for i, label in enumerate(labels)]
    return [BASELINE_LABEL] + named


def _check_seed(seed) -> int:
    """The sweep's seed as an int that ``torch.Generator.manual_seed`` takes (numpy integers included)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = operator.index(seed)
    try:
        torch.Generator().manual_seed(seed)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"seed {seed} is out of range for torch.Generator.manual_seed: {error}") from None
    return seed


def _check_count(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, got {value}")


def _enable_args(setting: dict) -> dict:
    """A setting's ``enable`` arguments (without its label)."""
    return {key: value for key, value in setting.items() if key != LABEL_KEY}


def _check_settings(pipe, settings) -> list:
    """The settings as a list of dicts, each checked as ``enable`` checks its arguments and its target (errors name
    the row), before any call: ``enable`` itself runs only once the earlier rows' calls are done."""
    if isinstance(settings, (dict, str)) or not isinstance(settings, Sequence):
        raise TypeError(f"settings must be a list of dicts of enable()'s arguments, got {type(settings).__name__}")
    if len(settings) == 0:
        raise ValueError("settings is empty: give at least one dict of enable()'s arguments, e.g. {'budget': 0.1}")
    rows = []
    for i, setting in enumerate(settings):
        if not isinstance(setting, dict):
            raise TypeError(f"settings[{i}] must be a dict of enable()'s arguments, got {type(setting).__name__}")
        unknown = sorted(set(setting) - set(SETTING_KEYS) - {LABEL_KEY}, key=str)
        if unknown:
            raise ValueError(f"settings[{i}] has unknown keys {unknown}: allowed are {list(SETTING_KEYS)} and "
                             f"'{LABEL_KEY}'")
        if LABEL_KEY in setting:
            label = setting[LABEL_KEY]
            if not isinstance(label, str):
                raise TypeError(f"settings[{i}]['{LABEL_KEY}'] must be a str, got {type(label).__name__}")
            if not label.strip():
                raise ValueError(f"settings[{i}]['{LABEL_KEY}'] is empty: give the row a name, or leave '{LABEL_KEY}' "
                                 "out (the row is then named by its settings)")
        args = _enable_args(setting)
        try:
            integration.check_enable_arguments(**args)
            integration.check_enable_target(pipe, args.get("attention", integration.NATIVE))
        except (TypeError, ValueError, RuntimeError) as e:
            raise type(e)(f"settings[{i}]: {e}") from e
        rows.append(setting)
    return rows


def _is_modular(pipe) -> bool:
    modular = sys.modules.get("diffusers.modular_pipelines")
    return modular is not None and isinstance(pipe, modular.ModularPipeline)


def _bar_owners(pipe) -> list:
    """What holds a pipeline's progress-bar settings: the pipeline, or every block of a modular pipeline that has
    them, however deep (its own ``set_progress_bar_config`` reaches its top-level blocks only, where the denoising
    loop's bar usually is not)."""
    if not _is_modular(pipe):
        return [pipe]
    owners, blocks = [], [pipe._blocks]
    while blocks:
        block = blocks.pop()
        if hasattr(block, "set_progress_bar_config"):
            owners.append(block)
        blocks.extend((getattr(block, "sub_blocks", None) or {}).values())
    return owners


def _output_of(out):
    """The images (or latents) a pipeline call returned: ``.images`` of its output object, the first item of its
    tuple (``return_dict=False``), or the value itself (a modular pipeline called with ``output=...``)."""
    if hasattr(out, "images"):
        return out.images
    return out[0] if isinstance(out, tuple) else out


def _as_float_tensor(images) -> torch.Tensor:
    """Images or latents as a float64 CPU tensor (a list of PIL images as their 8-bit values / 255)."""
    if isinstance(images, (list, tuple)):
        import numpy as np

        return torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float64) / 255.0)
                            if not isinstance(image, torch.Tensor) else image.detach().to("cpu", torch.float64)
                            for image in images])
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(images)
    return images.detach().to("cpu", torch.float64)


def _compare(output: torch.Tensor, baseline: torch.Tensor, images: bool) -> tuple:
    """(psnr, rel_rmse, max_abs_diff) of ``output`` against ``baseline`` (float64 tensors of one shape)."""
    if output.shape != baseline.shape:
        raise RuntimeError(f"an output of shape {tuple(output.shape)} against the baseline's "
                           f"{tuple(baseline.shape)}: the settings changed what the pipeline returns")
    diff = output - baseline
    mse = diff.pow(2).mean().item()
    # (an infinite error: -inf dB, where 1 / mse = 0 has no logarithm)
    psnr = (math.inf if mse == 0 else -math.inf if mse == math.inf else 10 * math.log10(1.0 / mse)) if images else None
    reference = baseline.pow(2).mean().item()
    if math.isnan(mse) or math.isnan(reference):  # (NaN in the output or the baseline: no distance to report)
        rel_rmse = math.nan
    else:
        rel_rmse = math.sqrt(mse / reference) if reference > 0 else (0.0 if mse == 0 else math.inf)
    return psnr, rel_rmse, diff.abs().max().item() if diff.numel() else 0.0


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def sweep(pipe, settings: Sequence[dict], *, seed: int = 0, repeats: int = 1, warmup: int = 1,
          keep_outputs: bool = False, progress: Optional[bool] = None, **call_kwargs: Any) -> Sweep:
    """Calls ``pipe(**call_kwargs)`` with Sparse Context off (the baseline), then once per setting inside
    ``sparse_context(pipe, **setting)``: ``warmup`` untimed calls and ``repeats`` timed ones each (the median is
    reported), every call with a new ``torch.Generator().manual_seed(seed)``, so every row starts from the same
    noise (and a seedless random selector selects alike in every row). The last call's output is compared with the
    baseline's.

    ``settings``: dicts of ``enable``'s arguments (``budget``, ``selector``, ``seed``, ``attention``, ``signals``;
    the ones left out take ``enable``'s defaults, not the pipeline's current settings) and optionally ``label`` (a
    non-empty str).
    ``call_kwargs``: the pipeline's own arguments, without ``generator``; ``output_type`` defaults to ``"pt"`` (one
    of ``pt``, ``np``, ``pil``: PSNR of images in [0, 1]; ``latent``: no PSNR); a modular pipeline needs
    ``output="images"`` (decoded with its ``output_type``, by default PIL) or ``"latents"``. The pipeline's Sparse
    Context state and progress-bar settings are restored after the sweep (its own bars are off during it;
    ``progress`` shows the sweep's, by default on a terminal). Every argument is checked before the first call, and
    what ``enable`` would refuse of the pipeline; an error raised in a row's call carries a note naming the row
    (Python 3.10: printed to stderr)."""
    if isinstance(pipe, torch.nn.Module) or not callable(pipe) or not hasattr(pipe, "set_progress_bar_config"):
        raise TypeError(f"pipe must be a diffusers pipeline (sweep calls it), got {type(pipe).__name__}")
    integration.check_enable_target(pipe)  # a pipeline of a supported family that enable can run
    rows = _check_settings(pipe, settings)
    seed = _check_seed(seed)
    if not isinstance(keep_outputs, bool):
        raise TypeError(f"keep_outputs must be a bool, got {type(keep_outputs).__name__}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or None, got {type(progress).__name__}")
    _check_count("repeats", repeats, 1)
    _check_count("warmup", warmup, 0)
    if "generator" in call_kwargs:
        raise ValueError("call_kwargs: pass no generator: sweep seeds every call with torch.Generator()."
                         "manual_seed(seed) (give `seed=`)")
    for name, value in call_kwargs.items():
        if isinstance(value, dict) and integration.CALL_KWARG in value:
            raise ValueError(f"call_kwargs: {name}[{integration.CALL_KWARG!r}] would override every row's settings: "
                             "give the settings to compare as `settings`")
    modular = _is_modular(pipe)
    if modular and call_kwargs.get("output") not in MODULAR_OUTPUTS:
        raise ValueError(f"output must be one of {list(MODULAR_OUTPUTS)} for a modular pipeline's sweep (what its "
                         f"call returns, to be compared), got {call_kwargs.get('output')!r}")
    output_type = call_kwargs.get("output_type", "pil") if modular else call_kwargs.setdefault("output_type", "pt")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)} to be compared, got {output_type!r}")
    images = output_type in IMAGE_OUTPUT_TYPES and not (modular and call_kwargs["output"] == "latents")

    from tqdm import tqdm

    bar_configs = [(owner, dict(getattr(owner, "_progress_bar_config", {}))) for owner in _bar_owners(pipe)]
    results, outputs, selections = [], [], []
    baseline = None
    try:
        for owner, _ in bar_configs:
            owner.set_progress_bar_config(disable=True)
        with tqdm(total=(1 + len(rows)) * (warmup + repeats), desc="sweep", unit="call", file=sys.stderr,
                  disable=None if progress is None else not progress) as bar:
            for i, (setting, label) in enumerate(zip([None] + rows, _labels(rows))):
                bar.set_postfix_str(label)
                try:
                    output, seconds, selection, kept = _run_row(pipe, setting, seed, warmup, repeats, call_kwargs,
                                                                bar)
                except Exception as error:  # which row failed (errors found only once the call lays out its images)
                    where = f"in sparsectx.sweep's row {label!r}" + ("" if setting is None else
                                                                      f" (settings[{i - 1}])")
                    if _ADD_NOTE:
                        error.add_note(where)
                    else:  # (Python 3.10: no notes on exceptions)
                        print(f"sparsectx.sweep: the error below came {where}", file=sys.stderr)
                    raise
                output = _as_float_tensor(output)
                if baseline is None:
                    baseline = output
                    if not bool(torch.isfinite(baseline).all()):
                        _warn("sparsectx.sweep: the baseline's output (Sparse Context off) holds NaN or inf: the "
                              "rows' PSNR, relative RMSE and largest difference against it read NaN or inf",
                              RuntimeWarning)
                psnr, rel_rmse, max_abs_diff = _compare(output, baseline, images)
                results.append(SweepRow(label, None if setting is None else _enable_args(setting), kept,
                                        statistics.median(seconds), psnr, rel_rmse, max_abs_diff))
                if keep_outputs:
                    outputs.append(output.float())
                    selections.append(selection)
    finally:
        for owner, config in bar_configs:
            owner.set_progress_bar_config(**config)
    return Sweep(results, outputs, selections) if keep_outputs else Sweep(results)


def _run_row(pipe, setting: Optional[dict], seed: int, warmup: int, repeats: int, call_kwargs: dict, bar) -> tuple:
    """(last output's images, timed seconds, last selection or None, share of the reference tokens the last call's
    selections kept) of one row's calls."""
    _, transformer, _ = integration._split_target(pipe)
    # as inside sparse_context: other threads' calls and blocks on the transformer wait for the row's calls
    with integration.transformer_lock(transformer), integration.restored_state(pipe):
        if setting is None:
            integration.disable(pipe)
        else:
            integration.enable(pipe, **_enable_args(setting))
        seconds, selections = [], {}
        for call in range(warmup + repeats):
            last = call == warmup + repeats - 1
            # the last call's selections, one per transformer forward that selected anew (GLM-Image selects each
            # reference image in a write forward of its own: the last one's alone would misstate the share kept);
            # the hook's host work, a few microseconds per forward, is inside that call's time
            hook = _selection_hook(pipe, selections) if last and setting is not None else contextlib.nullcontext()
            with hook:
                _synchronize()
                start = perf_counter()
                out = pipe(**call_kwargs, generator=torch.Generator().manual_seed(seed))
                _synchronize()
            if call >= warmup:
                seconds.append(perf_counter() - start)
            bar.update(1)
        selection = integration.last_selection(pipe) if setting is not None else None
    if setting is None:
        return _output_of(out), seconds, selection, 1.0
    kept = sum(s.keep.sum().item() for s in selections.values())
    total = sum(s.keep.numel() for s in selections.values())
    return _output_of(out), seconds, selection, kept / total if total else 1.0


@contextlib.contextmanager
def _selection_hook(pipe, found: dict):
    """While the block runs, each selection the pipeline's transformer forwards make (``last_selection`` after each
    forward), once each, into ``found`` (by the plan holding it: a forward reusing a cached selection adds nothing;
    ``last_selection`` returns copies, so its tensors can not tell)."""
    _, transformer, _ = integration._split_target(pipe)
    plans = []  # (held while the block runs: a freed plan's id could be another's)

    def record(module, args, output):
        patch = getattr(transformer, integration.PATCH_ATTR, None)
        plan = patch.cache if patch is not None else None
        if plan is not None and id(plan) not in found:
            plans.append(plan)
            found[id(plan)] = integration.last_selection(pipe)

    handle = transformer.register_forward_hook(record)
    try:
        yield
    finally:
        handle.remove()
