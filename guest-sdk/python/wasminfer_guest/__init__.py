"""wasminfer's guest SDK for Python: write a function, build it into a Wasm component with
`wasminfer build`, deploy it, invoke it. See guest-sdk/python/README.md.

    from wasminfer_guest import Request, Response, Tensor, handler, infer

    @handler
    def handle(request: Request) -> Response:
        x = Tensor.of([request.json()["pixels"]], "float32")
        out = infer("digits", {"input": x})
        return Response.json({"label": out["label"].item(0)})

One module per capability: `tensor` (Tensor), `inference` (infer, InferError), `decoder` (Decoder:
a model's past kept on the host between steps, tokens chosen there with Sampling), `log`, `http` (Request, Response), `cbor`, `export`
(@handler; a handler that returns an iterator streams its items), `local` (plain Python).
"""

from wasminfer_guest import log
from wasminfer_guest.decoder import Decoder, Sampling
from wasminfer_guest.export import handler
from wasminfer_guest.http import Reject, Request, Response
from wasminfer_guest.inference import InferError, infer
from wasminfer_guest.tensor import DTYPES, Tensor

__version__ = "0.1.0"  # the WIT world it targets: wasminfer:function@0.1.0

__all__ = ["DTYPES", "Decoder", "InferError", "Reject", "Request", "Response", "Sampling", "Tensor", "handler",
           "infer", "log"]
