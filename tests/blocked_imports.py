"""Run Python in a subprocess where the export stack looks uninstalled, as on a serving machine.

The blocker wraps every finder on `sys.meta_path` so that the hidden packages are found by
none of them: `import torch` raises ModuleNotFoundError and `importlib.util.find_spec("torch")`
answers None, as when torch is not installed (a finder that raised instead would also break
code that only asks whether a package is there).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXPORT_STACK = (
    "torch", "transformers", "pydantic", "onnx", "onnxscript", "networkx", "yaml",
    "safetensors", "scipy", "datasets", "accelerate", "peft", "tqdm", "gguf", "matplotlib",
)  # fmt: skip


class Hiding:
    """A meta path finder that finds what `finder` finds, except the `hidden` packages."""

    def __init__(self, finder, hidden: frozenset[str]):
        self.finder, self.hidden = finder, hidden

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.hidden:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, name):  # invalidate_caches, find_distributions, ...
        return getattr(self.finder, name)


def hide(packages) -> None:
    """Make `packages` (top-level names) unimportable in this process, and check that they are."""
    import importlib.util

    hidden = frozenset(packages)
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in hidden)
    assert not loaded, f"already imported, so they cannot be hidden: {loaded}"
    sys.meta_path[:] = [Hiding(finder, hidden) for finder in sys.meta_path]
    for name in hidden:
        assert importlib.util.find_spec(name) is None, name
        try:
            __import__(name)
        except ModuleNotFoundError:
            continue
        raise AssertionError(f"{name} is still importable")


def run_without(script: str, allow=(), timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter with the export stack (but `allow`) hidden."""
    hidden = [name for name in EXPORT_STACK if name not in allow]
    prelude = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        f"import blocked_imports; blocked_imports.hide({hidden!r})\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + script], capture_output=True, text=True, timeout=timeout
    )
