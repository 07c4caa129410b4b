"""AVX-512 and VNNI hidden from CPUID (``nocpuid.c``, preloaded), so that ONNX Runtime, numpy
and torch take their AVX2 kernels on a CPU that has more: what ``bench_int8.py --isa avx2``
measures on and what the tests masking CPUID run under (issue 30). Linux on x86-64 with CPUID
faulting, and a C compiler."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

#: the /proc/cpuinfo flags hidden (by substring: avx512f, avx512_vnni, avx_vnni, ...)
MASKED = ("avx512", "vnni")
SOURCE = Path(__file__).resolve().parent / "nocpuid.c"


def cpu_flags() -> set[str]:
    """This CPU's flags as Linux lists them (empty where they cannot be read)."""
    from tessera.core.training.quantize import cpu_flags as read

    return read() or set()


def masked_flags(flags: set[str] | None = None) -> set[str]:
    """``flags`` (default: this CPU's) without those the mask hides."""
    return {f for f in (cpu_flags() if flags is None else flags)
            if not any(m in f for m in MASKED)}


def unavailable() -> str | None:
    """Why nothing is masked here, or ``None`` where the mask works and changes something."""
    flags = cpu_flags()
    if masked_flags(flags) == flags:
        return "this CPU has neither AVX-512 nor VNNI: its own kernels are the AVX2 ones"
    if platform.machine() != "x86_64" or "cpuid_fault" not in flags or shutil.which("cc") is None:
        return ("AVX-512 and VNNI cannot be masked here: it needs an x86-64 CPU with CPUID "
                "faulting (cpuid_fault in /proc/cpuinfo) and a C compiler")
    return None


def environment(folder: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the shim, built into ``folder``,
    preloaded; Python's fault handler off (it would take the shim's SIGSEGV)."""
    shim = Path(folder) / "nocpuid.so"
    subprocess.run(["cc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(shim), str(SOURCE)],
                   check=True)
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(shim), env.get("LD_PRELOAD")]))
    env.pop("PYTHONFAULTHANDLER", None)
    return env


def took() -> bool:
    """Whether this process runs masked (numpy reads CPUID as ONNX Runtime does)."""
    from tessera.core.inference.onnx_cache import runtime_isa

    have = runtime_isa().split(",")
    return "AVX2" in have and not any(f.startswith("AVX512") for f in have)
