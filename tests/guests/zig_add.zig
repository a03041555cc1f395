//! A Zig guest over the C SDK, built as guest-sdk/zig/wasminfer_imports.zig says: the body is a JSON array
//! of 3 numbers x; it answers the JSON array add(x, [10, 20, 30]) from the host's `add` model.
const c = @import("wasminfer.zig");
comptime {
    _ = @import("wasminfer_imports.zig");
}

fn handle(req: [*c]const c.wasminfer_request) callconv(.c) c_int {
    var numbers: [3]f64 = undefined;
    var count: usize = 0;
    if (c.wasminfer_json_numbers(req.*.body, req.*.body_len, &numbers, numbers.len, &count) != null or count != 3)
        return c.wasminfer_fail_str(c.WASMINFER_BAD_REQUEST, "send a JSON array of 3 numbers");
    var a: [3]f32 = undefined;
    for (numbers, 0..) |v, i| a[i] = @floatCast(v);
    var b = [3]f32{ 10, 20, 30 };
    var inputs = [2]c.wasminfer_tensor{
        .{ .name = "a", .dtype = c.WASMINFER_F32, .ndim = 2, .dims = .{ 1, 3, 0, 0, 0, 0, 0, 0 }, .data = &a, .nbytes = @sizeOf(@TypeOf(a)) },
        .{ .name = "b", .dtype = c.WASMINFER_F32, .ndim = 2, .dims = .{ 1, 3, 0, 0, 0, 0, 0, 0 }, .data = &b, .nbytes = @sizeOf(@TypeOf(b)) },
    };
    var out: c.wasminfer_outputs = .{};
    const rc = c.wasminfer_infer("add", &inputs, inputs.len, &out);
    if (rc != 0) return rc;
    defer c.wasminfer_outputs_free(&out);
    const y = c.wasminfer_outputs_get(&out, "y");
    if (y == null) return c.wasminfer_fail_str(c.WASMINFER_FAILED, "the model gave no y");
    var buf: c.wasminfer_buf = .{};
    defer c.wasminfer_buf_free(&buf);
    c.wasminfer_json_f32_array(&buf, @ptrCast(@alignCast(y.*.data)), 3);
    c.wasminfer_log_str(c.WASMINFER_INFO, "hello from zig");
    return c.wasminfer_output_buf(&buf, "application/json");
}

export fn wasminfer_abi_v1() void {}
export fn wasminfer_alloc(size: usize) ?*anyopaque {
    return c.wasminfer_alloc_request(size);
}
export fn wasminfer_handle(body: [*c]u8, len: usize, ctype: [*c]u8, clen: usize) c_int {
    return c.wasminfer_dispatch(handle, body, len, ctype, clen);
}
