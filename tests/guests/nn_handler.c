/* Test guest (handler ABI v1 reactor) that infers through wasi_ephemeral_nn instead of
 * wasminfer.infer. Its graph and execution context are made on the first request and kept in
 * globals: handles live as long as the (reused) instance.
 *
 * Request: 64 bytes, pixels 0..16 of an 8×8 digit (content type may carry `model=NAME`, default
 * "digits"). Response: label (int64), probabilities (10 × float32), the graph handle (uint32) and
 * how many requests this instance has served (uint32), little-endian.
 */
#include "wasminfer.h"
#include "wasi_ephemeral_nn.h"

static int loaded;
static wasi_nn_graph graph;
static wasi_nn_context ctx;
static uint32_t served;

static int handle(const wasminfer_request *req) {
    if (req->body_len != 64) return wasminfer_fail(WASMINFER_FAILED, "expected 64 bytes, got %zu", req->body_len);
    int32_t rc;
    if (!loaded) {
        char model[64] = "digits";
        wasminfer_media_type_param(req->content_type, "model", model, sizeof model);
        if ((rc = wasi_nn_load_by_name(model, (uint32_t)strlen(model), &graph)))
            return wasminfer_fail(WASMINFER_FAILED, "load_by_name(%s): nn_errno %d", model, rc);
        if ((rc = wasi_nn_init_execution_context(graph, &ctx)))
            return wasminfer_fail(WASMINFER_FAILED, "init_execution_context: nn_errno %d", rc);
        loaded = 1;
    }
    float pixels[64];
    for (int i = 0; i < 64; i++) pixels[i] = req->body[i];
    uint32_t dims[2] = {1, 64};
    wasi_nn_tensor input = {dims, 2, WASI_NN_F32, (const uint8_t *)pixels, sizeof pixels};
    if ((rc = wasi_nn_set_input(ctx, 0, &input))) return wasminfer_fail(WASMINFER_FAILED, "set_input: %d", rc);
    if ((rc = wasi_nn_compute(ctx))) return wasminfer_fail(WASMINFER_FAILED, "compute: %d", rc);
    uint8_t out[8 + 40 + 4 + 4];
    uint32_t written;
    if ((rc = wasi_nn_get_output(ctx, 0, out, 8, &written)) || written != 8)
        return wasminfer_fail(WASMINFER_FAILED, "get_output 0: %d", rc);
    if ((rc = wasi_nn_get_output(ctx, 1, out + 8, 40, &written)) || written != 40)
        return wasminfer_fail(WASMINFER_FAILED, "get_output 1: %d", rc);
    served++;
    memcpy(out + 48, &graph, 4);
    memcpy(out + 52, &served, 4);
    return wasminfer_output(out, sizeof out, "application/octet-stream");
}

WASMINFER_HANDLER(handle)
