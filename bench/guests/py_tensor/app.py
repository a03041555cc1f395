"""A 1x3x224x224 float32 tensor (602,112 bytes) to the model `ident` (Identity) and back, for
bench/python_guest.py's py_tensor_602k_infer_overhead_ms_p50 (the Python runtime only: numpy)."""

import numpy as np
from wasminfer_guest import Request, Tensor, handler, infer

X = np.zeros((1, 3, 224, 224), dtype=np.float32)


@handler
def handle(request: Request) -> dict:
    out = infer("ident", {"x": Tensor.of(X, "float32")})["y"].numpy()
    return {"shape": list(out.shape)}
