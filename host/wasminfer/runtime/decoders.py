"""Decoder states on the host: a guest runs a decoder step by step while the model's past key/values
stay in host memory, so a step carries the new token's tensors across the boundary, not the cache.

Every state lives in the process's one `TABLE` under an opaque handle (a positive i32, never reused)
and belongs to the invocation that opened it: a handle given by another invocation, of the same
function or of another tenant, is `DecoderNotFound` as if it did not exist. An invocation's states
are freed when it ends however it ends (answered, failed, timed out, cancelled: `Host.invoke`
closes them), or earlier by the guest. Their bytes (the past tensors) are reserved against the
tenant's memory quota ("decoders" in `runtime.memory`) as they grow, step by step; a step that does
not fit fails with the quota's error.

A state may also choose its tokens (`next_token`): the step's logits stay on the host, which draws
the next token with the state's own `Sampler` (opened with its `Sampling`, seeded) and feeds it to
the next step, so a guest that only needs token ids crosses one id per step and runs no sampling.

On a model loaded with batching (and a mask), `next_token` queues the step on the token it chose
before returning it, in one of the model's `StepLoop`s, which runs it with other streams' while the
guest turns the token into text: the guest's next `next_token` takes it (docs/streaming.md, "Steps
run ahead").

Each ABI reaches this through `InvocationDecoders` (`InvocationState.decoders`, made on first use):
the handler ABI's `decoder_open` / `decoder_step` / `decoder_close`, the Python runtime's `d`
frames (with `next_token`), and WasmEdge's `compute_single` in wasi-nn.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from wasminfer.errors import DecoderNotFound, InferLimitExceeded, InvalidTensor, ModelNotFound
from wasminfer.models import ModelInfo, ModelRegistry
from wasminfer.models.batching import Stack
from wasminfer.models.decoding import DecoderSpec, nbytes
from wasminfer.models.sampling import Sampler, Sampling
from wasminfer.runtime.memory import Reservation, TenantMemory
from wasminfer.runtime.steploops import Ahead, StepLoop, StepLoops

#: Decoder states one invocation may hold at once.
MAX_PER_INVOCATION = 16
_MAX_HANDLE = (1 << 31) - 1



class Run(Protocol):
    """Runs a model on a step's feed (`InvocationState.run_model`); `stack` lets a model loaded with
    batching run it together with other states' steps (`DecoderSpec.steps`)."""

    def __call__(self, model: str, inputs: Mapping[str, np.ndarray], stack: Stack | None = None,
                 /) -> dict[str, np.ndarray]: ...


@dataclass(eq=False)
class _State:
    owner: object
    spec: DecoderSpec
    account: TenantMemory
    memory: Reservation
    sampler: Sampler
    past: dict[str, np.ndarray] | None = None
    steps: int = 0
    length: int = 0  # positions in the past (with a mask: besides its `pad` of padding before them)
    pad: int = 0
    token: int | None = None  # the one `next_token` chose last
    ahead: Ahead | None = None  # the step on `token`, queued before the guest asked for it
    loop: StepLoop | None = None  # where its steps run ahead (one of its model's `StepLoops`)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def drop_ahead(self) -> None:
        """Drops the step run ahead. One that ran in a batch with others' steps is a row of that
        batch's present, which lives on while another state holds its own row of it: counted
        against the tenant (unchecked: it is done) until the batch goes."""
        ahead, self.ahead = self.ahead, None
        outputs = ahead.drop() if ahead is not None else None
        if outputs is None:
            return
        _, past = self.spec.split(outputs)
        batch = _batch_of(past)
        if batch is not None:  # (a reservation of none grown unchecked: a close cannot be refused)
            held = Reservation(self.account, 0, "decoders")
            held.resize(nbytes(past))
            weakref.finalize(batch, held.release)

    def leave_loop(self) -> None:
        self.drop_ahead()
        if self.loop is not None:
            self.loop.leave(self)
        self.loop = None


