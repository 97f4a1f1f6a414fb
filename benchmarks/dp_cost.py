"""DP-SGD cost at real size: each Opacus per-sample-gradient mode against a plain step.

    .venv/bin/python benchmarks/dp_cost.py --quick                    # small inputs (~3 min)
    .venv/bin/python benchmarks/dp_cost.py --models densenet121       # one network, real size
    .venv/bin/python benchmarks/dp_cost.py --json out/dp_cost.json    # every network (~15 min)
    .venv/bin/python benchmarks/dp_cost.py --report out/a.json out/b.json --json out/all.json
    .venv/bin/python benchmarks/dp_cost.py --profile --models densenet121   # one step's parts

For every catalogue network at a realistic input (2D classifiers 1x224x224, 3D segmentation
1x96^3; ``--quick``: 1x64x64 and 1x32^3) and batch, one training step is timed and its memory
measured, without DP and in each of Opacus' per-sample-gradient modes (``hooks``,
``functorch``, ``ew``: expanded weights, ``ghost``: fast gradient clipping; see
:mod:`site_node.privacy.modes`):

* **Plain**: ``zero_grad``, forward, the task's loss, backward, SGD step.
* **DP**: the same loop inside the site's own :meth:`DpTrainer.private_round` in that mode:
  Poisson sampling at rate 1 (so every step holds the whole batch), flat clipping, secure
  noise (what production runs: Opacus' four-draw noise), the accountant's hook.
* **Physical batches** (``--physical N``, default a quarter of the batch): the chosen mode
  once more with Opacus' ``BatchMemoryManager`` splitting the batch into physical batches of
  at most N records (the site's ``dp_max_physical_batch``): the same logical step in less
  memory.

Time and memory are measured apart, each in a process of its own forked from this one
before any tensor work. **Time**: one process per network holds a copy of the network for
every variant (plain, each mode) and takes one step of each in turn, ``--steps`` rounds after
a warm-up round; each variant's figure is its fastest step. Taking turns step by step is
what makes the ratios hold on a shared machine whose load changes by the minute: a busy
spell slows every variant alike. **Memory**: one process per variant takes two steps; the
figure is the peak RSS during them (``VmHWM``, reset just before the first through
``/proc/self/clear_refs``) less the RSS before them (model, data and Opacus' wrapping already
there): what a step adds. Ratios are DP over plain.

Correctness, once per network before the timing, on a batch of ``--check-batch`` records at
the same input: each mode's clipped per-sample gradient sum (noise 0, clipping norm the
median per-record gradient norm, so that about half the records are clipped) against a
plain loop over the records one at a time (each record's gradient, clipped, summed), both in
float64 (in float32 the deepest networks differ by up to 5e-3 of the largest value from
rounding alone). A mode whose relative error exceeds 1e-6 is reported wrong, one that raises
failing; and each mode must take the site's step for an empty batch, which Poisson sampling
draws now and then (:func:`site_node.privacy.modes.empty_step`). The fastest mode that
passes both is the one to train with (ties within ``site_node.privacy.modes.TIE_MARGIN`` go
to ``hooks``); the last table compares it with ``site_node.privacy.modes.MODES``.

Data are random tensors (the timing does not depend on the values); 2 classes; ``--threads``
torch threads (default 2).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import multiprocessing
import os
import platform
import re
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from concord_protocol.contract import ModelSpec, PrivacySpec, TaskSpec, TrainingSpec
from site_node.privacy import DpTrainer
from site_node.privacy.modes import (
    MODES,
    TIE_MARGIN,
    GradSampleMode,
    choose,
    empty_step,
    make_private,
)
from site_node.training import build_model, num_parameters
from site_node.training.loops import loss_function

MODE_NAMES: tuple[GradSampleMode, ...] = get_args(GradSampleMode)
#: A mode's clipped sum (in float64) may differ from the per-record loop by rounding only.
TOLERANCE = 1e-6

Task = Literal["classification", "segmentation"]


@dataclass(frozen=True)
class Case:
    """One network at one input size and batch."""

    model: str
    input_shape: tuple[int, ...]
    batch: int
    task: Task
    #: Timed rounds: one step of every variant each, in turn, after a warm-up round.
    steps: int
    #: Records in the correctness check.
    check_batch: int
    #: Input of the correctness check, if not ``input_shape`` (the 3D networks: the float64
    #: per-record loop at 96^3 would need more memory than the step itself).
    check_shape: tuple[int, ...] | None = None

    @property
    def input_label(self) -> str:
        """The input as ``CxHxW`` (or ``CxDxHxW``)."""
        return "x".join(str(d) for d in self.input_shape)


def cases(quick: bool) -> list[Case]:
    """Every catalogue network at its realistic input (``quick``: smaller inputs)."""
    side, cube = (64, 32) if quick else (224, 96)
    image = (1, side, side)
    volume = (1, cube, cube, cube)
    small_steps, big_steps, volume_steps = (3, 2, 2) if quick else (5, 2, 1)
    return [
        Case("tabular-mlp", (30,), 256, "classification", 20, 8),
        Case("image-cnn", image, 32, "classification", small_steps, 4),
        Case("image-densenet", image, 32, "classification", small_steps, 4),
        Case("densenet121", image, 8, "classification", big_steps, 4),
        Case("resnet18", image, 8, "classification", big_steps, 4),
        Case("resnet50", image, 8, "classification", big_steps, 4),
        Case("unet", volume, 2, "segmentation", volume_steps, 2, (1, 32, 32, 32)),
        Case("segresnet", volume, 2, "segmentation", volume_steps, 2, (1, 32, 32, 32)),
    ]


# --- one cell, in a child process -----------------------------------------------------------


def _memory_mb() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) of this process, in MB."""
    status = Path("/proc/self/status").read_text()
    rss, hwm = (int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM"))  # type: ignore[union-attr]
    return rss / 1024, hwm / 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def _data(case: Case, records: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(records, *case.input_shape, generator=gen)
    label_shape = (records, *case.input_shape[1:]) if case.task == "segmentation" else (records,)
    return x, torch.randint(0, 2, label_shape, generator=gen)


def _model(case: Case, seed: int) -> nn.Module:
    spec = ModelSpec(name=case.model, version="1")
    return build_model(spec, input_shape=case.input_shape, num_classes=2, seed=seed)


#: What one step is: ``("plain", None)``, or a DP mode and its largest physical batch.
Variant = tuple[str, int | None]
PLAIN: Variant = ("plain", None)


def variant_label(variant: Variant) -> str:
    """``plain``, ``hooks``, ``ghost / 4`` (physical batches of at most 4)."""
    mode, physical = variant
    return mode if physical is None else f"{mode} / {physical}"


def _stepper(
    case: Case, variant: Variant, seed: int, stack: contextlib.ExitStack
) -> Callable[[], None]:
    """One training step of ``variant`` on a fresh copy of the network (a DP variant's
    private round stays open in ``stack``)."""
    model = _model(case, seed)
    x, y = _data(case, case.batch, seed)
    loss_fn = loss_function(TaskSpec(kind=case.task))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=case.batch)
    mode, physical = variant
    if mode == "plain":

        def plain() -> None:
            for xb, yb in loader:  # one batch, assembled as in training
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(xb), yb).backward()
                optimizer.step()

        return plain
    trainer = DpTrainer(
        PrivacySpec(epsilon=100.0, delta=1e-5),
        TrainingSpec(rounds=1, batch_size=case.batch, learning_rate=1e-3),
        num_samples=case.batch,  # one step per epoch at sample rate 1: the whole batch
        noise_multiplier=1.0,
        secure_mode=True,
    )
    private = stack.enter_context(
        trainer.private_round(
            model,
            optimizer,
            loader,
            loss=loss_fn,
            grad_sample_mode=mode,  # type: ignore[arg-type]
            max_physical_batch=physical,
        )
    )
    private_loss = private.loss or loss_fn

    def dp() -> None:
        steps = trainer.steps_taken
        for xb, yb in private.data_loader:  # the physical batches of one logical step
            private.optimizer.zero_grad(set_to_none=True)
            private_loss(private.module(xb), yb).backward()
            private.optimizer.step()
        if trainer.steps_taken != steps + 1:
            raise RuntimeError(f"took {trainer.steps_taken - steps} steps, not 1")

    return dp


