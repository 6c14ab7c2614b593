"""The part of ONNX's protobuf schema the runtime reads, built with `google.protobuf` alone (a
dependency of onnxruntime), so that walking and pruning a graph needs no onnx package.

Only the fields that lead to tensors (and the names that pruning follows) are declared, each as
onnx.proto declares it. Every other field is kept as an unknown field through parsing and
`SerializeToString`, so a graph read and written back here is still the whole graph: pruned,
it goes to onnxruntime as bytes. The messages live in a pool of their own, apart from the onnx
package's when both are imported.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

# message -> its declared fields, as onnx.proto writes them (`label type name = number`)
MESSAGES = {
    "ModelProto": [
        "optional GraphProto graph = 7",
        "repeated TrainingInfoProto training_info = 20",
        "repeated FunctionProto functions = 25",
    ],
    "GraphProto": [
        "repeated NodeProto node = 1",
        "repeated TensorProto initializer = 5",
        "repeated SparseTensorProto sparse_initializer = 15",
        "repeated ValueInfoProto input = 11",
        "repeated ValueInfoProto output = 12",
        "repeated ValueInfoProto value_info = 13",
    ],
    "NodeProto": [
        "repeated string input = 1",
        "repeated string output = 2",
        "repeated AttributeProto attribute = 5",
    ],
    "AttributeProto": [
        "optional TensorProto t = 5",
        "optional GraphProto g = 6",
        "optional SparseTensorProto sparse_tensor = 22",
        "repeated TensorProto tensors = 10",
        "repeated GraphProto graphs = 11",
        "repeated SparseTensorProto sparse_tensors = 23",
    ],
    "FunctionProto": [
        "repeated AttributeProto attribute_proto = 11",  # default attribute values
        "repeated NodeProto node = 7",
    ],
    "TrainingInfoProto": [
        "optional GraphProto initialization = 1",
        "optional GraphProto algorithm = 2",
    ],
    "TensorProto": [
        "optional string name = 8",
        "repeated StringStringEntryProto external_data = 13",
    ],
    "SparseTensorProto": [
        "optional TensorProto values = 1",
        "optional TensorProto indices = 2",
    ],
    "StringStringEntryProto": [
        "optional string key = 1",
        "optional string value = 2",
    ],
    "ValueInfoProto": [
        "optional string name = 1",
    ],
}


def _file() -> descriptor_pb2.FileDescriptorProto:
    Field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="recast/onnx_subset.proto", package="onnx", syntax="proto2"
    )
    for message, fields in MESSAGES.items():
        spec = file.message_type.add(name=message)
        for line in fields:
            label, kind, name, _, number = line.split()
            field = spec.field.add(name=name, number=int(number))
            field.label = Field.LABEL_REPEATED if label == "repeated" else Field.LABEL_OPTIONAL
            if kind == "string":
                field.type = Field.TYPE_STRING
            else:
                field.type, field.type_name = Field.TYPE_MESSAGE, f".onnx.{kind}"
    return file


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())
ModelProto = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("onnx.ModelProto"))


def read_model(path: Path) -> Message:
    """The ModelProto in the file at `path` (its external data is not read); raises OSError,
    or google.protobuf's DecodeError for a file that is no protobuf."""
    return ModelProto.FromString(Path(path).read_bytes())


def tensors(message: Message):
    """Every TensorProto in `message` (a ModelProto or a part of one): initializers, Constant
    values, sparse tensors' values and indices, subgraphs, functions, training graphs."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        for item in [value] if isinstance(value, Message) else value:
            if field.message_type.name == "TensorProto":
                yield item
            else:
                yield from tensors(item)


def external_locations(model: Message) -> set[str]:
    """The files (relative to the graph) that `model`'s tensors name as their external data."""
    return {
        entry.value
        for tensor in tensors(model)
        for entry in tensor.external_data
        if entry.key == "location"
    }
