/* Memory and process attributes that came back lost: mlock()ed memory (and mlock2's lock on
 * fault), mlockall(MCL_FUTURE), the THP-disable flag, oom_score_adj, a read-only MAP_SHARED
 * mapping of a file opened read-write, which may be made writable, a membarrier registration
 * (a private expedited barrier fails with EPERM without it), audit's loginuid, a mapping's
 * MAP_NORESERVE (glibc's thread arenas have it: no swap is reserved for them), MADV_RANDOM
 * readahead advice, a sealed mapping (mseal, Linux 6.10: munmap fails with EPERM), the
 * coredump_filter (which mappings a core dump holds), guard pages (MADV_GUARD_INSTALL,
 * Linux 6.13: a touch is SIGSEGV; their neighbours keep their bytes), speculative store
 * bypass disabled for itself (PR_SET_SPECULATION_CTRL, where the CPU and kernel let it), and
 * a MAP_DROPPABLE mapping (Linux 6.11: pages the kernel may drop under memory pressure, as
 * glibc keeps its getrandom() state; restored as a plain private mapping it would not be). */
#include "ckpt_common.h"
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#define MEMBARRIER_CMD_PRIVATE_EXPEDITED (1 << 3)
#define MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED (1 << 4)

static long loginuid(void) {
    long v = -1;
    FILE *f = fopen("/proc/self/loginuid", "r");
    if (f) { if (fscanf(f, "%ld", &v) != 1) v = -1; fclose(f); }
    return v;
}

/* Whether the mapping at addr shows VmFlag flag ("nr") in /proc/self/smaps. */
static int vmflag(void *addr, const char *flag) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return 0;
    char line[512], want[32];
    int in = 0, found = 0;
    snprintf(want, sizeof want, " %s", flag);
    while (fgets(line, sizeof line, f)) {
        unsigned long start, end;
        if (sscanf(line, "%lx-%lx ", &start, &end) == 2 && strchr(line, '-') < strchr(line, ' '))
            in = start <= (unsigned long)addr && (unsigned long)addr < end;
        else if (in && !strncmp(line, "VmFlags:", 8)) {
            line[strcspn(line, "\n")] = ' ';
            found = strstr(line, want) != NULL && strstr(line, want)[strlen(want)] == ' ';
            break;
        }
    }
    fclose(f);
    return found;
}

static int locked(void *addr) {
    /* VmFlags of the mapping that holds addr: "lo" when locked. */
    char line[512];
    unsigned long a = (unsigned long)addr, lo, hi;
    int in = 0, found = 0;
    FILE *f = fopen("/proc/self/smaps", "r");
    while (f && fgets(line, sizeof line, f)) {
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && strchr(line, ' ')) in = lo <= a && a < hi;
        if (in && !strncmp(line, "VmFlags:", 8)) found = strstr(line, " lo") != NULL;
    }
    if (f) fclose(f);
    return found;
}

static sigjmp_buf touched;
static void on_segv(int sig) { (void)sig; siglongjmp(touched, 1); }

/* Whether reading addr faults (SIGSEGV): a guard page's does. */
static int faults(volatile char *addr) {
    struct sigaction sa = {0}, old;
    sa.sa_handler = on_segv;
    sigaction(SIGSEGV, &sa, &old);
    int got = sigsetjmp(touched, 1) ? 1 : ((void)*addr, 0);
    sigaction(SIGSEGV, &old, NULL);
    return got;
}

static int oom_adj(void) {
    int v = -9999;
    FILE *f = fopen("/proc/self/oom_score_adj", "r");
    if (f) { if (fscanf(f, "%d", &v) != 1) v = -9999; fclose(f); }
    return v;
}

static unsigned dump_filter(void) {
    unsigned v = 0;
    FILE *f = fopen("/proc/self/coredump_filter", "r");
    if (f) { if (fscanf(f, "%x", &v) != 1) v = 0; fclose(f); }
    return v;
}

