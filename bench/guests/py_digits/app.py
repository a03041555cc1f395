"""digits in Python: the C example functions/digits/main.c, ported to the Python guest SDK, for
bench/python_guest.py. JSON {"pixels": [64 numbers]} -> {"label": n, "probabilities": [...]};
any other content type is echoed back (the floor of an invocation)."""

from wasminfer_guest import Reject, Request, Response, Tensor, handler, infer


@handler
def digits(request: Request) -> object:
    if request.media_type != "application/json":
        return Response(request.body, request.content_type)
    pixels = request.json()["pixels"]
    if len(pixels) != 64:
        raise Reject(422, f"expected 64 pixel values, got {len(pixels)}")
    out = infer("digits", {"input": Tensor.of([pixels], "float32")})
    return {"label": out["label"].item(0), "probabilities": out["probabilities"].tolist()[0]}
