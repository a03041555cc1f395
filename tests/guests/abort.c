/* Test guest: a handler that reports what is wrong on stderr and calls abort(), as C programs do
 * (wasi-libc's abort() is the `unreachable` instruction: a trap). The caller's error must carry it. */
#include "wasminfer.h"

static int handle(const wasminfer_request *req) {
    if (req->body_len != 64) {
        fprintf(stderr, "abort.c: expected 64 pixels, got %zu\n", req->body_len);
        abort();
    }
    return wasminfer_output_str("{\"ok\": true}", "application/json");
}

WASMINFER_HANDLER(handle)
