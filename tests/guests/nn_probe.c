/* Test guest (WASI command): runs a script of wasi_ephemeral_nn calls read from stdin and prints one
 * line per call with its nn_errno, so that the tests can drive every function and every error
 * number of the host from Python with one build.
 *
 * stdin: script lines, optionally followed by a line "--" and raw bytes (the payload: model bytes
 * for `load`). Commands (numbers are decimal; HEX is lowercase hex or "-" for no bytes; DIMS is
 * "2,3" or "-" for a scalar):
 *   byname NAME                    load_by_name             -> "byname ERRNO GRAPH"
 *   bycfg NAME CONFIG              load_by_name_with_config -> "bycfg ERRNO GRAPH"
 *   load ENC TARGET [NBUILDERS]    load (the payload)       -> "load ERRNO GRAPH"
 *   init G                         init_execution_context   -> "init ERRNO CTX"
 *   input C IDX TYPE DIMS HEX [pad|len=N]   set_input (pad: padding bytes 0xff; len: data_len N)
 *   compute C | compute1 C         compute | compute_single
 *   output C IDX CAP | output1 ... get_output | get_output_single -> "output ERRNO WRITTEN HEX"
 *   fini C | unload G | final C    fini_single | unload | finalize_execution_context
 *   badtensor C | badout C | badname   pointers outside memory (the host traps the guest)
 *   repeat N COMMAND...            runs COMMAND N times, prints the last line only
 *   exit N                         exit(N)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wasi_ephemeral_nn.h"

static unsigned char *payload;
static size_t payload_len;
static char line_out[1 << 16];

static size_t unhex(const char *s, uint8_t *out, size_t cap) {
    if (strcmp(s, "-") == 0) return 0;
    size_t n = strlen(s) / 2;
    if (n > cap) n = cap;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        sscanf(s + 2 * i, "%2x", &v);
        out[i] = (uint8_t)v;
    }
    return n;
}

static uint32_t parse_dims(const char *s, uint32_t *dims) {
    if (strcmp(s, "-") == 0) return 0;
    uint32_t n = 0;
    const char *p = s;
    while (*p && n < 64) {
        dims[n++] = (uint32_t)strtoul(p, (char **)&p, 10);
        if (*p == ',') p++;
    }
    return n;
}

static void hexout(char *dst, const uint8_t *src, size_t n) {
    if (n == 0) { strcpy(dst, "-"); return; }
    for (size_t i = 0; i < n; i++) sprintf(dst + 2 * i, "%02x", src[i]);
}

/* Runs one command (argv-style tokens) and formats its result line into line_out. */
static int run(int argc, char **argv) {
    const char *cmd = argv[0];
    static uint8_t data[1 << 14], out[1 << 14];
    static uint32_t dims[64];
    int32_t rc;
    if (strcmp(cmd, "byname") == 0 && argc >= 2) {
        wasi_nn_graph g = 0xffffffff;
        rc = wasi_nn_load_by_name(argv[1], (uint32_t)strlen(argv[1]), &g);
        sprintf(line_out, "byname %d %u", rc, rc ? 0xffffffffu : g);
    } else if (strcmp(cmd, "bycfg") == 0 && argc >= 3) {
        wasi_nn_graph g = 0xffffffff;
        rc = wasi_nn_load_by_name_with_config(argv[1], (uint32_t)strlen(argv[1]), argv[2],
                                              (uint32_t)strlen(argv[2]), &g);
        sprintf(line_out, "bycfg %d %u", rc, rc ? 0xffffffffu : g);
    } else if (strcmp(cmd, "load") == 0 && argc >= 3) {
        wasi_nn_graph_builder b[2] = {{payload, (uint32_t)payload_len}, {payload, (uint32_t)payload_len}};
        uint32_t n = argc >= 4 ? (uint32_t)atoi(argv[3]) : 1;
        wasi_nn_graph g = 0xffffffff;
        rc = wasi_nn_load(b, n, (uint32_t)atoi(argv[1]), (uint32_t)atoi(argv[2]), &g);
        sprintf(line_out, "load %d %u", rc, rc ? 0xffffffffu : g);
    } else if (strcmp(cmd, "init") == 0 && argc >= 2) {
        wasi_nn_context c = 0xffffffff;
        rc = wasi_nn_init_execution_context((uint32_t)atoi(argv[1]), &c);
        sprintf(line_out, "init %d %u", rc, rc ? 0xffffffffu : c);
    } else if (strcmp(cmd, "input") == 0 && argc >= 6) {
        wasi_nn_tensor t;
        memset(&t, argc >= 7 && strcmp(argv[6], "pad") == 0 ? 0xff : 0, sizeof t);
        t.dims = dims;
        t.dims_len = parse_dims(argv[4], dims);
        t.type = (uint8_t)atoi(argv[3]);
        t.data = data;
        t.data_len = (uint32_t)unhex(argv[5], data, sizeof data);
        if (argc >= 7 && strncmp(argv[6], "len=", 4) == 0) t.data_len = (uint32_t)strtoul(argv[6] + 4, NULL, 10);
        rc = wasi_nn_set_input((uint32_t)atoi(argv[1]), (uint32_t)atoi(argv[2]), &t);
        sprintf(line_out, "input %d", rc);
    } else if ((strcmp(cmd, "compute") == 0 || strcmp(cmd, "compute1") == 0) && argc >= 2) {
        uint32_t c = (uint32_t)atoi(argv[1]);
        rc = cmd[7] ? wasi_nn_compute_single(c) : wasi_nn_compute(c);
        sprintf(line_out, "%s %d", cmd, rc);
    } else if ((strcmp(cmd, "output") == 0 || strcmp(cmd, "output1") == 0) && argc >= 4) {
        uint32_t c = (uint32_t)atoi(argv[1]), idx = (uint32_t)atoi(argv[2]), cap = (uint32_t)atoi(argv[3]);
        uint32_t written = 0xffffffff;
        if (cap > sizeof out) cap = sizeof out;
        rc = cmd[6] ? wasi_nn_get_output_single(c, idx, out, cap, &written)
                    : wasi_nn_get_output(c, idx, out, cap, &written);
        int n = sprintf(line_out, "%s %d %u ", cmd, rc, written);
        hexout(line_out + n, out, rc == 0 ? written : 0);
    } else if (strcmp(cmd, "fini") == 0 && argc >= 2) {
        sprintf(line_out, "fini %d", wasi_nn_fini_single((uint32_t)atoi(argv[1])));
    } else if (strcmp(cmd, "unload") == 0 && argc >= 2) {
        sprintf(line_out, "unload %d", wasi_nn_unload((uint32_t)atoi(argv[1])));
    } else if (strcmp(cmd, "final") == 0 && argc >= 2) {
        sprintf(line_out, "final %d", wasi_nn_finalize_execution_context((uint32_t)atoi(argv[1])));
    } else if (strcmp(cmd, "badtensor") == 0 && argc >= 2) {
        rc = wasi_nn_set_input((uint32_t)atoi(argv[1]), 0, (const wasi_nn_tensor *)0xfffffff0u);
        sprintf(line_out, "badtensor %d", rc);
    } else if (strcmp(cmd, "badout") == 0 && argc >= 2) {
        uint32_t written;
        rc = wasi_nn_get_output((uint32_t)atoi(argv[1]), 0, (uint8_t *)0xffff0000u, 4096, &written);
        sprintf(line_out, "badout %d", rc);
    } else if (strcmp(cmd, "badname") == 0) {
        wasi_nn_graph g;
        rc = wasi_nn_load_by_name((const char *)0xfffffff0u, 64, &g);
        sprintf(line_out, "badname %d", rc);
    } else if (strcmp(cmd, "exit") == 0 && argc >= 2) {
        fflush(stdout);
        exit(atoi(argv[1]));
    } else {
        fprintf(stderr, "nn_probe: bad command '%s'\n", cmd);
        exit(2);
    }
    return 0;
}

