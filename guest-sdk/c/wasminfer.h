/*
 * wasminfer.h — the C (and Zig) guest SDK for the wasminfer handler ABI v1 (guest-sdk/ABI.md).
 *
 * One header, nothing to link: the three exports come from one macro, used in exactly one .c file
 * of the function. The SDK's code is either `static inline` in the function (`sdk="static"`), or, by
 * default when `wasminfer build` builds a handler module, imported from the SDK module that the host
 * ships and links ("wasminfer_sdk_v1", see "the API: where its code lives" below).
 *
 *     #include "wasminfer.h"
 *
 *     static int handle(const wasminfer_request *req) {
 *         if (!wasminfer_media_type_is(req->content_type, "application/json"))
 *             return wasminfer_fail(WASMINFER_UNSUPPORTED_MEDIA_TYPE, "send application/json, not '%s'", req->content_type);
 *         float x[4] = {1, 2, 3, 4};
 *         wasminfer_tensor in = {.name = "x", .dtype = WASMINFER_F32, .ndim = 2, .dims = {1, 4},
 *                                .data = x, .nbytes = sizeof x};
 *         wasminfer_outputs out;
 *         int rc = wasminfer_infer("my-model", &in, 1, &out);
 *         if (rc) return rc;                          // passes the infer error (and its status) on
 *         const wasminfer_tensor *y = wasminfer_outputs_get(&out, "y");
 *         ...
 *         wasminfer_outputs_free(&out);
 *         return wasminfer_output_str("{\"ok\": true}", "application/json");
 *     }
 *     WASMINFER_HANDLER(handle)
 *
 * Build: `wasminfer build DIR -o fn.wasm` (or `python -m ziglang cc -target wasm32-wasi
 * -mexec-model=reactor -I guest-sdk/c ...`, see host/wasminfer/toolchain.py for the flags).
 *
 * API in brief (functions that can fail for a data reason return NULL or a static message):
 *   request     wasminfer_request {body, body_len, content_type (NUL-terminated), content_type_len};
 *               the body is the handler's to modify; the SDK frees it after the handler returns.
 *               wasminfer_media_type_is(ctype, "image/png"), wasminfer_media_type_param(ctype, "width", buf, cap)
 *   response    wasminfer_output(body, len, ctype), wasminfer_output_str(s, ctype), wasminfer_output_buf(&b, ctype)
 *               wasminfer_output_chunk(part, len, ctype): one part now (streamed invocations get it at once)
 *   failure     return wasminfer_fail(status, fmt, ...)   sets the error message, returns status;
 *               statuses 1..8 mean "an infer error passed on" (ABI.md); 400..499 reject the input with that
 *               HTTP status (WASMINFER_BAD_REQUEST, ..._UNSUPPORTED_MEDIA_TYPE); WASMINFER_FAILED for your own
 *   logging     wasminfer_log(WASMINFER_INFO, fmt, ...), wasminfer_log_str(level, msg)
 *   inference   wasminfer_infer(model, inputs, n, &outputs) -> 0 | WASMINFER_E_*; the error message is set.
 *               wasminfer_outputs_get(&outputs, name), wasminfer_outputs_free(&outputs)
 *               Output data is aligned for its dtype; output names are NOT NUL-terminated (name_len).
 *   decoders    h = wasminfer_decoder_open(model) (> 0, or -WASMINFER_E_*); wasminfer_decoder_step(h, model,
 *               inputs, n, &outputs): one step with the past key/values kept by the host; wasminfer_decoder_close(h)
 *   tensors     wasminfer_tensor {name, name_len (0 = strlen), dtype, ndim, dims[], data, nbytes}
 *               dtypes are the RFC 8746 typed-array tags: WASMINFER_F32 == 85 etc.; WASMINFER_BOOL == WASMINFER_U8.
 *   CBOR        wasminfer_cbor_size / wasminfer_cbor_encode / wasminfer_cbor_decode (in place, bounds-checked;
 *               text tensors are rejected)
 *   buffers     wasminfer_buf (growable; sticky out-of-memory flag): _append, _printf, _free
 *   formatting  wasminfer_snprintf / wasminfer_vsnprintf: C's, without linking libc's printf (~17 KB);
 *               the conversions it takes are listed at its definition
 *   JSON        writer: wasminfer_json_str, wasminfer_json_num, wasminfer_json_f32_array (into a wasminfer_buf)
 *               reader: wasminfer_json_member (top-level object member), wasminfer_json_numbers (array of numbers)
 *   low level   wasminfer_dispatch(handler, buf, body_len, ctype, ctype_len) and wasminfer_alloc_request(size),
 *               for Zig, which writes its own exports: see guest-sdk/zig/wasminfer_imports.zig (Zig 0.17
 *               translates this header with translate-c; the variadic helpers do not translate).
 *
 * Memory: zig's malloc rounds blocks up to powers of two and never merges freed blocks; size the
 * manifest's memory_mb as ABI.md ("Building") explains.
 *
 * Compiled natively (not __wasm__) the imports are plain extern declarations and the exports plain
 * functions, so the codec can be unit-tested with a host compiler.
 */
#ifndef WASMINFER_H
#define WASMINFER_H

#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- constants ------------------------------------------------------------------------------ */

/* Error codes of `infer` / `infer_result` (returned negated by the host; positive here). */
#define WASMINFER_E_INVALID_ARGUMENT 1
#define WASMINFER_E_NOT_FOUND 2
#define WASMINFER_E_NOT_ALLOWED 3
#define WASMINFER_E_INVALID_TENSOR 4
#define WASMINFER_E_RUNTIME 5
#define WASMINFER_E_TOO_SMALL 6
#define WASMINFER_E_NO_RESULT 7
#define WASMINFER_E_LIMIT 8
/* SDK statuses for handler failures, outside 1..8 (those pass an infer error on, see ABI.md). */
#define WASMINFER_FAILED 100    /* the handler's own failure (a bug, an unexpected model answer, ...) */
/* The handler rejecting its input: the caller gets this HTTP status (ABI.md, "One invocation"). */
#define WASMINFER_BAD_REQUEST 400
#define WASMINFER_PAYLOAD_TOO_LARGE 413
#define WASMINFER_UNSUPPORTED_MEDIA_TYPE 415
#define WASMINFER_UNPROCESSABLE 422
#define WASMINFER_E_NOMEM 101   /* the guest ran out of memory */
#define WASMINFER_E_DECODE 102  /* the host's answer did not decode (or holds text tensors) */

/* Log levels. */
#define WASMINFER_DEBUG 0
#define WASMINFER_INFO 1
#define WASMINFER_WARN 2
#define WASMINFER_ERROR 3

/* dtypes = RFC 8746 typed-array tags (little-endian forms). */
enum {
    WASMINFER_U8 = 64, WASMINFER_U16 = 69, WASMINFER_U32 = 70, WASMINFER_U64 = 71,
    WASMINFER_I8 = 72, WASMINFER_I16 = 77, WASMINFER_I32 = 78, WASMINFER_I64 = 79,
    WASMINFER_F16 = 84, WASMINFER_F32 = 85, WASMINFER_F64 = 86,
    WASMINFER_BOOL = WASMINFER_U8, /* 0/1 bytes; the host casts where the model wants bool */
};

#ifndef WASMINFER_MAX_DIMS
#define WASMINFER_MAX_DIMS 8
#endif
#ifndef WASMINFER_MAX_TENSORS
#define WASMINFER_MAX_TENSORS 16 /* outputs per infer call */
#endif
#ifndef WASMINFER_INFER_BUF
#define WASMINFER_INFER_BUF 4096 /* first output buffer; grown to the exact size when too small */
#endif
#define WASMINFER_MSG_MAX 1024   /* error and log messages formatted by the SDK */

/* ---- host imports --------------------------------------------------------------------------- */

#ifdef __wasm__
#define WASMINFER_IMPORT(name) __attribute__((import_module("wasminfer"), import_name(name)))
#define WASMINFER_EXPORT(name) __attribute__((export_name(name)))
#else
#define WASMINFER_IMPORT(name)
#define WASMINFER_EXPORT(name)
#endif

WASMINFER_IMPORT("infer")
int32_t wasminfer__infer(const char *model, size_t model_len, const uint8_t *in, size_t in_len,
                         uint8_t *out, size_t out_cap);
