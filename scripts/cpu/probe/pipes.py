#!/usr/bin/env python3
"""Issue rates of the AVX-512 instructions q4's CPU kernels are made of, alone and in pairs.

Writes a C program whose timed loops are inline assembly (so that no compiler decides the
register allocation or the schedule: C loops over vector arrays spilled or stalled at some
unroll depths and gave misleading rates), builds it with gcc and runs it:

    python3 scripts/cpu/probe/pipes.py          # while nothing else runs

Each test repeats its instruction group 24 times per iteration over independent registers
(at least eight chains, more than the latency needs). A pair that runs at the sum of its
members' rates issues on disjoint pipes; one that runs at a single member's rate shares them.
The "step" tests model a whole inner-loop step of a kernel with its real instruction mix.
Results are instructions per nanosecond; the clock is measured by a dependent add chain.
"""
import os
import subprocess
import sys
import tempfile

# Instruction templates: {a} {b} {c} are destination registers, rotated per repetition.
SINGLE = {
    "vpdpbusd": "vpdpbusd %zmm30, %zmm31, %zmm{a}",
    "vpdpbusd m32bcst": "vpdpbusd (%rsi){{1to16}}, %zmm31, %zmm{a}",
    "vfmadd231ps": "vfmadd231ps %zmm30, %zmm31, %zmm{a}",
    "vmulps": "vmulps %zmm30, %zmm31, %zmm{a}",
    "vaddps": "vaddps %zmm30, %zmm31, %zmm{a}",
    "vcvtdq2ps": "vcvtdq2ps %zmm30, %zmm{a}",
    "vpermps": "vpermps %zmm30, %zmm31, %zmm{a}",
    "vpshufb": "vpshufb %zmm30, %zmm31, %zmm{a}",
    "vpunpckldq": "vpunpckldq %zmm30, %zmm31, %zmm{a}",
    "vshufi32x4": "vshufi32x4 $0x88, %zmm30, %zmm31, %zmm{a}",
    "vpsrld imm": "vpsrld $4, %zmm30, %zmm{a}",
    "vpandd": "vpandd %zmm30, %zmm31, %zmm{a}",
    "vpbroadcastd m32": "vpbroadcastd (%rsi), %zmm{a}",
    "vmovdqa64 load": "vmovdqa64 (%rsi), %zmm{a}",
}
PAIRS = [
    ("vpdpbusd", "vfmadd231ps"),
    ("vpdpbusd", "vmulps"),
    ("vpdpbusd", "vaddps"),
    ("vpdpbusd", "vcvtdq2ps"),
    ("vpdpbusd", "vpermps"),
    ("vpdpbusd", "vpsrld imm"),
    ("vpdpbusd", "vpbroadcastd m32"),
    ("vpermps", "vfmadd231ps"),
    ("vpermps", "vpsrld imm"),
    ("vpermps", "vpshufb"),
    ("vpermps", "vpunpckldq"),
    ("vpermps", "vshufi32x4"),
    ("vpsrld imm", "vfmadd231ps"),
    ("vfmadd231ps", "vaddps"),
]


def w4a8_step():
    """One activation block of the W4A8 VNNI pass (NVFP4: two 16-weight blocks, 8 activation
    rows): 64 vpdpbusd with broadcast activations, the 16 correction broadcasts, 16 conversions,
    8 multiplies and 16 multiply-adds (8 with a broadcast activation scale)."""
    out = []
    for jb in range(2):
        for m in range(8):
            out.append(f"vpbroadcastd {4 * m + 64 * jb}(%rdx), %zmm{m}")
        for v in range(4):
            out.append(f"vmovdqa64 {(jb * 4 + v) * 64}(%rdi), %zmm{27 + v}")
            for m in range(8):
                off = m * 32 + 4 * (jb * 4 + v)
                out.append(f"vpdpbusd {off}(%rsi){{1to16}}, %zmm{27 + v}, %zmm{m}")
        out.append(f"vmovaps {jb * 64}(%rcx), %zmm26")
        for m in range(8):
            out.append(f"vcvtdq2ps %zmm{m}, %zmm{8 + m}")
            op = "vmulps" if jb == 0 else "vfmadd231ps"
            out.append(f"{op} %zmm26, %zmm{8 + m}, %zmm{16 + m}")
    for m in range(8):
        acc = 24 + (m if m < 3 else 0)
        out.append(f"vfmadd231ps {4 * m + 128}(%rdx){{1to16}}, %zmm{16 + m}, %zmm{acc}")
    return out


