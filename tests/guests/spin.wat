;; A handler that spins for the u32 count of iterations in its body, then answers "ok"
;; (tests/test_runtime_host.py, bench/hardening.py).
(module
  (import "wasminfer" "output" (func $output (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "ok")
  (func (export "wasminfer_abi_v1"))
  (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "wasminfer_handle") (param $b i32) (param $bl i32) (param i32 i32) (result i32)
    (local $i i32)
    (local.set $i (i32.load (local.get $b)))
    (block $done (loop $spin
      (br_if $done (i32.eqz (local.get $i)))
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (br $spin)))
    (call $output (i32.const 16) (i32.const 2) (i32.const 0) (i32.const 0))))