class DecoderTable:
    """Every decoder state of the process, by handle. Thread-safe."""

    def __init__(self) -> None:
        self._states: dict[int, _State] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.opened = 0
        self.freed = 0

    def live(self) -> int:
        """States held now (opened and not yet freed)."""
        with self._lock:
            return len(self._states)

    def open(self, owner: object, spec: DecoderSpec, memory: TenantMemory,
             sampling: Sampling | None = None, loops: StepLoops | None = None) -> int:
        """A new empty state of `spec`'s model for `owner`, choosing tokens with `sampling` (greedy
        if None), its steps run ahead in one of `loops` (see `next_token`); returns its handle."""
        sampler = Sampler(sampling or Sampling())
        reservation = memory.reserve(0, "decoders", f"a decoder state of model {spec.model!r}")
        with self._lock:
            handle = next(self._ids)
            if handle > _MAX_HANDLE:  # two billion opened in one process: start over past the live ones
                self._ids = itertools.count(max(self._states, default=0) + 1)
                handle = next(self._ids)
            state = self._states[handle] = _State(owner, spec, memory, reservation, sampler)
            self.opened += 1
            spec.count_stream(1)
        if loops is not None:
            state.loop = loops.assign(state)
        return handle

    def _get(self, owner: object, handle: int) -> _State:
        with self._lock:
            state = self._states.get(handle)
        if state is None or state.owner is not owner:
            raise DecoderNotFound(f"no decoder state {handle} in this invocation (a handle lives as long as "
                                  "the invocation that opened it, and only there)")
        return state

    def step(self, owner: object, handle: int, inputs: Mapping[str, np.ndarray], run: Run,
             memory: TenantMemory) -> tuple[DecoderSpec, dict[str, np.ndarray]]:
        """One step of state `handle`: `run(model, inputs + past)`; keeps the present as the next
        past. Returns the spec and every output. Raises `DecoderNotFound`, what `run` raises (the
        state is then unchanged), `MemoryQuotaExceeded` or `HostMemoryExhausted` when the grown
        past does not fit (the state is then freed)."""
        state = self._get(owner, handle)
        with state.lock:
            state.drop_ahead()
            return state.spec, self._step(owner, handle, state, inputs, run, memory)

    def next_token(self, owner: object, handle: int, inputs: Mapping[str, np.ndarray] | None, run: Run,
                   memory: TenantMemory, deadline_ns: int | None = None,
                   waited: Callable[[int], None] | None = None) -> int:
        """A step of state `handle` on `inputs`, or without them on the token chosen last (fed to the
        model's one input besides its past); returns the next token, drawn by the state's sampler
        from the last row of the step's logits. Raises what `step` raises, `InvalidTensor` without
        inputs before any token was chosen, for a model whose ids input or logits output cannot be
        told (`DecoderSpec.token_ids`, `last_logits`: the state is then unchanged or stepped).

        On a state opened with step loops (a model loaded with batching) whose loop has other
        states too, the step on the token chosen is queued at once in that `StepLoop` (by
        `deadline_ns`), to run with theirs while the guest turns the token into text; a next token
        without inputs takes it, any other call on the state drops it. A step run ahead is counted
        against the memory quota, and among the invocation's inferences, when the guest takes it;
        `waited` is told the nanoseconds the guest waited for it (its run, as far as the guest's own
        work did not hide it).
        Alone in its loop, a state steps as it asks (a thread of the loop's between would cost a
        lone stream more than running its step meanwhile saves: 0.51-0.55 of the limit at one
        stream against 0.59-0.65, `bench/stream.py`)."""
        state = self._get(owner, handle)
        with state.lock:
            spec = state.spec
            if inputs is not None:
                state.drop_ahead()
            ahead, state.ahead = state.ahead, None
            outputs = None
            if ahead is not None:
                t0 = time.perf_counter_ns()
                outputs = ahead.result()
                if waited is not None:
                    waited(time.perf_counter_ns() - t0)
            if outputs is not None:  # (a step on one token: it adds one position)
                self._commit(owner, handle, state, outputs, 1, memory)
            else:  # none ahead, or its batch failed: run it here
                if inputs is None:
                    if state.token is None:
                        raise InvalidTensor(f"decoder state {handle} has chosen no token yet: give the "
                                            "first step's inputs (the prompt's ids)")
                    inputs = spec.token_ids(state.token)
                outputs = self._step(owner, handle, state, inputs, run, memory)
            token = state.token = state.sampler.next(spec.last_logits(outputs))
            loop = state.loop
            if loop is not None and loop.members > 1 and spec.ids is not None:
                state.ahead = loop.submit(
                    spec.feed(spec.token_ids(token), state.past, state.length, state.pad), deadline_ns, state)
            return token

    def _step(self, owner: object, handle: int, state: _State, inputs: Mapping[str, np.ndarray], run: Run,
              memory: TenantMemory) -> dict[str, np.ndarray]:
        """Under the state's lock."""
        spec = state.spec
        stack = spec.steps if state.past is not None else spec.first_steps
        outputs = run(spec.model, spec.feed(inputs, state.past, state.length, state.pad), stack)
        self._commit(owner, handle, state, outputs, spec.seq(inputs) if spec.mask or spec.positions else 0,
                     memory)
        return outputs

    def _commit(self, owner: object, handle: int, state: _State, outputs: dict[str, np.ndarray], seq: int,
                memory: TenantMemory) -> None:
        """Under the state's lock: the present of a step that added `seq` positions becomes the past."""
        spec = state.spec
        _, past = spec.split(outputs)
        # A batched step's past is its row of the batch's present (a view, padding and all: counted
        # as its own), which the next batch of the same states runs on without a copy.
        size = nbytes(past)
        shared = _batch_of(state.past)
        if shared is not None:
            # Its last past was its row of a batch's present, which stays in memory as long as any
            # state of that batch holds its own row: those bytes stay counted until then, and the
            # new past is counted afresh.
            try:
                fresh = memory.reserve(size, "decoders", f"the decoder state {handle} of model "
                                       f"{state.spec.model!r} ({size} bytes after step {state.steps + 1})")
            except BaseException:
                self.close(owner, handle)
                raise
            weakref.finalize(shared, state.memory.release)
            state.memory = fresh
        elif (grow := size - state.memory.nbytes) > 0:
            try:
                what = (f"the decoder state {handle} of model {state.spec.model!r} ({size} bytes after "
                        f"step {state.steps + 1})")
                extra = memory.reserve(grow, "decoders", what)
            except BaseException:
                self.close(owner, handle)
                raise
            state.memory.resize(size)
            extra.release()
        else:
            state.memory.resize(size)
        state.past = past
        state.steps += 1
        if spec.mask or spec.positions:
            state.length += seq
            state.pad = past[spec.pairs[0][0]].shape[2] - state.length if spec.mask else 0

    def steps(self, owner: object, handle: int) -> int:
        return self._get(owner, handle).steps

    def close(self, owner: object, handle: int) -> None:
        """Frees state `handle`. Raises `DecoderNotFound`."""
        state = self._get(owner, handle)
        with self._lock:
            if self._states.pop(handle, None) is None:
                return
            self.freed += 1
            state.spec.count_stream(-1)
        state.leave_loop()
        shared = _batch_of(state.past)
        state.past = None
        if shared is None:
            state.memory.release()
        else:  # its row of a batch's present: counted until the batch's last state lets it go
            weakref.finalize(shared, state.memory.release)

    def close_owner(self, owner: object) -> int:
        """Frees every state of `owner`; returns how many."""
        with self._lock:
            mine = [h for h, s in self._states.items() if s.owner is owner]
        for handle in mine:
            self.close(owner, handle)
        return len(mine)


