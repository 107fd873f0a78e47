/* Changes its own layout all the time while tracked: mmap, munmap (whole and partial),
 * mremap (grow in place or moving, shrink, move), mprotect (read-only, none, and a
 * write-then-read-only flip within one step, as JITs do), MADV_DONTNEED, MAP_FIXED over part
 * of a mapping, brk up and down, a private file mapping written copy-on-write; and writes.
 * Usage: layout_churn OUTDIR SEED STEPS_PER_SECOND. Runs until killed. */
#include "ckpt_common.h"
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>

#define PAGE 4096UL
#define SLOTS 24

struct slot { char *addr; unsigned long pages; int prot; };
static struct slot slots[SLOTS];
static uint64_t rng_state;
static uint64_t seq;
static uint64_t rng(void) {
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}
static unsigned long pick(unsigned long n) { return n ? rng() % n : 0; }

static volatile int last_op = -1;
static struct slot *volatile last_slot;

static void on_fault(int sig, siginfo_t *si, void *ctx) {   /* say what went wrong, then die */
    (void)ctx;
    char msg[256];
    int n = snprintf(msg, sizeof msg, "signal %d at %p during step %d on slot %p+%lu pages prot %d\n", sig,
                     si->si_addr, last_op, last_slot ? (void *)last_slot->addr : NULL,
                     last_slot ? last_slot->pages : 0, last_slot ? last_slot->prot : -1);
    if (write(2, msg, n) < 0) {}
    signal(sig, SIG_DFL);
    raise(sig);
}

static void scribble(char *addr, unsigned long pages) {
    for (unsigned long i = 0; i < pages; i++)
        ((uint64_t *)(addr + i * PAGE))[pick(PAGE / 8)] = ++seq;
}

static void fresh(struct slot *s) {
    s->pages = 1 + pick(48);
    s->addr = mmap(NULL, s->pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (s->addr == MAP_FAILED) { perror("mmap"); exit(3); }
    s->prot = PROT_READ | PROT_WRITE;
    scribble(s->addr, s->pages);
}

int main(int argc, char **argv) {
    init(argc, argv);
    if (argc < 4) { fprintf(stderr, "usage: %s OUTDIR SEED STEPS\n", argv[0]); return 2; }
    rng_state = strtoull(argv[2], NULL, 0) | 1;
    double steps = atof(argv[3]);
    char path[4096];
    snprintf(path, sizeof path, "%s/datafile", outdir);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    for (int i = 0; i < 64; i++) { char page[PAGE]; memset(page, 'a' + i % 26, PAGE); if (write(fd, page, PAGE) != (ssize_t)PAGE) return 3; }
    char *file = mmap(NULL, 64 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (file == MAP_FAILED) { perror("mmap file"); return 3; }
    for (int i = 0; i < 64; i += 2) (void)*(volatile char *)(file + i * PAGE);   /* read: file pages */
    for (int i = 0; i < SLOTS; i++) fresh(&slots[i]);
    struct sigaction sa = { .sa_sigaction = on_fault, .sa_flags = SA_SIGINFO };
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGBUS, &sa, NULL);
    ready();
    char *brk0 = sbrk(0);              /* nothing calls malloc from here on */
    unsigned long brk_pages = 0;
    double owed = 0;
    for (;;) {
        sleep_ms(1);
        owed += steps / 1000.0;
        while (owed >= 1.0) {
            owed -= 1.0;
            struct slot *s = &slots[pick(SLOTS)];
            unsigned long n = s->pages, k;
            int op = (int)pick(14);
            last_op = op;
            last_slot = s;
            switch (op) {
            case 0:                       /* unmap and map anew */
                munmap(s->addr, n * PAGE);
                fresh(s);
                break;
            case 1:                       /* grow (in place or moving) */
                k = n + 1 + pick(16);
                { char *a = mremap(s->addr, n * PAGE, k * PAGE, MREMAP_MAYMOVE);
                  if (a != MAP_FAILED) { s->addr = a; s->pages = k; if (s->prot & PROT_WRITE) scribble(a + n * PAGE, k - n); } }
                break;
            case 2:                       /* shrink */
                if (n > 1) { k = 1 + pick(n - 1); if (mremap(s->addr, n * PAGE, k * PAGE, 0) != MAP_FAILED) s->pages = k; }
                break;
            case 3:                       /* move elsewhere (one page: a move of several mappings
                                             at once can stop halfway on Linux >= 6.17) */
                if (n > 1) { munmap(s->addr + PAGE, (n - 1) * PAGE); s->pages = n = 1; }
                { char *hole = mmap(NULL, PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                  char *a = mremap(s->addr, PAGE, PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, hole);
                  if (a != MAP_FAILED) s->addr = a; else munmap(hole, PAGE); }
                break;
            case 4:                       /* read-only */
                mprotect(s->addr, n * PAGE, PROT_READ); s->prot = PROT_READ;
                break;
            case 5:                       /* no access (contents kept) */
                mprotect(s->addr, n * PAGE, PROT_NONE); s->prot = PROT_NONE;
                break;
            case 6:                       /* writable again, and written */
                mprotect(s->addr, n * PAGE, PROT_READ | PROT_WRITE); s->prot = PROT_READ | PROT_WRITE;
                scribble(s->addr, n);
                break;
            case 7:                       /* W^X flip in one step: read-only before and after */
                mprotect(s->addr, n * PAGE, PROT_READ | PROT_WRITE);
                scribble(s->addr + pick(n) * PAGE, 1);
                mprotect(s->addr, n * PAGE, PROT_READ); s->prot = PROT_READ;
                break;
            case 8:                       /* drop some pages */
                k = pick(n);
                madvise(s->addr + k * PAGE, (1 + pick(n - k)) * PAGE, MADV_DONTNEED);
                break;
            case 9:                       /* a new mapping over part of this one */
                k = pick(n);
                if (mmap(s->addr + k * PAGE, PAGE, s->prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED
                    && (s->prot & PROT_WRITE))
                    scribble(s->addr + k * PAGE, 1);
                break;
            case 10:                      /* unmap the tail */
                if (n > 1) { k = 1 + pick(n - 1); munmap(s->addr + k * PAGE, (n - k) * PAGE); s->pages = k; }
                break;
            case 11:                      /* brk up (written) or down */
                if (brk_pages < 64 && pick(2)) { k = 1 + pick(8); if (sbrk(k * PAGE) != (void *)-1) { scribble(brk0 + brk_pages * PAGE, k); brk_pages += k; } }
                else if (brk_pages) { k = 1 + pick(brk_pages); if (sbrk(-(long)(k * PAGE)) != (void *)-1) brk_pages -= k; }
                break;
            case 12:                      /* copy-on-write into the file mapping, or drop a copy */
                k = pick(64);
                if (pick(3)) ((uint64_t *)(file + k * PAGE))[pick(PAGE / 8)] = ++seq;
                else madvise(file + k * PAGE, PAGE, MADV_DONTNEED);
                break;
            default:                      /* plain writes */
                k = pick(n);
                if (s->prot & PROT_WRITE) scribble(s->addr + k * PAGE, 1 + pick(n - k < 4 ? n - k : 4));
                break;
            }
        }
    }
}
