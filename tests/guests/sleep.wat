;; A handler-ABI v1 guest that sleeps for the milliseconds its body holds (u32 LE; WASI poll_oneoff on
;; the monotonic clock), then answers "ok": it holds an instance for a known time without using CPU.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasminfer" "output" (func $output (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "ok")
  (data (i32.const 32) "text/plain")
  (func (export "wasminfer_abi_v1"))
  (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "wasminfer_handle") (param $b i32) (param $bl i32) (param $c i32) (param $cl i32) (result i32)
    ;; one clock subscription at 256: userdata 0, tag 0 (clock), id 1 (monotonic), timeout in ns
    (i64.store (i32.const 256) (i64.const 0))
    (i32.store8 (i32.const 264) (i32.const 0))
    (i32.store (i32.const 272) (i32.const 1))
    (i64.store (i32.const 280) (i64.mul (i64.extend_i32_u (i32.load (local.get $b))) (i64.const 1000000)))
    (i64.store (i32.const 288) (i64.const 0))
    (i32.store16 (i32.const 296) (i32.const 0))
    (drop (call $poll (i32.const 256) (i32.const 512) (i32.const 1) (i32.const 600)))
    (drop (call $output (i32.const 16) (i32.const 2) (i32.const 32) (i32.const 10)))
    (i32.const 0)))
