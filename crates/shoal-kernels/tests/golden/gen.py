"""Writes the golden vectors the `golden` integration test reads.

Run from this directory with the Python `gguf` package and llama-cpp-python installed:
    python3 gen.py
For each weight type it stores, per file `<type>.bin` (all little-endian):
    u32 rows, u32 cols
    f32 src[rows*cols]          random weights
    u8  wq[rows*row_bytes]      the weights quantized by ggml's quantizer
    f32 deq[rows*cols]          wq dequantized by the gguf package (an independent decoder)
    u32 n_acts
    f32 x[n_acts*cols]          activations
    u8  xq[n_acts*act_bytes]    x quantized by ggml's CPU backend into the weight's dot format
    f32 dots[n_acts*rows]       ggml's CPU dot product of each weight row with each activation
"""
import ctypes
import os
import struct

import numpy as np
import gguf
import gguf.quants
import llama_cpp

LIB = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
base = ctypes.CDLL(os.path.join(LIB, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
cpu = ctypes.CDLL(os.path.join(LIB, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
cpu.ggml_cpu_init()

base.ggml_quantize_chunk.restype = ctypes.c_size_t
base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

Q = gguf.GGMLQuantizationType
# weight type -> (ggml id, activation type id, activation bytes per block, block size, dot fn, from_float fn)
TYPES = {
    "q8_0": (Q.Q8_0, 8, 34, 32, "ggml_vec_dot_q8_0_q8_0", "quantize_row_q8_0"),
    "q4_0": (Q.Q4_0, 8, 34, 32, "ggml_vec_dot_q4_0_q8_0", "quantize_row_q8_0"),
    "q4_1": (Q.Q4_1, 9, 36, 32, "ggml_vec_dot_q4_1_q8_1", "quantize_row_q8_1"),
    "q4_k": (Q.Q4_K, 15, 292, 256, "ggml_vec_dot_q4_K_q8_K", "quantize_row_q8_K"),
    "q5_k": (Q.Q5_K, 15, 292, 256, "ggml_vec_dot_q5_K_q8_K", "quantize_row_q8_K"),
    "q6_k": (Q.Q6_K, 15, 292, 256, "ggml_vec_dot_q6_K_q8_K", "quantize_row_q8_K"),
    "f16": (Q.F16, 1, 2, 1, "ggml_vec_dot_f16", "ggml_cpu_fp32_to_fp16"),
    "bf16": (Q.BF16, 30, 2, 1, "ggml_vec_dot_bf16", "ggml_cpu_fp32_to_bf16"),
}

ROWS, COLS, N_ACTS = 6, 512, 3


def ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def main():
    rng = np.random.default_rng(20240601)
    for name, (qt, act_id, act_bs, bs, dot_name, ff_name) in TYPES.items():
        src = rng.standard_normal((ROWS, COLS)).astype(np.float32) * 0.05
        src[1, 7] = 0.9  # an outlier weight
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qt]
        row_bytes = COLS // block_elems * block_bytes
        wq = np.zeros(ROWS * row_bytes, dtype=np.uint8)
        n = base.ggml_quantize_chunk(int(qt), ptr(src), ptr(wq), 0, ROWS, COLS, None)
        assert n == wq.size, (name, n, wq.size)
        deq = gguf.quants.dequantize(wq.reshape(ROWS, row_bytes), qt).astype(np.float32)

        x = rng.standard_normal((N_ACTS, COLS)).astype(np.float32)
        x[0, 3] = 11.0  # activation outliers are common in LLMs
        x[2] *= 0.01
        act_row = COLS // bs * act_bs
        xq = np.zeros(N_ACTS * act_row, dtype=np.uint8)
        ff = getattr(cpu, ff_name)
        ff.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        dot = getattr(cpu, dot_name)
        dot.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                        ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        dots = np.zeros((N_ACTS, ROWS), dtype=np.float32)
        for i in range(N_ACTS):
            xi = np.ascontiguousarray(x[i])
            yq = np.zeros(act_row, dtype=np.uint8)
            ff(ptr(xi), ptr(yq), COLS)
            xq[i * act_row:(i + 1) * act_row] = yq
            for r in range(ROWS):
                wr = np.ascontiguousarray(wq[r * row_bytes:(r + 1) * row_bytes])
                s = np.zeros(1, dtype=np.float32)
                dot(COLS, ptr(s), 0, ptr(wr), 0, ptr(yq), 0, 1)
                dots[i, r] = s[0]
        with open(f"{name}.bin", "wb") as f:
            f.write(struct.pack("<II", ROWS, COLS))
            f.write(src.tobytes())
            f.write(wq.tobytes())
            f.write(deq.tobytes())
            f.write(struct.pack("<I", N_ACTS))
            f.write(x.tobytes())
            f.write(xq.tobytes())
            f.write(dots.tobytes())
        print(name, row_bytes, dots[0, :3])


if __name__ == "__main__":
    main()
