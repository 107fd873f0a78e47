/* Changes its layout on command, at a moment the test chooses (e.g. between a tracker's read of
 * /proc/PID/maps and its page-table scan). Each byte written to the FIFO OUTDIR/cmd runs one
 * step, after which OUTDIR/ackN appears (N counts steps from 1).
 *   's'  writes pages 1 and 6 of the 8-page "split" mapping, then maps a new page over its
 *        page 4 (MAP_FIXED) and writes it: one mapping becomes three, the middle one new.
 *   'f'  maps OUTDIR/datafile (private, writable) over the 4-page anonymous "swap" mapping
 *        (MAP_FIXED) and writes its page 0 (copy-on-write): same range, another backing.
 *   'm'  moves page 0 of the 4-page "pair" mapping away (mremap onto a reserved page elsewhere);
 *   'b'  moves it back next to pages 1-3, then writes page 2: mremap merges the page into its old
 *        neighbour, and (without UFFD_FEATURE_EVENT_REMAP) unregisters the whole merged mapping
 *        from userfaultfd, pages 1-3 included, whose page tables still carry uffd-wp state.
 *   'w'  writes page 2 of "split".
 *   'r'  maps OUTDIR/datafile over "swap" again, as 'f' did: the page 'f' wrote is the file's again.
 *   'z'  zaps page 3 of "split" (MADV_DONTNEED): it reads as zeros from then on.
 *   'c'  writes page 0 of "swap" (after 'f': a new copy of the file's page);
 *   'd'  drops page 0 of "swap" (MADV_DONTNEED; after 'f': it reads as the file's page again).
 *   'n'  maps the 4-page "grow" mapping (where 12 pages are free) and writes it;
 *   'g'  grows it in place to 8 pages (mremap without MREMAP_MAYMOVE) and writes the new ones;
 *   'G'  grows it in place to 12 pages the same way: it fails if "grow" is not one mapping.
 * Usage: layout_race OUTDIR. OUTDIR/layout lists "NAME ADDR PAGES" per mapping. */
#include "ckpt_common.h"
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define PAGE 4096UL

static uint64_t seq;

static void fill(char *page) {            /* every word distinct and non-zero */
    for (unsigned long i = 0; i < PAGE / 8; i++)
        ((uint64_t *)page)[i] = ++seq;
}

static void raw_file(const char *name, const char *text) {   /* no stdio: no malloc */
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", outdir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || write(fd, text, strlen(text)) < 0) exit(3);
    close(fd);
}

int main(int argc, char **argv) {
    init(argc, argv);
    char path[4096];
    snprintf(path, sizeof path, "%s/datafile", outdir);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    for (int i = 0; i < 4; i++) {
        char page[PAGE];
        memset(page, 'a' + i, PAGE);
        if (write(fd, page, PAGE) != (ssize_t)PAGE) return 3;
    }
    char *split = mmap(NULL, 8 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *swap = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *pair = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *away = mmap(NULL, 3 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (split == MAP_FAILED || swap == MAP_FAILED || pair == MAP_FAILED || away == MAP_FAILED) { perror("mmap"); return 3; }
    away += PAGE;                      /* the middle page: mapped apart from anything else */
    /* Room for "grow": 12 free pages between two guard pages, so that nothing merges into it. */
    char *room = mmap(NULL, 14 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (room == MAP_FAILED || munmap(room + PAGE, 12 * PAGE)) { perror("mmap room"); return 3; }
    char *grow = room + PAGE;
    unsigned long grow_pages = 0;
    for (int i = 0; i < 8; i++) fill(split + i * PAGE);
    for (int i = 0; i < 4; i++) fill(swap + i * PAGE);
    for (int i = 0; i < 4; i++) fill(pair + i * PAGE);
    char text[256];
    snprintf(text, sizeof text, "split %lx 8\nswap %lx 4\npair %lx 4\n", (unsigned long)split, (unsigned long)swap,
             (unsigned long)pair);
    raw_file("layout", text);
    snprintf(path, sizeof path, "%s/cmd", outdir);
    if (mkfifo(path, 0600) != 0) { perror("mkfifo"); return 3; }
    int cmd = open(path, O_RDWR | O_CLOEXEC);
    if (cmd < 0) { perror(path); return 3; }
    ready();
    for (int n = 1;; n++) {
        char c;
        ssize_t got = read(cmd, &c, 1);
        if (got < 0 && errno == EINTR) { n--; continue; }
        if (got != 1) return 3;
        switch (c) {
        case 's':
            fill(split + 1 * PAGE);
            fill(split + 6 * PAGE);
            if (mmap(split + 4 * PAGE, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
                == MAP_FAILED) return 3;
            fill(split + 4 * PAGE);
            break;
        case 'f':
            if (mmap(swap, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, 0) == MAP_FAILED) return 3;
            fill(swap);
            break;
        case 'm':
            if (mremap(pair, PAGE, PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, away) == MAP_FAILED) return 3;
            break;
        case 'b':
            if (mremap(away, PAGE, PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, pair) == MAP_FAILED) return 3;
            fill(pair + 2 * PAGE);
            break;
        case 'w':
            fill(split + 2 * PAGE);
            break;
        case 'r':
            if (mmap(swap, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, 0) == MAP_FAILED) return 3;
            break;
        case 'z':
            if (madvise(split + 3 * PAGE, PAGE, MADV_DONTNEED)) return 3;
            break;
        case 'c':
            fill(swap);
            break;
        case 'd':
            if (madvise(swap, PAGE, MADV_DONTNEED)) return 3;
            break;
        case 'n':
            if (mmap(grow, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
                != grow) return 3;
            for (grow_pages = 0; grow_pages < 4; grow_pages++) fill(grow + grow_pages * PAGE);
            break;
        case 'g':
        case 'G':
            if (mremap(grow, grow_pages * PAGE, (grow_pages + 4) * PAGE, 0) != grow) {
                fprintf(stderr, "growing \"grow\" in place from %lu pages: %s\n", grow_pages, strerror(errno));
                return 3;
            }
            for (unsigned long end = grow_pages + 4; grow_pages < end; grow_pages++) fill(grow + grow_pages * PAGE);
            break;
        default:
            return 3;
        }
        char name[32];
        snprintf(name, sizeof name, "ack%d", n);
        raw_file(name, "done\n");
    }
}
