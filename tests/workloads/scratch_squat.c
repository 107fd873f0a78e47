/* A job that maps a page where kcr-migrate would put the scratch it borrows to read the state
 * of a frozen process (the middle of the largest gap of its last pre-copy layout).
 * Usage: scratch_squat OUTDIR
 * On OUTDIR/map (an address, in hex) it maps a page there (MAP_FIXED_NOREPLACE), fills it
 * with a pattern and writes OUTDIR/mapped ("mapped ADDR", or why not). Then, held
 * (WORKLOAD_HOLD), it checks the page and what its own maps show there: the page, with its
 * pattern, and nothing beside it. */
#include "ckpt_common.h"
#include <stdint.h>
#include <sys/mman.h>

#define PAGE 4096

/* The mappings of /proc/self/maps that overlap [lo, hi). */
static int mappings_near(uintptr_t lo, uintptr_t hi) {
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) return -1;
    char line[4096];
    int n = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long start, end;
        if (sscanf(line, "%lx-%lx", &start, &end) == 2 && start < hi && end > lo) n++;
    }
    fclose(f);
    return n;
}

int main(int argc, char **argv) {
    init(argc, argv);
    ready();
    char path[4096];
    snprintf(path, sizeof path, "%s/map", outdir);
    FILE *f = NULL;
    for (int i = 0; i < 600000 && !(f = fopen(path, "r")); i++) sleep_ms(1);
    unsigned long at = 0;
    if (!f || fscanf(f, "%lx", &at) != 1) { write_file("mapped", "no address\n"); return 1; }
    fclose(f);
    unsigned char *page = mmap((void *)at, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                               -1, 0);
    char said[256];
    if (page != (void *)at) {
        snprintf(said, sizeof said, "not mapped: %s\n", page == MAP_FAILED ? strerror(errno) : "elsewhere");
        write_file("mapped", said);
        return 1;
    }
    for (int i = 0; i < PAGE; i++) page[i] = (unsigned char)(i * 7 + 3);
    snprintf(said, sizeof said, "mapped %lx\n", at);
    write_file("mapped", said);
    hold_on();
    int bad = 0;
    for (int i = 0; i < PAGE; i++) bad += page[i] != (unsigned char)(i * 7 + 3);
    /* 64 KiB each side: a scratch left behind or merged in shows here */
    int near = mappings_near(at - 16 * PAGE, at + 17 * PAGE);
    FILE *out = open_output();
    fprintf(out, "page: %d bad bytes; mappings near it: %d\n", bad, near);
    fclose(out);
    verdict(bad == 0 && near == 1, "%d bad bytes, %d mappings near the page", bad, near);
    return 0;
}