WASMINFER_IMPORT("infer_result") int32_t wasminfer__infer_result(uint8_t *out, size_t out_cap);
WASMINFER_IMPORT("last_error") int32_t wasminfer__last_error(char *buf, size_t cap);
WASMINFER_IMPORT("output")
int32_t wasminfer__output(const void *body, size_t body_len, const char *ctype, size_t ctype_len);
WASMINFER_IMPORT("output_chunk")
int32_t wasminfer__output_chunk(const void *body, size_t body_len, const char *ctype, size_t ctype_len);
WASMINFER_IMPORT("decoder_open") int32_t wasminfer__decoder_open(const char *model, size_t model_len);
WASMINFER_IMPORT("decoder_step")
int32_t wasminfer__decoder_step(int32_t handle, const uint8_t *in, size_t in_len, uint8_t *out, size_t out_cap);
WASMINFER_IMPORT("decoder_close") int32_t wasminfer__decoder_close(int32_t handle);
WASMINFER_IMPORT("error") void wasminfer__error(const char *msg, size_t msg_len);
WASMINFER_IMPORT("log") void wasminfer__log(int32_t level, const char *msg, size_t msg_len);

/* ---- types ---------------------------------------------------------------------------------- */

typedef struct wasminfer_request {
    uint8_t *body;            /* the handler may modify it; freed by the SDK after the handler */
    size_t body_len;
    const char *content_type; /* NUL-terminated, "" when the caller sent none */
    size_t content_type_len;
} wasminfer_request;

typedef int (*wasminfer_handler)(const wasminfer_request *req);

typedef struct wasminfer_tensor {
    const char *name; /* inputs: NUL-terminated (name_len 0); decoded: NOT terminated, use name_len */
    size_t name_len;
    int dtype;        /* WASMINFER_U8 ... WASMINFER_F64 */
    int ndim;         /* 0 for a scalar */
    int64_t dims[WASMINFER_MAX_DIMS];
    void *data;       /* row-major, little-endian */
    size_t nbytes;    /* product(dims) * element size */
} wasminfer_tensor;

typedef struct wasminfer_outputs {
    size_t count;
    wasminfer_tensor tensors[WASMINFER_MAX_TENSORS];
    uint8_t *buf_; /* owns the memory every tensor points into */
} wasminfer_outputs;

typedef struct wasminfer_buf {
    char *data; /* not NUL-terminated; `len` bytes */
    size_t len, cap;
    int oom;    /* set once an append failed; every later append is a no-op */
} wasminfer_buf;

/* ---- the API: where its code lives ----------------------------------------------------------- */

/* Every call below is, by default, `static inline`: compiled into the function (one header, nothing
 * to link). Two other builds (docs/sdk-module.md):
 * - WASMINFER_SDK_MODULE (`wasminfer build`'s default for handler modules): the calls are imports
 *   from the SDK module "wasminfer_sdk_v1", which the host compiles once and links into every such
 *   function's instances; the function's own module holds only its own code (~2 KB instead of ~20).
 *   The variadic calls (wasminfer_snprintf, _fail, _log, _buf_printf) stay in the function, as
 *   small shims over wasminfer_vsnprintf.
 * - WASMINFER_SDK_BUILD: the SDK module itself (guest-sdk/c/sdk_module.c) defines and exports them.
 * Memory the SDK allocates (outputs, buffers, requests) is freed by the SDK's calls
 * (wasminfer_outputs_free, wasminfer_buf_free), never by the function's own free(). */
#define WASMINFER_SDK_MODULE_NAME "wasminfer_sdk_v1"
#if defined(WASMINFER_SDK_MODULE) && defined(__wasm__)
#define WASMINFER_API(name) __attribute__((import_module(WASMINFER_SDK_MODULE_NAME), import_name(#name)))
#elif defined(WASMINFER_SDK_BUILD)
#define WASMINFER_API(name) __attribute__((export_name(#name)))
#else
#define WASMINFER_API(name) static inline
#endif

WASMINFER_API(wasminfer_vsnprintf) int wasminfer_vsnprintf(char *buf, size_t cap, const char *fmt, va_list ap);
WASMINFER_API(wasminfer_error) void wasminfer_error(const char *msg);
WASMINFER_API(wasminfer_fail_str) int wasminfer_fail_str(int status, const char *msg);
WASMINFER_API(wasminfer_log_str) void wasminfer_log_str(int level, const char *msg);
WASMINFER_API(wasminfer_buf_reserve) int wasminfer_buf_reserve(wasminfer_buf *b, size_t extra);
WASMINFER_API(wasminfer_buf_append) void wasminfer_buf_append(wasminfer_buf *b, const void *p, size_t n);
WASMINFER_API(wasminfer_buf_puts) void wasminfer_buf_puts(wasminfer_buf *b, const char *s);
WASMINFER_API(wasminfer_buf_free) void wasminfer_buf_free(wasminfer_buf *b);
WASMINFER_API(wasminfer_output) int wasminfer_output(const void *body, size_t len, const char *ctype);
WASMINFER_API(wasminfer_output_str) int wasminfer_output_str(const char *body, const char *ctype);
WASMINFER_API(wasminfer_output_buf) int wasminfer_output_buf(const wasminfer_buf *b, const char *ctype);
WASMINFER_API(wasminfer_output_chunk) int wasminfer_output_chunk(const void *body, size_t len, const char *ctype);
WASMINFER_API(wasminfer_media_type_is) int wasminfer_media_type_is(const char *ctype, const char *type);
WASMINFER_API(wasminfer_media_type_param) int wasminfer_media_type_param(const char *ctype, const char *name, char *val, size_t cap);
WASMINFER_API(wasminfer_dtype_size) size_t wasminfer_dtype_size(int dtype);
WASMINFER_API(wasminfer_cbor_size) size_t wasminfer_cbor_size(const wasminfer_tensor *t, size_t n);
WASMINFER_API(wasminfer_cbor_encode) const char *wasminfer_cbor_encode(const wasminfer_tensor *t, size_t n, uint8_t *out, size_t cap, size_t *len);
WASMINFER_API(wasminfer_cbor_decode) const char *wasminfer_cbor_decode(uint8_t *buf, size_t len, wasminfer_tensor *out, size_t cap, size_t *count);
WASMINFER_API(wasminfer_last_error) size_t wasminfer_last_error(char *msg, size_t cap);
WASMINFER_API(wasminfer_outputs_free) void wasminfer_outputs_free(wasminfer_outputs *out);
WASMINFER_API(wasminfer_infer) int wasminfer_infer(const char *model, const wasminfer_tensor *inputs, size_t n, wasminfer_outputs *out);
WASMINFER_API(wasminfer_decoder_open) int32_t wasminfer_decoder_open(const char *model);
WASMINFER_API(wasminfer_decoder_step) int wasminfer_decoder_step(int32_t handle, const char *model, const wasminfer_tensor *inputs, size_t n, wasminfer_outputs *out);
WASMINFER_API(wasminfer_decoder_close) int wasminfer_decoder_close(int32_t handle);
WASMINFER_API(wasminfer_outputs_get) const wasminfer_tensor *wasminfer_outputs_get(const wasminfer_outputs *out, const char *name);
WASMINFER_API(wasminfer_tensor_count) size_t wasminfer_tensor_count(const wasminfer_tensor *t);
WASMINFER_API(wasminfer_json_str) void wasminfer_json_str(wasminfer_buf *b, const char *s);
WASMINFER_API(wasminfer_json_num) void wasminfer_json_num(wasminfer_buf *b, double x);
WASMINFER_API(wasminfer_json_f32_array) void wasminfer_json_f32_array(wasminfer_buf *b, const float *x, size_t n);
WASMINFER_API(wasminfer_json_member) int wasminfer_json_member(const char *json, size_t len, const char *key, const char **val, size_t *val_len);
WASMINFER_API(wasminfer_json_numbers) const char *wasminfer_json_numbers(const char *s, size_t len, double *out, size_t cap, size_t *count);
WASMINFER_API(wasminfer_alloc_request) void *wasminfer_alloc_request(size_t size);
WASMINFER_API(wasminfer_free_request) void wasminfer_free_request(void *buf);

#if !(defined(WASMINFER_SDK_MODULE) && defined(__wasm__)) /* the SDK's code, unless it is imported */

/* ---- formatting: snprintf without libc's printf --------------------------------------------- */

/* wasminfer_snprintf / wasminfer_vsnprintf are C's snprintf / vsnprintf for what functions format,
 * and the SDK formats its own messages and JSON numbers with them: libc's printf (musl's
 * printf_core with its long-double float code) is ~17 KB, half of a small function's code and of
 * the time a new function waits for its first compile. (libc's snprintf still works in a function
 * that calls it; the module is that much bigger.)
 * Conversions: d i u o x X c s e E f F g G %; flags - + space # 0; width and precision, also as *;
 * length modifiers hh h l ll z j t. Floats are exact and rounded half to even, as glibc and musl
 * print them. Anything else (%a, %p, %n, %L..., %lc, %ls, %1$d) makes them return -1. */

