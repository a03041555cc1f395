"""chatbot: streams the continuation of a prompt, one token at a time, from tiny-gpt.

Request (JSON): {"prompt": "...", "max_new_tokens": 32, "temperature": 0, "top_k": 0, "top_p": 1,
"seed": 0, "stop": true} ("stop": false goes on past the end-of-text token, for measurements). The
answer is the text, each token sent as it is chosen (invoke with ?stream=1 or Accept:
text/event-stream to see them come). The model's past key/values stay on the host between steps (a
`Decoder`), which also chooses each token (`Sampling`: greedy, or temperature, top-k, top-p with a
seed), so a step crosses one token id each way, with the text of the token before it (`send`);
the tokenizer runs here.
"""

from __future__ import annotations

from collections.abc import Iterator

import tokenizer
from wasminfer_guest import Decoder, Reject, Request, Sampling, Tensor, handler

MODEL = "tiny-gpt"
MAX_NEW_TOKENS = 4096


@handler
def chat(request: Request) -> Iterator[str]:
    body = request.json()
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or not body["prompt"]:
        raise Reject(400, 'send {"prompt": "some text", "max_new_tokens": 32, ...}')
    try:
        s = Sampling.from_dict(body)
        count = int(body.get("max_new_tokens", 32))
    except (TypeError, ValueError) as exc:
        raise Reject(400, f"bad sampling parameters: {exc}") from None
    if not 0 <= count <= MAX_NEW_TOKENS:
        raise Reject(400, f"max_new_tokens is 0 to {MAX_NEW_TOKENS}")
    eos = tokenizer.EOS if body.get("stop", True) else -1
    return _tokens(tokenizer.encode(body["prompt"]), count, s, eos)


def _tokens(prompt: list[int], count: int, s: Sampling, eos: int) -> Iterator[str]:
    if count == 0:
        return
    with Decoder(MODEL, s) as decoder:
        token = decoder.next_token({"input_ids": Tensor.of([prompt], "int64")})
        for _ in range(count - 1):
            if token == eos:
                return
            # one crossing per token: this token's text goes out with the step that feeds it back
            token = decoder.next_token(send=tokenizer.decode(token))
        if token != eos:
            yield tokenizer.decode(token)
