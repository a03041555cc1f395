"""Validation of uploaded models, before ONNX Runtime sees them.

`validate_upload` refuses models that are not ONNX, that keep any tensor's data outside the model
(external data: ORT reads the file a tensor names, relative to the model's folder or, for a model
given as bytes, the working directory -- ORT 1.32 refuses `../` escapes itself but still reads a
file named `passwd` in the working directory when graph optimisations are off; a sibling blob is
enough to leak another tenant's model), or that use operator domains beyond the standard ones and
ORT's own. It returns the bytes ORT is to parse: the validated proto serialised again, so sessions
are created from what was checked, never from a path. `no_batch_dimension` says why a model cannot
be batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from google.protobuf.message import DecodeError, Message

from wasminfer.errors import InvalidModel
from wasminfer.models.inputs import TensorSpec

__all__ = ["ALLOWED_DOMAINS", "ValidModel", "no_batch_dimension", "validate_upload"]

#: Operator domains a model may use: standard ONNX, ONNX-ML, and ORT's own contrib ops.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


@dataclass(frozen=True, slots=True)
class ValidModel:
    """An upload that passed: `data` for ORT to parse, the graph inputs' and outputs' declared
    ranks (name -> whether the model declares its rank; ORT shows [] either way) and the model's
    metadata properties."""

    data: bytes
    declared_rank: dict[str, bool]
    metadata: dict[str, str]


def validate_upload(data: bytes) -> ValidModel:
    """Raises `InvalidModel` if `data` is not an ONNX model, keeps tensor data outside the model,
    or uses an operator domain other than `ALLOWED_DOMAINS` (or a function defined in the model)."""
    proto = _parse(data)
    _validate(proto)
    declared_rank = {
        value.name: value.type.tensor_type.HasField("shape")
        for value in [*proto.graph.input, *proto.graph.output]
        if value.type.HasField("tensor_type")
    }
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    # ORT parses exactly what was validated: the re-serialised proto, without unknown fields
    # (a field this onnx does not know, but a newer ORT would act on, never reaches ORT).
    proto.DiscardUnknownFields()
    return ValidModel(proto.SerializeToString(), declared_rank, metadata)


def _parse(data: bytes) -> onnx.ModelProto:
    try:
        # Parses the bytes only: external data is never loaded from a string.
        proto = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidModel(f"not an ONNX model: {exc}") from None
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.graph.output:
        raise InvalidModel("not an ONNX model: no graph with outputs and an IR version")
    return proto


def _validate(proto: onnx.ModelProto) -> None:
    """Refuse external data anywhere and operator domains beyond the allowed ones."""
    functions = {(function.domain, function.name) for function in proto.functions}
    function_domains = {domain for domain, _ in functions}
    for opset in [*proto.opset_import, *(o for f in proto.functions for o in f.opset_import)]:
        if opset.domain not in ALLOWED_DOMAINS and opset.domain not in function_domains:
            raise InvalidModel(
                f"the model imports operator domain {opset.domain!r}; only "
                f"{', '.join(repr(d) for d in sorted(ALLOWED_DOMAINS))} are allowed (custom operators "
                "would need code the host does not load)"
            )

    # Walk every message in the model by reflection rather than by the fields we know of: tensors
    # hide in initializers, sparse initializers, Constant attributes, subgraphs of If/Loop/Scan,
    # function attribute defaults and training graphs, and a later ONNX may add places.
    stack: list[tuple[Message, str]] = [(proto, "model")]
    while stack:
        message, where = stack.pop()
        if isinstance(message, onnx.TensorProto):
            if message.data_location == onnx.TensorProto.EXTERNAL or len(message.external_data):
                location = next((e.value for e in message.external_data if e.key == "location"), "")
                raise InvalidModel(
                    f"tensor {message.name!r} ({where}) keeps its data outside the model "
                    f"(external data{f', location {location!r}' if location else ''}); upload a model "
                    "with its weights inside (onnx.save_model(model, path, save_as_external_data=False))"
                )
            continue  # a tensor holds no further tensors
        if isinstance(message, onnx.NodeProto):
            domain = message.domain
            if domain not in ALLOWED_DOMAINS and (domain, message.op_type) not in functions:
                raise InvalidModel(
                    f"node {message.name!r} ({where}) uses operator {message.op_type!r} of domain "
                    f"{domain!r}; only {', '.join(repr(d) for d in sorted(ALLOWED_DOMAINS))} and "
                    "functions defined in the model are allowed"
                )
        for descriptor, value in message.ListFields():
            if descriptor.message_type is None:
                continue
            if isinstance(value, Message):
                stack.append((value, f"{where}.{descriptor.name}"))
            else:  # a repeated field of messages (ONNX has no map fields)
                stack.extend((item, f"{where}.{descriptor.name}[{i}]") for i, item in enumerate(value))


def no_batch_dimension(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str | None:
    """Why the model has no batch dimension to stack requests along, or None if it has one."""
    symbols: dict[str, str] = {}
    for kind, specs in (("input", inputs), ("output", outputs)):
        for spec in specs:
            if spec.shape is None:
                return f"{kind} {spec.name!r} does not declare its shape"
            if not spec.shape:
                return f"{kind} {spec.name!r} is a scalar"
            first = spec.shape[0]
            if isinstance(first, int) and first >= 0:
                return f"{kind} {spec.name!r} has a fixed first dimension ({first})"
            if kind == "input" and isinstance(first, str):
                symbols[spec.name] = first
    if len(set(symbols.values())) > 1:
        # Different named first dimensions may differ in size: stacking could misalign rows.
        shown = ", ".join(f"{name!r} ({symbol})" for name, symbol in symbols.items())
        return f"the inputs' first dimensions have different names: {shown}"
    return None