/* Formatting is off the hot path (an error message, a few numbers of JSON): code size counts more
 * (every byte of a new function's module is compiled before its first answer). */
#ifdef __clang__
#define WASMINFER__SMALL __attribute__((minsize))
#else
#define WASMINFER__SMALL
#endif

typedef struct wasminfer__sink {
    char *buf;
    size_t cap;
    size_t len; /* every byte formatted, also those past the end of buf */
} wasminfer__sink;

static inline void wasminfer__put(wasminfer__sink *s, const char *p, size_t n) {
    if (s->len < s->cap) {
        size_t room = s->cap - 1 - s->len; /* one byte is kept for the NUL */
        memcpy(s->buf + s->len, p, n < room ? n : room);
    }
    s->len += n;
}

static inline void wasminfer__puts(wasminfer__sink *s, const char *str) { wasminfer__put(s, str, strlen(str)); }

static inline void wasminfer__pad(wasminfer__sink *s, char c, size_t n) {
    for (; n > 0; n--) wasminfer__put(s, &c, 1);
}

static inline void wasminfer__end(wasminfer__sink *s) {
    if (s->cap > 0) s->buf[s->len < s->cap ? s->len : s->cap - 1] = '\0';
}

#define WASMINFER__LEFT 1
#define WASMINFER__PLUS 2
#define WASMINFER__SPACE 4
#define WASMINFER__ALT 8
#define WASMINFER__ZERO 16
#define WASMINFER__UPPER 32

/* The padding and sign of a field of `body` bytes that the caller writes after this returns. */
WASMINFER__SMALL
static inline void wasminfer__field_start(wasminfer__sink *s, const char *prefix, size_t body, int width, int flags) {
    size_t n = strlen(prefix) + body, pad = width > 0 && (size_t)width > n ? (size_t)width - n : 0;
    if (!(flags & (WASMINFER__LEFT | WASMINFER__ZERO))) wasminfer__pad(s, ' ', pad);
    wasminfer__puts(s, prefix);
    if ((flags & (WASMINFER__LEFT | WASMINFER__ZERO)) == WASMINFER__ZERO) wasminfer__pad(s, '0', pad);
}

static inline void wasminfer__field_end(wasminfer__sink *s, const char *prefix, size_t body, int width, int flags) {
    size_t n = strlen(prefix) + body;
    if ((flags & WASMINFER__LEFT) && width > 0 && (size_t)width > n) wasminfer__pad(s, ' ', (size_t)width - n);
}

/* An integer: `v` its magnitude, `neg` its sign; precision < 0 means none. */
WASMINFER__SMALL
static inline void wasminfer__put_int(wasminfer__sink *s, uint64_t v, int neg, unsigned base, int flags, int width,
                                      int prec) {
    const char *digit = (flags & WASMINFER__UPPER) ? "0123456789ABCDEF" : "0123456789abcdef";
    char text[24], prefix[3] = {0, 0, 0};
    size_t n = 0, zeros = 0;
    int nonzero = v != 0;
    for (; v != 0; v /= base) text[sizeof text - 1 - n++] = digit[v % base];
    if (prec < 0) prec = 1;
    else flags &= ~WASMINFER__ZERO;
    if ((size_t)prec > n) zeros = (size_t)prec - n;
    if (neg) prefix[0] = '-';
    else if (flags & WASMINFER__PLUS) prefix[0] = '+';
    else if (flags & WASMINFER__SPACE) prefix[0] = ' ';
    if ((flags & WASMINFER__ALT) && base == 8 && zeros == 0 && (n == 0 || text[sizeof text - n] != '0')) zeros = 1;
    if ((flags & WASMINFER__ALT) && base == 16 && nonzero) {
        prefix[0] = '0';
        prefix[1] = digit[10] == 'A' ? 'X' : 'x';
    }
    wasminfer__field_start(s, prefix, zeros + n, width, flags);
    wasminfer__pad(s, '0', zeros);
    wasminfer__put(s, text + sizeof text - n, n);
    wasminfer__field_end(s, prefix, zeros + n, width, flags);
}

#define WASMINFER__DIGITS_MAX 780 /* the exact decimal of the smallest double: 767 significant digits */

/* The exact decimal value of |x| (finite): its digits d[0..*n) ("0" for zero) of which the first
 * *point are before the decimal point (*point may be <= 0, or > *n: zeros implied). */
WASMINFER__SMALL
static inline void wasminfer__float_digits(double x, char *d, int *n, int *point) {
    static const uint32_t pow5[14] = {1, 5, 25, 125, 625, 3125, 15625, 78125, 390625, 1953125, 9765625,
                                      48828125, 244140625, 1220703125};
    uint32_t limb[90]; /* base 1e9, least significant first: m*2^e below 2^1024 or m*5^1074 */
    uint64_t bits, m;
    int e, nl = 0, left, i, j, len = 0;
    memcpy(&bits, &x, sizeof bits);
    m = bits & (((uint64_t)1 << 52) - 1);
    e = (int)(bits >> 52 & 0x7ff);
    if (e != 0) m |= (uint64_t)1 << 52;
    e = e != 0 ? e - 1075 : -1074;
    if (m == 0) {
        d[0] = '0';
        *n = 1;
        *point = 1;
        return;
    }
    while ((m & 1) == 0) { m >>= 1; e++; } /* fewer multiplications (a float's 29 zero bits) */
    for (; m != 0; m /= 1000000000) limb[nl++] = (uint32_t)(m % 1000000000);
    /* x = m * 2^e: an integer times 2^e, or (m * 5^-e) / 10^-e */
    for (left = e >= 0 ? e : -e; left > 0;) {
        uint32_t f;
        uint64_t carry = 0;
        if (e >= 0) {
            int k = left < 29 ? left : 29;
            f = (uint32_t)1 << k;
            left -= k;
        } else {
            int k = left < 13 ? left : 13;
            f = pow5[k];
            left -= k;
        }
        for (i = 0; i < nl; i++) {
            uint64_t t = (uint64_t)limb[i] * f + carry;
            limb[i] = (uint32_t)(t % 1000000000);
            carry = t / 1000000000;
        }
        for (; carry != 0; carry /= 1000000000) limb[nl++] = (uint32_t)(carry % 1000000000);
    }
    for (i = nl - 1; i >= 0; i--) {
        char nine[9];
        uint32_t v = limb[i];
        for (j = 8; j >= 0; j--, v /= 10) nine[j] = (char)('0' + v % 10);
        for (j = 0; i == nl - 1 && j < 8 && nine[j] == '0'; j++) {} /* the top limb without leading zeros */
        for (; j < 9; j++) d[len++] = nine[j];
    }
    *n = len;
    *point = e >= 0 ? len : len + e;
}

/* Rounds d[0..*n) to its first `keep` digits, half to even (keep <= 0: rounded at that many places
 * before the first digit; *n == 0 then means zero). 999.9 kept to 3 becomes 1000 (*point grows). */
WASMINFER__SMALL
static inline void wasminfer__float_round(char *d, int *n, int *point, int keep) {
    int up = 0, i;
    if (keep >= *n) return;
    if (keep < 0) {
        *n = 0;
        return;
    }
    if (d[keep] > '5') up = 1;
    else if (d[keep] == '5') {
        for (i = keep + 1; i < *n; i++)
            if (d[i] != '0') up = 1;
        if (keep > 0 && (d[keep - 1] & 1)) up = 1; /* ASCII '0' is even */
    }
    *n = keep;
    if (!up) return;
    for (i = keep - 1; i >= 0 && d[i] == '9'; i--) d[i] = '0';
    if (i >= 0) d[i]++;
    else { /* all nines (or nothing kept): 1 followed by the zeros */
        d[0] = '1';
        if (keep == 0) *n = 1;
        ++*point;
    }
}

/* Writes the digits d[from..from+count), '0' where that is outside d[0..n). */
WASMINFER__SMALL
static inline void wasminfer__put_digits(wasminfer__sink *s, const char *d, int n, int from, int count) {
    int inside;
    if (from < 0) {
        int zeros = -from < count ? -from : count;
        wasminfer__pad(s, '0', (size_t)zeros);
        from += zeros;
        count -= zeros;
    }
    inside = from < n ? n - from : 0;
    if (inside > count) inside = count;
    wasminfer__put(s, d + from, (size_t)inside);
    wasminfer__pad(s, '0', (size_t)(count - inside));
}

