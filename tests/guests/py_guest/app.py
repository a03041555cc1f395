"""A Python test guest: the request body (text) picks what it does. See tests/test_python_guest.py."""

import sys

from wasminfer_guest import InferError, Request, Response, Tensor, handler, infer, log

_cache: list[bytes] = []


@handler
def handle(request: Request) -> object:
    if request.media_type == "application/cbor":  # tensors in, tensors out
        value = request.cbor()
        x = value["x"]
        return Response.cbor({"x": x, "doubled": Tensor.of([2 * v for v in x.values()], x.dtype, x.shape)})
    command, _, arg = request.text().partition(" ")
    if command == "echo":
        return Response(request.body, request.content_type)
    if command == "add":  # model add: y = a + b over float32 [N, 3]
        rows = [float(v) for v in arg.split(",")]
        out = infer("add", {"a": Tensor.of([rows]), "b": Tensor.of([[1.0, 2.0, 3.0]])})
        return {"y": out["y"].tolist()}
    if command == "infer-bad-shape":
        infer("add", {"a": Tensor.of([[1.0, 2.0]]), "b": Tensor.of([[1.0, 2.0]])})
    if command == "infer-model":  # whatever model the argument names (allowed or not)
        infer(arg, {"a": Tensor.of([[1.0, 2.0, 3.0]])})
    if command == "infer-recover":  # a failed infer the function recovers from
        try:
            infer("add", {"a": Tensor.of([[1.0]])})
        except InferError as exc:
            return {"recovered": exc.kind}
    if command == "infer-loop":
        for _ in range(int(arg)):
            try:
                infer("add", {"a": Tensor.of([[1.0, 2.0, 3.0]]), "b": Tensor.of([[1.0, 2.0, 3.0]])})
            except InferError:
                pass
        return "done"
    if command == "raise":
        raise ValueError(arg or "boom")
    if command == "exit":
        sys.exit(3)
    if command == "loop":
        while True:
            pass
    if command == "alloc":  # MiB, kept alive across requests: memory_mb obeyed or violated
        _cache.append(bytearray(int(arg) << 20))
        return f"holding {sum(map(len, _cache)) >> 20} MiB"
    if command == "free":
        _cache.clear()
        return "freed"
    if command == "recurse":
        def deeper(n: int) -> int:
            return deeper(n + 1) + 1
        return str(deeper(0))
    if command == "log":
        for i in range(int(arg)):
            log.info(f"line {i} " + "x" * 100)
        return "logged"
    if command == "print":
        print(arg)
        print("to stderr", file=sys.stderr)
        return "printed"
    if command == "big":
        return Response(b"x" * int(arg))
    if command == "state":
        _cache.append(b"")
        return str(len(_cache))
    raise ValueError(f"unknown command {command!r}")