class _Shared:
    """What a registry's loaded decoder model shares among invocations: its spec, and its step loops
    once asked for (None: it does not batch, or has no mask)."""

    __slots__ = ("info", "spec", "loops", "looked")

    def __init__(self, info: ModelInfo, spec: DecoderSpec) -> None:
        self.info = info
        self.spec = spec
        self.loops: StepLoops | None = None
        self.looked = False


# One entry per loaded model of a registry, shared by every invocation's states: its steps' `Stack`
# counts the model's open states, the streams a batch takes its share of (`batching.Stack.streams`).
_SPECS: weakref.WeakKeyDictionary[ModelRegistry, dict[str, _Shared]] = weakref.WeakKeyDictionary()
_SPECS_LOCK = threading.Lock()


def shared_spec(models: ModelRegistry, model: str) -> DecoderSpec:
    """The `DecoderSpec` of `model` as `models` has it loaded now (a reload gets a new one). Raises
    `ModelNotFound`, or `InvalidTensor` if the model is no decoder."""
    info = models.get(model)
    with _SPECS_LOCK:
        specs = _SPECS.get(models)
        if specs is None:
            specs = _SPECS[models] = {}
        found = specs.get(model)
        if found is not None and found.info is info:
            return found.spec
        spec = DecoderSpec.of(info)
        specs[model] = _Shared(info, spec)
        return spec


