"""Run by ``tests/test_kernels.py`` in a fresh process: Triton's compiler front end (AST → TTIR) for an
sm_90 target on each of a module's kernels, which needs no GPU. Exit 3 (a skip) when this Triton's
compiler internals moved; a compile error fails.

    python tests/triton_front_end.py haar|nearest_code
"""

import sys

try:
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler.compiler import ASTSource
except ImportError as e:  # internals: a Triton that moved them skips the check, it does not fail it
    print(f"this Triton's compiler internals moved: {e}")
    sys.exit(3)

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = CUDABackend(TARGET)


def to_ttir(kernel, signature: dict, constexprs: dict) -> str:
    ctx = ir.context()
    ir.load_dialects(ctx)
    BACKEND.load_dialects(ctx)
    options = BACKEND.parse_options({"num_warps": 4})
    src = ASTSource(kernel, signature, constexprs=constexprs)
    return str(src.make_ir(TARGET, options, BACKEND.get_codegen_implementation(options), BACKEND.get_module_map(), ctx))


def main(module: str) -> None:
    if module == "haar":
        from coarse2fine.train.kernels import haar

        for kernel in haar._kernels():
            signature = {n: "*fp32" for n in kernel.arg_names[:8]} | {n: "i32" for n in kernel.arg_names[8:12]}
            for side in (2, 16, 64):  # 1, 4 and 6 levels
                consts = {"SIDE": side, "BLOCK_P": max(1, 2048 // side**2)}
                assert "tt.func" in to_ttir(kernel, signature | dict.fromkeys(consts, "constexpr"), consts)
    else:
        from coarse2fine.train.kernels import nearest_code

        signature = {"z_ptr": "*fp32", "c_ptr": "*fp32", "norm_ptr": "*fp32", "out_ptr": "*i64", "N": "i32", "K": "i32",
                     "D": "i32"}
        for euclidean in (True, False):
            consts = {"euclidean": euclidean, "BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_D": 32}
            assert "tt.func" in to_ttir(nearest_code._kernel(), signature | dict.fromkeys(consts, "constexpr"), consts)
    print(module, "TTIR ok")


if __name__ == "__main__":
    main(sys.argv[1])