def run_memory(case: Case, variant: Variant, seed: int) -> dict[str, float]:
    """Peak memory of two steps of ``variant`` over the process's memory before them."""
    with contextlib.ExitStack() as stack:
        step = _stepper(case, variant, seed, stack)
        baseline = _memory_mb()[0]
        _reset_peak()
        for _ in range(2):  # the second step reuses what the first allocated
            step()
        peak = _memory_mb()[1]
    return {"baseline_mb": baseline, "peak_mb": peak, "step_mb": peak - baseline}


def run_interleaved(
    case: Case, variants: list[Variant], rounds: int, seed: int
) -> dict[str, list[float] | str]:
    """Step times of every variant, one step of each in turn per round (so a change of the
    machine's load hits all of them alike), after a round that warms each up; a variant
    that raises is dropped and reported."""
    times: dict[str, list[float] | str] = {}
    with contextlib.ExitStack() as stack:
        steppers: dict[str, Callable[[], None]] = {}
        for variant in variants:
            label = variant_label(variant)
            try:
                steppers[label] = _stepper(case, variant, seed, stack)
                times[label] = []
            except Exception as exc:  # a failing mode is a result
                times[label] = f"fails: {_short(exc)}"
        for r in range(rounds + 1):
            for label, step in list(steppers.items()):
                start = time.perf_counter()
                try:
                    step()
                except Exception as exc:  # a failing mode is a result
                    times[label] = f"fails: {_short(exc)}"
                    del steppers[label]
                    continue
                if r > 0:
                    times[label].append(time.perf_counter() - start)  # type: ignore[union-attr]
    return times