def step_loops(models: ModelRegistry, spec: DecoderSpec) -> StepLoops | None:
    """The step loops of `spec` (`shared_spec`'s), None if its model does not batch, has no mask,
    or was replaced since (its states then step as they ask)."""
    with _SPECS_LOCK:
        found = _SPECS.get(models, {}).get(spec.model)
        if found is None or found.spec is not spec:
            return None
        if not found.looked:
            found.looked = True
            try:
                runs = models.joined_runs(spec.model, found.info)
            except ModelNotFound:
                runs = None
            # With a mask, steps of states of any length share a run; without, only those of equal
            # lengths would, and a loop's batch of them would not join: their steps are not run ahead.
            found.loops = StepLoops(runs, spec) if runs is not None and spec.mask else None
        return found.loops


def _batch_of(past: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
    """The present of the batch `past` is a row of (its first array's; every past of a state comes
    from the same run, so they go together), None if it is a state's own."""
    if not past:
        return None
    base = next(iter(past.values())).base
    return base if isinstance(base, np.ndarray) and base.shape[0] > 1 else None


TABLE = DecoderTable()


class InvocationDecoders:
    """The decoder states of one invocation (its `InvocationState.decoders`)."""

    def __init__(self, owner: object, models: ModelRegistry, memory: TenantMemory,
                 table: DecoderTable = TABLE, waited: Callable[[int], None] | None = None) -> None:
        """`waited`: told how long each next token waited for its step run ahead (the invocation's
        inference time, as its `run` counts its own)."""
        self.owner = owner
        self.models = models
        self.memory = memory
        self.table = table
        self.waited = waited
        self.handles: set[int] = set()
        self._specs: dict[str, DecoderSpec] = {}

    def spec(self, model: str) -> DecoderSpec:
        """Raises `ModelNotFound`, or `InvalidTensor` if the model is no decoder."""
        spec = self._specs.get(model)
        if spec is None:
            spec = self._specs[model] = shared_spec(self.models, model)
        return spec

    def open(self, model: str, function: str, sampling: Sampling | None = None) -> int:
        """Raises `ModelNotFound`, `InvalidTensor` (no decoder), `InferLimitExceeded` past
        `MAX_PER_INVOCATION` open states, the memory refusals."""
        spec = self.spec(model)
        if len(self.handles) >= MAX_PER_INVOCATION:
            raise InferLimitExceeded(f"function {function!r} holds {len(self.handles)} decoder states: at "
                                     f"most {MAX_PER_INVOCATION} per invocation; close some")
        handle = self.table.open(self.owner, spec, self.memory, sampling, step_loops(self.models, spec))
        self.handles.add(handle)
        return handle

    def step(self, handle: int, inputs: Mapping[str, np.ndarray],
             run: Run) -> tuple[DecoderSpec, dict[str, np.ndarray]]:
        """See `DecoderTable.step`."""
        try:
            return self.table.step(self.owner, handle, inputs, run, self.memory)
        except BaseException:
            self._forget_freed(handle)
            raise

    def next_token(self, handle: int, inputs: Mapping[str, np.ndarray] | None, run: Run,
                   deadline_ns: int | None = None) -> int:
        """See `DecoderTable.next_token`."""
        try:
            return self.table.next_token(self.owner, handle, inputs, run, self.memory, deadline_ns,
                                         self.waited)
        except BaseException:
            self._forget_freed(handle)
            raise

    def _forget_freed(self, handle: int) -> None:
        """After a failed step: a state freed because its past did not fit is no longer held."""
        if handle in self.handles and not self._holds(handle):
            self.handles.discard(handle)

    def _holds(self, handle: int) -> bool:
        try:
            self.table.steps(self.owner, handle)
        except DecoderNotFound:
            return False
        return True

    def close_one(self, handle: int) -> None:
        """Raises `DecoderNotFound`."""
        self.table.close(self.owner, handle)
        self.handles.discard(handle)

    def close(self) -> None:
        """Frees every state of the invocation (at its end)."""
        self.handles.clear()
        self.table.close_owner(self.owner)


__all__ = ["MAX_PER_INVOCATION", "TABLE", "DecoderTable", "InvocationDecoders"]
