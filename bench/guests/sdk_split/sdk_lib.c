/* The C SDK as a module of its own (issue 18's probe, bench/sdk_split_probe.py): every SDK call the
 * digits example makes, exported under "sdk_*" names. A function built against `wasminfer.h` in
 * this folder imports them from "wasminfer_sdk" instead of compiling them into its own module.
 *
 * Memory layout (both modules share one memory, this module's): the function's stack at [0, 64 KiB)
 * (zig links with --stack-first), this module's data from 64 KiB (--global-base), the function's
 * data from 128 KiB. This module's own stack is `sdk_stack` below: `sdk_init` points its
 * __stack_pointer there, away from the 16 bytes zig's link gave it. */
#include <stdarg.h>

#include "wasminfer.h"

#define SDK_EXPORT(name) __attribute__((export_name(#name)))

static char sdk_stack[32768] __attribute__((aligned(16)));

SDK_EXPORT(sdk_init) void sdk_init(void) {
    void *top = sdk_stack + sizeof sdk_stack;
    __asm__ volatile("local.get %0\n\tglobal.set __stack_pointer" ::"r"(top));
}

SDK_EXPORT(sdk_malloc) void *sdk_malloc(size_t n) { return malloc(n); }
SDK_EXPORT(sdk_free) void sdk_free(void *p) { free(p); }
SDK_EXPORT(sdk_media_type_is) int sdk_media_type_is(const char *c, const char *t) {
    return wasminfer_media_type_is(c, t);
}
SDK_EXPORT(sdk_vsnprintf) int sdk_vsnprintf(char *b, size_t cap, const char *f, va_list ap) {
    return wasminfer_vsnprintf(b, cap, f, ap);
}
SDK_EXPORT(sdk_json_member) int sdk_json_member(const char *j, size_t l, const char *k, const char **v, size_t *vl) {
    return wasminfer_json_member(j, l, k, v, vl);
}
SDK_EXPORT(sdk_json_numbers) const char *sdk_json_numbers(const char *s, size_t l, double *o, size_t c, size_t *n) {
    return wasminfer_json_numbers(s, l, o, c, n);
}
SDK_EXPORT(sdk_fail_str) int sdk_fail_str(int status, const char *m) { return wasminfer_fail_str(status, m); }
SDK_EXPORT(sdk_infer) int sdk_infer(const char *m, const wasminfer_tensor *in, size_t n, wasminfer_outputs *o) {
    return wasminfer_infer(m, in, n, o);
}
SDK_EXPORT(sdk_outputs_get) const wasminfer_tensor *sdk_outputs_get(const wasminfer_outputs *o, const char *n) {
    return wasminfer_outputs_get(o, n);
}
SDK_EXPORT(sdk_tensor_count) size_t sdk_tensor_count(const wasminfer_tensor *t) { return wasminfer_tensor_count(t); }
SDK_EXPORT(sdk_outputs_free) void sdk_outputs_free(wasminfer_outputs *o) { wasminfer_outputs_free(o); }
SDK_EXPORT(sdk_buf_append) void sdk_buf_append(wasminfer_buf *b, const void *p, size_t n) {
    wasminfer_buf_append(b, p, n);
}
SDK_EXPORT(sdk_buf_reserve) int sdk_buf_reserve(wasminfer_buf *b, size_t n) { return wasminfer_buf_reserve(b, n); }
SDK_EXPORT(sdk_json_f32_array) void sdk_json_f32_array(wasminfer_buf *b, const float *x, size_t n) {
    wasminfer_json_f32_array(b, x, n);
}
SDK_EXPORT(sdk_output_buf) int sdk_output_buf(const wasminfer_buf *b, const char *c) { return wasminfer_output_buf(b, c); }
SDK_EXPORT(sdk_buf_free) void sdk_buf_free(wasminfer_buf *b) { wasminfer_buf_free(b); }