def _clipped_sum_by_records(
    case: Case, seed: int, x: torch.Tensor, y: torch.Tensor
) -> tuple[list[torch.Tensor], float]:
    """Each record's gradient alone, clipped at the median norm, summed; and that norm."""
    model = _model(case, seed).double()
    loss_fn = loss_function(TaskSpec(kind=case.task))
    grads: list[list[torch.Tensor]] = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters() if p.grad is not None])
    norms = [float(torch.stack([(g.double() ** 2).sum() for g in gs]).sum().sqrt()) for gs in grads]
    clip = statistics.median(norms)
    total = [torch.zeros_like(g) for g in grads[0]]
    for gs, norm in zip(grads, norms, strict=True):
        factor = min(1.0, clip / (norm + 1e-6))
        for t, g in zip(total, gs, strict=True):
            t += factor * g
    return total, clip


def _clipped_sum_by_mode(
    case: Case,
    seed: int,
    x: torch.Tensor,
    y: torch.Tensor,
    mode: GradSampleMode,
    clip: float,
    *,
    empty: bool = False,
) -> list[torch.Tensor]:
    """The clipped per-sample gradient sum Opacus computes in ``mode`` (noise 0) for the
    batch ``x, y``, or (``empty``) for an empty batch of the same loader."""
    from opacus import PrivacyEngine

    model = _model(case, seed).double()
    loss_fn = loss_function(TaskSpec(kind=case.task))
    private = make_private(
        PrivacyEngine(),
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)),
        mode=mode,
        loss=loss_fn,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        poisson_sampling=False,
    )
    if empty:  # what site_node.training.loops does for an empty Poisson batch
        empty_step(private.optimizer)  # (noise 0: the update is 0 too)
    else:
        private.optimizer.zero_grad(set_to_none=True)
        (private.loss or loss_fn)(private.module(x), y).backward()
        private.optimizer.pre_step()  # clip, sum, add (zero) noise, scale; no update
    scale = private.optimizer.expected_batch_size
    grads = [p.grad.detach() * scale for p in model.parameters() if p.grad is not None]
    private.module.cleanup()
    return grads


