"""Helpers every systems benchmark shares: the command line, interleaved median timing,
peak-memory reading, the printed table and the JSON file with the machine it ran on."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

# The benchmarks import fedsms_server / fedsms_client; Flower must not phone home from a benchmark.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def parser(doc: str, out: str, repeats: int) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--out``, ``--repeats`` and ``--tiny`` (the smoke-test size)."""
    p = argparse.ArgumentParser(
        description=doc.strip().splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc
    )
    p.add_argument("--out", default=out, help=f"results JSON (default {out})")
    p.add_argument("--repeats", type=int, default=repeats, help=f"timed repetitions per variant (default {repeats})")
    p.add_argument("--tiny", action="store_true", help="smallest sizes, for the smoke test (figures mean nothing)")
    return p


def interleaved(
    variants: Mapping[str, Callable[[], float | None]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each variant, ``repeats`` times, the variants alternating (and their order
    reversed every other repetition) so that load from other users of the machine hits all
    of them alike. A variant may return its own measured seconds instead of None (e.g. to
    leave out set-up it does inside)."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            own = variants[name]()
            times[name].append(own if own is not None else time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def peak_rss_reset() -> bool:
    """Give freed heap back to the kernel (glibc ``malloc_trim``, so memory freed earlier is not
    silently reused below the baseline), then reset this process's peak RSS (Linux
    ``clear_refs``) so that ``peak_rss()`` reads the peak since now. False where the kernel
    does not allow the reset."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss() -> int:
    """Resident bytes of this process now (VmRSS)."""
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Peak resident bytes of this process (VmHWM: every allocator, torch's included)."""
    return _status_kib("VmHWM") * 1024


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def machine() -> dict:
    """Where and with what a result was measured."""
    import flwr
    import torch

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }


def table(rows: Sequence[Mapping], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width table: ``columns`` are (key, header, format spec) triples."""
    cells = [[format(row[key], spec) for key, _, spec in columns] for row in rows]
    widths = [max(len(header), *(len(c[i]) for c in cells)) for i, (_, header, _) in enumerate(columns)]
    lines = ["  ".join(header.rjust(w) for (_, header, _), w in zip(columns, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def report(out: str, rows: Sequence[Mapping], columns: Sequence[tuple[str, str, str]], **extra) -> dict:
    """Print the table (and the load it ran under), write ``{"machine", "rows", **extra}`` to ``out``."""
    result = {"machine": machine(), "rows": list(rows), **extra}
    print(table(rows, columns))
    print(
        f"\nload average {result['machine']['load_average']} on {result['machine']['cpu_cores']} cores; "
        f"written to {out}"
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


QUALITY_METRICS = ("accuracy", "ood_accuracy", "ece")


def seed_summary(done: Sequence[Mapping]) -> dict:
    """Mean sparsity and mean ± std of each quality metric over the seeds' rows ``done``."""
    from fedsms.report import mean_std

    entry = {"seeds": len(done), "sparsity": statistics.fmean(r["sparsity"] for r in done)}
    for key in QUALITY_METRICS:
        entry[key], entry[key + "_std"] = mean_std([r[key] for r in done])
    return entry


def metric_cells(row: Mapping) -> list[str]:
    """``mean ± std`` in percent for each quality metric of a ``seed_summary`` row."""
    return [f"{100 * row[k]:6.2f} ± {100 * row[k + '_std']:4.2f}" for k in QUALITY_METRICS]


def simulate_in_process(config: Mapping, num_clients: int) -> None:
    """The fedsms apps in Flower's in-process simulation, so that a benchmark can time the
    strategy's methods in this process (``fedsms simulate`` runs them in a SuperLink's
    subprocess). Flower marks ``run_simulation`` deprecated; benchmarks accept that."""
    from flwr.simulation import run_simulation

    from fedsms_client.app import make_client_app
    from fedsms_server.app import make_server_app

    run_simulation(
        server_app=make_server_app(config),
        client_app=make_client_app(),
        num_supernodes=num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
