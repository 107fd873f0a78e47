/* Single-threaded: computes over a 64 MiB array, appending progress lines to a file. */
#include "ckpt_common.h"
#include <stdint.h>

#define N (64u << 20) / sizeof(uint64_t)

int main(int argc, char **argv) {
    init(argc, argv);
    int iters = argc > 2 ? atoi(argv[2]) : 40;
    uint64_t *a = malloc(N * sizeof *a);
    if (!a) return 3;
    for (size_t i = 0; i < N; i++) a[i] = i * 2654435761u;
    FILE *out = open_output();
    uint64_t sum = 0;
    for (int it = 0; it < iters; it++) {
        for (size_t i = (it * 4099) % 64; i < N; i += 64) {   /* touch a page-spread subset */
            a[i] = a[i] * 6364136223846793005ull + 1442695040888963407ull + it;
            sum ^= a[i] >> 7;
        }
        fprintf(out, "iter %d sum %016llx\n", it, (unsigned long long)sum);
        if (it == 3) ready();
        sleep_ms(25);
    }
    hold_on();                      /* WORKLOAD_HOLD: until the test lets it go, then the final sum */
    uint64_t check = 0;
    for (size_t i = 0; i < N; i++) check += a[i] ^ (check << 1);
    fprintf(out, "final %016llx\n", (unsigned long long)check);
    verdict(1, "");
    return 0;
}
