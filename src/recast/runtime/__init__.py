"""Run exported bundles: `recast.runtime.load(bundle).generate("...")`.

Needs numpy, onnxruntime and tokenizers only (torch for pt2 bundles), so a serving process
can run bundles without the export stack.
"""

from .session import Session, load

__all__ = ["Session", "load"]