def group_step():
    """Two rows' 128-weight groups of the batch-1 GEMV (avx512_groups): per row one code load,
    seven shifts, eight vpermps lookups, eight multiplies / multiply-adds on two sums, the
    scale vector from eight E4M3 bytes, and the scaled sum."""
    out = [f"vmovups {64 * s}(%rsi), %zmm{s}" for s in range(8)]
    for r in range(2):
        c, p, q, t = 20 + r, 22 + 2 * r, 23 + 2 * r, 12 + 4 * r
        out += [f"vmovdqu64 {64 * r}(%rdi), %zmm{c}",
                f"vpermps %zmm31, %zmm{c}, %zmm{t}", f"vmulps %zmm0, %zmm{t}, %zmm{p}",
                f"vpsrld $4, %zmm{c}, %zmm{t + 1}", f"vpermps %zmm31, %zmm{t + 1}, %zmm{t + 1}",
                f"vmulps %zmm1, %zmm{t + 1}, %zmm{q}"]
        for s in range(2, 8):
            out += [f"vpsrld ${4 * s}, %zmm{c}, %zmm{t + 2}",
                    f"vpermps %zmm31, %zmm{t + 2}, %zmm{t + 2}",
                    f"vfmadd231ps %zmm{s}, %zmm{t + 2}, %zmm{p if s % 2 == 0 else q}"]
        out += [f"vpbroadcastq {8 * r}(%rdx), %zmm{t + 3}", f"vpshufb %zmm30, %zmm{t + 3}, %zmm{t + 3}",
                f"vpsrad $4, %zmm{t + 3}, %zmm{t + 3}", f"vpandd %zmm29, %zmm{t + 3}, %zmm{t + 3}",
                f"vmulps %zmm28, %zmm{t + 3}, %zmm{t + 3}", f"vaddps %zmm{p}, %zmm{q}, %zmm{p}",
                f"vfmadd231ps %zmm{t + 3}, %zmm{p}, %zmm{26 + r}"]
    return out


def repeated(templates):
    lines = []
    for i in range(24):
        for t in templates:
            lines.append(t.format(a=i % 8, b=12 + i % 8, c=20 + i % 6))
    return lines


def asm_string(lines):
    text = "\\n\\t".join(lines).replace("%", "%%")
    return text.replace("{1to16}", "%{1to16%}")


def main():
    tests = [(name, repeated([t])) for name, t in SINGLE.items()]
    for a, b in PAIRS:
        tests.append((f"{a} + {b}", repeated([SINGLE[a], SINGLE[b].replace("{a}", "{b}")])))
    steps = [("W4A8 pass step (NVFP4, 8 rows)", w4a8_step()),
             ("batch-1 group step (2 rows x 128)", group_step())]
    src = ["#include <stdio.h>", "#include <time.h>",
           "static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);"
           "return t.tv_sec+t.tv_nsec*1e-9;}",
           "static char buf[1 << 16] __attribute__((aligned(64)));",
           "int main(void){ double t0, t1; void *p = buf;",
           "long x = 0; t0 = now(); for (long i = 0; i < 400000000L; i++)"
           " __asm__ volatile(\"add $1, %0\" : \"+r\"(x)); t1 = now();",
           "double ghz = 0.4 / (t1 - t0);",
           "printf(\"clock %.2f GHz (dependent add chain)\\n\", ghz);"]
    for name, lines in tests:
        src.append(f't0 = now(); for (long it = 0; it < 2000000L; it++) __asm__ volatile("{asm_string(lines)}"'
                   ' :: "S"(p), "D"(p), "d"(p), "c"(p) : "memory"); t1 = now();')
        src.append(f'printf("%-36s %6.2f instr/ns  %5.2f per cycle\\n", "{name}",'
                   f' {len(lines)} / ((t1 - t0) / 2000000 * 1e9), {len(lines)} / ((t1 - t0) / 2000000 * 1e9) / ghz);')
    for name, lines in steps:
        src.append(f't0 = now(); for (long it = 0; it < 2000000L; it++) __asm__ volatile("{asm_string(lines)}"'
                   ' :: "S"(p), "D"(p), "d"(p), "c"(p) : "memory"); t1 = now();')
        src.append(f'printf("%-36s %6.2f ns = %5.1f cycles per step ({len(lines)} instructions)\\n", "{name}",'
                   f' (t1 - t0) / 2000000 * 1e9, (t1 - t0) / 2000000 * 1e9 * ghz);')
    src.append("return 0; }")
    with tempfile.TemporaryDirectory() as d:
        c, exe = os.path.join(d, "pipes.c"), os.path.join(d, "pipes")
        with open(c, "w") as f:
            f.write("\n".join(src))
        subprocess.run(["gcc", "-O2", c, "-o", exe], check=True)
        sys.stdout.flush()
        subprocess.run([exe], check=True)


if __name__ == "__main__":
    main()