/* A double as %e, %f or %g (conv 'e', 'f', 'g'; WASMINFER__UPPER for E, F, G); precision < 0: 6. */
WASMINFER__SMALL
static inline void wasminfer__put_float(wasminfer__sink *s, double x, char conv, int prec, int flags, int width) {
    char d[WASMINFER__DIGITS_MAX], prefix[2] = {0, 0}, exp_text[8];
    uint64_t bits;
    int n, point, frac, exp_len = 0, dot = 0;
    size_t body;
    memcpy(&bits, &x, sizeof bits);
    if (bits >> 63) prefix[0] = '-';
    else if (flags & WASMINFER__PLUS) prefix[0] = '+';
    else if (flags & WASMINFER__SPACE) prefix[0] = ' ';
    if ((bits >> 52 & 0x7ff) == 0x7ff) {
        const char *text = (bits << 12) != 0 ? "nan" : "inf";
        if (flags & WASMINFER__UPPER) text = (bits << 12) != 0 ? "NAN" : "INF";
        flags &= ~WASMINFER__ZERO;
        wasminfer__field_start(s, prefix, 3, width, flags);
        wasminfer__put(s, text, 3);
        wasminfer__field_end(s, prefix, 3, width, flags);
        return;
    }
    if (prec < 0) prec = 6;
    wasminfer__float_digits(x, d, &n, &point);
    if (conv == 'g') {
        int p = prec > 0 ? prec : 1;
        wasminfer__float_round(d, &n, &point, p);
        /* %f when the exponent X of %e satisfies -4 <= X < P, else %e; trailing zeros dropped */
        if (point - 1 < p && point - 1 >= -4) {
            conv = 'f';
            frac = p - point;
            for (; !(flags & WASMINFER__ALT) && frac > 0; frac--) {
                int last = point + frac - 1;
                if (last >= 0 && last < n && d[last] != '0') break;
            }
        } else {
            conv = 'e';
            frac = p - 1;
            for (; !(flags & WASMINFER__ALT) && frac > 0; frac--)
                if (frac < n && d[frac] != '0') break;
        }
    } else {
        frac = prec;
        wasminfer__float_round(d, &n, &point, conv == 'e' ? prec + 1 : point + prec);
    }
    if (frac > 0 || (flags & WASMINFER__ALT)) dot = 1;
    if (conv == 'e') {
        int x10 = n > 0 && d[0] != '0' ? point - 1 : 0;
        unsigned v = (unsigned)(x10 < 0 ? -x10 : x10);
        char digits[4];
        int k = 0;
        do { digits[k++] = (char)('0' + v % 10); v /= 10; } while (v != 0 || k < 2);
        exp_text[exp_len++] = (flags & WASMINFER__UPPER) ? 'E' : 'e';
        exp_text[exp_len++] = x10 < 0 ? '-' : '+';
        while (k > 0) exp_text[exp_len++] = digits[--k];
        body = 1 + (size_t)dot + (size_t)frac + (size_t)exp_len;
        wasminfer__field_start(s, prefix, body, width, flags);
        wasminfer__put_digits(s, d, n, 0, 1);
        wasminfer__put(s, ".", (size_t)dot);
        wasminfer__put_digits(s, d, n, 1, frac);
        wasminfer__put(s, exp_text, (size_t)exp_len);
    } else {
        int whole = point > 0 ? point : 1;
        body = (size_t)whole + (size_t)dot + (size_t)frac;
        wasminfer__field_start(s, prefix, body, width, flags);
        wasminfer__put_digits(s, d, n, point > 0 ? 0 : -1, whole);
        wasminfer__put(s, ".", (size_t)dot);
        wasminfer__put_digits(s, d, n, point, frac);
    }
    wasminfer__field_end(s, prefix, body, width, flags);
}

static inline int wasminfer__bad_format(wasminfer__sink *s) {
    wasminfer__end(s);
    return -1;
}

WASMINFER__SMALL
WASMINFER_API(wasminfer_vsnprintf) int wasminfer_vsnprintf(char *buf, size_t cap, const char *fmt, va_list ap) {
    wasminfer__sink s;
    s.buf = buf;
    s.cap = cap;
    s.len = 0;
    while (*fmt) {
        const char *p = fmt;
        int flags = 0, width = 0, prec = -1, neg = 0;
        char size = 0, conv;
        uint64_t u = 0;
        while (*p && *p != '%') p++;
        wasminfer__put(&s, fmt, (size_t)(p - fmt));
        if (!*p) break;
        for (fmt = p + 1;; fmt++) {
            if (*fmt == '-') flags |= WASMINFER__LEFT;
            else if (*fmt == '+') flags |= WASMINFER__PLUS;
            else if (*fmt == ' ') flags |= WASMINFER__SPACE;
            else if (*fmt == '#') flags |= WASMINFER__ALT;
            else if (*fmt == '0') flags |= WASMINFER__ZERO;
            else break;
        }
        if (*fmt == '*') {
            width = va_arg(ap, int);
            if (width < 0) {
                flags |= WASMINFER__LEFT;
                width = width == INT_MIN ? INT_MAX : -width;
            }
            fmt++;
        } else
            for (; *fmt >= '0' && *fmt <= '9'; fmt++)
                if (width < 100000000) width = width * 10 + (*fmt - '0');
        if (*fmt == '.') {
            fmt++;
            if (*fmt == '*') {
                prec = va_arg(ap, int);
                fmt++;
            } else
                for (prec = 0; *fmt >= '0' && *fmt <= '9'; fmt++)
                    if (prec < 100000000) prec = prec * 10 + (*fmt - '0');
        }
        if (width > 100000000 || prec > 100000000) return wasminfer__bad_format(&s); /* near INT_MAX bytes */
        if (*fmt == 'h' || *fmt == 'l') {
            size = *fmt++;
            if (*fmt == size) { size = size == 'h' ? 'H' : 'q'; fmt++; } /* hh, ll */
        } else if (*fmt == 'z' || *fmt == 'j' || *fmt == 't') size = *fmt++;
        conv = *fmt++;
        switch (conv) {
        case '%':
            wasminfer__put(&s, "%", 1);
            break;
        case 'c': {
            char c;
            if (size) return wasminfer__bad_format(&s); /* before va_arg: a wide character is not an int */
            c = (char)va_arg(ap, int);
            wasminfer__field_start(&s, "", 1, width, flags & ~WASMINFER__ZERO);
            wasminfer__put(&s, &c, 1);
            wasminfer__field_end(&s, "", 1, width, flags);
            break;
        }
        case 's': {
            const char *str, *nul;
            size_t len;
            if (size) return wasminfer__bad_format(&s);
            str = va_arg(ap, const char *);
            if (!str) str = "(null)";
            nul = prec >= 0 ? (const char *)memchr(str, '\0', (size_t)prec) : NULL;
            len = prec < 0 ? strlen(str) : nul ? (size_t)(nul - str) : (size_t)prec;
            wasminfer__field_start(&s, "", len, width, flags & ~WASMINFER__ZERO);
            wasminfer__put(&s, str, len);
            wasminfer__field_end(&s, "", len, width, flags);
            break;
        }
        case 'd':
        case 'i': {
            int64_t v;
            switch (size) {
            case 'H': v = (signed char)va_arg(ap, int); break;
            case 'h': v = (short)va_arg(ap, int); break;
            case 'l': v = va_arg(ap, long); break;
            case 'q': v = va_arg(ap, long long); break;
            case 'z': v = (ptrdiff_t)va_arg(ap, size_t); break;
            case 'j': v = va_arg(ap, intmax_t); break;
            case 't': v = va_arg(ap, ptrdiff_t); break;
            default: v = va_arg(ap, int);
            }
            neg = v < 0;
            u = neg ? 0 - (uint64_t)v : (uint64_t)v;
            wasminfer__put_int(&s, u, neg, 10, flags & ~WASMINFER__ALT, width, prec);
            break;
        }
        case 'u':
        case 'o':
        case 'x':
        case 'X':
            switch (size) {
            case 'H': u = (unsigned char)va_arg(ap, unsigned); break;
            case 'h': u = (unsigned short)va_arg(ap, unsigned); break;
            case 'l': u = va_arg(ap, unsigned long); break;
            case 'q': u = va_arg(ap, unsigned long long); break;
            case 'z': u = va_arg(ap, size_t); break;
            case 'j': u = va_arg(ap, uintmax_t); break;
            case 't': u = (size_t)va_arg(ap, ptrdiff_t); break;
            default: u = va_arg(ap, unsigned);
            }
            flags &= ~(WASMINFER__PLUS | WASMINFER__SPACE);
            if (conv == 'X') flags |= WASMINFER__UPPER;
            wasminfer__put_int(&s, u, 0, conv == 'u' ? 10 : conv == 'o' ? 8 : 16,
                               conv == 'u' ? flags & ~WASMINFER__ALT : flags, width, prec);
            break;
        case 'e':
        case 'f':
        case 'g':
        case 'E':
        case 'F':
        case 'G':
            /* %lf is %f; %Lf (long double) is not supported */
            if (size && size != 'l') return wasminfer__bad_format(&s);
            if (conv < 'a') flags |= WASMINFER__UPPER;
            wasminfer__put_float(&s, va_arg(ap, double), (char)(conv | 32), prec, flags, width);
            break;
        default:
            return wasminfer__bad_format(&s);
        }
    }
    wasminfer__end(&s);
    return s.len > INT_MAX ? -1 : (int)s.len;
}

