;; A handler-ABI v1 guest for the sandbox limits, each driven to just under and just past its bound.
;; The request is one opcode byte, a little-endian u32 N, then an optional payload:
;;   r recurse N frames deep, then answer "ok"           (stack: max_wasm_stack)
;;   t grow the table by N entries; answer the old size, or -1 if refused, as 4 bytes (table limit)
;;   l log N lines of 100 bytes, then answer "ok"        (manifest key max_log_bytes)
;;   i call infer N times on the payload (CBOR tensors for model "add"), answer the last result
;;     (manifest keys max_infer_calls, max_tensor_bytes)
;;   p log the payload N times (wasminfer.log, level info), then answer "ok"   (log ring, line size)
;;   o write the payload N times to stdout, then answer "ok"                 (the same, for streams)
;;   e echo the payload
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasminfer" "output" (func $output (param i32 i32 i32 i32) (result i32)))
  (import "wasminfer" "log" (func $log (param i32 i32 i32)))
  (import "wasminfer" "infer" (func $infer (param i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (table $t 1 funcref)
  (data (i32.const 16) "add")
  (data (i32.const 32) "ok")
  (data (i32.const 64) "0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789")
  (func (export "wasminfer_abi_v1"))
  (func (export "wasminfer_alloc") (param $n i32) (result i32)
    ;; one request buffer at 4096, the infer result after it; memory grows to fit both
    (local $need i32)
    (local.set $need (i32.add (i32.add (i32.const 4096) (i32.mul (local.get $n) (i32.const 2))) (i32.const 65536)))
    (block $ok
      (br_if $ok (i32.le_u (local.get $need) (i32.mul (memory.size) (i32.const 65536))))
      (if (i32.eq (memory.grow (i32.add (i32.shr_u (i32.sub (local.get $need) (i32.mul (memory.size) (i32.const 65536)))
                                                   (i32.const 16)) (i32.const 1)))
                  (i32.const -1))
        (then (return (i32.const 0)))))
    (i32.const 4096))
  (func $recurse (param $n i32) (result i32)
    (if (result i32) (i32.eqz (local.get $n))
      (then (i32.const 0))
      (else (i32.add (call $recurse (i32.sub (local.get $n) (i32.const 1))) (i32.const 1)))))
  (func (export "wasminfer_handle") (param $b i32) (param $bl i32) (param $c i32) (param $cl i32) (result i32)
    (local $op i32) (local $n i32) (local $r i32) (local $out i32) (local $pl i32)
    (local.set $op (i32.load8_u (local.get $b)))
    (local.set $n (i32.load offset=1 align=1 (local.get $b)))
    (local.set $pl (i32.sub (local.get $bl) (i32.const 5)))
    (local.set $out (i32.add (local.get $b) (local.get $bl)))
    (if (i32.eq (local.get $op) (i32.const 114)) ;; r
      (then (drop (call $recurse (local.get $n)))
            (return (call $output (i32.const 32) (i32.const 2) (i32.const 0) (i32.const 0)))))
    (if (i32.eq (local.get $op) (i32.const 116)) ;; t
      (then (i32.store (local.get $out) (table.grow $t (ref.null func) (local.get $n)))
            (return (call $output (local.get $out) (i32.const 4) (i32.const 0) (i32.const 0)))))
    (if (i32.eq (local.get $op) (i32.const 108)) ;; l
      (then
        (block $done (loop $next
          (br_if $done (i32.eqz (local.get $n)))
          (call $log (i32.const 2) (i32.const 64) (i32.const 100))
          (local.set $n (i32.sub (local.get $n) (i32.const 1)))
          (br $next)))
        (return (call $output (i32.const 32) (i32.const 2) (i32.const 0) (i32.const 0)))))
    (if (i32.eq (local.get $op) (i32.const 105)) ;; i
      (then
        (block $done (loop $next
          (br_if $done (i32.eqz (local.get $n)))
          (local.set $r (call $infer (i32.const 16) (i32.const 3)
            (i32.add (local.get $b) (i32.const 5)) (local.get $pl) (local.get $out) (local.get $bl)))
          (if (i32.lt_s (local.get $r) (i32.const 0)) (then (return (i32.sub (i32.const 0) (local.get $r)))))
          (local.set $n (i32.sub (local.get $n) (i32.const 1)))
          (br $next)))
        (return (call $output (local.get $out) (local.get $r) (i32.const 0) (i32.const 0)))))
    (if (i32.eq (local.get $op) (i32.const 112)) ;; p
      (then
        (block $done (loop $next
          (br_if $done (i32.eqz (local.get $n)))
          (call $log (i32.const 1) (i32.add (local.get $b) (i32.const 5)) (local.get $pl))
          (local.set $n (i32.sub (local.get $n) (i32.const 1)))
          (br $next)))
        (return (call $output (i32.const 32) (i32.const 2) (i32.const 0) (i32.const 0)))))
    (if (i32.eq (local.get $op) (i32.const 111)) ;; o: one iovec at $out (aligned), nwritten after it
      (then
        (local.set $out (i32.and (i32.add (local.get $out) (i32.const 7)) (i32.const -8)))
        (i32.store (local.get $out) (i32.add (local.get $b) (i32.const 5)))
        (i32.store offset=4 (local.get $out) (local.get $pl))
        (block $done (loop $next
          (br_if $done (i32.eqz (local.get $n)))
          (drop (call $fd_write (i32.const 1) (local.get $out) (i32.const 1) (i32.add (local.get $out) (i32.const 8))))
          (local.set $n (i32.sub (local.get $n) (i32.const 1)))
          (br $next)))
        (return (call $output (i32.const 32) (i32.const 2) (i32.const 0) (i32.const 0)))))
    (if (i32.eq (local.get $op) (i32.const 101)) ;; e
      (then (return (call $output (i32.add (local.get $b) (i32.const 5)) (local.get $pl) (i32.const 0) (i32.const 0)))))
    (i32.const 42))
)