int main(void) {
    static char script[1 << 16];
    static unsigned char input[1 << 20];
    size_t len = fread(input, 1, sizeof input, stdin);
    size_t script_len = len;
    for (size_t i = 0; i + 3 <= len; i++) {
        if ((i == 0 || input[i - 1] == '\n') && memcmp(input + i, "--\n", 3) == 0) {
            script_len = i;
            payload = input + i + 3;
            payload_len = len - i - 3;
            break;
        }
    }
    if (script_len >= sizeof script) script_len = sizeof script - 1;
    memcpy(script, input, script_len);
    script[script_len] = '\0';
    for (char *line = strtok(script, "\n"); line; line = strtok(NULL, "\n")) {
        char copy[4096];
        snprintf(copy, sizeof copy, "%s", line);
        char *argv[16];
        int argc = 0;
        for (char *save, *tok = strtok_r(copy, " ", &save); tok && argc < 16; tok = strtok_r(NULL, " ", &save))
            argv[argc++] = tok;
        if (argc == 0) continue;
        if (strcmp(argv[0], "repeat") == 0 && argc >= 3) {
            int times = atoi(argv[1]);
            for (int i = 0; i < times; i++) run(argc - 2, argv + 2);
        } else {
            run(argc, argv);
        }
        printf("%s\n", line_out);
    }
    return 0;
}
