;; A handler-ABI v1 guest that sleeps through WASI `poll_oneoff` (a relative clock subscription) for
;; the u32 count of milliseconds at the start of its body, then answers "ok". A guest blocked inside
;; a host call, not running Wasm: it holds its thread without using a core.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasminfer" "output" (func $output (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "ok")
  (func (export "wasminfer_abi_v1"))
  (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "wasminfer_handle") (param $b i32) (param $bl i32) (param i32 i32) (result i32)
    ;; subscription at 256 (48 bytes): userdata, tag 0 (clock), clock id 1 (monotonic),
    ;; timeout in ns, precision, flags 0 (relative)
    (i64.store (i32.const 256) (i64.const 0))
    (i32.store8 (i32.const 264) (i32.const 0))
    (i32.store (i32.const 272) (i32.const 1))
    (i64.store (i32.const 280) (i64.mul (i64.extend_i32_u (i32.load (local.get $b))) (i64.const 1000000)))
    (i64.store (i32.const 288) (i64.const 0))
    (i32.store16 (i32.const 296) (i32.const 0))
    (drop (call $poll (i32.const 256) (i32.const 320) (i32.const 1) (i32.const 384)))
    (call $output (i32.const 16) (i32.const 2) (i32.const 0) (i32.const 0))))
