;; A handler-ABI v1 guest that answers "te" with a content type holding CR/LF, as if to add a header
;; of its own (set-cookie): the gateway and a replica worker must send application/octet-stream.
(module
  (import "wasminfer" "output" (func $output (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "text/plain\r\nset-cookie: pwned=1")
  (func (export "wasminfer_abi_v1"))
  (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "wasminfer_handle") (param i32 i32 i32 i32) (result i32)
    (drop (call $output (i32.const 64) (i32.const 2) (i32.const 64) (i32.const 31)))
    (i32.const 0)))
