/* digits: classifies an 8×8 handwritten digit (scikit-learn's `load_digits` format) with the
 * model `digits` (LogisticRegression exported by skl2onnx: input `input` float32 [N, 64], outputs
 * `label` int64 [N] and `probabilities` float32 [N, 10]). See README.md for the formats. */
#include <string.h>

#include "wasminfer.h"

#define PIXELS 64
#define MAX_VALUE 16

/* Fills pixels[] from the request body, or returns why it cannot. */
static const char *read_pixels(const wasminfer_request *req, float *pixels) {
    static char why[160];
    const char *ctype = req->content_type;
    if (wasminfer_media_type_is(ctype, "application/octet-stream")) {
        if (req->body_len != PIXELS) {
            wasminfer_snprintf(why, sizeof why, "expected %d bytes (one per pixel), got %zu", PIXELS, req->body_len);
            return why;
        }
        for (int i = 0; i < PIXELS; i++) {
            if (req->body[i] > MAX_VALUE) {
                wasminfer_snprintf(why, sizeof why, "pixel %d is %d: values must be between 0 and %d", i,
                                   req->body[i], MAX_VALUE);
                return why;
            }
            pixels[i] = req->body[i];
        }
        return NULL;
    }
    if (!wasminfer_media_type_is(ctype, "application/json")) {
        wasminfer_snprintf(why, sizeof why,
                           "unsupported content type '%.64s': send application/json or "
                           "application/octet-stream",
                           ctype);
        return why;
    }
    const char *json = (const char *)req->body, *array = json;
    size_t len = req->body_len, array_len = len, n;
    int found = wasminfer_json_member(json, len, "pixels", &array, &array_len);
    if (found == 0) return "expected {\"pixels\": [64 numbers]} or a JSON array of 64 numbers";
    double values[PIXELS];
    const char *err = wasminfer_json_numbers(array, array_len, values, PIXELS, &n);
    if (err && strcmp(err, "too many numbers") == 0) n = PIXELS + 1;
    else if (err && found == 1) {
        wasminfer_snprintf(why, sizeof why, "pixels: %s", err);
        return why;
    } else if (err) {
        wasminfer_snprintf(why, sizeof why, "%s; send {\"pixels\": [64 numbers]} or a bare array of 64 numbers", err);
        return why;
    }
    if (n != PIXELS) {
        wasminfer_snprintf(why, sizeof why, "expected %d pixel values, got %s%zu", PIXELS,
                           n > PIXELS ? "more than " : "", n > PIXELS ? (size_t)PIXELS : n);
        return why;
    }
    for (int i = 0; i < PIXELS; i++) {
        if (!(values[i] >= 0 && values[i] <= MAX_VALUE)) {
            wasminfer_snprintf(why, sizeof why, "pixel %d is %g: values must be between 0 and %d", i, values[i],
                               MAX_VALUE);
            return why;
        }
        pixels[i] = (float)values[i];
    }
    return NULL;
}

static int handle(const wasminfer_request *req) {
    float pixels[PIXELS];
    const char *why = read_pixels(req, pixels);
    if (why) {
        int status = strncmp(why, "unsupported content type", 24) == 0 ? WASMINFER_UNSUPPORTED_MEDIA_TYPE
                                                                         : WASMINFER_BAD_REQUEST;
        return wasminfer_fail(status, "digits: %s", why);
    }

    wasminfer_tensor input = {
        .name = "input", .dtype = WASMINFER_F32, .ndim = 2, .dims = {1, PIXELS}, .data = pixels, .nbytes = sizeof pixels,
    };
    wasminfer_outputs out;
    int rc = wasminfer_infer("digits", &input, 1, &out);
    if (rc) return rc;

    const wasminfer_tensor *label = wasminfer_outputs_get(&out, "label");
    const wasminfer_tensor *probs = wasminfer_outputs_get(&out, "probabilities");
    if (!label || label->dtype != WASMINFER_I64 || wasminfer_tensor_count(label) != 1 || !probs ||
        probs->dtype != WASMINFER_F32 || wasminfer_tensor_count(probs) != 10) {
        wasminfer_outputs_free(&out);
        return wasminfer_fail(WASMINFER_FAILED, "digits: the model did not answer with label int64 [1] and "
                                                "probabilities float32 [1, 10]");
    }
    wasminfer_buf body = {0};
    wasminfer_buf_printf(&body, "{\"label\": %lld, \"probabilities\": ", (long long)*(const int64_t *)label->data);
    wasminfer_json_f32_array(&body, (const float *)probs->data, 10);
    wasminfer_buf_puts(&body, "}");
    wasminfer_outputs_free(&out);
    rc = wasminfer_output_buf(&body, "application/json");
    wasminfer_buf_free(&body);
    return rc;
}

WASMINFER_HANDLER(handle)
