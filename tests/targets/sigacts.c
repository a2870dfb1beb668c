/* A target with a different action for every signal, and deterministic work on a memory region:
 * what a migration's final step must give back (every signal's handler, flags and mask, in one run of
 * injected code; the memory; the registers inside read()).
 *
 * usage: sigacts NPAGES
 * Prints "ready PID" and answers one line per command on stdin:
 *   info     -> "pid N region ADDR npages N"
 *   round    -> one more round of writes over the region -> "round R sum HEX" (FNV-1a 64 of the region)
 *   acts     -> "acts HEX": FNV-1a 64 over every signal's action as sigaction() reports it (handler,
 *               flags, mask), each signal 1..64 but SIGKILL/SIGSTOP and glibc's own 32 and 33
 *   flags    -> "flags HEX": the same over the flags and masks only (the handlers' addresses differ
 *               between two runs of a PIE binary)
 *   raise S  -> raise(S) -> "caught S N" (N: the handler's calls so far, all signals) or "ignored S"
 * Between commands it blocks in read(0). Two runs given the same commands print the same lines,
 * "acts" excepted.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "lineio.h"

#define PG 4096
static unsigned char *region;
static size_t npages;
static unsigned long rounds_done;
static volatile sig_atomic_t caught;

static void on_signal(int sig) { (void)sig; caught++; }
static void on_info(int sig, siginfo_t *si, void *uc) { (void)sig; (void)si; (void)uc; caught++; }

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) { h ^= b[i]; h *= 0x100000001b3ull; }
    return h;
}

static int skip(int sig) { return sig == SIGKILL || sig == SIGSTOP || sig == 32 || sig == 33; }

static void setup(void) {
    for (int sig = 1; sig <= 64; sig++) {
        if (skip(sig)) continue;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sigemptyset(&sa.sa_mask);
        /* a mask of its own for each: two neighbours, and every third one SIGUSR1 too */
        sigaddset(&sa.sa_mask, sig % 64 + 1);
        if (!skip((sig + 1) % 64 + 1)) sigaddset(&sa.sa_mask, (sig + 1) % 64 + 1);
        if (sig % 3 == 0) sigaddset(&sa.sa_mask, SIGUSR1);
        switch (sig % 5) {
        case 0: sa.sa_handler = SIG_IGN; break;
        case 1: sa.sa_handler = on_signal; sa.sa_flags = SA_RESTART; break;
        case 2: sa.sa_sigaction = on_info; sa.sa_flags = SA_SIGINFO | SA_RESTART; break;
        case 3: sa.sa_handler = on_signal; sa.sa_flags = SA_RESTART | SA_NODEFER; break;
        default: continue; /* left at SIG_DFL */
        }
        if (sig == SIGINT || sig == SIGTERM || sig == SIGHUP || sig == SIGPIPE) sa.sa_handler = SIG_IGN;
        if (sigaction(sig, &sa, NULL)) { perror("sigaction"); exit(1); }
    }
}

static uint64_t acts(int with_handlers) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (int sig = 1; sig <= 64; sig++) {
        if (skip(sig)) continue;
        struct sigaction sa;
        if (sigaction(sig, NULL, &sa)) { perror("sigaction"); exit(1); }
        int special = sa.sa_handler == SIG_IGN || sa.sa_handler == SIG_DFL;
        if (with_handlers || special) h = fnv(h, &sa.sa_handler, sizeof sa.sa_handler);
        h = fnv(h, &sa.sa_flags, sizeof sa.sa_flags);
        h = fnv(h, &sa.sa_mask, 8);
    }
    return h;
}

static uint64_t region_sum(void) { return fnv(0xcbf29ce484222325ull, region, npages * PG); }

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    npages = argc > 1 ? strtoul(argv[1], NULL, 0) : 64;
    region = mmap(NULL, npages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) return 1;
    for (size_t i = 0; i < npages * PG; i++) region[i] = (unsigned char)(i * 7 + 3);
    setup();
    printf("ready %d\n", getpid());
    char line[64];
    for (;;) {
        if (!read_command(line, sizeof line)) return 0;
        if (!strncmp(line, "info", 4)) {
            printf("pid %d region %p npages %zu\n", getpid(), (void *)region, npages);
        } else if (!strncmp(line, "round", 5)) {
            rounds_done++;
            for (size_t p = rounds_done % 3; p < npages; p += 3)
                for (size_t i = 0; i < PG; i += 64) region[p * PG + i] += (unsigned char)(rounds_done + i);
            printf("round %lu sum %016llx\n", rounds_done, (unsigned long long)region_sum());
        } else if (!strncmp(line, "acts", 4)) {
            printf("acts %016llx\n", (unsigned long long)acts(1));
        } else if (!strncmp(line, "flags", 5)) {
            printf("flags %016llx\n", (unsigned long long)acts(0));
        } else if (!strncmp(line, "raise ", 6)) {
            int sig = atoi(line + 6);
            struct sigaction sa;
            sigaction(sig, NULL, &sa);
            raise(sig);
            if (sa.sa_handler == SIG_IGN) printf("ignored %d\n", sig);
            else printf("caught %d %d\n", sig, (int)caught);
        } else {
            puts("unknown");
        }
    }
}
