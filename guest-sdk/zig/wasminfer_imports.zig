//! For Zig guests that use guest-sdk/c/wasminfer.h through translate-c (Zig 0.17 has no @cImport):
//! translate-c drops the header's `import_module("wasminfer")` attributes, so the SDK's calls to
//! `wasminfer__infer` & co. would import them from "env", which the host refuses. This file defines
//! those symbols (hidden: linked into the module, not exported to the host) over the real imports.
//!
//!     // build: zig translate-c guest-sdk/c/wasminfer.h -target wasm32-wasi -lc > wasminfer.zig
//!     //        zig build-exe main.zig -target wasm32-wasi -fno-entry -mexec-model=reactor -rdynamic
//!     //            -lc -O ReleaseSmall --stack 65536
//!     const c = @import("wasminfer.zig");
//!     comptime { _ = @import("wasminfer_imports.zig"); }
//!     fn handle(req: [*c]const c.wasminfer_request) callconv(.c) c_int { ... }
//!     export fn wasminfer_abi_v1() void {}
//!     export fn wasminfer_alloc(size: usize) ?*anyopaque { return c.wasminfer_alloc_request(size); }
//!     export fn wasminfer_handle(body: [*c]u8, len: usize, ctype: [*c]u8, clen: usize) c_int {
//!         return c.wasminfer_dispatch(handle, body, len, ctype, clen);
//!     }
//!
//! The variadic helpers (wasminfer_fail, wasminfer_log, wasminfer_buf_printf, wasminfer_snprintf)
//! cannot be translated: use wasminfer_fail_str, wasminfer_log_str and wasminfer_buf_puts.

extern "wasminfer" fn infer(model: [*]const u8, model_len: usize, in: [*]const u8, in_len: usize, out: [*]u8, out_cap: usize) i32;
extern "wasminfer" fn infer_result(out: [*]u8, out_cap: usize) i32;
extern "wasminfer" fn last_error(buf: [*]u8, cap: usize) i32;
extern "wasminfer" fn output(body: [*]const u8, body_len: usize, ctype: [*]const u8, ctype_len: usize) i32;
extern "wasminfer" fn output_chunk(body: [*]const u8, body_len: usize, ctype: [*]const u8, ctype_len: usize) i32;
extern "wasminfer" fn decoder_open(model: [*]const u8, model_len: usize) i32;
extern "wasminfer" fn decoder_step(handle: i32, in: [*]const u8, in_len: usize, out: [*]u8, out_cap: usize) i32;
extern "wasminfer" fn decoder_close(handle: i32) i32;
extern "wasminfer" fn @"error"(msg: [*]const u8, msg_len: usize) void;
extern "wasminfer" fn log(level: i32, msg: [*]const u8, msg_len: usize) void;

fn inferC(model: [*]const u8, model_len: usize, in: [*]const u8, in_len: usize, out: [*]u8, out_cap: usize) callconv(.c) i32 {
    return infer(model, model_len, in, in_len, out, out_cap);
}
fn inferResultC(out: [*]u8, out_cap: usize) callconv(.c) i32 {
    return infer_result(out, out_cap);
}
fn lastErrorC(buf: [*]u8, cap: usize) callconv(.c) i32 {
    return last_error(buf, cap);
}
fn outputC(body: [*]const u8, body_len: usize, ctype: [*]const u8, ctype_len: usize) callconv(.c) i32 {
    return output(body, body_len, ctype, ctype_len);
}
fn outputChunkC(body: [*]const u8, body_len: usize, ctype: [*]const u8, ctype_len: usize) callconv(.c) i32 {
    return output_chunk(body, body_len, ctype, ctype_len);
}
fn decoderOpenC(model: [*]const u8, model_len: usize) callconv(.c) i32 {
    return decoder_open(model, model_len);
}
fn decoderStepC(handle: i32, in: [*]const u8, in_len: usize, out: [*]u8, out_cap: usize) callconv(.c) i32 {
    return decoder_step(handle, in, in_len, out, out_cap);
}
fn decoderCloseC(handle: i32) callconv(.c) i32 {
    return decoder_close(handle);
}
fn errorC(msg: [*]const u8, msg_len: usize) callconv(.c) void {
    @"error"(msg, msg_len);
}
fn logC(level: i32, msg: [*]const u8, msg_len: usize) callconv(.c) void {
    log(level, msg, msg_len);
}

comptime {
    const hidden: @import("std").builtin.SymbolVisibility = .hidden;
    @export(&inferC, .{ .name = "wasminfer__infer", .visibility = hidden });
    @export(&inferResultC, .{ .name = "wasminfer__infer_result", .visibility = hidden });
    @export(&lastErrorC, .{ .name = "wasminfer__last_error", .visibility = hidden });
    @export(&outputC, .{ .name = "wasminfer__output", .visibility = hidden });
    @export(&outputChunkC, .{ .name = "wasminfer__output_chunk", .visibility = hidden });
    @export(&decoderOpenC, .{ .name = "wasminfer__decoder_open", .visibility = hidden });
    @export(&decoderStepC, .{ .name = "wasminfer__decoder_step", .visibility = hidden });
    @export(&decoderCloseC, .{ .name = "wasminfer__decoder_close", .visibility = hidden });
    @export(&errorC, .{ .name = "wasminfer__error", .visibility = hidden });
    @export(&logC, .{ .name = "wasminfer__log", .visibility = hidden });
}
