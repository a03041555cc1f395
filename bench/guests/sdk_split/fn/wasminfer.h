/* The probe's stand-in for the SDK header (bench/sdk_split_probe.py): the same types and API as
 * guest-sdk/c/wasminfer.h for what the digits example calls, but each call is an import from the
 * SDK module ("wasminfer_sdk", sdk_lib.c), compiled once per host instead of into every function.
 * Variadic calls stay here as small shims over the SDK's va_list ones. `wasminfer_types.h` is the
 * real header's types and constants, cut from it by the probe. */
#ifndef WASMINFER_SPLIT_H
#define WASMINFER_SPLIT_H
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "wasminfer_types.h"

#define SDK_IMPORT(name) __attribute__((import_module("wasminfer_sdk"), import_name(#name)))
SDK_IMPORT(sdk_malloc) void *sdk_malloc(size_t n);
SDK_IMPORT(sdk_free) void sdk_free(void *p);
SDK_IMPORT(sdk_media_type_is) int wasminfer_media_type_is(const char *c, const char *t);
SDK_IMPORT(sdk_vsnprintf) int wasminfer_vsnprintf(char *b, size_t cap, const char *f, va_list ap);
SDK_IMPORT(sdk_json_member) int wasminfer_json_member(const char *j, size_t l, const char *k, const char **v, size_t *vl);
SDK_IMPORT(sdk_json_numbers) const char *wasminfer_json_numbers(const char *s, size_t l, double *o, size_t c, size_t *n);
SDK_IMPORT(sdk_fail_str) int wasminfer_fail_str(int status, const char *m);
SDK_IMPORT(sdk_infer) int wasminfer_infer(const char *m, const wasminfer_tensor *in, size_t n, wasminfer_outputs *o);
SDK_IMPORT(sdk_outputs_get) const wasminfer_tensor *wasminfer_outputs_get(const wasminfer_outputs *o, const char *n);
SDK_IMPORT(sdk_tensor_count) size_t wasminfer_tensor_count(const wasminfer_tensor *t);
SDK_IMPORT(sdk_outputs_free) void wasminfer_outputs_free(wasminfer_outputs *o);
SDK_IMPORT(sdk_buf_append) void wasminfer_buf_append(wasminfer_buf *b, const void *p, size_t n);
SDK_IMPORT(sdk_buf_reserve) int wasminfer_buf_reserve(wasminfer_buf *b, size_t n);
SDK_IMPORT(sdk_json_f32_array) void wasminfer_json_f32_array(wasminfer_buf *b, const float *x, size_t n);
SDK_IMPORT(sdk_output_buf) int wasminfer_output_buf(const wasminfer_buf *b, const char *c);
SDK_IMPORT(sdk_buf_free) void wasminfer_buf_free(wasminfer_buf *b);

static int wasminfer_snprintf(char *b, size_t cap, const char *f, ...) {
    va_list ap;
    va_start(ap, f);
    int n = wasminfer_vsnprintf(b, cap, f, ap);
    va_end(ap);
    return n;
}
static int wasminfer_fail(int status, const char *f, ...) {
    char m[WASMINFER_MSG_MAX];
    va_list ap;
    va_start(ap, f);
    wasminfer_vsnprintf(m, sizeof m, f, ap);
    va_end(ap);
    return wasminfer_fail_str(status, m);
}
static void wasminfer_buf_puts(wasminfer_buf *b, const char *s) { wasminfer_buf_append(b, s, strlen(s)); }
static void wasminfer_buf_printf(wasminfer_buf *b, const char *f, ...) {
    va_list ap;
    va_start(ap, f);
    int n = wasminfer_vsnprintf(NULL, 0, f, ap);
    va_end(ap);
    if (n < 0 || !wasminfer_buf_reserve(b, (size_t)n + 1)) return;
    va_start(ap, f);
    wasminfer_vsnprintf(b->data + b->len, (size_t)n + 1, f, ap);
    va_end(ap);
    b->len += (size_t)n;
}

static uint8_t wasminfer__inbox[4096 + 1];
#define WASMINFER_HANDLER(handler)                                                                  \
    WASMINFER_EXPORT("wasminfer_abi_v1") void wasminfer_abi_v1(void) {}                            \
    WASMINFER_EXPORT("wasminfer_alloc") void *wasminfer_alloc(size_t size) {                       \
        return size == SIZE_MAX ? NULL : sdk_malloc(size + 1);                                      \
    }                                                                                               \
    WASMINFER_EXPORT("wasminfer_handle")                                                            \
    int wasminfer_handle(uint8_t *buf, size_t body_len, char *ctype, size_t ctype_len) {            \
        wasminfer_request req = {buf, body_len, "", 0};                                             \
        if (buf && ctype == (char *)buf + body_len) {                                               \
            ctype[ctype_len] = '\0';                                                                \
            req.content_type = ctype;                                                               \
            req.content_type_len = ctype_len;                                                       \
        }                                                                                           \
        int status = handler(&req);                                                                 \
        if (buf != wasminfer__inbox) sdk_free(buf);                                                 \
        return status;                                                                              \
    }                                                                                               \
    WASMINFER_EXPORT("wasminfer_inbox") void *wasminfer_inbox(void) { return wasminfer__inbox; }   \
    WASMINFER_EXPORT("wasminfer_inbox_size") size_t wasminfer_inbox_size(void) { return 4096; }
#endif
