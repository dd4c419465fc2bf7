"""Instructions per weight byte of the GGUF GPU kernels, from their compiled sm_90 code (no GPU needed).

    python benchmarks/gguf_sass.py

Compiles each kernel for an H100/H200 target with Triton's bundled ptxas, finds the main loop in the
SASS (the longest backward branch) and divides its instruction count by the weight bytes one thread
reads per iteration. At batch 1 a kernel that streams 4.3 GB of Q4_K_M blocks at ~3 TB/s on an H200
(~33 T thread instructions/s) has ~11 instructions per byte to spend; this is the evidence the dispatch
in ``aphrodite.kernels.gguf_gpu`` relies on where no GPU timing exists yet. Prints a table last.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from aphrodite.kernels import gguf_gpu, gguf_matmul  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
BLOCK_BYTES = {12: 144, 13: 176, 14: 210}
CODE_BYTES = {12: 128, 13: 160, 14: 192}   # code bytes per block (scales excluded)


def compile_stats(fn, signature: dict[str, str], consts: dict, aligned: tuple[int, ...], warps: int,
                  stages: int = 3) -> tuple[int, Counter]:
    """(main-loop instructions, their mix) of ``fn`` compiled for sm_90a."""
    src = ASTSource(fn=JITFunction(fn), signature={**signature, **{k: "constexpr" for k in consts}},
                    constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    path = f"/tmp/gguf_sass_{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
    os.unlink(path)
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    lo = hi = 0
    for addr, ins in lines:
        m = re.search(r"BRA\s+0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < int(addr, 16) and int(addr, 16) - int(m.group(1), 16) > hi - lo:
            lo, hi = int(m.group(1), 16), int(addr, 16)
    body = [ins.split()[1] if ins.startswith("@") else ins.split()[0] for a, ins in lines if lo <= int(a, 16) <= hi]
    return len(body), Counter(b.split(".")[0] for b in body) + Counter(b for b in body if b.startswith("LDG"))


def main() -> None:
    rows = []
    gemv_q8_sig = {"xq_ptr": "*i32", "xd_ptr": "*fp32", "xs_ptr": "*fp32", "w_ptr": "*u8", "w32_ptr": "*i32",
                   "out_ptr": "*bf16", "N": "i32", "row_bytes": "i32", "n_blocks": "i32"}
    gemv_sig = {"x_ptr": "*bf16", "w_ptr": "*u8", "out_ptr": "*bf16", "N": "i32", "row_bytes": "i32",
                "n_blocks": "i32"}
    dot_sig = {"x_ptr": "*bf16", "w_ptr": "*u8", "out_ptr": "*bf16", "M": "i32", "N": "i32", "row_bytes": "i32",
               "n_blocks": "i32", "blocks_per_split": "i32", "stride_xm": "i32", "stride_om": "i32"}
    old_sig = {"x_ptr": "*bf16", "w_ptr": "*u8", "out_ptr": "*fp32", "M": "i32", "N": "i32", "row_bytes": "i32",
               "stride_xm": "i32", "stride_om": "i32", "n_blocks": "i32", "blocks_per_split": "i32"}
    old_gemm_sig = {k: v for k, v in old_sig.items() if k != "blocks_per_split"} | {"out_ptr": "*bf16"}
    v2_sig = {"xq_ptr": "*i32", "xd_ptr": "*fp32", "xs_ptr": "*fp32", "w32_ptr": "*i32", "out_ptr": "*bf16",
              "M": "i32", "N": "i32", "row_quads": "i32", "n_blocks": "i32", "stride_om": "i32"}
    v2_sig6 = {("row_words" if k == "row_quads" else k): v for k, v in v2_sig.items()}
    for qtype in (12, 13, 14):
        name, bb = gguf_matmul.GGML_TYPE_NAMES[qtype], BLOCK_BYTES[qtype]
        if qtype == 14:
            v2 = ("M=1 gemv_q8 v2 (2,8,2)", gguf_gpu._gemv_q8k6_fn, v2_sig6,
                  {"BLOCK_M": 1, "BLOCK_N": 2, "BLOCK_P": 4, "ASM": True}, (0, 1, 2, 3, 4, 6), 2, 2 * 8)
        else:
            v2 = ("M=1 gemv_q8 v2 (4,8,4)", gguf_gpu._gemv_q8k_fn, v2_sig,
                  {"QTYPE": qtype, "BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_B": 8, "ASM": True}, (0, 1, 2, 3, 4, 7), 4, 4 * 8)
        cases = [v2,
            ("M=1 gemv_q8 v1 (2,8,2)", gguf_gpu._gemv_q8_fn, gemv_q8_sig,
             {"QTYPE": qtype, "BB": bb, "BLOCK_N": 2, "BLOCK_B": 8, "ASM": True}, (0, 1, 2, 3, 4, 5, 7), 2, 2 * 8),
            ("new M=1 gemv exact (2,4,2)", gguf_gpu._gemv_fn, gemv_sig,
             {"QTYPE": qtype, "BB": bb, "BLOCK_N": 2, "BLOCK_B": 4}, (0, 1, 2, 4), 2, 2 * 4),
            ("new M=2..16 dot", gguf_gpu._dot_fn, dot_sig, {"QTYPE": qtype, "BB": bb, "BLOCK_M": 16, "BLOCK_N": 32,
             "ATOMIC": False, "PRECISION": "tf32"}, (0, 1, 2, 5, 8, 9), 4, 32),
            ("new M=65..256 tiled 128x64", gguf_gpu._dot_fn, dot_sig, {"QTYPE": qtype, "BB": bb, "BLOCK_M": 128,
             "BLOCK_N": 64, "ATOMIC": False, "PRECISION": "tf32"}, (0, 1, 2, 5, 8, 9), 8, 64),
            ("old M=1 gemv", gguf_matmul._gemv_kernel_fn, old_sig, {"QTYPE": qtype, "QK": 256, "BB": bb, "BLOCK_M": 1,
             "BLOCK_N": 16, "ATOMIC": True}, (0, 1, 2, 5, 6, 7), 4, 16),
            ("old M=4 gemv", gguf_matmul._gemv_kernel_fn, old_sig, {"QTYPE": qtype, "QK": 256, "BB": bb, "BLOCK_M": 4,
             "BLOCK_N": 16, "ATOMIC": True}, (0, 1, 2, 5, 6, 7), 4, 16),
            ("old M>8 gemm 64x64", gguf_matmul._gemm_kernel_fn, old_gemm_sig, {"QTYPE": qtype, "QK": 256, "BB": bb,
             "BLOCK_M": 64, "BLOCK_N": 64}, (0, 1, 2, 5, 6, 7), 4, 64),
        ]
        for label, fn, sig, consts, aligned, warps, blocks_per_iter in cases:
            n, mix = compile_stats(fn, sig, consts, aligned, warps)
            per_thread = blocks_per_iter * CODE_BYTES[qtype] / (warps * 32)
            slow = mix["I2F"] + mix["I2FP"]   # int->float conversions: quarter rate on sm_90
            loads = sum(v for k, v in mix.items() if k.startswith("LDG."))
            rows.append((f"{name} {label}", f"{n / per_thread:5.1f} instr/B, of which {slow / per_thread:4.1f} "
                         f"int->float conversions; {loads / per_thread:4.2f} global loads/B; "
                         f"{mix['BAR']} barriers, {mix['STS']} shared stores per step"))
            print(rows[-1], flush=True)
    print("\n== GGUF kernels, sm_90 main loop: instructions per weight code byte ==")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
