"""Models: the registry of ONNX Runtime sessions (one per model) and what it is made of -- the
validation of uploads, the check of inputs against a model's signature, load options, counters,
dynamic batching, the run timer -- and the tensor codec.

Never imports wasmtime or starlette: the runtime and the gateway build on this layer.
"""

from __future__ import annotations

from wasminfer.models.batching import BatchingConfig, BatchingStats
from wasminfer.models.codec import decode_tensors, encode_tensors, tensors_from_json, tensors_to_json
from wasminfer.models.inputs import TensorSpec
from wasminfer.models.registry import ModelInfo, ModelRegistry
from wasminfer.models.stats import ModelStats

__all__ = [
    "BatchingConfig",
    "BatchingStats",
    "ModelInfo",
    "ModelRegistry",
    "ModelStats",
    "TensorSpec",
    "decode_tensors",
    "encode_tensors",
    "tensors_from_json",
    "tensors_to_json",
]
