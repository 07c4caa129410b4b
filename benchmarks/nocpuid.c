/* An LD_PRELOAD shim for `bench_int8.py --isa avx2` (issue 30): on a CPU with AVX-512 and
 * VNNI, make every library that picks its kernels with CPUID (ONNX Runtime's MLAS, cpuinfo,
 * numpy, torch) take its AVX2 kernels, as on a CPU without them. CPUID is made to fault
 * (Linux's arch_prctl(ARCH_SET_CPUID, 0): x86-64 CPUs with CPUID faulting, `cpuid_fault` in
 * /proc/cpuinfo; kept by threads and forks, reset by exec, hence the constructor) and each
 * fault is answered with the real CPUID minus the AVX-512, AVX-VNNI and AVX512-BF16 bits.
 * The cores stay this machine's: what it shows is the instruction set's part, not another
 * CPU's speed. Any other fault keeps its default action. NOCPUID_REPORT=1 prints the count
 * of CPUID instructions answered at exit. */
#define _GNU_SOURCE
#include <signal.h>
#include <ucontext.h>
#include <asm/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cpuid.h>

static volatile unsigned long traps = 0;
static int ap(int code, unsigned long addr) { return (int)syscall(SYS_arch_prctl, code, addr); }

static void handler(int sig, siginfo_t *si, void *vctx) {
    ucontext_t *ctx = (ucontext_t *)vctx;
    greg_t *g = ctx->uc_mcontext.gregs;
    unsigned char *ip = (unsigned char *)g[REG_RIP];
    if (!(ip[0] == 0x0f && ip[1] == 0xa2)) {
        signal(SIGSEGV, SIG_DFL);  /* a real fault: it recurs and crashes as usual */
        return;
    }
    unsigned int leaf = (unsigned int)g[REG_RAX], sub = (unsigned int)g[REG_RCX];
    unsigned int a, b, c, d;
    ap(ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, a, b, c, d);
    ap(ARCH_SET_CPUID, 0);
    if (leaf == 7 && sub == 0) {  /* AVX-512 F DQ IFMA PF ER CD BW VL; VBMI VBMI2 VNNI
                                     BITALG VPOPCNTDQ; 4VNNIW 4FMAPS VP2INTERSECT FP16 */
        b &= ~((1u<<16)|(1u<<17)|(1u<<21)|(1u<<26)|(1u<<27)|(1u<<28)|(1u<<30)|(1u<<31));
        c &= ~((1u<<1)|(1u<<6)|(1u<<11)|(1u<<12)|(1u<<14));
        d &= ~((1u<<2)|(1u<<3)|(1u<<8)|(1u<<23));
    } else if (leaf == 7 && sub == 1) {  /* AVX-VNNI, AVX512-BF16; AVX-VNNI-INT8, AVX-NE-CONVERT */
        a &= ~((1u<<4)|(1u<<5));
        d &= ~((1u<<4)|(1u<<5));
    }
    g[REG_RAX] = a; g[REG_RBX] = b; g[REG_RCX] = c; g[REG_RDX] = d;
    g[REG_RIP] += 2;
    traps++;
}

static void report(void) {
    if (getenv("NOCPUID_REPORT")) fprintf(stderr, "nocpuid: %lu CPUID traps\n", traps);
}

__attribute__((constructor)) static void install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    if (ap(ARCH_SET_CPUID, 0) != 0) {  /* no CPUID faulting: nothing masked (checked) */
        perror("nocpuid: arch_prctl(ARCH_SET_CPUID, 0)");
        return;
    }
    atexit(report);
}
