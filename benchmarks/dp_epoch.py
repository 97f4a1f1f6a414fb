"""Epoch time with and without DP-SGD for every catalogue model, on synthetic data.

    .venv/bin/python benchmarks/dp_epoch.py --quick        # a few seconds per model
    .venv/bin/python benchmarks/dp_epoch.py                # larger sizes (minutes)

Each cell is the fastest of ``--repeat`` single local epochs through
:func:`site_node.training.train_round`, plain, then through the same call with a
:class:`site_node.privacy.DpTrainer` (Opacus DP-SGD, Poisson sampling, per-sample clipping;
the noise multiplier is fixed at 1.0 so that the timing leaves out the once-per-study noise
search, and the epsilon computations are cached beforehand), and once more with the site's
secure noise (``secure_mode``: Opacus' four-draw noise from an OS-seeded generator, what
production runs). Data are random tensors of the model's input shape: the timing does not
depend on the values.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from concord_protocol.contract import ModelSpec, PrivacySpec, TrainingSpec
from site_node.data import LocalDataset
from site_node.privacy import DpTrainer
from site_node.training import build_model, list_models, num_parameters, train_round


@dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    model: str
    input_shape: tuple[int, ...]
    records: int
    batch_size: int


def cases(quick: bool) -> list[Case]:
    """The configurations to time: every catalogue model at a few sizes."""
    out: list[Case] = []
    for entry in list_models():
        sizes: list[tuple[int, ...]]
        if entry.modality == "tabular":
            sizes = [(30,)] if quick else [(30,), (200,)]
            records = [512] if quick else [2048, 8192]
        else:
            sizes = [(1, 32, 32)] if quick else [(1, 32, 32), (1, 64, 64)]
            records = [256] if quick else [512, 2048]
        for shape in sizes:
            for n in records:
                out.append(Case(entry.name, shape, n, 64))
    return out


def _epoch_seconds(case: Case, *, dp: bool, seed: int, secure: bool = False) -> tuple[float, int]:
    gen = torch.Generator().manual_seed(seed)
    data = LocalDataset(
        features=torch.randn(case.records, *case.input_shape, generator=gen),
        labels=torch.randint(0, 2, (case.records,), generator=gen),
        num_classes=2,
        modality="benchmark",
    )
    spec = ModelSpec(name=case.model, version="1")
    model = build_model(spec, input_shape=case.input_shape, num_classes=2, seed=seed)
    training = TrainingSpec(rounds=1, batch_size=case.batch_size, learning_rate=0.05)
    trainer = (
        DpTrainer(
            PrivacySpec(epsilon=100.0, delta=1e-5),
            training,
            num_samples=case.records,
            noise_multiplier=1.0,
            secure_mode=secure,
        )
        if dp
        else None
    )
    if trainer is not None:
        # Accounting is not training time: this computes (and caches) the epsilon of the
        # history after one round, which is what the round's own check and report ask for.
        trainer.check_round_allowed()
    start = time.perf_counter()
    train_round(model, data, training, dp=trainer, seed=seed)
    return time.perf_counter() - start, num_parameters(model)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, time every case, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeat", type=int, default=3, help="epochs timed per cell; the fastest is shown"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    table = Table(title=f"Epoch time, plain vs DP-SGD (Opacus), {args.threads} thread(s)")
    columns = ("model", "input", "params", "records", "batch", "plain s", "DP s", "DP/plain")
    for column in (*columns, "secure DP s", "secure/DP"):
        left = column in ("model", "input")
        table.add_column(column, justify="left" if left else "right", no_wrap=True)
    for case in cases(args.quick):
        runs = [_epoch_seconds(case, dp=False, seed=args.seed) for _ in range(args.repeat)]
        plain, params = min(t for t, _ in runs), runs[0][1]
        private = min(_epoch_seconds(case, dp=True, seed=args.seed)[0] for _ in range(args.repeat))
        secure = min(
            _epoch_seconds(case, dp=True, seed=args.seed, secure=True)[0]
            for _ in range(args.repeat)
        )
        table.add_row(
            case.model,
            "x".join(str(d) for d in case.input_shape),
            f"{params:,}",
            str(case.records),
            str(case.batch_size),
            f"{plain:.2f}",
            f"{private:.2f}",
            f"{private / plain:.2f}x" if plain > 0 else "-",
            f"{secure:.2f}",
            f"{secure / private:.2f}x" if private > 0 else "-",
        )
    console = Console(width=max(Console().width, 100))
    console.print(table)
    console.print(noise_table(args.repeat))


def noise_table(repeat: int) -> Table:
    """One step's noise draw at imaging sizes: plain vs secure (Opacus' 2n = 4 draws)."""
    from opacus.optimizers.optimizer import _generate_noise

    table = Table(title="Noise for one DP-SGD step (all parameters), plain vs secure")
    for column in ("parameters", "plain ms", "secure ms", "secure/plain"):
        table.add_column(column, justify="right")
    generator = torch.Generator().manual_seed(0)
    for n in (1_000_000, 7_000_000):
        reference = torch.zeros(n)
        times = {}
        for secure in (False, True):
            best = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                _generate_noise(1.0, reference, generator=generator, secure_mode=secure)
                best = min(best, time.perf_counter() - start)
            times[secure] = best
        table.add_row(
            f"{n:,}",
            f"{times[False] * 1e3:.1f}",
            f"{times[True] * 1e3:.1f}",
            f"{times[True] / times[False]:.2f}x",
        )
    return table


if __name__ == "__main__":
    main()
