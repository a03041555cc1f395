"""Decoder states on the host (runtime/decoders.py) through the handler ABI, with a real C guest
(tests/guests/decoder_probe.c) and tiny-gpt made in code: tokens equal a reference loop run on
ONNX Runtime, handles are owned by their invocation (another invocation or tenant cannot use
them), freed when it ends, fails or is cut, counted against the tenant's memory quota; and
WasmEdge's compute_single over the same states."""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest

import sampling_reference
from wasminfer.errors import DecoderNotFound, InvalidTensor, InvocationCancelled, MemoryQuotaExceeded
from wasminfer.examples import functions_dir, tiny_gpt_model
from wasminfer.models import ModelRegistry
from wasminfer.models.batching import Stack
from wasminfer.models.decoding import DecoderSpec
from wasminfer.models.sampling import Sampling
from wasminfer.runtime import Host, OutputStream
from wasminfer.runtime.decoders import TABLE, InvocationDecoders
from wasminfer.runtime.memory import MemoryBudget

MANIFEST = {"models": ["tiny-gpt"], "max_infer_calls": 100_000, "timeout_ms": 20_000}


def chatbot_module(name: str) -> ModuleType:
    """A module of functions/chatbot (the guest's tokenizer), imported on the host."""
    path = functions_dir() / "chatbot" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"chatbot_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def reference(prompt: str, count: int, **sampling: float) -> str:
    """The chatbot's decoding loop run directly on ONNX Runtime, the past kept in this process, its
    tokens chosen by the reference sampler (the guest's before the host chose them)."""
    smp, tok = sampling_reference, chatbot_module("tokenizer")
    session = ort.InferenceSession(tiny_gpt_model(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    past = {i.name: np.zeros((1, 4, 0, 16), np.float32)
            for i in session.get_inputs() if i.name.startswith("past")}

    def step(ids: np.ndarray) -> np.ndarray:
        out = dict(zip(names, session.run(None, {"input_ids": ids, **past}), strict=True))
        for name in list(past):
            past[name] = out["present" + name[4:]]
        return out["logits"]

    s = smp.Sampling.from_dict(dict(sampling))
    return "".join(tok.decode(t) for t in smp.generate(step, tok.encode(prompt), count, s, tok.EOS))


@pytest.fixture(scope="module")
def gpt() -> bytes:
    return tiny_gpt_model()


@pytest.fixture
def host(gpt: bytes, build_guest: Callable[..., bytes]) -> Iterator[Host]:
    with Host() as h:
        h.deploy_model("tiny-gpt", gpt)
        h.deploy_function("probe", build_guest("decoder_probe.c"), MANIFEST)
        yield h


def test_decoder_spec_pairs_past_with_present_and_starts_empty(gpt: bytes) -> None:
    with ModelRegistry() as models:
        models.load("tiny-gpt", gpt)
        spec = DecoderSpec.of(models.get("tiny-gpt"))
    assert spec.pairs == (("past_key_0", "present_key_0"), ("past_value_0", "present_value_0"),
                          ("past_key_1", "present_key_1"), ("past_value_1", "present_value_1"))
    assert {a.shape for a in spec.first.values()} == {(1, 4, 0, 16)}
    with pytest.raises(InvalidTensor, match="is the state the host keeps"):
        spec.feed({"past_key_0": np.zeros((1, 4, 0, 16), np.float32)}, None)


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.8, "top_k": 20, "seed": 7},
                                      {"temperature": 1.2, "top_p": 0.9, "seed": 2**63}])
def test_the_host_chooses_the_reference_samplers_tokens_and_feeds_them_back(
    gpt: bytes, settings: dict[str, float]
) -> None:
    tok = chatbot_module("tokenizer")
    with ModelRegistry() as models:
        models.load("tiny-gpt", gpt)
        decoders = InvocationDecoders(object(), models, MemoryBudget.unlimited().tenant("t"))
        ran: list[dict[str, np.ndarray]] = []

        def run(model: str, inputs: Mapping[str, np.ndarray],
                stack: Stack | None = None, /) -> dict[str, np.ndarray]:
            ran.append(models.infer(model, inputs, stack=stack))
            return ran[-1]

        h = decoders.open("tiny-gpt", "f", Sampling(**settings))  # type: ignore[arg-type]
        with pytest.raises(InvalidTensor, match=f"decoder state {h} has chosen no token yet: give the first"):
            decoders.next_token(h, None, run)
        tokens = [decoders.next_token(h, {"input_ids": np.array([tok.encode("Hello")])}, run)]
        tokens += [decoders.next_token(h, None, run) for _ in range(39)]
        kept = decoders.table._states[h].past
        assert kept is not None and kept["past_key_0"] is ran[-1]["present_key_0"]  # no copy per step
        assert ran[-1]["present_key_0"].shape == (1, 4, 5 + 39, 16)
        decoders.close()
    text = "".join(tok.decode(t) for t in tokens[: tokens.index(tok.EOS) if tok.EOS in tokens else None])
    assert text == reference("Hello", 40, **settings)


