/* Test guest (WASI command), written the way an existing wasi-nn program is: classifies an 8×8
 * grey image (binary PGM, "P5") with the digits model through wasi_ephemeral_nn.
 *
 *   nn_digits [IMAGE]     reads IMAGE (a path), or stdin when there is no argument
 *   env MODEL             the model to load by name (default "digits")
 *
 * Prints {"label": L, "probabilities": [p0, ..., p9]} on stdout; on failure a message on stderr
 * and exit status 1. The model (skl2onnx LogisticRegression) takes `input` float32 [N, 64] with
 * pixel values 0..16 and gives `label` int64 [N] and `probabilities` float32 [N, 10].
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wasi_ephemeral_nn.h"

static int fail(const char *what, int rc) {
    fprintf(stderr, "nn_digits: %s failed (nn_errno %d)\n", what, rc);
    return 1;
}

/* Reads a binary PGM of 8×8 pixels into 0..16 floats; returns NULL or why not. */
static const char *read_pgm(FILE *f, float *pixels) {
    int width, height, maxval;
    if (fscanf(f, "P5 %d %d %d", &width, &height, &maxval) != 3) return "not a binary PGM (P5) image";
    if (width != 8 || height != 8) return "the image must be 8x8 pixels";
    if (maxval <= 0 || maxval > 255) return "the image's maxval must be 1..255";
    fgetc(f); /* the single whitespace after the header */
    unsigned char raw[64];
    if (fread(raw, 1, sizeof raw, f) != sizeof raw) return "the image is truncated";
    for (int i = 0; i < 64; i++) pixels[i] = (float)raw[i] * 16.0f / (float)maxval;
    return NULL;
}

int main(int argc, char **argv) {
    FILE *f = stdin;
    if (argc > 1 && !(f = fopen(argv[1], "rb"))) {
        fprintf(stderr, "nn_digits: cannot open %s\n", argv[1]);
        return 1;
    }
    float pixels[64];
    const char *why = read_pgm(f, pixels);
    if (why) {
        fprintf(stderr, "nn_digits: %s\n", why);
        return 1;
    }
    const char *model = getenv("MODEL") ? getenv("MODEL") : "digits";

    wasi_nn_graph graph;
    wasi_nn_context ctx;
    int32_t rc = wasi_nn_load_by_name(model, (uint32_t)strlen(model), &graph);
    if (rc) return fail("load_by_name", rc);
    if ((rc = wasi_nn_init_execution_context(graph, &ctx))) return fail("init_execution_context", rc);
    uint32_t dims[2] = {1, 64};
    wasi_nn_tensor input = {dims, 2, WASI_NN_F32, (const uint8_t *)pixels, sizeof pixels};
    if ((rc = wasi_nn_set_input(ctx, 0, &input))) return fail("set_input", rc);
    if ((rc = wasi_nn_compute(ctx))) return fail("compute", rc);

    int64_t label;
    float probabilities[10];
    uint32_t written;
    if ((rc = wasi_nn_get_output(ctx, 0, (uint8_t *)&label, sizeof label, &written))) return fail("get_output 0", rc);
    if ((rc = wasi_nn_get_output(ctx, 1, (uint8_t *)probabilities, sizeof probabilities, &written)))
        return fail("get_output 1", rc);
    printf("{\"label\": %lld, \"probabilities\": [", (long long)label);
    for (int i = 0; i < 10; i++) printf("%s%.9g", i ? ", " : "", probabilities[i]);
    printf("]}\n");
    return 0;
}