def run_check(case: Case, modes: tuple[GradSampleMode, ...], seed: int) -> dict[str, Any]:
    """Each mode's relative error against the per-record loop, and its empty-batch step
    (in float64, so that what is left is the modes' error, not float32 rounding)."""
    if case.check_shape is not None:
        case = Case(**{**asdict(case), "input_shape": case.check_shape})
    x, y = _data(case, case.check_batch, seed + 1)
    x = x.double()
    reference, clip = _clipped_sum_by_records(case, seed, x, y)
    scale = max(float(r.abs().max()) for r in reference)
    out: dict[str, Any] = {"clip_norm": clip}
    for mode in modes:
        entry: dict[str, Any] = {}
        try:
            grads = _clipped_sum_by_mode(case, seed, x, y, mode, clip)
            if len(grads) != len(reference):
                raise RuntimeError(f"{len(grads)} gradients for {len(reference)} parameters")
            error = max(float((g - r).abs().max()) for g, r in zip(grads, reference, strict=True))
            entry["relative_error"] = error / scale
            entry["gradients"] = "ok" if error / scale <= TOLERANCE else "wrong"
        except Exception as exc:  # a failing mode is a result
            entry["gradients"] = f"fails: {_short(exc)}"
        try:
            empty = _clipped_sum_by_mode(case, seed, x, y, mode, clip, empty=True)
            entry["empty_batch"] = (
                "ok" if all(float(g.abs().max()) == 0.0 for g in empty) else "wrong"
            )
        except Exception as exc:  # a failing mode is a result
            entry["empty_batch"] = f"fails: {_short(exc)}"
        out[mode] = entry
    return out


def profile_step(case: Case, seed: int, rounds: int = 3) -> dict[str, float]:
    """Where one ``hooks`` DP step's time goes, against a plain step: forward, backward (with
    the per-sample gradients), clipping, noise (plain and secure), the update; and, from a
    profile of the backward, the per-sample gradients of convolutions and GroupNorm and the
    rest of Opacus' hooks. Each figure is the fastest of ``rounds``, in seconds."""
    import cProfile
    import pstats

    from opacus import PrivacyEngine

    x, y = _data(case, case.batch, seed)
    loss_fn = loss_function(TaskSpec(kind=case.task))
    plain_model = _model(case, seed)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=1e-3)
    model = _model(case, seed)
    private = make_private(
        PrivacyEngine(),
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1e-3),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=case.batch),
        mode="hooks",
        loss=loss_fn,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    optimizer = private.optimizer
    parts: dict[str, list[float]] = {}

    def timed(name: str, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = work()
        parts.setdefault(name, []).append(time.perf_counter() - start)
        return out

    profile = cProfile.Profile()
    for r in range(rounds + 1):
        plain_opt.zero_grad(set_to_none=True)
        loss = timed("plain forward", lambda: loss_fn(plain_model(x), y))
        timed("plain backward", loss.backward)
        optimizer.zero_grad(set_to_none=True)
        loss = timed("DP forward", lambda: loss_fn(private.module(x), y))
        if r == rounds:
            profile.enable()
        timed("DP backward (per-sample gradients)", loss.backward)
        profile.disable()
        timed("clipping (norms, weighted sum)", optimizer.clip_and_accumulate)
        for secure in (False, True):
            draw = functools.partial(_draw_noise, optimizer.params, secure)
            timed(f"a noise draw alone ({'secure' if secure else 'plain'})", draw)
        timed(
            "noise into the gradient (plain), scale, update",
            lambda: (
                optimizer.add_noise(),
                optimizer.scale_grad(),
                optimizer.original_optimizer.step(),
            ),
        )
    out = {name: min(times[1:]) for name, times in parts.items()}
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    by_function = {func[2]: entry[3] for func, entry in stats.items()}  # cumulative time
    out["of the backward: convolutions' per-sample gradients"] = by_function.get(
        "compute_conv_grad_sample", math.nan
    )
    out["of the backward: GroupNorm's per-sample gradients"] = by_function.get(
        "compute_group_norm_grad_sample", math.nan
    )
    out["of the backward: all of Opacus' backward hooks"] = by_function.get(
        "capture_backprops_hook", math.nan
    )
    return out


def _draw_noise(params: list[torch.Tensor], secure: bool) -> None:
    from opacus.optimizers.optimizer import _generate_noise

    for p in params:
        _generate_noise(1.0, p.summed_grad, None, secure_mode=secure)  # type: ignore[attr-defined]


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:90]}"


def _child(conn: Connection, threads: int, job: Callable[[], Any]) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")  # Opacus' notes on hooks and secure RNG
    try:
        conn.send(("ok", job()))
    except BaseException as exc:  # reported to the parent
        conn.send(("error", _short(exc), traceback.format_exc()))
    finally:
        conn.close()