def test_a_model_without_past_inputs_is_no_decoder(add_model: bytes) -> None:
    with ModelRegistry() as models:
        models.load("add", add_model)
        with pytest.raises(InvalidTensor, match="model 'add' is no decoder: none of its inputs is named"):
            DecoderSpec.of(models.get("add"))


def test_greedy_tokens_from_the_c_guest_equal_the_reference_on_ort(host: Host) -> None:
    live = TABLE.live()
    r = host.invoke("probe", b"greedy 40 Hello, world")
    assert r.body.decode() == reference("Hello, world", 40)
    assert len(r.body) == 40
    assert TABLE.live() == live  # closed by the guest


def test_each_step_crosses_the_same_bytes_whatever_the_sequence_length(host: Host) -> None:
    short = host.invoke("probe", b"greedy 10 Hi").boundary_bytes
    longer = host.invoke("probe", b"greedy 50 Hi").boundary_bytes
    per_step = (longer - short) / 40
    # one token id in (a few dozen bytes of CBOR), one row of 96 float32 logits out
    assert 96 * 4 < per_step < 96 * 4 + 120


def test_a_state_left_open_is_freed_when_the_invocation_ends(host: Host) -> None:
    live, freed = TABLE.live(), TABLE.freed
    assert host.invoke("probe", b"leave").body == b"left open\n"
    assert TABLE.live() == live and TABLE.freed == freed + 1
    assert host.memory.used["decoders"] == 0


def test_a_state_is_freed_when_its_invocation_fails(host: Host) -> None:
    live = TABLE.live()
    with pytest.raises(DecoderNotFound, match="no decoder state .* in this invocation"):
        host.invoke("probe", b"closed")
    assert TABLE.live() == live


def test_a_handle_of_an_earlier_invocation_is_not_found(host: Host) -> None:
    first = host.invoke("probe", b"greedy 1 a")
    assert first.body
    with pytest.raises(DecoderNotFound, match="no decoder state 1 in this invocation"):
        host.invoke("probe", b"use 1")


def test_another_tenant_cannot_use_a_live_handle(gpt: bytes, build_guest: Callable[..., bytes]) -> None:
    budget = MemoryBudget(1 << 34, 1 << 33)
    wasm = build_guest("decoder_probe.c")
    with Host(memory=budget.tenant("a")) as a, Host(memory=budget.tenant("b"), engine=a.engine) as b:
        for h in (a, b):
            h.deploy_model("tiny-gpt", gpt)
            h.deploy_function("probe", wasm, MANIFEST)
        outcome: dict[str, BaseException | bytes] = {}

        def deliver(chunk: bytes, _ctype: str) -> None:
            if chunk.startswith(b"handle="):  # a's state is live now: b tries it from a's thread
                handle = chunk.split(b"=")[1].strip()
                try:
                    outcome["b"] = b.invoke("probe", b"use " + handle).body
                except BaseException as exc:  # noqa: BLE001 - the assertion below looks at it
                    outcome["b"] = exc
                stream.cancel(RuntimeError("done"))

        stream = OutputStream(deliver)
        with pytest.raises(InvocationCancelled):
            a.invoke("probe", b"hold", stream=stream)
    err = outcome["b"]
    assert isinstance(err, DecoderNotFound), err
    assert "in this invocation" in err.message


def test_a_cut_stream_frees_its_state_and_stops_stepping(host: Host) -> None:
    live = TABLE.live()
    parts: list[bytes] = []
    states_during: list[int] = []

    def deliver(chunk: bytes, _ctype: str) -> None:
        parts.append(chunk)
        states_during.append(TABLE.live())
        if len(parts) == 10:
            stream.cancel(RuntimeError("the client left"))

    stream = OutputStream(deliver)
    with pytest.raises(InvocationCancelled):
        host.invoke("probe", b"hold", stream=stream)
    assert len(parts) == 10  # the step after the cancel wrote nothing: the guest ended at its next part
    assert states_during[-1] == live + 1 and TABLE.live() == live
    assert host.memory.used["decoders"] == 0


def test_the_timeout_frees_the_state(build_guest: Callable[..., bytes]) -> None:
    with Host() as h:
        # positions for every token the guest can step through in its 300 ms (a few thousand here)
        h.deploy_model("tiny-gpt", tiny_gpt_model(max_positions=1 << 16))
        h.deploy_function("probe", build_guest("decoder_probe.c"), {**MANIFEST, "timeout_ms": 300})
        live = TABLE.live()
        with pytest.raises(Exception) as info:
            h.invoke("probe", b"hold", stream=OutputStream(lambda c, t: None))
        assert type(info.value).__name__ == "Timeout", repr(info.value)
        assert TABLE.live() == live


