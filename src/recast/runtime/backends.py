"""One exported graph behind a common `run(feeds) -> outputs`: ONNX Runtime, or a pt2 program."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DeviceUnavailableError, RuntimeInputError

ONNX_DTYPES = {
    f"tensor({name})": np.dtype(numpy_name).type
    for name, numpy_name in [
        ("float", "float32"), ("double", "float64"), ("float16", "float16"), ("bool", "bool"),
        ("int8", "int8"), ("int16", "int16"), ("int32", "int32"), ("int64", "int64"),
        ("uint8", "uint8"), ("uint16", "uint16"), ("uint32", "uint32"), ("uint64", "uint64"),
    ]
}  # fmt: skip


def onnxruntime_errors() -> tuple[type[Exception], ...]:
    """onnxruntime's exception classes (InvalidProtobuf, Fail, ...: they share no base class
    but Exception), for callers to translate."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(
        v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)
    )


def providers_for(device: str | None) -> list[str]:
    """onnxruntime providers for `device`; None picks CUDA when onnxruntime offers it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in (None, "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise DeviceUnavailableError(
            "device 'cuda' needs onnxruntime-gpu with a CUDA device; use device='cpu'"
        )
    return ["CPUExecutionProvider"]


class OnnxGraph:
    """An onnxruntime session on a graph file, or on an in-memory ModelProto whose external
    data lives in `folder`."""

    def __init__(
        self,
        path,
        device: str | None,
        threads: int | None = None,
        arena: bool = True,
        folder: Path | None = None,
    ):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if folder is not None:
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(folder)
            )
            path = path.SerializeToString()
        else:
            path = str(path)
        # Without the arena, memory goes back after each run instead of staying at its peak:
        # what an offload session needs for its memory bound to hold.
        options.enable_cpu_mem_arena = arena
        # Bundles hold standard ONNX as exported: onnxruntime's fusions (and its layout
        # transforms for this machine) are applied here, when the session opens.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # provider fallbacks are reported by `providers`
        if threads:
            options.intra_op_num_threads = threads
        providers = providers_for(device)
        # onnxruntime-gpu lists CUDA even where its libraries or a GPU are missing, and prints
        # errors while falling back to the CPU; `providers` tells what was used instead.
        ort.set_default_logger_severity(4)
        try:
            self.session = ort.InferenceSession(path, options, providers=providers)
        finally:
            ort.set_default_logger_severity(2)
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise DeviceUnavailableError(
                "onnxruntime could not start its CUDA provider (no usable GPU); use device='cpu'"
            )
        self.inputs = {
            i.name: (ONNX_DTYPES.get(i.type), i.shape)  # None: a type numpy lacks, unchecked
            for i in self.session.get_inputs()
        }
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # the failure is raised below, in one line
        try:
            outputs = self.session.run(None, feeds, quiet)
        except onnxruntime_errors() as exc:  # inputs the session's checks could not judge
            reason = next(iter(str(exc).splitlines()), "")
            raise RuntimeInputError(
                f"onnxruntime cannot run the graph on these inputs ({reason}); check their "
                "shapes against the bundle's inputs (recast inspect)"
            ) from exc
        return dict(zip(self.output_names, outputs, strict=True))


class Pt2Graph:
    """A `torch.export` program, or its AOTInductor package when the bundle has one (`path`
    is then the package's); needs torch (and `recast.ops` for MoE graphs)."""

    def __init__(self, path: Path, spec: dict, device: str | None):
        import torch

        from .. import ops  # noqa: F401  registers recast::routed_experts

        self.torch = torch
        self.device = "cuda" if device == "cuda" else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise DeviceUnavailableError("device 'cuda' needs a CUDA build of torch and a GPU")
        if spec.get("compiled"):  # an AOTInductor package: compiled kernels, same signature
            self.module = torch._inductor.aoti_load_package(str(path))
        else:
            # guards are replaced by the session's input checks and the export's parity gate
            # (see recast.export.pt2)
            program = torch.export.load(str(path))
            self.module = program.module(check_guards=False).to(self.device)
        self.inputs = {i["name"]: (np.dtype(i["dtype"]).type, i["shape"]) for i in spec["inputs"]}
        self.output_names = [o["name"] for o in spec["outputs"]]

    @property
    def providers(self) -> list[str]:
        return [f"torch:{self.device}"]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # the program takes the inputs positionally in manifest order (recast.export.pt2)
        args = [
            self.torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device)
            for n in self.inputs
        ]
        with self.torch.no_grad():
            values = self.module(*args)
        return {
            name: value.detach().cpu().numpy()
            for name, value in zip(self.output_names, values, strict=True)
        }