/* ---- messages: error, log ------------------------------------------------------------------- */

WASMINFER_API(wasminfer_error) void wasminfer_error(const char *msg) { wasminfer__error(msg, strlen(msg)); }

/* Sets the error message and returns `status` (never 0), for `return wasminfer_fail_str(...)`. */
WASMINFER_API(wasminfer_fail_str) int wasminfer_fail_str(int status, const char *msg) {
    wasminfer_error(msg);
    return status ? status : WASMINFER_FAILED;
}

WASMINFER_API(wasminfer_log_str) void wasminfer_log_str(int level, const char *msg) { wasminfer__log(level, msg, strlen(msg)); }

/* ---- growable buffer ------------------------------------------------------------------------ */

WASMINFER_API(wasminfer_buf_reserve) int wasminfer_buf_reserve(wasminfer_buf *b, size_t extra) {
    if (b->oom) return 0;
    if (extra <= b->cap - b->len) return 1;
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < extra) {
        if (cap > SIZE_MAX / 2) { b->oom = 1; return 0; }
        cap *= 2;
    }
    char *p = (char *)realloc(b->data, cap);
    if (!p) { b->oom = 1; return 0; }
    b->data = p;
    b->cap = cap;
    return 1;
}

WASMINFER_API(wasminfer_buf_append) void wasminfer_buf_append(wasminfer_buf *b, const void *p, size_t n) {
    if (n && wasminfer_buf_reserve(b, n)) { memcpy(b->data + b->len, p, n); b->len += n; }
}

WASMINFER_API(wasminfer_buf_puts) void wasminfer_buf_puts(wasminfer_buf *b, const char *s) { wasminfer_buf_append(b, s, strlen(s)); }

WASMINFER_API(wasminfer_buf_free) void wasminfer_buf_free(wasminfer_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
    b->oom = 0;
}

/* ---- response ------------------------------------------------------------------------------- */

WASMINFER_API(wasminfer_output) int wasminfer_output(const void *body, size_t len, const char *ctype) {
    return wasminfer__output(body, len, ctype, strlen(ctype));
}

WASMINFER_API(wasminfer_output_str) int wasminfer_output_str(const char *body, const char *ctype) {
    return wasminfer_output(body, strlen(body), ctype);
}

/* Sends the buffer (or fails with WASMINFER_E_NOMEM if building it ran out of memory); keeps it. */
WASMINFER_API(wasminfer_output_buf) int wasminfer_output_buf(const wasminfer_buf *b, const char *ctype) {
    if (b->oom) return wasminfer_fail_str(WASMINFER_E_NOMEM, "out of memory while building the response");
    /* both arms of one pointer type: Zig's translate-c refuses `char *` vs `""` in a conditional */
    return wasminfer_output(b->data ? (const void *)b->data : (const void *)"", b->len, ctype);
}

/* Sends one part of the response now (a streamed invocation gets it at once; a plain one gets the
 * parts joined, followed by what wasminfer_output set). Returns 0. */
WASMINFER_API(wasminfer_output_chunk) int wasminfer_output_chunk(const void *body, size_t len, const char *ctype) {
    return wasminfer__output_chunk(body, len, ctype, strlen(ctype));
}

/* ---- content types -------------------------------------------------------------------------- */

