/* wasi_ephemeral_nn.h — the legacy witx WASI-NN ABI (`wasi_ephemeral_nn`) for C guests.
 *
 * The declarations the Rust `wasi-nn` crate 0.6 and WasmEdge's WASI-NN plugin use, written out for
 * C: what the host implements is described in guest-sdk/WASI-NN.md. Every function returns an
 * nn_errno (0 on success) and passes its results through out-pointers. Header-only, no dependency
 * on wasminfer.h; works in handler modules and WASI commands alike.
 */
#ifndef WASI_EPHEMERAL_NN_H
#define WASI_EPHEMERAL_NN_H

#include <stdint.h>

typedef uint32_t wasi_nn_graph;
typedef uint32_t wasi_nn_context;

typedef enum {
    WASI_NN_SUCCESS = 0,
    WASI_NN_INVALID_ARGUMENT = 1,
    WASI_NN_INVALID_ENCODING = 2,
    WASI_NN_MISSING_MEMORY = 3,
    WASI_NN_BUSY = 4,
    WASI_NN_RUNTIME_ERROR = 5,
    WASI_NN_UNSUPPORTED_OPERATION = 6,
    WASI_NN_TOO_LARGE = 7,
    WASI_NN_NOT_FOUND = 8,
} wasi_nn_errno;

typedef enum {
    WASI_NN_F16 = 0,
    WASI_NN_F32 = 1,
    WASI_NN_F64 = 2,
    WASI_NN_U8 = 3,
    WASI_NN_I32 = 4,
    WASI_NN_I64 = 5,
} wasi_nn_tensor_type;

typedef enum {
    WASI_NN_OPENVINO = 0,
    WASI_NN_ONNX = 1,
    WASI_NN_TENSORFLOW = 2,
    WASI_NN_PYTORCH = 3,
    WASI_NN_TENSORFLOWLITE = 4,
    WASI_NN_AUTODETECT = 5,
    WASI_NN_GGML = 6, /* WasmEdge */
} wasi_nn_encoding;

typedef enum {
    WASI_NN_CPU = 0,
    WASI_NN_GPU = 1,
    WASI_NN_TPU = 2,
    WASI_NN_AUTO = 3, /* WasmEdge */
} wasi_nn_target;

/* A list<u8>: one graph builder (for ONNX, the whole model). */
typedef struct {
    const uint8_t *buf;
    uint32_t size;
} wasi_nn_graph_builder;

/* The witx `tensor` record: 20 bytes, align 4; `type` is a u8 followed by 3 padding bytes. */
typedef struct {
    const uint32_t *dims;
    uint32_t dims_len;
    uint8_t type; /* wasi_nn_tensor_type */
    const uint8_t *data;
    uint32_t data_len;
} wasi_nn_tensor;

_Static_assert(sizeof(wasi_nn_tensor) == 20, "wasi_nn_tensor must match the witx layout");

#define WASI_NN_IMPORT(name) __attribute__((import_module("wasi_ephemeral_nn"), import_name(name)))

WASI_NN_IMPORT("load")
int32_t wasi_nn_load(const wasi_nn_graph_builder *builders, uint32_t builders_len, uint32_t encoding,
                     uint32_t target, wasi_nn_graph *graph);
WASI_NN_IMPORT("load_by_name")
int32_t wasi_nn_load_by_name(const char *name, uint32_t name_len, wasi_nn_graph *graph);
WASI_NN_IMPORT("load_by_name_with_config")
int32_t wasi_nn_load_by_name_with_config(const char *name, uint32_t name_len, const char *config,
                                         uint32_t config_len, wasi_nn_graph *graph);
WASI_NN_IMPORT("init_execution_context")
int32_t wasi_nn_init_execution_context(wasi_nn_graph graph, wasi_nn_context *ctx);
WASI_NN_IMPORT("set_input")
int32_t wasi_nn_set_input(wasi_nn_context ctx, uint32_t index, const wasi_nn_tensor *tensor);
WASI_NN_IMPORT("compute")
int32_t wasi_nn_compute(wasi_nn_context ctx);
WASI_NN_IMPORT("get_output")
int32_t wasi_nn_get_output(wasi_nn_context ctx, uint32_t index, uint8_t *out, uint32_t out_max,
                           uint32_t *written);
/* WasmEdge's additions */
WASI_NN_IMPORT("compute_single")
int32_t wasi_nn_compute_single(wasi_nn_context ctx);
WASI_NN_IMPORT("get_output_single")
int32_t wasi_nn_get_output_single(wasi_nn_context ctx, uint32_t index, uint8_t *out, uint32_t out_max,
                                  uint32_t *written);
WASI_NN_IMPORT("fini_single")
int32_t wasi_nn_fini_single(wasi_nn_context ctx);
WASI_NN_IMPORT("unload")
int32_t wasi_nn_unload(wasi_nn_graph graph);
WASI_NN_IMPORT("finalize_execution_context")
int32_t wasi_nn_finalize_execution_context(wasi_nn_context ctx);

#endif /* WASI_EPHEMERAL_NN_H */