def in_child(job: Callable[[], Any], *, threads: int, timeout: float) -> tuple[str, Any]:
    """Run ``job`` in a forked process: ``("ok", value)``, ``("error", why)`` or
    ``("timeout", seconds)``."""
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(child, threads, job), daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(timeout):
            process.kill()
            return "timeout", timeout
        try:
            reply = parent.recv()
        except EOFError:  # killed, e.g. out of memory
            process.join()
            return "error", f"the process died (exit {process.exitcode})"
        return reply[0], reply[1]
    finally:
        process.join(timeout=10)
        parent.close()


# --- the parent: cells, tables, the choice --------------------------------------------------


def fastest(times: dict[str, float], usable: set[str]) -> str | None:
    """The mode to train with among the usable ones (``site_node.privacy.modes.choose``)."""
    candidates = {m: t for m, t in times.items() if m in usable and math.isfinite(t)}
    return choose(candidates) if candidates else None


def _seconds(t: float) -> str:
    return f"{t:.3g} s" if math.isfinite(t) else "-"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 and math.isfinite(a) and math.isfinite(b) else "-"


def measure(
    selected: list[Case], modes: tuple[GradSampleMode, ...], args: argparse.Namespace
) -> Iterator[dict[str, Any]]:
    """Yield one result per network: the gradient check, every variant's step memory, the
    interleaved step times, the mode to train with, and that mode in physical batches."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), transient=True) as progress:
        bar = progress.add_task("networks", total=4 * len(selected))
        for case in selected:
            row: dict[str, Any] = {"case": asdict(case)}
            progress.update(bar, description=f"{case.model}: gradient check")
            row["check"] = _in_child_or_error(
                functools.partial(run_check, case, modes, args.seed), args
            )
            progress.advance(bar)
            right = [m for m in modes if row["check"].get(m, {}).get("gradients") == "ok"]
            variants = [PLAIN, *((m, None) for m in right)]
            progress.update(bar, description=f"{case.model}: memory")
            row["memory"] = {
                variant_label(v): _in_child_or_error(
                    functools.partial(run_memory, case, v, args.seed), args
                )
                for v in variants
            }
            progress.advance(bar)
            progress.update(bar, description=f"{case.model}: step times")
            step_s = _in_child_or_error(
                functools.partial(run_interleaved, case, variants, case.steps, args.seed), args
            )
            row["step_s"] = step_s
            row["times"] = {m: _fastest_step(step_s.get(m)) for m in ("plain", *modes)}
            row["memory_mb"] = {
                m: row["memory"].get(m, {}).get("step_mb", math.nan) for m in ("plain", *modes)
            }
            progress.advance(bar)
            row["usable"] = [
                m
                for m in right
                if row["check"][m].get("empty_batch") == "ok"
                and math.isfinite(row["times"][m])
                and math.isfinite(row["memory_mb"][m])
            ]
            row["chosen"] = fastest(row["times"], set(row["usable"]))
            physical = args.physical if args.physical is not None else max(1, case.batch // 4)
            if args.physical != 0 and row["chosen"] is not None and physical < case.batch:
                progress.update(bar, description=f"{case.model}: physical batches")
                whole, split = (row["chosen"], None), (row["chosen"], physical)
                times = _in_child_or_error(
                    functools.partial(run_interleaved, case, [whole, split], case.steps, args.seed),
                    args,
                )
                memory = _in_child_or_error(
                    functools.partial(run_memory, case, split, args.seed), args
                )
                row["physical"] = {
                    "max_physical_batch": physical,
                    "step_s": times,
                    "whole_s": _fastest_step(times.get(variant_label(whole))),
                    "split_s": _fastest_step(times.get(variant_label(split))),
                    "split_mb": memory.get("step_mb", math.nan),
                }
            progress.advance(bar)
            row["params"] = num_parameters(_model(case, args.seed))
            yield row


def _in_child_or_error(job: Callable[[], Any], args: argparse.Namespace) -> dict[str, Any]:
    status, value = in_child(job, threads=args.threads, timeout=args.cell_timeout)
    if status != "ok":
        return {"error": f"{status}: {value}"}
    return dict(value)


def _fastest_step(times: object) -> float:
    return min(times) if isinstance(times, list) and times else math.nan


def _mode_cell(row: dict[str, Any], mode: str) -> str:
    if "error" in row["check"]:
        return "check failed"
    gradients = row["check"].get(mode, {}).get("gradients", "?")
    if gradients != "ok":
        return "wrong" if gradients == "wrong" else "fails"
    times, memory = row["times"], row["memory_mb"]
    if not math.isfinite(times[mode]):
        return str(row["step_s"].get(mode, row["step_s"].get("error", "?"))).split(":")[0]
    text = f"{_seconds(times[mode])} ({_ratio(times[mode], times['plain'])}), "
    text += f"{memory[mode]:,.0f} MB ({_ratio(memory[mode], memory['plain'])})"
    if row["check"][mode].get("empty_batch") != "ok":
        text += " [empty batch fails]"
    return text


def print_tables(console: Console, rows: list[dict[str, Any]], modes: tuple[str, ...]) -> None:
    """Cost per mode, the gradient checks, and the choice against the site's table."""
    cost = Table(title="One DP-SGD step per Opacus mode: seconds (x plain), step memory (x plain)")
    for column in ("network", "input", "batch", "params", "plain", *modes):
        cost.add_column(column, justify="left" if column in ("network", "input") else "right")
    for row in rows:
        case = row["case"]
        plain = f"{_seconds(row['times']['plain'])}, {row['memory_mb']['plain']:,.0f} MB"
        cost.add_row(
            case["model"],
            "x".join(str(d) for d in case["input_shape"]),
            str(case["batch"]),
            f"{row['params']:,}",
            plain,
            *(_mode_cell(row, m) for m in modes),
        )
    console.print(cost)
    checks = Table(title="Clipped per-sample gradient sum vs a per-record loop; empty batch")
    for column in ("network", "check input", "check batch", "clip norm", *modes):
        checks.add_column(column, justify="left" if column == "network" else "right")
    for row in rows:
        check = row["check"]
        if "error" in check:
            checks.add_row(row["case"]["model"], "-", "-", "-", *([check["error"]] * len(modes)))
            continue
        cells = []
        for mode in modes:
            entry = check[mode]
            text = entry["gradients"]
            if "relative_error" in entry:
                text = f"{entry['relative_error']:.1e} {entry['gradients']}"
            cells.append(f"{text}; empty: {entry['empty_batch']}")
        shape = row["case"]["check_shape"] or row["case"]["input_shape"]
        checks.add_row(
            row["case"]["model"],
            "x".join(str(d) for d in shape),
            str(row["case"]["check_batch"]),
            f"{check['clip_norm']:.3g}",
            *cells,
        )
    console.print(checks)
    choice = Table(title="Fastest correct mode, with physical batches, and the site's table")
    for column in (
        "network",
        "fastest correct",
        "x plain time",
        "x plain memory",
        "physical batch",
        "x whole time",
        "x whole memory",
        "site_node.privacy.modes",
    ):
        choice.add_column(column, justify="left" if column == "network" else "right")
    for row in rows:
        chosen = row["chosen"]
        physical = row.get("physical", {})
        table_mode = MODES[row["case"]["model"]].mode if row["case"]["model"] in MODES else "-"
        agrees = "" if table_mode == chosen else " (differs)"
        choice.add_row(
            row["case"]["model"],
            chosen or "none",
            _ratio(row["times"].get(chosen, math.nan), row["times"]["plain"]) if chosen else "-",
            _ratio(row["memory_mb"].get(chosen, math.nan), row["memory_mb"]["plain"])
            if chosen
            else "-",
            str(physical.get("max_physical_batch", "-")),
            _ratio(physical.get("split_s", math.nan), physical.get("whole_s", math.nan)),
            _ratio(
                physical.get("split_mb", math.nan), row["memory_mb"].get(chosen or "", math.nan)
            ),
            table_mode + agrees,
        )
    console.print(choice)


