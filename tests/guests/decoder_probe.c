/* Test guest for decoder states (handler ABI): the body says what to do with model tiny-gpt.
 *   "greedy N PROMPT"  greedy decoding of N tokens after PROMPT, each token's character one part
 *   "hold"             opens a state, sends "handle=H\n", then steps on token 0 forever, one part per
 *                      step (ended by a cancel, the timeout or a limit)
 *   "use H"            one step of handle H (someone else's): passes the error on
 *   "closed"           opens, steps, closes, steps again: passes the error on
 *   "leave"            opens a state and returns without closing it */
#include "wasminfer.h"

#define MODEL "tiny-gpt"
#define EOS 95

static int step(int32_t h, const int64_t *ids, size_t n, int *next) {
    wasminfer_tensor in = {.name = "input_ids", .dtype = WASMINFER_I64, .ndim = 2, .dims = {1, (int64_t)n},
                           .data = (void *)ids, .nbytes = n * sizeof *ids};
    wasminfer_outputs out;
    int rc = wasminfer_decoder_step(h, MODEL, &in, 1, &out);
    if (rc) return rc;
    const wasminfer_tensor *logits = wasminfer_outputs_get(&out, "logits");
    if (!logits || out.count != 1) {
        wasminfer_outputs_free(&out);
        return wasminfer_fail_str(WASMINFER_FAILED, "expected only logits back");
    }
    int64_t vocab = logits->dims[2];
    const float *row = (const float *)logits->data + (logits->dims[1] - 1) * vocab;
    int best = 0;
    for (int64_t i = 1; i < vocab; i++)
        if (row[i] > row[best]) best = (int)i;
    *next = best;
    wasminfer_outputs_free(&out);
    return 0;
}

static int handle(const wasminfer_request *req) {
    char text[256] = {0};
    memcpy(text, req->body, req->body_len < sizeof text - 1 ? req->body_len : sizeof text - 1);
    int64_t ids[256];
    int next = 0, rc;
    if (strncmp(text, "use ", 4) == 0) {
        ids[0] = 0;
        return step((int32_t)atol(text + 4), ids, 1, &next);
    }
    int32_t h = wasminfer_decoder_open(MODEL);
    if (h < 0) return -h;
    if (strcmp(text, "leave") == 0) return wasminfer_output_str("left open\n", "text/plain");
    if (strcmp(text, "closed") == 0) {
        ids[0] = 1;
        if ((rc = step(h, ids, 1, &next))) return rc;
        wasminfer_decoder_close(h);
        return step(h, ids, 1, &next);
    }
    if (strcmp(text, "hold") == 0) {
        char line[32];
        int len = snprintf(line, sizeof line, "handle=%d\n", (int)h);
        wasminfer_output_chunk(line, (size_t)len, "text/plain");
        for (;;) {
            ids[0] = 0;
            if ((rc = step(h, ids, 1, &next))) return rc;
            char c = (char)(next + 32);
            wasminfer_output_chunk(&c, 1, "text/plain");
        }
    }
    if (strncmp(text, "greedy ", 7) != 0) return wasminfer_fail_str(WASMINFER_BAD_REQUEST, "unknown command");
    char *prompt = strchr(text + 7, ' ');
    long count = atol(text + 7);
    if (!prompt) return wasminfer_fail_str(WASMINFER_BAD_REQUEST, "greedy N PROMPT");
    size_t n = 0;
    for (const char *p = prompt + 1; *p && n < 256; p++) ids[n++] = (*p >= 32 && *p <= 126) ? *p - 32 : '?' - 32;
    if ((rc = step(h, ids, n, &next))) return rc;
    for (long i = 0; i < count && next != EOS; i++) {
        char c = (char)(next + 32);
        wasminfer_output_chunk(&c, 1, "text/plain");
        if (i + 1 < count) {
            ids[0] = next;
            if ((rc = step(h, ids, 1, &next))) return rc;
        }
    }
    return wasminfer_decoder_close(h);
}

WASMINFER_HANDLER(handle)
