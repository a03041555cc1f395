/* The C SDK as a module of its own, "wasminfer_sdk_v1" (docs/sdk-module.md): every call of
 * wasminfer.h, compiled once per host instead of into every function. A function built with
 * WASMINFER_SDK_MODULE (`wasminfer build`'s default for handler modules) imports them from it.
 *
 * Built by `wasminfer.toolchain.build_sdk_module` with the layout both modules agree on (the
 * constants are in host/wasminfer/toolchain.py, `SdkLayout`):
 * - one memory, this module's: it exports it, the function imports it and exports it again;
 * - the function's stack at [0, 64 KiB) (zig links every module with --stack-first);
 * - this module's stack, then its data, from 64 KiB (--global-base): the stack is this module's
 *   own (its own __stack_pointer global) and calls from the function pass pointers into the
 *   function's stack, which is the same memory;
 * - the function's data from 128 KiB; both heaps above, each taken with memory.grow (zig's
 *   allocator never assumes it owns the memory past its data), so the two never overlap. */
#define WASMINFER_SDK_BUILD
#include "wasminfer.h"

/* This module's stack. zig's link puts every module's stack at address 0 (--stack-first), where the
 * function's is: this constructor, the first to run in `_initialize` (which the host calls once per
 * instance, before anything else), moves this module's __stack_pointer here. Neither `_initialize`
 * nor the linker's __wasm_call_ctors keeps a frame on the stack that would put it back. */
static char wasminfer__sdk_stack[32 << 10] __attribute__((aligned(16)));

__attribute__((constructor(101))) static void wasminfer__sdk_stack_init(void) {
    void *top = wasminfer__sdk_stack + sizeof wasminfer__sdk_stack;
    __asm__ volatile("local.get %0\n\tglobal.set __stack_pointer" ::"r"(top));
}
