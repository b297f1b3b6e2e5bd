"""How many int8 multiply-adds one core of this machine can issue per second, by instruction idiom.

The ceiling under jaxinfer's CPU int8 kernel (issue 6). AVX2 without VNNI has two ways to multiply
8-bit values into 32-bit sums:

* exact (ours): widen to int16, ``vpmaddwd`` (16 products summed in pairs into 8 int32 lanes), then
  ``vpaddd`` into the accumulator: 2 vector instructions per 16 multiply-adds;
* saturating (onnxruntime's u8 x s8 path on AVX2): ``vpmaddubsw`` (32 products summed in pairs into
  16 *saturating* int16 lanes), ``vpmaddwd`` by ones, ``vpaddd``: 3 instructions per 32 multiply-adds.
  A pair of u8 x s8 products can reach 2 x 255 x 128 = 65280, past int16, so the sums are not exact.

Each loop keeps its operands in registers (no memory traffic), 8 independent accumulators, and runs
on one core; the table also gives plain ``vpaddd`` and ``vfmadd231ps`` issue rates. Built with the
host's ``g++`` (``CXX``) like the kernel.

    python benchmarks/simd_rate.py [--json benchmarks/results/simd_rate.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

# One asm loop per idiom: ITER iterations of 8 steps, one step per accumulator ymm0..ymm7.
# ymm14/ymm15 hold the operands, ymm13 a vector of int16 ones, ymm8..ymm12 temporaries.
_STEPS = {
    "vpaddd": ("vpaddd %%ymm14, %%ymm{a}, %%ymm{a}",),
    "vfmadd231ps": ("vfmadd231ps %%ymm14, %%ymm15, %%ymm{a}",),
    "exact_int8": ("vpmaddwd %%ymm14, %%ymm15, %%ymm{t}", "vpaddd %%ymm{t}, %%ymm{a}, %%ymm{a}"),
    "saturating_u8s8": ("vpmaddubsw %%ymm14, %%ymm15, %%ymm{t}", "vpmaddwd %%ymm13, %%ymm{t}, %%ymm{t}",
                        "vpaddd %%ymm{t}, %%ymm{a}, %%ymm{a}"),
}
# multiply-adds per step (vpaddd and the float FMA: lanes per instruction)
_MACS = {"vpaddd": 8, "vfmadd231ps": 8, "exact_int8": 16, "saturating_u8s8": 32}


def _source(iters: int) -> str:
    funcs, calls = [], []
    for name, step in _STEPS.items():
        body = "".join(f'"{ins.format(a=a, t=8 + a % 5)}\\n"' for a in range(8) for ins in step)
        funcs.append(f"""
__attribute__((noinline)) void {name}(long n) {{
  asm volatile("vpxor %%ymm14, %%ymm14, %%ymm14\\n vpxor %%ymm15, %%ymm15, %%ymm15\\n"
               "vpcmpeqw %%ymm13, %%ymm13, %%ymm13\\n vpsrlw $15, %%ymm13, %%ymm13\\n"
               "1:\\n" {body} "dec %0\\n jnz 1b\\n vzeroupper\\n"
               : "+r"(n) :: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
                  "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc");
}}""")
        calls.append(f'  time("{name}", {name});')
    return f"""#include <algorithm>
#include <chrono>
#include <cstdio>
{''.join(funcs)}
template <class F> void time(const char* name, F f) {{
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {{
    auto t0 = std::chrono::steady_clock::now();
    f({iters}L);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }}
  std::printf("%s %.6f\\n", name, best);
}}
int main() {{
{chr(10).join(calls)}
}}
"""


def measure(iters: int = 20_000_000) -> list[dict]:
    """Best-of-5 seconds for ``iters`` x 8 steps of each idiom on one core."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "simd_rate.cc", Path(tmp) / "simd_rate"
        src.write_text(_source(iters))
        subprocess.run([os.environ.get("CXX", "g++"), "-O2", "-o", str(exe), str(src)], check=True)
        out = subprocess.run(["taskset", "-c", "0", str(exe)], check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.split("\n"):
        if line.strip():
            name, secs = line.split()
            steps = iters * 8 / float(secs)
            rows.append({"idiom": name, "instructions_per_step": len(_STEPS[name]),
                         "g_instructions_per_s": round(steps * len(_STEPS[name]) / 1e9, 2),
                         "g_macs_per_s": round(steps * _MACS[name] / 1e9, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = measure()
    print(f"{'idiom':>16} {'instr/step':>10} {'G instr/s':>10} {'G MAC/s':>8}")
    for r in rows:
        print(f"{r['idiom']:>16} {r['instructions_per_step']:>10} {r['g_instructions_per_s']:>10.2f} "
              f"{r['g_macs_per_s']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
