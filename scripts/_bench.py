"""Shared helpers for the benchmarks in scripts/ (bench_*.py).

Measurements run in fresh subprocesses so that each one's peak RSS (`ru_maxrss`) is its own:
`run_snippet` starts `python -c CODE` with this module importable as `_bench`, passes
parameters through the environment and reads back the last JSON line the child `emit`s.

Everything here imports only the standard library, so a child that imports `_bench` pays
nothing measurable for it; torch is imported lazily, only by `machine()`.

    import _bench
    result = _bench.run_snippet('''
        import recast
        _bench.emit({"rss": _bench.rss_bytes(), "peak": _bench.peak_rss_bytes()})
    ''')
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULT_MARKER = "@@bench-result@@ "
PARAMS_ENV = "RECAST_BENCH_PARAMS"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MB = 1024 * 1024


# --- memory ---------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident set size (`ru_maxrss`: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> int:
    """This process's current resident set size (Linux; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _can_reset_peak() -> bool:
    return _status_kib("VmHWM") is not None and os.access("/proc/self/clear_refs", os.W_OK)


class StageMeter:
    """Time and peak RSS per stage of one process.

    On Linux, writing 5 to /proc/self/clear_refs resets the kernel's RSS high-water mark
    (VmHWM, which `ru_maxrss` also reads), so each stage's peak is exact rather than sampled.
    Because that reset also lowers `ru_maxrss`, the process-wide peak is kept here: `peak()`
    is the maximum over every stage and every gap between stages. Where the reset is not
    available, stages still get times and the RSS at their ends, but no peaks.
    """

    def __init__(self) -> None:
        self.exact = _can_reset_peak()
        self.stages: list[dict] = []
        self._peak = peak_rss_bytes()

    def _high_water(self) -> int:
        kib = _status_kib("VmHWM") if self.exact else None
        return kib * 1024 if kib is not None else peak_rss_bytes()

    def _reset(self) -> int:
        """The high-water mark since the last reset; then start a new one."""
        mark = self._high_water()
        self._peak = max(self._peak, mark, peak_rss_bytes())
        if self.exact:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return mark

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        before = rss_bytes()
        gap_peak = self._reset()  # peak of whatever ran since the previous stage ended
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            peak = self._reset()
            self.stages.append(
                {
                    "stage": name,
                    "seconds": round(seconds, 3),
                    "rss_before": before,
                    "rss_after": rss_bytes(),
                    "peak": peak if self.exact else None,
                    "peak_before_stage": gap_peak if self.exact else None,
                }
            )

    def wrap(self, namespace: object, attr: str, name: str | None = None) -> None:
        """Replace `namespace.attr` (a function or class) by one that runs inside a stage."""
        original: Callable = getattr(namespace, attr)
        meter, label = self, name or attr

        def staged(*args, **kwargs):
            with meter.stage(label):
                return original(*args, **kwargs)

        staged.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(namespace, attr, staged)

    def peak(self) -> int:
        """Peak RSS of the whole process so far, across the resets."""
        return max(self._peak, self._high_water(), peak_rss_bytes())


# --- subprocesses ---------------------------------------------------------------------------


class SnippetError(RuntimeError):
    """A benchmark subprocess failed or emitted no result."""


def params() -> dict:
    """In a child started by `run_snippet`: the parameters it was given."""
    return json.loads(os.environ.get(PARAMS_ENV, "{}"))


def emit(result: dict) -> None:
    """In a child started by `run_snippet`: hand `result` (JSON-able) back to the parent."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


def run_snippet(
    code: str,
    params: dict | None = None,
    *,
    timeout: float | None = None,
    cwd: str | Path | None = REPO,
    env: dict | None = None,
) -> dict:
    """Run `code` in a fresh Python (this interpreter) and return the last dict it `emit`s.

    The child can `import _bench` (it is on the child's sys.path) and reads `_bench.params()`.
    """
    prelude = f"import sys\nsys.path.insert(0, {str(HERE)!r})\nimport _bench\n"
    child_env = {**os.environ, PARAMS_ENV: json.dumps(params or {}), **(env or {})}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", prelude + textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=child_env,
        )
    except subprocess.TimeoutExpired as exc:
        raise SnippetError(f"benchmark subprocess ran past {timeout}s") from exc
    results = [
        line[len(RESULT_MARKER) :]
        for line in proc.stdout.splitlines()
        if line.startswith(RESULT_MARKER)
    ]
    if proc.returncode != 0 or not results:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise SnippetError(f"benchmark subprocess failed (exit {proc.returncode}):\n{tail}")
    return json.loads(results[-1])


# --- the machine ----------------------------------------------------------------------------


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine() -> dict:
    """What the figures were measured on (imports torch for its version and thread count)."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_bytes": _memory_bytes(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "platform": platform.platform(),
        "load_average": load_average(),
    }


def machine_line(info: dict) -> str:
    """One line for a results table: cpu, cores, memory, torch, threads, load."""
    memory = info.get("memory_bytes")
    mem = f", {memory / 2**30:.0f} GiB" if memory else ""
    load = "/".join(f"{x:.2f}" for x in info.get("load_average", []))
    return (
        f"{info['cpu']}, {info['cores_usable']} cores{mem}, Python {info['python']}, "
        f"torch {info['torch']} ({info['torch_threads']} threads"
        f"{', CUDA' if info.get('cuda') else ', no GPU'}), load average {load or 'n/a'}"
    )


def today() -> str:
    return datetime.date.today().isoformat()


# --- checkpoints and output -----------------------------------------------------------------


def weight_bytes(directory: str | Path) -> int:
    """Bytes of the weight files (safetensors, or pickles) at the top of a checkpoint dir."""
    return sum(
        p.stat().st_size
        for p in Path(directory).iterdir()
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )


def mb(n: float | None, digits: int = 0) -> str:
    """Bytes as MiB for a table cell ('-' for missing)."""
    return "-" if n is None else f"{n / MB:,.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A plain-text table, columns two spaces apart; `align` has one 'l' or 'r' per column
    (default: the first left, the rest right)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(row: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if a == "l" else c.rjust(w)
            for c, w, a in zip(row, widths, align, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a message) when not installed."""
    try:
        import matplotlib
    except ImportError:
        print(
            "matplotlib is not installed, so no chart was drawn; "
            "pip install -e '.[dev]' (or pip install matplotlib) for the PNG",
            file=sys.stderr,
        )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