int main(int argc, char **argv) {
    init(argc, argv);
    FILE *out = open_output();
    char *a = mmap(NULL, 8 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *b = mmap(NULL, 8 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *nr = mmap(NULL, 8 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    memset(a, 'a', 8 * 4096);
    nr[4096] = 'n';
    int noreserve = vmflag(nr, "nr");      /* not under vm.overcommit_memory=2, which ignores it */
    char *rnd = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (rnd == MAP_FAILED || madvise(rnd, 4 * 4096, MADV_RANDOM)) return 3;
    rnd[0] = 'r';
    char *sealed = mmap(NULL, 2 * 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int seals = sealed != MAP_FAILED && syscall(462, sealed, 2 * 4096, 0) == 0;    /* mseal */
    char *dp = mmap(NULL, 2 * 4096, PROT_READ | PROT_WRITE, 0x08 /* MAP_DROPPABLE */ | MAP_ANONYMOUS, -1, 0);
    int droppable = dp != MAP_FAILED;
    if (droppable) dp[0] = 'd';
    char path[4096];
    snprintf(path, sizeof path, "%s/shared.bin", outdir);
    int sfd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (sfd < 0 || ftruncate(sfd, 4096)) return 3;
    char *ro = mmap(NULL, 4096, PROT_READ, MAP_SHARED, sfd, 0);
    close(sfd);
    if (ro == MAP_FAILED) return 3;
    /* Guard pages: the 2nd and 5th-6th of 8 (where the kernel has them: Linux 6.13), in a
     * mapping made before mlockall(MCL_FUTURE) (a locked mapping takes none). */
    char *g = mmap(NULL, 8 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g == MAP_FAILED) return 3;
    memset(g, 'g', 8 * 4096);
    int guards = madvise(g + 4096, 4096, 102 /* MADV_GUARD_INSTALL */) == 0 &&
                 madvise(g + 4 * 4096, 2 * 4096, 102) == 0;
    if (mlock(a, 8 * 4096)) { perror("mlock"); return 3; }
    if (mlock2(b, 8 * 4096, MLOCK_ONFAULT)) { perror("mlock2"); return 3; }
    b[0] = 'b';
    if (mlockall(MCL_FUTURE)) { perror("mlockall"); return 3; }
    if (prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)) return 3;
    FILE *f = fopen("/proc/self/oom_score_adj", "w");
    if (!f || fprintf(f, "300\n") < 0 || fclose(f)) return 3;
    f = fopen("/proc/self/coredump_filter", "w");            /* no shared memory, ELF headers */
    if (!f || fprintf(f, "0x11\n") < 0 || fclose(f) || dump_filter() != 0x11) return 3;
    if (syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0)) { perror("membarrier"); return 3; }
    /* PR_SET_SPECULATION_CTRL (53), PR_SPEC_STORE_BYPASS (0), PR_SPEC_DISABLE (4). */
    int ssbd = prctl(53, 0, 4, 0, 0) == 0;
    /* Audit's login uid: only where the kernel has audit, and we may set it (root). */
    int audit = 0;
    f = fopen("/proc/self/loginuid", "w");
    if (f) audit = fprintf(f, "4242") > 0 && fclose(f) == 0 && loginuid() == 4242;
    ready();
    linger(50);
    char why[256] = "";
    if (!locked(a) || a[4096 * 7] != 'a') strcat(why, "mlock; ");
    if (!locked(b) || b[0] != 'b') strcat(why, "mlock2 on fault; ");
    char *c = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!locked(c)) strcat(why, "mlockall(MCL_FUTURE); ");
    if (prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) != 1) strcat(why, "THP disable; ");
    if (oom_adj() != 300) strcat(why, "oom_score_adj; ");
    if (dump_filter() != 0x11) strcat(why, "coredump_filter; ");
    if (syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0)) strcat(why, "membarrier registration; ");
    if (audit && loginuid() != 4242) strcat(why, "loginuid; ");
    if ((noreserve && !vmflag(nr, "nr")) || nr[4096] != 'n') strcat(why, "MAP_NORESERVE; ");
    if (!vmflag(rnd, "rr") || rnd[0] != 'r') strcat(why, "MADV_RANDOM; ");
    if (droppable && !vmflag(dp, "dp")) strcat(why, "MAP_DROPPABLE; ");
    if (seals && (!vmflag(sealed, "sl") || munmap(sealed, 4096) == 0 || errno != EPERM)) strcat(why, "mseal; ");
    if (guards && (!faults(g + 4096) || !faults(g + 4 * 4096) || !faults(g + 5 * 4096) || faults(g + 3 * 4096)
                   || g[0] != 'g' || g[2 * 4096] != 'g' || g[6 * 4096] != 'g' || g[7 * 4096 + 100] != 'g'))
        strcat(why, "guard pages; ");
    if (mprotect(ro, 4096, PROT_READ | PROT_WRITE)) strcat(why, "shared mapping may not be made writable; ");
    else ro[0] = 'w';
    /* PR_GET_SPECULATION_CTRL (52): PR_SPEC_PRCTL (1) | PR_SPEC_DISABLE (4) */
    if (ssbd && (prctl(52, 0, 0, 0, 0) & 0xf) != (1 | 4)) strcat(why, "speculative store bypass control; ");
    fprintf(out, "guard pages: %s\n", guards ? "installed" : "not on this kernel");
    fprintf(out, "attributes checked: %s\n", why[0] ? why : "all good");
    verdict(!why[0], "%s", why);
    return 0;
}
