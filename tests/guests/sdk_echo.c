/* Test guest for the C SDK: decodes the request body (application/cbor named tensors) with the
 * SDK, runs the model named by the content type's `model` parameter on them, and answers with the
 * outputs re-encoded by the SDK. Exercises decode → infer (incl. infer_result) → encode. */
#include "wasminfer.h"

static int handle(const wasminfer_request *req) {
    char model[64];
    if (!wasminfer_media_type_is(req->content_type, "application/cbor") ||
        !wasminfer_media_type_param(req->content_type, "model", model, sizeof model))
        return wasminfer_fail(WASMINFER_FAILED, "send application/cbor; model=NAME, not '%s'", req->content_type);
    wasminfer_tensor in[WASMINFER_MAX_TENSORS];
    size_t n;
    const char *why = wasminfer_cbor_decode(req->body, req->body_len, in, WASMINFER_MAX_TENSORS, &n);
    if (why) return wasminfer_fail(WASMINFER_FAILED, "bad request body: %s", why);
    wasminfer_log(WASMINFER_INFO, "%zu input tensor(s) for %s", n, model);

    wasminfer_outputs out;
    int rc = wasminfer_infer(model, in, n, &out);
    if (rc) return rc;
    size_t size = wasminfer_cbor_size(out.tensors, out.count), len;
    uint8_t *body = (uint8_t *)malloc(size);
    why = body ? wasminfer_cbor_encode(out.tensors, out.count, body, size, &len) : "out of memory";
    wasminfer_outputs_free(&out);
    if (why) {
        free(body);
        return wasminfer_fail(WASMINFER_FAILED, "cannot encode the outputs: %s", why);
    }
    rc = wasminfer_output(body, len, "application/cbor");
    free(body);
    return rc;
}

WASMINFER_HANDLER(handle)
