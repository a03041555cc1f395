/* Test guest for streamed answers: the body says what to write.
 *   "N"          N parts "part I\n" (output_chunk), then returns
 *   "N final"    the same, then sets "final\n" with wasminfer_output (the answer's last part)
 *   "forever"    parts without end, each after ~1 ms of work: ended by a cancel, the timeout or the
 *                output limit
 *   "fail N"     N parts, then fails with status 100 and the message "gave up" */
#include "wasminfer.h"

static volatile unsigned sink;

static void work(void) {
    for (unsigned i = 0; i < 200000; i++) sink += i;
}

static int handle(const wasminfer_request *req) {
    char text[32] = {0}, part[32];
    memcpy(text, req->body, req->body_len < sizeof text - 1 ? req->body_len : sizeof text - 1);
    int forever = strcmp(text, "forever") == 0, fail = strncmp(text, "fail ", 5) == 0;
    long n = forever ? -1 : atol(fail ? text + 5 : text);
    for (long i = 0; forever || i < n; i++) {
        int len = snprintf(part, sizeof part, "part %ld\n", i);
        wasminfer_output_chunk(part, (size_t)len, "text/plain; charset=utf-8");
        if (forever) work();
    }
    if (fail) return wasminfer_fail_str(WASMINFER_FAILED, "gave up");
    if (strstr(text, "final")) return wasminfer_output_str("final\n", "text/plain; charset=utf-8");
    return 0;
}

WASMINFER_HANDLER(handle)
