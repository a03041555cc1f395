"""text-classify: the topic of a short English text — food, sports, tech or weather.

Tokenizes in the guest (word unigrams and bigrams over vocab.txt, which ships with the function:
see tokenizer.py), infers with the model `text-classifier` (TF-IDF + logistic regression trained on
train.tsv, exported by skl2onnx: input `counts` float32 [N, 953], outputs `label` int64 [N] and
`probabilities` float32 [N, 4] in the order of labels.txt) and answers JSON. See README.md.
"""

from pathlib import Path

import tokenizer
from wasminfer_guest import Reject, Request, Tensor, handler, infer

HERE = Path(__file__).parent
# Read when an instance loads the function (on the Python runtime, from /fn); built into a
# component, once at build time: its snapshot holds them, the files are not inside it.
VOCABULARY = tokenizer.load_vocabulary(HERE / "vocab.txt")
LABELS = (HERE / "labels.txt").read_text().split()
MODEL = "text-classifier"
MAX_TEXTS = 64
MAX_CHARS = 10_000


def read_texts(request: Request) -> tuple[list[str], bool]:
    """The texts of a request, and whether it asked for a batch."""
    if request.media_type == "text/plain":
        return [request.text()], False
    if request.media_type != "application/json":
        what = request.content_type or "no content type"
        raise Reject(415, f"send text/plain or application/json, not {what!r}")
    body = request.json()
    if isinstance(body, dict) and isinstance(body.get("text"), str):
        return [body["text"]], False
    if isinstance(body, dict) and isinstance(body.get("texts"), list) and body["texts"]:
        if not all(isinstance(t, str) for t in body["texts"]):
            raise Reject(422, '"texts" must be a list of strings')
        if len(body["texts"]) > MAX_TEXTS:
            raise Reject(413, f"at most {MAX_TEXTS} texts in one request")
        return body["texts"], True
    raise Reject(422, 'send {"text": "..."} or {"texts": ["...", ...]}')


@handler
def classify(request: Request) -> dict:
    texts, batch = read_texts(request)
    if any(len(t) > MAX_CHARS for t in texts):
        raise Reject(413, f"a text is longer than {MAX_CHARS} characters")
    rows = [tokenizer.counts(t, VOCABULARY) for t in texts]
    outputs = infer(MODEL, {"counts": Tensor.of(rows, "float32")})
    results = []
    for row, scores in zip(rows, outputs["probabilities"].tolist(), strict=True):
        best = max(range(len(LABELS)), key=scores.__getitem__)
        results.append({
            "label": LABELS[best],
            "scores": dict(zip(LABELS, scores, strict=True)),
            "known_ngrams": int(sum(row)),  # 0: nothing the model knows, the scores are its priors
        })
    return {"results": results} if batch else results[0]
