/* NUMA memory policies, which came back as the default: each thread sets its own (set_mempolicy:
 * bind, preferred, interleave with MPOL_F_STATIC_NODES, local, none), and mappings get theirs by
 * mbind (bind, preferred with MPOL_F_RELATIVE_NODES, interleave, local, preferred-many and
 * weighted-interleave where the kernel has them, and the middle of one mapping only). All on
 * node 0, which every host has. After the move, each thread and each mapping checks its own. */
#include "ckpt_common.h"
#include <pthread.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#define MPOL_DEFAULT 0
#define MPOL_PREFERRED 1
#define MPOL_BIND 2
#define MPOL_INTERLEAVE 3
#define MPOL_LOCAL 4
#define MPOL_PREFERRED_MANY 5
#define MPOL_WEIGHTED_INTERLEAVE 6
#define MPOL_F_STATIC_NODES (1 << 15)
#define MPOL_F_RELATIVE_NODES (1 << 14)
#define MPOL_F_ADDR (1 << 1)
#define NODE_BITS 1024

struct policy { int mode; unsigned long nodes; };    /* mode | flags; nodes: node 0 is bit 0 */

static long get_policy(int *mode, unsigned long *nodes, void *addr) {
    unsigned long mask[NODE_BITS / 64] = {0};
    long r = syscall(SYS_get_mempolicy, mode, mask, NODE_BITS, addr, addr ? MPOL_F_ADDR : 0);
    *nodes = mask[0];
    return r;
}

static int set_policy(struct policy p) {
    unsigned long mask = p.nodes;
    return (int)syscall(SYS_set_mempolicy, p.mode, p.nodes ? &mask : NULL, p.nodes ? 65 : 0);
}

static void check(struct policy want, void *addr, const char *what, char *why, size_t size) {
    int mode = -1;
    unsigned long nodes = 0;
    if (get_policy(&mode, &nodes, addr))
        snprintf(why + strlen(why), size - strlen(why), "%s: get_mempolicy: %s; ", what, strerror(errno));
    else if (mode != want.mode || nodes != want.nodes)
        snprintf(why + strlen(why), size - strlen(why), "%s: mode %#x nodes %#lx, not %#x %#lx; ", what, mode, nodes,
                 want.mode, want.nodes);
}

static pthread_barrier_t set_up, go;
struct thread { struct policy p; char why[256]; };

static void *thread(void *arg) {
    struct thread *t = arg;
    if (t->p.mode != MPOL_DEFAULT && set_policy(t->p))
        snprintf(t->why, sizeof t->why, "set_mempolicy: %s; ", strerror(errno));
    pthread_barrier_wait(&set_up);
    pthread_barrier_wait(&go);
    if (!t->why[0]) check(t->p, NULL, "thread", t->why, sizeof t->why);
    return NULL;
}

int main(int argc, char **argv) {
    init(argc, argv);
    FILE *out = open_output();
    long page = sysconf(_SC_PAGESIZE);
    struct thread threads[] = {
        { { MPOL_BIND, 1 } },                              /* main */
        { { MPOL_PREFERRED, 1 } },
        { { MPOL_INTERLEAVE | MPOL_F_STATIC_NODES, 1 } },
        { { MPOL_LOCAL, 0 } },
        { { MPOL_DEFAULT, 0 } },
    };
    int n = sizeof threads / sizeof threads[0];
    struct { struct policy p; int pages, first, count; } maps[] = {
        { { MPOL_BIND, 1 }, 4, 0, 4 },
        { { MPOL_PREFERRED | MPOL_F_RELATIVE_NODES, 1 }, 4, 0, 4 },
        { { MPOL_INTERLEAVE, 1 }, 4, 0, 4 },
        { { MPOL_LOCAL, 0 }, 4, 0, 4 },
        { { MPOL_BIND | MPOL_F_STATIC_NODES, 1 }, 8, 2, 3 },      /* the middle only: splits the mapping */
        { { MPOL_PREFERRED_MANY, 1 }, 4, 0, 4 },                 /* Linux 5.15 */
        { { MPOL_WEIGHTED_INTERLEAVE, 1 }, 4, 0, 4 },            /* Linux 6.9 */
    };
    int m = sizeof maps / sizeof maps[0];
    char *areas[16];
    int kept[16];
    for (int i = 0; i < m; i++) {
        areas[i] = mmap(NULL, maps[i].pages * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (areas[i] == MAP_FAILED) { perror("mmap"); return 3; }
        unsigned long mask = maps[i].p.nodes;
        char *at = areas[i] + maps[i].first * page;
        kept[i] = syscall(SYS_mbind, at, maps[i].count * page, maps[i].p.mode, maps[i].p.nodes ? &mask : NULL,
                          maps[i].p.nodes ? 65 : 0, 0) == 0;
        if (!kept[i] && i < 5) { perror("mbind"); return 3; }    /* the newer modes may be missing */
        memset(areas[i], i + 1, maps[i].pages * page);
    }
    pthread_barrier_init(&set_up, NULL, n);
    pthread_barrier_init(&go, NULL, n);
    pthread_t ids[8];
    for (int i = 1; i < n; i++) pthread_create(&ids[i], NULL, thread, &threads[i]);
    if (set_policy(threads[0].p)) { perror("set_mempolicy"); return 3; }
    pthread_barrier_wait(&set_up);
    ready();
    linger(50);
    pthread_barrier_wait(&go);
    check(threads[0].p, NULL, "main thread", threads[0].why, sizeof threads[0].why);
    for (int i = 1; i < n; i++) pthread_join(ids[i], NULL);
    char why[2048] = "";
    for (int i = 0; i < n; i++)
        if (threads[i].why[0]) snprintf(why + strlen(why), sizeof why - strlen(why), "thread %d: %s", i, threads[i].why);
    struct policy none = { MPOL_DEFAULT, 0 };
    for (int i = 0; i < m; i++) {
        if (!kept[i]) continue;
        char what[64];
        snprintf(what, sizeof what, "mapping %d", i);
        check(maps[i].p, areas[i] + maps[i].first * page, what, why, sizeof why);
        if (maps[i].first) check(none, areas[i], what, why, sizeof why);          /* before the middle */
        if (maps[i].first + maps[i].count < maps[i].pages)
            check(none, areas[i] + (maps[i].pages - 1) * page, what, why, sizeof why);   /* after it */
        for (long b = 0; b < maps[i].pages * page; b += page)
            if (areas[i][b] != i + 1) { snprintf(why + strlen(why), sizeof why - strlen(why), "%s: contents; ", what); break; }
    }
    fprintf(out, "NUMA policies checked: %s\n", why[0] ? why : "all good");
    verdict(!why[0], "%s", why);
    return 0;
}