static inline int wasminfer__lower(int c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }
static inline int wasminfer__space(int c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

/* 1 if the media type of `ctype` (before any ';' parameters) is `type`, ignoring case and spaces. */
WASMINFER_API(wasminfer_media_type_is) int wasminfer_media_type_is(const char *ctype, const char *type) {
    while (wasminfer__space(*ctype)) ctype++;
    size_t n = strlen(type), i;
    for (i = 0; i < n; i++)
        if (wasminfer__lower((unsigned char)ctype[i]) != wasminfer__lower((unsigned char)type[i])) return 0;
    for (ctype += n; wasminfer__space(*ctype); ctype++) {}
    return *ctype == '\0' || *ctype == ';';
}

/* Copies the value of parameter `name` (e.g. "width" in "image/x-raw-rgb; width=320") into
 * `val[0..cap)` (NUL-terminated, quotes removed). Returns 1 if found and it fit, else 0. */
WASMINFER_API(wasminfer_media_type_param) int wasminfer_media_type_param(const char *ctype, const char *name, char *val, size_t cap) {
    size_t n = strlen(name);
    const char *p = strchr(ctype, ';');
    while (p) {
        p++;
        while (wasminfer__space(*p)) p++;
        size_t i = 0;
        while (i < n && p[i] && wasminfer__lower((unsigned char)p[i]) == wasminfer__lower((unsigned char)name[i])) i++;
        const char *q = p + i;
        while (wasminfer__space(*q)) q++;
        if (i == n && *q == '=') {
            q++;
            while (wasminfer__space(*q)) q++;
            int quoted = *q == '"';
            q += quoted;
            size_t len = 0;
            while (q[len] && (quoted ? q[len] != '"' : q[len] != ';' && !wasminfer__space(q[len]))) len++;
            if (len >= cap) return 0;
            memcpy(val, q, len);
            val[len] = '\0';
            return 1;
        }
        p = strchr(p, ';');
    }
    return 0;
}

/* ---- CBOR: named tensors (ABI.md, "Tensor encoding") ---------------------------------------- */

/* Element size of a dtype, 0 if the dtype is not one of ABI.md's typed-array tags. */
WASMINFER_API(wasminfer_dtype_size) size_t wasminfer_dtype_size(int dtype) {
    switch (dtype) {
    case WASMINFER_U8: case WASMINFER_I8: return 1;
    case WASMINFER_U16: case WASMINFER_I16: case WASMINFER_F16: return 2;
    case WASMINFER_U32: case WASMINFER_I32: case WASMINFER_F32: return 4;
    case WASMINFER_U64: case WASMINFER_I64: case WASMINFER_F64: return 8;
    default: return 0;
    }
}

static inline size_t wasminfer__name_len(const wasminfer_tensor *t) {
    return t->name_len ? t->name_len : strlen(t->name);
}

static inline size_t wasminfer__head_size(uint64_t v) {
    return v < 24 ? 1 : v <= 0xff ? 2 : v <= 0xffff ? 3 : v <= 0xffffffffu ? 5 : 9;
}

static inline uint8_t *wasminfer__head(uint8_t *p, int major, uint64_t v) {
    size_t n = wasminfer__head_size(v), i;
    static const uint8_t ai[10] = {0, 0, 24, 25, 0, 26, 0, 0, 0, 27};
    *p++ = (uint8_t)(major << 5 | (n == 1 ? v : ai[n]));
    for (i = n - 1; i > 0; i--) *p++ = (uint8_t)(v >> (8 * (i - 1)));
    return p;
}

/* Checks one tensor's shape against its byte length; NULL or why not. */
static inline const char *wasminfer__check(const wasminfer_tensor *t, size_t nbytes) {
    size_t esize = wasminfer_dtype_size(t->dtype);
    if (!esize) return "unsupported dtype";
    if (t->ndim < 0 || t->ndim > WASMINFER_MAX_DIMS) return "too many dimensions";
    uint64_t count = 1;
    int zero = 0, overflow = 0, i;
    for (i = 0; i < t->ndim; i++) {
        uint64_t d = (uint64_t)t->dims[i];
        if (t->dims[i] < 0) return "negative dimension";
        if (d == 0) zero = 1;
        else if (count > UINT64_MAX / d) overflow = 1;
        else count *= d;
    }
    if (zero) count = 0;
    else if (overflow || count > UINT64_MAX / esize) return "byte length does not match the shape";
    return count * esize == nbytes ? NULL : "byte length does not match the shape";
}

/* NULL if every tensor can be encoded, else why tensor *bad (the first bad one) cannot. */
static inline const char *wasminfer__check_inputs(const wasminfer_tensor *t, size_t n, size_t *bad) {
    for (*bad = 0; *bad < n; (*bad)++, t++) {
        if (!t->name) return "tensor without a name";
        if (t->nbytes && !t->data) return "tensor without data";
        const char *why = wasminfer__check(t, t->nbytes);
        if (why) return why;
    }
    return NULL;
}

/* Bytes that wasminfer_cbor_encode will write; 0 if a tensor is invalid. */
WASMINFER_API(wasminfer_cbor_size) size_t wasminfer_cbor_size(const wasminfer_tensor *t, size_t n) {
    size_t size = wasminfer__head_size(n), i;
    int d;
    if (wasminfer__check_inputs(t, n, &i)) return 0;
    for (i = 0; i < n; i++, t++) {
        size_t name_len = wasminfer__name_len(t);
        size += wasminfer__head_size(name_len) + name_len + 2 + 1 + wasminfer__head_size((uint64_t)t->ndim);
        for (d = 0; d < t->ndim; d++) size += wasminfer__head_size((uint64_t)t->dims[d]);
        size += 2 + wasminfer__head_size(t->nbytes) + t->nbytes;
    }
    return size;
}

/* Encodes `n` tensors as one CBOR map into out[0..cap); sets *len. NULL or why not. */
WASMINFER_API(wasminfer_cbor_encode) const char *wasminfer_cbor_encode(const wasminfer_tensor *t, size_t n, uint8_t *out, size_t cap,
                                                size_t *len) {
    size_t i;
    int d;
    const char *why = wasminfer__check_inputs(t, n, &i);
    if (why) return why;
    if (wasminfer_cbor_size(t, n) > cap) return "buffer too small";
    uint8_t *p = wasminfer__head(out, 5, n);
    for (i = 0; i < n; i++, t++) {
        size_t name_len = wasminfer__name_len(t);
        p = wasminfer__head(p, 3, name_len);
        memcpy(p, t->name, name_len);
        p = wasminfer__head(p + name_len, 6, 40);
        p = wasminfer__head(p, 4, 2);
        p = wasminfer__head(p, 4, (uint64_t)t->ndim);
        for (d = 0; d < t->ndim; d++) p = wasminfer__head(p, 0, (uint64_t)t->dims[d]);
        p = wasminfer__head(p, 6, (uint64_t)t->dtype);
        p = wasminfer__head(p, 2, t->nbytes);
        if (t->nbytes) memcpy(p, t->data, t->nbytes);
        p += t->nbytes;
    }
    *len = (size_t)(p - out);
    return NULL;
}

/* Reads one CBOR head of major type `major` from [*p, end): its argument into *v. 0 on failure. */
static inline int wasminfer__read_head(uint8_t **p, const uint8_t *end, int major, uint64_t *v) {
    if (*p >= end || (**p >> 5) != major) return 0;
    unsigned ai = **p & 31, n = ai < 24 ? 0 : ai == 24 ? 1 : ai == 25 ? 2 : ai == 26 ? 4 : ai == 27 ? 8 : 9;
    if (n == 9 || (size_t)(end - *p) - 1 < n) return 0; /* reserved, indefinite length, or truncated */
    uint64_t x = n ? 0 : ai;
    unsigned i;
    for (i = 1; i <= n; i++) x = x << 8 | (*p)[i];
    *p += 1 + n;
    *v = x;
    return 1;
}

/* Decodes a CBOR map of named tensors from buf[0..len) into out[0..cap) and sets *count.
 * IN PLACE: names and data point into `buf`, and payloads are moved (by at most 7 bytes, over
 * their own already-read CBOR heads) so that each tensor's data is aligned for its dtype; `buf`
 * is no longer valid CBOR afterwards. Never reads or writes outside buf[0..len).
 * Returns NULL, or why the input was rejected. */
WASMINFER_API(wasminfer_cbor_decode) const char *wasminfer_cbor_decode(uint8_t *buf, size_t len, wasminfer_tensor *out, size_t cap,
                                                size_t *count) {
    uint8_t *p = buf;
    const uint8_t *end = buf + len;
    uint64_t n, v, i, d;
    *count = 0;
    if (!wasminfer__read_head(&p, end, 5, &n)) return "expected a definite-length map of named tensors";
    if (n > cap) return "too many tensors";
    for (i = 0; i < n; i++) {
        wasminfer_tensor *t = &out[i];
        memset(t, 0, sizeof *t);
        if (!wasminfer__read_head(&p, end, 3, &v)) {
            return p < end && (*p >> 5) == 3 ? "truncated tensor name" : "expected a text tensor name";
        }
        if (v > (uint64_t)(end - p)) return "truncated tensor name";
        t->name = (const char *)p;
        t->name_len = (size_t)v;
        p += (size_t)v;
        if (!wasminfer__read_head(&p, end, 6, &v) || v != 40) return "expected tag 40 (multi-dimensional array)";
        if (!wasminfer__read_head(&p, end, 4, &v) || v != 2) return "expected [dims, data]";
        if (!wasminfer__read_head(&p, end, 4, &v)) return "expected an array of dims";
        if (v > WASMINFER_MAX_DIMS) return "too many dimensions";
        t->ndim = (int)v;
        for (d = 0; d < v; d++) {
            uint64_t dim;
            if (!wasminfer__read_head(&p, end, 0, &dim) || dim > INT64_MAX) return "expected an unsigned dim";
            t->dims[d] = (int64_t)dim;
        }
        if (p < end && (*p >> 5) == 4) return "text tensors are not supported by the C SDK";
        if (!wasminfer__read_head(&p, end, 6, &v) || !wasminfer_dtype_size((int)(v > 255 ? 0 : v)))
            return "expected a little-endian typed-array tag";
        t->dtype = (int)v;
        if (!wasminfer__read_head(&p, end, 2, &v)) return "expected a byte string of tensor data";
        if (v > (uint64_t)(end - p)) return "truncated tensor data";
        if (wasminfer__check(t, (size_t)v)) return "byte length does not match the shape";
        t->nbytes = (size_t)v;
        /* Align: the move stays inside this tensor's heads, which are at least 7 bytes long
         * (D8 28, 82, the dims array, D8 tag, the byte-string head); the name lies before them. */
        size_t align = wasminfer_dtype_size(t->dtype), shift = (uintptr_t)p & (align - 1);
        if (shift && t->nbytes) memmove(p - shift, p, t->nbytes);
        t->data = p - shift;
        p += (size_t)v;
        *count = (size_t)i + 1;
    }
    if (p != end) { *count = 0; return "trailing bytes after the tensor map"; }
    return NULL;
}

/* ---- inference ------------------------------------------------------------------------------ */

/* Copies the host's last infer error into msg[0..cap) (NUL-terminated); returns its full length. */
WASMINFER_API(wasminfer_last_error) size_t wasminfer_last_error(char *msg, size_t cap) {
    int32_t n = wasminfer__last_error(msg, cap ? cap - 1 : 0);
    if (cap) msg[n < 0 ? 0 : (size_t)n < cap - 1 ? (size_t)n : cap - 1] = '\0';
    return n < 0 ? 0 : (size_t)n;
}

WASMINFER_API(wasminfer_outputs_free) void wasminfer_outputs_free(wasminfer_outputs *out) {
    free(out->buf_);
    out->buf_ = NULL;
    out->count = 0;
}

/* Sets the message "<call>(<model>): <a><num><b><c>" (without num when it is negative) and returns
 * `status`. Not variadic: Zig guests call these paths, and translate-c cannot take variadic definitions. */
WASMINFER__SMALL
static inline int wasminfer__fail_call(int status, const char *call, const char *model, const char *a, int64_t num,
                                       const char *b, const char *c) {
    char msg[WASMINFER_MSG_MAX];
    wasminfer__sink s = {msg, sizeof msg, 0};
    wasminfer__puts(&s, call);
    wasminfer__puts(&s, "(");
    wasminfer__puts(&s, model);
    wasminfer__puts(&s, "): ");
    wasminfer__puts(&s, a);
    if (num >= 0) wasminfer__put_int(&s, (uint64_t)num, 0, 10, 0, 0, -1);
    wasminfer__puts(&s, b);
    wasminfer__puts(&s, c);
    wasminfer__end(&s);
    return wasminfer_fail_str(status, msg);
}

/* The host's message of the last failed call, or "error <code>" (the status: `rc` negated). */
static inline int wasminfer__fail_host(const char *call, const char *model, int32_t rc) {
    char host_msg[WASMINFER_MSG_MAX / 2];
    int status = rc >= -255 ? (int)-rc : WASMINFER_E_RUNTIME;
    if (wasminfer_last_error(host_msg, sizeof host_msg))
        return wasminfer__fail_call(status, call, model, host_msg, -1, "", "");
    return wasminfer__fail_call(status, call, model, "error ", -(int64_t)rc, "", "");
}

/* Runs `model` on `n` input tensors. On success (0) `out` holds the outputs; free them with
 * wasminfer_outputs_free. On failure returns a WASMINFER_E_* status with the error message set
 * (return it from the handler to pass the infer error on) and `out` holds nothing. */
static inline int wasminfer__run(const char *model, int32_t decoder, const wasminfer_tensor *inputs,
                                 size_t n, wasminfer_outputs *out) {
    static size_t hint = WASMINFER_INFER_BUF; /* the largest answer so far: usually right first time */
    size_t in_len = wasminfer_cbor_size(inputs, n), bad;
    const char *why = wasminfer__check_inputs(inputs, n, &bad);
    out->count = 0;
    out->buf_ = NULL;
    if (why)
        return wasminfer__fail_call(WASMINFER_E_INVALID_ARGUMENT, "infer", model, "input ", (int64_t)bad, ": ", why);
    uint8_t *in = (uint8_t *)malloc(in_len), *buf = (uint8_t *)malloc(hint);
    if (!in || !buf) {
        free(in);
        free(buf);
        return wasminfer__fail_call(WASMINFER_E_NOMEM, "infer", model, "out of memory for ", (int64_t)in_len,
                                    " bytes of input", "");
    }
    wasminfer_cbor_encode(inputs, n, in, in_len, &in_len);
    int32_t rc = decoder > 0 ? wasminfer__decoder_step(decoder, in, in_len, buf, hint)
                             : wasminfer__infer(model, strlen(model), in, in_len, buf, hint);
    free(in);
    if (rc >= 0 && (size_t)rc > hint) { /* the host kept the result: fetch it, the model ran once */
        size_t need = (size_t)rc;
        free(buf);
        if (!(buf = (uint8_t *)malloc(need)))
            return wasminfer__fail_call(WASMINFER_E_NOMEM, "infer", model, "out of memory for ", (int64_t)need,
                                        " bytes of output", "");
        hint = need;
        rc = wasminfer__infer_result(buf, need);
    }
    if (rc < 0) {
        free(buf);
        return wasminfer__fail_host("infer", model, rc);
    }
    why = wasminfer_cbor_decode(buf, (size_t)rc, out->tensors, WASMINFER_MAX_TENSORS, &out->count);
    if (why) {
        free(buf);
        out->count = 0;
        return wasminfer__fail_call(WASMINFER_E_DECODE, "infer", model, "cannot decode the outputs: ", -1, why, "");
    }
    out->buf_ = buf;
    return 0;
}

WASMINFER_API(wasminfer_infer) int wasminfer_infer(const char *model, const wasminfer_tensor *inputs, size_t n,
                                  wasminfer_outputs *out) {
    return wasminfer__run(model, 0, inputs, n, out);
}

/* ---- decoders: a model's past key/values kept by the host between steps (ABI.md) ------------- */

/* Opens a decoder state of `model` (whose inputs named past* pair with its outputs named present*).
 * Returns its handle (> 0), or a WASMINFER_E_* status with the error message set. */
WASMINFER_API(wasminfer_decoder_open) int32_t wasminfer_decoder_open(const char *model) {
    int32_t rc = wasminfer__decoder_open(model, strlen(model));
    if (rc > 0) return rc;
    return -wasminfer__fail_host("decoder_open", model, rc);
}

/* One step: the model on `inputs` plus the state's past; the outputs other than present*. Returns
 * 0 or a WASMINFER_E_* status, as wasminfer_infer does. */
WASMINFER_API(wasminfer_decoder_step) int wasminfer_decoder_step(int32_t handle, const char *model, const wasminfer_tensor *inputs,
                                         size_t n, wasminfer_outputs *out) {
    return wasminfer__run(model, handle, inputs, n, out);
}

/* Frees the state now (the host frees it at the end of the invocation anyway). */
WASMINFER_API(wasminfer_decoder_close) int wasminfer_decoder_close(int32_t handle) {
    int32_t rc = wasminfer__decoder_close(handle);
    return rc < 0 ? (int)-rc : 0;
}

/* The output tensor called `name`, or NULL. */
WASMINFER_API(wasminfer_outputs_get) const wasminfer_tensor *wasminfer_outputs_get(const wasminfer_outputs *out, const char *name) {
    size_t n = strlen(name), i;
    for (i = 0; i < out->count; i++)
        if (out->tensors[i].name_len == n && memcmp(out->tensors[i].name, name, n) == 0) return &out->tensors[i];
    return NULL;
}

/* Number of elements of a tensor. */
WASMINFER_API(wasminfer_tensor_count) size_t wasminfer_tensor_count(const wasminfer_tensor *t) {
    size_t esize = wasminfer_dtype_size(t->dtype);
    return esize ? t->nbytes / esize : 0;
}

/* ---- JSON ----------------------------------------------------------------------------------- */

/* Appends `s` as a JSON string (quoted, escaped). */
WASMINFER_API(wasminfer_json_str) void wasminfer_json_str(wasminfer_buf *b, const char *s) {
    wasminfer_buf_append(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') { char e[2] = {'\\', (char)c}; wasminfer_buf_append(b, e, 2); }
        else if (c < 0x20) {
            char e[6] = {'\\', 'u', '0', '0', "0123456789abcdef"[c >> 4], "0123456789abcdef"[c & 15]};
            wasminfer_buf_append(b, e, 6);
        }
        else wasminfer_buf_append(b, s, 1);
    }
    wasminfer_buf_append(b, "\"", 1);
}

/* Appends a number as %.9g: 9 significant digits (enough to round-trip a float32); NaN/inf become null. */
WASMINFER_API(wasminfer_json_num) void wasminfer_json_num(wasminfer_buf *b, double x) {
    char text[32];
    wasminfer__sink s = {text, sizeof text, 0};
    if (x != x || x - x != 0) {
        wasminfer_buf_puts(b, "null");
        return;
    }
    wasminfer__put_float(&s, x, 'g', 9, 0, 0);
    wasminfer_buf_append(b, text, s.len);
}

WASMINFER_API(wasminfer_json_f32_array) void wasminfer_json_f32_array(wasminfer_buf *b, const float *x, size_t n) {
    size_t i;
    wasminfer_buf_append(b, "[", 1);
    for (i = 0; i < n; i++) {
        if (i) wasminfer_buf_append(b, ", ", 2);
        wasminfer_json_num(b, x[i]);
    }
    wasminfer_buf_append(b, "]", 1);
}

static inline const char *wasminfer__json_ws(const char *p, const char *end) {
    while (p < end && wasminfer__space(*p)) p++;
    return p;
}

/* Skips a JSON string starting at the opening quote; returns the position after it, NULL if unterminated. */
static inline const char *wasminfer__json_string_end(const char *p, const char *end) {
    for (p++; p < end; p++) {
        if (*p == '"') return p + 1;
        if (*p == '\\' && ++p == end) break; /* skip the escaped character */
    }
    return NULL;
}

/* Finds member `key` of the top-level JSON object in json[0..len) (keys compared as written,
 * without unescaping). Returns 1 and sets val[0..*val_len) to its raw value; 0 if absent; -1 if the
 * text is not an object. The value itself is not validated: parse it with the readers below. */
WASMINFER_API(wasminfer_json_member) int wasminfer_json_member(const char *json, size_t len, const char *key, const char **val,
                                        size_t *val_len) {
    const char *p = wasminfer__json_ws(json, json + len), *end = json + len;
    size_t klen = strlen(key);
    if (p == end || *p != '{') return -1;
    p = wasminfer__json_ws(p + 1, end);
    if (p < end && *p == '}') return 0;
    for (;;) {
        if (p == end || *p != '"') return -1;
        const char *k = p + 1, *kend = wasminfer__json_string_end(p, end);
        if (!kend) return -1;
        p = wasminfer__json_ws(kend, end);
        if (p == end || *p != ':') return -1;
        const char *v = p = wasminfer__json_ws(p + 1, end);
        int depth = 0;
        while (p < end && (depth > 0 || (*p != ',' && *p != '}'))) {
            if (*p == '"') { p = wasminfer__json_string_end(p, end); if (!p) return -1; continue; }
            if (*p == '[' || *p == '{') depth++;
            else if (*p == ']' || *p == '}') depth--;
            if (depth < 0) return -1;
            p++;
        }
        if (p == end || p == v) return -1;
        const char *vend = p;
        while (vend > v && wasminfer__space(vend[-1])) vend--;
        if ((size_t)(kend - 1 - k) == klen && memcmp(k, key, klen) == 0) {
            *val = v;
            *val_len = (size_t)(vend - v);
            return 1;
        }
        if (*p == '}') return 0;
        p = wasminfer__json_ws(p + 1, end);
    }
}

/* The value of a decimal number's text in [s, end) (JSON's grammar, already checked), without
 * libc's strtod: that parses in long double (software float128 on wasm32) and brings ~15 KB of code,
 * a third of a small function and of its compile time, into every module that parses JSON.
 * Correctly rounded when the significant digits fit 2^53 and the power of ten is within 1e+-22
 * (integers, pixel values, most numbers people write); 17-digit doubles as Python writes them within
 * one unit in the last place between 1e-22 and 1e22, within 2e-15 (relative) beyond: far below the
 * precision of the float32 tensors models take. */
static inline double wasminfer__decimal(const char *s, const char *end) {
    static const double pow10[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                                     1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    int neg = 0, digits = 0, scale = 0, exp = 0, exp_neg = 0, frac = 0;
    uint64_t m = 0;
    double x;
    if (s < end && *s == '-') { neg = 1; s++; }
    /* (Written so that Zig's translate-c takes it: no comparison used as an int.) */
    for (; s < end && ((*s >= '0' && *s <= '9') || *s == '.'); s++) {
        if (*s == '.') { frac = 1; continue; }
        if (digits < 19) { /* 19 significant digits fit a uint64; the rest only round */
            m = m * 10 + (uint64_t)(*s - '0');
            if (m != 0) digits++;
            if (frac) scale--;
        } else if (!frac) scale++;
    }
    if (s < end && (*s == 'e' || *s == 'E')) {
        s++;
        if (s < end && (*s == '+' || *s == '-')) {
            if (*s == '-') exp_neg = 1;
            s++;
        }
        for (; s < end && *s >= '0' && *s <= '9'; s++)
            if (exp < 100000) exp = exp * 10 + (*s - '0');
    }
    scale += exp_neg ? -exp : exp;
    x = (double)m;
    if (m != 0) {
        for (; scale > 22; scale -= 22) x *= 1e22; /* past the range of double: inf, refused by the caller */
        for (; scale < -22; scale += 22) x /= 1e22; /* below it: 0 */
        x = scale < 0 ? x / pow10[-scale] : x * pow10[scale];
    }
    return neg ? -x : x;
}

/* Parses one JSON number at [*p, end) into *x (strict JSON grammar, finite); 0 if there is none. */
static inline int wasminfer__json_number(const char **p, const char *end, double *x) {
    const char *s = *p, *q = s;
#define WASMINFER__DIGITS(q) while (q < end && *q >= '0' && *q <= '9') q++
    if (q < end && *q == '-') q++;
    if (q < end && *q == '0') q++;
    else if (q < end && *q >= '1' && *q <= '9') { WASMINFER__DIGITS(q); }
    else return 0;
    if (q < end && *q == '.') {
        const char *f = ++q;
        WASMINFER__DIGITS(q);
        if (q == f) return 0;
    }
    if (q < end && (*q == 'e' || *q == 'E')) {
        q++;
        if (q < end && (*q == '+' || *q == '-')) q++;
        const char *e = q;
        WASMINFER__DIGITS(q);
        if (q == e) return 0;
    }
#undef WASMINFER__DIGITS
    if (q - s >= 64) return 0; /* a bound on the text of one number */
    *x = wasminfer__decimal(s, q);
    if (*x - *x != 0) return 0; /* overflowed to infinity */
    *p = q;
    return 1;
}

/* Parses `[n, n, ...]` (a JSON array of numbers, whitespace around) from s[0..len) into
 * out[0..cap) and sets *count. Returns NULL, or why the text was rejected. */
WASMINFER_API(wasminfer_json_numbers) const char *wasminfer_json_numbers(const char *s, size_t len, double *out, size_t cap,
                                                 size_t *count) {
    const char *p = wasminfer__json_ws(s, s + len), *end = s + len;
    *count = 0;
    if (p == end || *p != '[') return "expected a JSON array of numbers";
    p = wasminfer__json_ws(p + 1, end);
    if (p < end && *p == ']') return wasminfer__json_ws(p + 1, end) == end ? NULL : "trailing text after the array";
    for (;;) {
        double x;
        if (!wasminfer__json_number(&p, end, &x)) return "expected a JSON array of numbers";
        if (*count == cap) return "too many numbers";
        out[(*count)++] = x;
        p = wasminfer__json_ws(p, end);
        if (p < end && *p == ',') { p = wasminfer__json_ws(p + 1, end); continue; }
        if (p < end && *p == ']') break;
        return "expected ',' or ']' in the array";
    }
    return wasminfer__json_ws(p + 1, end) == end ? NULL : "trailing text after the array";
}

/* ---- requests ------------------------------------------------------------------------------ */

/* wasminfer_alloc: one byte more than asked, so that the content type can be NUL-terminated. */
WASMINFER_API(wasminfer_alloc_request) void *wasminfer_alloc_request(size_t size) { return size == SIZE_MAX ? NULL : malloc(size + 1); }

/* Frees a request that wasminfer_alloc_request gave (with the allocator that gave it). */
WASMINFER_API(wasminfer_free_request) void wasminfer_free_request(void *buf) { free(buf); }

#endif /* the SDK's code */

/* ---- variadic calls: in every function, over wasminfer_vsnprintf ---------------------------------- */

static inline int wasminfer_snprintf(char *buf, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static inline int wasminfer_snprintf(char *buf, size_t cap, const char *fmt, ...) {
    va_list ap;
    int n;
    va_start(ap, fmt);
    n = wasminfer_vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
    return n;
}

static inline int wasminfer_fail(int status, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static inline int wasminfer_fail(int status, const char *fmt, ...) {
    char msg[WASMINFER_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    wasminfer_vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return wasminfer_fail_str(status, msg);
}

static inline void wasminfer_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static inline void wasminfer_log(int level, const char *fmt, ...) {
    char msg[WASMINFER_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    wasminfer_vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    wasminfer_log_str(level, msg);
}

static inline void wasminfer_buf_printf(wasminfer_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static inline void wasminfer_buf_printf(wasminfer_buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = wasminfer_vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !wasminfer_buf_reserve(b, (size_t)n + 1)) return;
    va_start(ap, fmt);
    wasminfer_vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* ---- the handler glue ----------------------------------------------------------------------- */


/* The inbox (ABI.md): a request of up to WASMINFER_INBOX_BYTES (body and content type) is written
 * here by the host, with no wasminfer_alloc call; a bigger one is allocated. Zeroed memory (.bss):
 * it costs the module no bytes and an instance only the pages a request touches. Define
 * WASMINFER_INBOX_BYTES as 0 before including this header to go without one. */
#ifndef WASMINFER_INBOX_BYTES
#define WASMINFER_INBOX_BYTES 4096
#endif
#if WASMINFER_INBOX_BYTES > 0
static uint8_t wasminfer__inbox[WASMINFER_INBOX_BYTES + 1]; /* + 1: the content type's NUL */
#endif

/* wasminfer_handle: runs the handler on the request's buffer, then frees it (unless it is the inbox). */
static inline int wasminfer_dispatch(wasminfer_handler handler, uint8_t *buf, size_t body_len, char *ctype,
                                     size_t ctype_len) {
    wasminfer_request req = {buf, body_len, "", 0};
    if (buf && ctype == (char *)buf + body_len) {
        ctype[ctype_len] = '\0';
        req.content_type = ctype;
        req.content_type_len = ctype_len;
    }
    int status = handler(&req);
#if WASMINFER_INBOX_BYTES > 0
    if (buf != wasminfer__inbox) wasminfer_free_request(buf);
#else
    wasminfer_free_request(buf);
#endif
    return status;
}

#if WASMINFER_INBOX_BYTES > 0
#define WASMINFER__INBOX_EXPORTS                                                                    \
    WASMINFER_EXPORT("wasminfer_inbox") void *wasminfer_inbox(void) { return wasminfer__inbox; }   \
    WASMINFER_EXPORT("wasminfer_inbox_size") size_t wasminfer_inbox_size(void) { return WASMINFER_INBOX_BYTES; }
#else
#define WASMINFER__INBOX_EXPORTS
#endif

/* Defines the module's exports around `handler` (int handler(const wasminfer_request *)). Use it
 * in exactly one .c file of the function. */
#define WASMINFER_HANDLER(handler)                                                                  \
    WASMINFER_EXPORT("wasminfer_abi_v1") void wasminfer_abi_v1(void) {}                            \
    WASMINFER_EXPORT("wasminfer_alloc") void *wasminfer_alloc(size_t size) {                       \
        return wasminfer_alloc_request(size);                                                       \
    }                                                                                               \
    WASMINFER_EXPORT("wasminfer_handle")                                                            \
    int wasminfer_handle(uint8_t *body, size_t body_len, char *ctype, size_t ctype_len) {           \
        return wasminfer_dispatch(handler, body, body_len, ctype, ctype_len);                       \
    }                                                                                               \
    WASMINFER__INBOX_EXPORTS

#endif /* WASMINFER_H */
