;; A handler-ABI v1 guest written by hand to exercise the host's edge cases.
;; The first byte of the request body selects the behaviour:
;;   e echo the body          l loop forever           m grow memory until refused, then return 1
;;   o output past the limit  b output with a bad ptr  t trap (unreachable)
;;   s return status 3 with an error message           g log a line, then echo
;;   i infer: rest of the body is CBOR tensors for model "add", output the encoded result
;;   j infer into a 4-byte buffer, then fetch the result with infer_result
;;   r recurse until the stack overflows                 n infer with an unknown model name
;;   c count: return how many requests this instance has served (as one byte)
;; A warm instance's wasminfer_alloc refuses exactly 4242 bytes (a fragmented heap, simulated).
(module
  (import "wasminfer" "output" (func $output (param i32 i32 i32 i32) (result i32)))
  (import "wasminfer" "error" (func $error (param i32 i32)))
  (import "wasminfer" "log" (func $log (param i32 i32 i32)))
  (import "wasminfer" "infer" (func $infer (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasminfer" "infer_result" (func $infer_result (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 4096))
  (global $served (mut i32) (i32.const 0))
  (data (i32.const 16) "add")
  (data (i32.const 32) "text/plain")
  (data (i32.const 48) "bad things happened")
  (data (i32.const 80) "hello from the guest")
  (data (i32.const 112) "no-such-model")
  (func (export "wasminfer_abi_v1"))
  (func $alloc (export "wasminfer_alloc") (param $n i32) (result i32)
    (local $p i32)
    ;; a warm instance refuses exactly 4242 bytes: stands in for a fragmented heap
    (if (i32.and (i32.gt_u (global.get $served) (i32.const 0)) (i32.eq (local.get $n) (i32.const 4242)))
      (then (return (i32.const 0))))
    (global.set $heap (i32.const 4096))
    (local.set $p (global.get $heap))
    ;; grow memory if needed
    (block $ok
      (br_if $ok (i32.le_u (i32.add (local.get $p) (local.get $n))
                           (i32.mul (memory.size) (i32.const 65536))))
      (if (i32.eq (memory.grow (i32.add (i32.shr_u (local.get $n) (i32.const 16)) (i32.const 1)))
                  (i32.const -1))
        (then (return (i32.const 0)))))
    (local.get $p))
  (func $recurse (param i32) (result i32)
    (i32.add (call $recurse (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))
  (func (export "wasminfer_handle") (param $b i32) (param $bl i32) (param $c i32) (param $cl i32) (result i32)
    (local $op i32) (local $n i32) (local $out i32)
    (global.set $served (i32.add (global.get $served) (i32.const 1)))
    (local.set $op (i32.load8_u (local.get $b)))
    (if (i32.eq (local.get $op) (i32.const 101)) ;; e
      (then (drop (call $output (local.get $b) (local.get $bl) (i32.const 32) (i32.const 10)))
            (return (i32.const 0))))
    (if (i32.eq (local.get $op) (i32.const 103)) ;; g
      (then (call $log (i32.const 2) (i32.const 80) (i32.const 20))
            (drop (call $output (local.get $b) (local.get $bl) (i32.const 32) (i32.const 10)))
            (return (i32.const 0))))
    (if (i32.eq (local.get $op) (i32.const 108)) ;; l
      (then (loop $forever (br $forever))))
    (if (i32.eq (local.get $op) (i32.const 109)) ;; m
      (then (loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
            (return (i32.const 1))))
    (if (i32.eq (local.get $op) (i32.const 111)) ;; o: claim 1 GiB of output
      (then (return (call $output (i32.const 0) (i32.const 0x40000000) (i32.const 32) (i32.const 10)))))
    (if (i32.eq (local.get $op) (i32.const 98)) ;; b: pointer far outside memory
      (then (return (call $output (i32.const 0x7ffffff0) (i32.const 64) (i32.const 32) (i32.const 10)))))
    (if (i32.eq (local.get $op) (i32.const 116)) ;; t
      (then unreachable))
    (if (i32.eq (local.get $op) (i32.const 115)) ;; s
      (then (call $error (i32.const 48) (i32.const 19)) (return (i32.const 3))))
    (if (i32.eq (local.get $op) (i32.const 114)) ;; r
      (then (return (call $recurse (i32.const 0)))))
    (if (i32.eq (local.get $op) (i32.const 99)) ;; c
      (then (i32.store8 (i32.const 200) (global.get $served))
            (return (call $output (i32.const 200) (i32.const 1) (i32.const 32) (i32.const 10)))))
    (if (i32.or (i32.eq (local.get $op) (i32.const 105)) (i32.eq (local.get $op) (i32.const 110))) ;; i, n
      (then
        (local.set $out (i32.add (local.get $b) (local.get $bl)))
        (local.set $n (call $infer
          (select (i32.const 16) (i32.const 112) (i32.eq (local.get $op) (i32.const 105)))
          (select (i32.const 3) (i32.const 13) (i32.eq (local.get $op) (i32.const 105)))
          (i32.add (local.get $b) (i32.const 1)) (i32.sub (local.get $bl) (i32.const 1))
          (local.get $out) (i32.const 60000)))
        (if (i32.lt_s (local.get $n) (i32.const 0)) (then (return (i32.sub (i32.const 0) (local.get $n)))))
        (return (call $output (local.get $out) (local.get $n) (i32.const 32) (i32.const 0)))))
    (if (i32.eq (local.get $op) (i32.const 106)) ;; j
      (then
        (local.set $out (i32.add (local.get $b) (local.get $bl)))
        (local.set $n (call $infer (i32.const 16) (i32.const 3)
          (i32.add (local.get $b) (i32.const 1)) (i32.sub (local.get $bl) (i32.const 1))
          (local.get $out) (i32.const 4)))
        (if (i32.lt_s (local.get $n) (i32.const 0)) (then (return (i32.sub (i32.const 0) (local.get $n)))))
        (local.set $n (call $infer_result (local.get $out) (local.get $n)))
        (if (i32.lt_s (local.get $n) (i32.const 0)) (then (return (i32.const 77))))
        (return (call $output (local.get $out) (local.get $n) (i32.const 32) (i32.const 0)))))
    (i32.const 42))
)
