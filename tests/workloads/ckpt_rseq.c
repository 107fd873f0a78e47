/* A thread that spends nearly all its time inside an rseq critical section (registered by
 * glibc). Frozen there, it must resume at the section's abort handler, as the kernel would
 * make it, not in the middle of the section. Writes the section's bounds to OUTDIR/rseq. */
#include "ckpt_common.h"
#include <stddef.h>
#include <stdint.h>
#include <sys/rseq.h>

extern char rseq_cs_start[], rseq_cs_end[], rseq_abort_ip[];
static volatile long commits;

/* Returns 0 when the section committed, 1 when the kernel aborted it. */
static int run_section(long spins) {
    struct rseq *rs = (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
    __asm__ __volatile__ goto(
        "leaq 3f(%%rip), %%rax\n\t"
        "movq %%rax, %[cs]\n\t"
        ".globl rseq_cs_start\n"
        "rseq_cs_start:\n"
        "1:\n\t"
        "movq %[spins], %%rcx\n"
        "2:\n\t"
        "decq %%rcx\n\t"
        "jnz 2b\n\t"
        "incq %[commits]\n"
        ".globl rseq_cs_end\n"
        "rseq_cs_end:\n"
        "4:\n\t"
        ".pushsection __rseq_cs, \"aw\"\n\t"
        ".balign 32\n"
        "3:\n\t"
        ".long 0, 0\n\t"
        ".quad 1b, 4b - 1b, 5f\n\t"
        ".popsection\n\t"
        ".pushsection __rseq_failure, \"ax\"\n\t"
        ".byte 0x0f, 0xb9, 0x3d\n\t"
        ".long 0x53053053\n"
        ".globl rseq_abort_ip\n"
        "rseq_abort_ip:\n"
        "5:\n\t"
        "jmp %l[aborted]\n\t"
        ".popsection\n"
        : : [cs] "m" (rs->rseq_cs), [spins] "r" (spins), [commits] "m" (commits)
        : "rax", "rcx", "memory", "cc" : aborted);
    rs->rseq_cs = 0;
    return 0;
aborted:
    rs->rseq_cs = 0;
    return 1;
}

int main(int argc, char **argv) {
    init(argc, argv);
    if (__rseq_size == 0) { verdict(0, "glibc did not register rseq"); return 0; }
    char bounds[128];
    snprintf(bounds, sizeof bounds, "%lu %lu %lu\n", (unsigned long)rseq_cs_start,
             (unsigned long)rseq_cs_end, (unsigned long)rseq_abort_ip);
    write_file("rseq", bounds);
    FILE *out = open_output();
    long target = argc > 2 ? atol(argv[2]) : 2500, aborts = 0;
    while (commits < 20) run_section(4000000);
    ready();
    while (commits < target)
        aborts += run_section(4000000);
    fprintf(out, "commits %ld\n", commits);
    verdict(commits == target, "commits %ld", commits);
    return 0;
}
