"""Typed errors raised by the library. Only `recast.cli` turns them into messages and exit codes.

Every message is one line that names the problem and, where there is one, the fix.
"""


class RecastError(Exception):
    """Base class of every error recast raises on purpose."""


class RecipeError(RecastError):
    """A recipe is malformed: unknown keys, wrong types, impossible settings."""


class ModelLoadError(RecastError):
    """A checkpoint is missing, corrupt, or cannot be read."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint's architecture has no family adapter."""


class PickleCheckpointError(ModelLoadError):
    """A checkpoint is stored as pickle and the user did not opt in to loading it."""


class DataError(RecastError):
    """A calibration or evaluation text source is missing, empty or unreadable."""


class PartitionError(RecastError):
    """A partition cannot be built or does not cover the FFN exactly."""


class RoutingError(RecastError):
    """A router was asked for something it cannot give."""


class OutputExistsError(RecastError):
    """The output directory exists and is not empty, and --overwrite was not given."""


class FormatError(RecastError):
    """A saved directory is not in a format recast can read."""


class ParityError(RecastError):
    """A written or exported model computes something other than the model it came from."""


class ExportError(RecastError):
    """A model cannot be exported to the asked format or target."""


class BundleIntegrityError(RecastError):
    """An exported bundle is incomplete or was modified after export (checksums disagree)."""


class RuntimeInputError(RecastError):
    """Inputs given to a bundle's session do not fit it (dtype, vocabulary, length)."""


class DeviceUnavailableError(RecastError):
    """The asked device (CUDA) is not usable on this machine."""


class TraceError(RecastError):
    """A routing trace is missing, malformed, or cannot be recorded from a bundle."""


class OffloadError(RecastError):
    """An expert store or cache cannot be set up as asked (no store, a budget below one expert)."""


class FusionError(RecastError):
    """Models cannot be fused as asked (an unknown source, mismatched shared inputs, control flow)."""


class UnsafeOutputError(OutputExistsError):
    """The output path exists and recast must not write there: a directory recast did not write,
    a symlink, the working or home directory (or one containing them), or an input of the run."""


class OutputWriteError(RecastError):
    """The output cannot be written: its parent is not writable, or a write failed (disk full,
    read-only file system)."""


class TrainingError(RecastError):
    """Training left NaN or inf in the model's weights (a learning rate too high, a loss that
    diverged)."""


class ReportedElsewhereError(RecastError):
    """Another process of a multi-process run failed, and the main process reports why; the CLI
    exits on it without printing the same line again."""


class ResumeError(RecastError):
    """A killed run cannot be resumed (nothing to resume, or from another recipe)."""
