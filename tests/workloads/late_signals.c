/* Signals that arrive during a move: SIGUSR1, SIGUSR2 and SIGRTMIN+1 are caught with their
 * siginfo and listed in OUTDIR/output, one line each ("sig N code C value V", value only for
 * sigqueue), in the order handled; SIGTERM ends the program. Meanwhile it keeps rewriting
 * MIB MiB of memory, so that a move has pages to copy. Usage: late_signals OUTDIR MIB */
#include "ckpt_common.h"
#include <signal.h>

#define MAX_SEEN 64
static volatile sig_atomic_t nseen, term;
static int seen_sig[MAX_SEEN], seen_code[MAX_SEEN], seen_value[MAX_SEEN];

static void on_signal(int sig, siginfo_t *info, void *ctx) {
    (void)ctx;
    if (nseen < MAX_SEEN) {
        seen_sig[nseen] = sig;
        seen_code[nseen] = info->si_code;
        seen_value[nseen] = info->si_code == SI_QUEUE ? info->si_value.sival_int : 0;
        nseen++;
    }
}

static void on_term(int sig) { (void)sig; term = 1; }

int main(int argc, char **argv) {
    init(argc, argv);
    size_t size = (size_t)(argc > 2 ? atoi(argv[2]) : 16) << 20;
    char *mem = malloc(size);
    memset(mem, 1, size);
    FILE *out = open_output();
    struct sigaction sa = {0};
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    sigaction(SIGRTMIN + 1, &sa, NULL);
    signal(SIGTERM, on_term);
    ready();
    int printed = 0;
    unsigned long round = 0;
    while (!term) {
        for (size_t i = 0; i < size; i += 4096 * 16) mem[i + (round % 16) * 4096] = (char)round;
        round++;
        sleep_ms(5);
        while (printed < nseen) {
            fprintf(out, "sig %d code %d value %d\n", seen_sig[printed], seen_code[printed], seen_value[printed]);
            printed++;
        }
    }
    while (printed < nseen) {
        fprintf(out, "sig %d code %d value %d\n", seen_sig[printed], seen_code[printed], seen_value[printed]);
        printed++;
    }
    verdict(1, "");
    return 0;
}
