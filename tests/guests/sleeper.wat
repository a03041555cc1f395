;; Test guest (handler ABI v1) that sleeps in WASI `poll_oneoff`, the call `sleep` and `nanosleep`
;; become. Request: two little-endian u32, a mode and milliseconds. Response (64 bytes, u32s): the
;; errno poll_oneoff returned, the number of events, the mode, 0; 16 bytes of zeros; then the first
;; event as poll_oneoff wrote it (32 bytes: userdata u64, errno u16, type u8, ...).
;; Modes: 0 sleep (relative monotonic clock), 1 a clock of that length and an fd_read on stdin
;; (ready at once), 2 zero subscriptions (EINVAL), 3 subscriptions out of bounds (EFAULT),
;; 4 sleep until an absolute monotonic time (clock_time_get + ms), 5 a realtime clock.
;; `_initialize` writes "init\n" to stdout, then sleeps INIT_MS (replaced by the tests; 0: no sleep).
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasminfer" "output" (func $output (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 32) "init\n")
  (func (export "wasminfer_abi_v1"))
  (func (export "wasminfer_alloc") (param i32) (result i32) (i32.const 1024))

  ;; one clock subscription at 256: userdata 7, clock `id`, `ns` from now (or absolute with flags 1)
  (func $clock_sub (param $at i32) (param $id i32) (param $ns i64) (param $flags i32)
    (i64.store (local.get $at) (i64.const 7))
    (i32.store8 offset=8 (local.get $at) (i32.const 0))
    (i32.store offset=16 (local.get $at) (local.get $id))
    (i64.store offset=24 (local.get $at) (local.get $ns))
    (i64.store offset=32 (local.get $at) (i64.const 0))
    (i32.store16 offset=40 (local.get $at) (local.get $flags)))

  (func $sleep (param $ms i32) (result i32)
    (call $clock_sub (i32.const 256) (i32.const 1)
      (i64.mul (i64.extend_i32_u (local.get $ms)) (i64.const 1000000)) (i32.const 0))
    (call $poll (i32.const 256) (i32.const 512) (i32.const 1) (i32.const 600)))

  (func (export "_initialize")
    (if (i32.ne (global.get $init_ms) (i32.const 0))
      (then
        ;; iovec at 64: "init\n"
        (i32.store (i32.const 64) (i32.const 32))
        (i32.store (i32.const 68) (i32.const 5))
        (drop (call $write (i32.const 1) (i32.const 64) (i32.const 1) (i32.const 72)))
        (drop (call $sleep (global.get $init_ms))))))
  (global $init_ms i32 (i32.const INIT_MS))

  (func (export "wasminfer_handle") (param $b i32) (param $bl i32) (param i32 i32) (result i32)
    (local $mode i32) (local $ms i32) (local $errno i32) (local $ns i64)
    (local.set $mode (i32.load (local.get $b)))
    (local.set $ms (i32.load offset=4 (local.get $b)))
    (local.set $ns (i64.mul (i64.extend_i32_u (local.get $ms)) (i64.const 1000000)))
    (i32.store (i32.const 600) (i32.const 0))
    (if (i32.eq (local.get $mode) (i32.const 0))
      (then (local.set $errno (call $sleep (local.get $ms)))))
    (if (i32.eq (local.get $mode) (i32.const 1))
      (then
        (call $clock_sub (i32.const 256) (i32.const 1) (local.get $ns) (i32.const 0))
        ;; an fd_read subscription on fd 0, userdata 9
        (i64.store (i32.const 304) (i64.const 9))
        (i32.store8 (i32.const 312) (i32.const 1))
        (i32.store (i32.const 320) (i32.const 0))
        (local.set $errno (call $poll (i32.const 256) (i32.const 512) (i32.const 2) (i32.const 600)))))
    (if (i32.eq (local.get $mode) (i32.const 2))
      (then (local.set $errno (call $poll (i32.const 256) (i32.const 512) (i32.const 0) (i32.const 600)))))
    (if (i32.eq (local.get $mode) (i32.const 3))
      (then (local.set $errno (call $poll (i32.const 65500) (i32.const 512) (i32.const 1) (i32.const 600)))))
    (if (i32.eq (local.get $mode) (i32.const 4))
      (then
        (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 240)))
        (call $clock_sub (i32.const 256) (i32.const 1) (i64.add (i64.load (i32.const 240)) (local.get $ns))
          (i32.const 1))
        (local.set $errno (call $poll (i32.const 256) (i32.const 512) (i32.const 1) (i32.const 600)))))
    (if (i32.eq (local.get $mode) (i32.const 5))
      (then
        (call $clock_sub (i32.const 256) (i32.const 0) (local.get $ns) (i32.const 0))
        (local.set $errno (call $poll (i32.const 256) (i32.const 512) (i32.const 1) (i32.const 600)))))
    ;; the response at 480: errno, nevents, mode, 0, then the event at 512
    (i32.store (i32.const 480) (local.get $errno))
    (i32.store (i32.const 484) (i32.load (i32.const 600)))
    (i32.store (i32.const 488) (local.get $mode))
    (i32.store (i32.const 492) (i32.const 0))
    (call $output (i32.const 480) (i32.const 64) (i32.const 0) (i32.const 0))))
