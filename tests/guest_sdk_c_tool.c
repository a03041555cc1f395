/* Native driver for tests/test_guest_sdk_c.py: exercises the codec of guest-sdk/c/wasminfer.h.
 *
 *   decode   stdin: records (u32 little-endian length + CBOR bytes); stdout: one line per record,
 *            "ok <n>" then per tensor "<hex name> <dtype> <dims,comma,separated> <hex data> <aligned>",
 *            or "error <reason>"
 *   encode   stdin: lines "<name> <dtype> <dims|-> <hex data|->", then a line "end";
 *            stdout: the CBOR bytes of one map (repeat for several maps)
 *   numbers  stdin: records; stdout per record: "ok <n> <%.17g ...>" or "error <reason>"
 *   member   stdin: records "key\0json"; stdout per record: "<rc> <raw value>"
 *   jsonstr  stdin: records; stdout per record: the JSON string written for the record's text
 *   format   stdin: records "<kind><format>\0<arguments>" (kinds below); stdout per record two lines,
 *            "sdk ..." from wasminfer_snprintf and "libc ..." from snprintf, each "<result> <hex text>"
 *            for a buffer of 4096 bytes, then for buffers of 5 and 1 bytes and for (NULL, 0)
 *   format-sdk  the same, only the "sdk" lines (for formats that libc must not be given)
 *   floats   stdin: one record of float32s (little-endian); stdout: wasminfer_json_f32_array of them
 */
#include "wasminfer.h"

/* The host imports are not linked natively; the codec does not call them. */

static int read_record(uint8_t **buf, size_t *len) {
    uint8_t h[4];
    if (fread(h, 1, 4, stdin) != 4) return 0;
    *len = (size_t)h[0] | (size_t)h[1] << 8 | (size_t)h[2] << 16 | (size_t)h[3] << 24;
    *buf = (uint8_t *)malloc(*len ? *len : 1); /* exactly sized, so AddressSanitizer sees overreads */
    if (!*buf || fread(*buf, 1, *len, stdin) != *len) exit(2);
    return 1;
}

static int hexval(int c) { return c <= '9' ? c - '0' : (c | 32) - 'a' + 10; }

static void decode(void) {
    uint8_t *buf;
    size_t len;
    while (read_record(&buf, &len)) {
        wasminfer_tensor t[WASMINFER_MAX_TENSORS];
        size_t n, i, j;
        const char *why = wasminfer_cbor_decode(buf, len, t, WASMINFER_MAX_TENSORS, &n);
        if (why) {
            printf("error %s\n", why);
        } else {
            printf("ok %zu\n", n);
            for (i = 0; i < n; i++) {
                for (j = 0; j < t[i].name_len; j++) printf("%02x", (uint8_t)t[i].name[j]);
                printf("%s %d ", t[i].name_len ? "" : "-", t[i].dtype);
                for (j = 0; j < (size_t)t[i].ndim; j++) printf(j ? ",%lld" : "%lld", (long long)t[i].dims[j]);
                printf(t[i].ndim ? " " : "- ");
                for (j = 0; j < t[i].nbytes; j++) printf("%02x", ((uint8_t *)t[i].data)[j]);
                printf(t[i].nbytes ? " " : "- ");
                printf("%d\n", (uintptr_t)t[i].data % wasminfer_dtype_size(t[i].dtype) == 0);
            }
        }
        free(buf);
    }
}

static void encode(void) {
    /* static: too big for the 64 KiB stack of the wasm32 build (the format mode runs there) */
    static char line[1 << 16];
    static wasminfer_tensor t[WASMINFER_MAX_TENSORS];
    static char names[WASMINFER_MAX_TENSORS][64];
    static uint8_t data[WASMINFER_MAX_TENSORS][4096];
    size_t n = 0;
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "end", 3) == 0) {
            size_t size = wasminfer_cbor_size(t, n), len = 0;
            uint8_t *out = (uint8_t *)malloc(size ? size : 1);
            const char *why = wasminfer_cbor_encode(t, n, out, size, &len);
            if (why || len != size) { fprintf(stderr, "encode: %s\n", why ? why : "size mismatch"); exit(1); }
            fwrite(out, 1, len, stdout);
            free(out);
            n = 0;
            continue;
        }
        static char dims[256], hex[1 << 14];
        wasminfer_tensor *x = &t[n];
        memset(x, 0, sizeof *x);
        if (sscanf(line, "%63s %d %255s %16383s", names[n], &x->dtype, dims, hex) != 4) exit(3);
        x->name = names[n];
        if (strcmp(dims, "-") != 0)
            for (char *d = strtok(dims, ","); d; d = strtok(NULL, ",")) x->dims[x->ndim++] = atoll(d);
        if (strcmp(hex, "-") != 0)
            for (size_t j = 0; hex[2 * j]; j++)
                data[n][x->nbytes++] = (uint8_t)(hexval(hex[2 * j]) << 4 | hexval(hex[2 * j + 1]));
        x->data = data[n];
        n++;
    }
}