def write_chart(rows: list[dict[str, Any]], modes: tuple[str, ...], path: Path) -> None:
    """Grouped bars per network: DP/plain step time and step memory for each mode."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from consortium_server.reports.charts import PALETTE

    figure = Figure(figsize=(10.0, 3.8), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    width = 0.8 / len(modes)
    names = [r["case"]["model"] for r in rows]
    for ax, key, title in (
        (axes[0], "times", "DP / plain step time"),
        (axes[1], "memory_mb", "DP / plain step memory"),
    ):
        for k, mode in enumerate(modes):
            values = [
                r[key][mode] / r[key]["plain"]
                if math.isfinite(r[key][mode]) and r[key]["plain"] > 0
                else 0.0
                for r in rows
            ]
            offsets = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(offsets, values, width=width, color=PALETTE[k % len(PALETTE)], label=mode)
        ax.axhline(2.0, color="#444", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", metadata={"Software": None})


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1_5_15": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure, print the tables, write JSON and a chart if asked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1x64x64 and 1x32^3 inputs")
    names = [c.model for c in cases(False)]
    parser.add_argument("--models", nargs="+", choices=names, default=names)
    parser.add_argument("--modes", nargs="+", choices=MODE_NAMES, default=list(MODE_NAMES))
    parser.add_argument("--batch", type=int, help="override every network's batch")
    parser.add_argument(
        "--steps", type=int, help="override the timed rounds (one step of each variant each)"
    )
    parser.add_argument(
        "--physical",
        type=int,
        help="physical batch of the memory-manager cell (default batch/4; 0: skip it)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--cell-timeout", type=float, default=1200.0, help="seconds per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here (a chart next to it)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the comparison: where a hooks DP step's time goes, per network",
    )
    parser.add_argument(
        "--report",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="do not measure: print the tables of earlier --json files (their networks "
        "merged; with --json, write the merged figures and chart)",
    )
    args = parser.parse_args(argv)
    modes = tuple(m for m in MODE_NAMES if m in args.modes)
    console = Console(width=max(Console().width, 200))
    if args.profile:
        return _profile_all(args, console)
    if args.report:
        bodies = [json.loads(path.read_text()) for path in args.report]
        rows = [row for body in bodies for row in body["networks"]]
        runs = [run for body in bodies for run in body["runs"]]
    else:
        rows, run = _measure_all(args, modes, console)
        runs = [run]
    print_tables(console, rows, modes)
    for run in runs:
        load = run["machine"]["load_average_1_5_15"]
        console.print(
            f"run of {run['started_at']}: load average before {run['load_average_before']}, "
            f"after {load}"
        )
    if args.json:
        body = {"benchmark": "dp_cost", "runs": runs, "networks": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(body, indent=1, default=str))
        chart = args.json.with_suffix(".png")
        write_chart(rows, modes, chart)
        console.print(f"wrote {args.json} and {chart}")
    return 0 if all(r["chosen"] is not None for r in rows) else 1


def _profile_all(args: argparse.Namespace, console: Console) -> int:
    selected = [c for c in cases(args.quick) if c.model in args.models]
    if args.batch is not None:
        selected = [Case(**{**asdict(c), "batch": args.batch}) for c in selected]
    for case in selected:
        parts = _in_child_or_error(functools.partial(profile_step, case, args.seed), args)
        table = Table(title=f"{case.model}, {case.input_label}, batch {case.batch}: one step")
        table.add_column("part")
        table.add_column("seconds", justify="right")
        for name, seconds in parts.items():
            table.add_row(name, f"{seconds:.3f}" if isinstance(seconds, float) else seconds)
        console.print(table)
    return 0


def _measure_all(
    args: argparse.Namespace, modes: tuple[GradSampleMode, ...], console: Console
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    selected = [c for c in cases(args.quick) if c.model in args.models]
    for override in ("batch", "steps"):
        if getattr(args, override) is not None:
            selected = [Case(**{**asdict(c), override: getattr(args, override)}) for c in selected]
    run = {
        "started_at": datetime.now(UTC).isoformat(),
        "quick": args.quick,
        "threads": args.threads,
        "tie_margin": TIE_MARGIN,
        "tolerance": TOLERANCE,
        "load_average_before": list(os.getloadavg()),
    }
    rows = []
    for row in measure(selected, modes, args):
        rows.append(row)
        console.print(
            f"{row['case']['model']}: plain {_seconds(row['times']['plain'])}; "
            + ", ".join(f"{m} {_seconds(row['times'][m])}" for m in modes)
            + f"; fastest correct: {row['chosen']}"
        )
    run["machine"] = machine()  # with the load average after the run
    return rows, run


if __name__ == "__main__":
    raise SystemExit(main())