def test_memory_quota_obeyed(gpt: bytes, build_guest: Callable[..., bytes]) -> None:
    budget = MemoryBudget(1 << 30, 256 << 20)
    with Host(memory=budget.tenant("t")) as h:
        h.deploy_model("tiny-gpt", gpt)
        h.deploy_function("probe", build_guest("decoder_probe.c"), MANIFEST)
        seen: list[int] = []
        r = h.invoke("probe", b"greedy 60 x", stream=OutputStream(
            lambda c, t: seen.append(h.memory.used["decoders"])))
        assert r.body == b""
        # 4 tensors of [1, 4, n, 16] float32 over n tokens: 1 KiB per token; at the 60th part the
        # state holds the prompt's token and 59 chosen ones (the last is sent before its step)
        assert seen[0] == 1024 and seen[-1] == 1024 * 60 and h.memory.used["decoders"] == 0


def test_memory_quota_violated_ends_the_invocation_and_frees_the_state(
    gpt: bytes, build_guest: Callable[..., bytes]
) -> None:
    budget = MemoryBudget(1 << 30, 1 << 30)
    with Host(memory=budget.tenant("t")) as h:
        h.deploy_model("tiny-gpt", gpt)
        h.deploy_function("probe", build_guest("decoder_probe.c"), MANIFEST)
        h.memory.quota_bytes = h.memory.used_bytes + 40 * 1024  # 40 tokens of past
        live = TABLE.live()
        with pytest.raises(MemoryQuotaExceeded, match="decoder state .* of model 'tiny-gpt'"):
            h.invoke("probe", b"hold", stream=OutputStream(lambda c, t: None))
        assert TABLE.live() == live and h.memory.used["decoders"] == 0


def test_concurrent_invocations_each_get_their_own_tokens(host: Host) -> None:
    results: dict[int, bytes] = {}

    def run(i: int) -> None:
        results[i] = host.invoke("probe", f"greedy 20 prompt {i}".encode()).body

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: reference(f"prompt {i}", 20).encode() for i in range(4)}




def test_wasi_nn_compute_single_steps_a_state_the_host_keeps(
    gpt: bytes, build_guest: Callable[..., bytes]
) -> None:
    """WasmEdge's token-by-token calls (tests/guests/nn_probe.c runs the script): only input_ids is
    set; each compute_single continues the sequence; fini_single starts a new one."""
    session = ort.InferenceSession(gpt, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    empty = {i.name: np.zeros((1, 4, 0, 16), np.float32)
             for i in session.get_inputs() if i.name != "input_ids"}
    first = dict(zip(names, session.run(None, {"input_ids": np.array([[5]]), **empty}), strict=True))
    past = {name: first["present" + name[4:]] for name in empty}
    second = session.run(None, {"input_ids": np.array([[7]]), **past})[0]

    def ids(token: int) -> str:
        return np.array([[token]], "<i8").tobytes().hex()

    script = (f"byname tiny-gpt\ninit 0\ninput 0 0 5 1,1 {ids(5)}\ncompute1 0\noutput1 0 0 4096\n"
              f"input 0 0 5 1,1 {ids(7)}\ncompute1 0\noutput1 0 0 4096\noutput1 0 1 4096\n"
              f"fini 0\ninput 0 0 5 1,1 {ids(5)}\ncompute1 0\noutput1 0 0 4096\n")
    with Host() as h:
        h.deploy_model("tiny-gpt", gpt)
        h.deploy_function("nn", build_guest("nn_probe.c", exec_model="command"), MANIFEST)
        live = TABLE.live()
        lines = [line.split() for line in h.invoke("nn", script.encode()).body.decode().splitlines()]
        assert TABLE.live() == live  # fini_single freed it (and the invocation's end would have)
    assert [int(line[1]) for line in lines] == [0] * len(lines)

    def logits(line: list[str]) -> np.ndarray:
        return np.frombuffer(bytes.fromhex(line[3]), "<f4").reshape(1, 1, 96)

    np.testing.assert_array_equal(logits(lines[4]), first["logits"])
    np.testing.assert_array_equal(logits(lines[7]), second)  # the past of the first step was kept
    assert int(lines[8][2]) == 4 * 2 * 16 * 4  # present_key_0: [1, 4, 2, 16] float32, two tokens long
    np.testing.assert_array_equal(logits(lines[12]), first["logits"])  # fini_single: a new sequence