static void numbers(void) {
    uint8_t *buf;
    size_t len, n, i;
    double out[128];
    while (read_record(&buf, &len)) {
        const char *why = wasminfer_json_numbers((const char *)buf, len, out, 128, &n);
        if (why) printf("error %s\n", why);
        else {
            printf("ok %zu", n);
            for (i = 0; i < n; i++) printf(" %.17g", out[i]);
            printf("\n");
        }
        free(buf);
    }
}

static void member(void) {
    uint8_t *buf;
    size_t len, vlen = 0;
    while (read_record(&buf, &len)) {
        const char *key = (const char *)buf, *val = "";
        size_t klen = strlen(key);
        int rc = wasminfer_json_member(key + klen + 1, len - klen - 1, key, &val, &vlen);
        printf("%d %.*s\n", rc, rc == 1 ? (int)vlen : 0, val);
        free(buf);
    }
}

static void jsonstr(void) {
    uint8_t *buf;
    size_t len;
    while (read_record(&buf, &len)) {
        char *s = (char *)malloc(len + 1);
        memcpy(s, buf, len);
        s[len] = '\0';
        wasminfer_buf b = {0};
        wasminfer_json_str(&b, s);
        wasminfer_buf_puts(&b, " ");
        wasminfer_json_num(&b, 0.1f);
        fwrite(b.data, 1, b.len, stdout);
        printf("\n");
        wasminfer_buf_free(&b);
        free(s);
        free(buf);
    }
}

/* Formats `fmt` with the arguments of kind `kind` from `arg` into each buffer size; prints one line. */
typedef int (*format_fn)(char *, size_t, const char *, ...);

static int format_once(format_fn f, char *buf, size_t cap, int kind, const char *fmt, const uint8_t *arg,
                       size_t arg_len) {
    int32_t i1 = 0, i2 = 0;
    int64_t q = 0;
    double x = 0;
    memcpy(&i1, arg, arg_len >= 4 ? 4 : 0);
    memcpy(&i2, arg + 4, arg_len >= 8 ? 4 : 0);
    memcpy(&q, arg, arg_len >= 8 ? 8 : 0);
    switch (kind) {
    case 'n': return f(buf, cap, fmt);
    case 'i': return f(buf, cap, fmt, i1);               /* int-sized: d i u o x X c, also hh and h */
    case 'q': return f(buf, cap, fmt, (long long)q);     /* 64-bit: l ll z j t natively */
    case 'f': memcpy(&x, arg, 8); return f(buf, cap, fmt, x);
    case 's': return f(buf, cap, fmt, (const char *)arg);
    case 'p': return f(buf, cap, fmt, i1, (const char *)arg + 4);               /* %*s, %.*s */
    case 'w': memcpy(&x, arg + 8, 8); return f(buf, cap, fmt, i1, i2, x);         /* %*.*f */
    case 'W': memcpy(&q, arg + 8, 8); return f(buf, cap, fmt, i1, i2, (int)q);    /* %*.*d */
    default: exit(4);
    }
}

static void print_hex(const char *s, size_t n) {
    putchar(' ');
    if (!n) putchar('-');
    while (n--) printf("%02x", (uint8_t)*s++);
}

static void format(int sides) {
    uint8_t *buf;
    size_t len;
    static char out[4096];
    static const size_t caps[] = {4096, 5, 1};
    while (read_record(&buf, &len)) {
        const char *fmt = (const char *)buf + 1;
        size_t flen = strlen(fmt), c;
        const uint8_t *arg = buf + 1 + flen + 1;
        for (int side = 0; side < sides; side++) {
            format_fn f = side ? snprintf : wasminfer_snprintf;
            printf(side ? "libc" : "sdk");
            for (c = 0; c < 3; c++) {
                memset(out, '#', sizeof out);
                int n = format_once(f, out, caps[c], buf[0], fmt, arg, len - 2 - flen);
                printf(" %d", n);
                print_hex(out, strlen(out));
            }
            printf(" %d\n", format_once(f, NULL, 0, buf[0], fmt, arg, len - 2 - flen));
        }
        free(buf);
    }
}

static void floats(void) {
    uint8_t *buf;
    size_t len;
    while (read_record(&buf, &len)) {
        float *x = (float *)malloc(len + 4);
        memcpy(x, buf, len);
        wasminfer_buf b = {0};
        wasminfer_json_f32_array(&b, x, len / 4);
        fwrite(b.data, 1, b.len, stdout);
        printf("\n");
        wasminfer_buf_free(&b);
        free(x);
        free(buf);
    }
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    if (!strcmp(argv[1], "decode")) decode();
    else if (!strcmp(argv[1], "encode")) encode();
    else if (!strcmp(argv[1], "numbers")) numbers();
    else if (!strcmp(argv[1], "member")) member();
    else if (!strcmp(argv[1], "jsonstr")) jsonstr();
    else if (!strcmp(argv[1], "format")) format(2);
    else if (!strcmp(argv[1], "format-sdk")) format(1);
    else if (!strcmp(argv[1], "floats")) floats();
    else return 2;
    return 0;
}
