/* A target that keeps writing its memory while it runs: the workload of live migration.
 *
 * usage: dirtier NPAGES PERMILLE [cpu]
 * Maps NPAGES anonymous pages and fills each from (page, version 0). Then, every 100 ms, rewrites
 * PERMILLE/1000 of its pages (chosen by a fixed PRNG): the version of the page goes up and the page
 * is filled from (page, version). Between ticks it waits in poll() on stdin for commands, so it is
 * busy and idle by turns, like a real program. Any moment's memory is self-describing, which lets a
 * restored copy check itself: every page equals fill(page, version[page]), except the one page being
 * written when it was frozen (`cur`), which is either.
 *
 * With `cpu`, the 100 ms are of the process's own CPU time and it spins between ticks: a CPU-bound
 * writer, whose dirty rate falls when its CPU is throttled (--auto-converge). Without it the ticks
 * are wall-clock ones and a late tick is caught up: throttling the CPU of such a writer changes
 * nothing until it leaves no time for the writes themselves.
 *
 * Commands (one line each, one line of answer):
 *   check   -> "ok WRITES" (pages rewritten so far) or "bad PAGE"
 *   stop    -> stop writing -> "stopped WRITES"
 *   go      -> write again -> "going"
 *   info    -> "pid N region ADDR npages N"
 *   exit N  -> exit(N)
 */
#define _GNU_SOURCE
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "lineio.h"

#define PG 4096
static unsigned char *region;
static uint32_t *version;
static size_t npages;
static volatile long cur = -1;
static uint64_t rng = 0x2545F4914F6CDD1Dull, writes;

static uint64_t next_rand(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

static uint64_t mix(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void fill(unsigned char *p, size_t page, uint32_t ver) {
    uint64_t seed = mix(((uint64_t)page << 32) ^ ver);
    for (int i = 0; i < PG; i += 8) { uint64_t w = seed + (uint64_t)i * 0x9E3779B97F4A7C15ull; memcpy(p + i, &w, 8); }
}

static int page_ok(size_t i) {
    unsigned char buf[PG];
    fill(buf, i, version[i]);
    return memcmp(buf, region + i * PG, PG) == 0;
}

static void reply(const char *s) {
    size_t n = strlen(s);
    if (write(1, s, n) != (ssize_t)n) _exit(3);
}

static int cpu_clock;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(cpu_clock ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    npages = argc > 1 ? strtoul(argv[1], NULL, 0) : 256;
    size_t per_tick = argc > 2 ? npages * strtoul(argv[2], NULL, 0) / 1000 : 0;
    cpu_clock = argc > 3 && !strcmp(argv[3], "cpu");
    region = mmap(NULL, npages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    version = mmap(NULL, npages * sizeof *version, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED || version == MAP_FAILED) return 1;
    for (size_t i = 0; i < npages; i++) fill(region + i * PG, i, 0);
    char line[256];
    snprintf(line, sizeof line, "ready %d\n", getpid());
    reply(line);
    int writing = 1;
    double next = now_ms();
    for (;;) {
        if (writing && now_ms() >= next) {
            for (size_t k = 0; k < per_tick; k++) {
                size_t i = next_rand() % npages;
                cur = (long)i;
                version[i]++;
                fill(region + i * PG, i, version[i]);
                cur = -1;
                writes++;
            }
            next += 100;
        }
        int wait = writing ? (cpu_clock ? 0 : (int)(next - now_ms())) : -1;
        struct pollfd pfd = {0, POLLIN, 0};
        if (poll(&pfd, 1, wait < 0 && writing ? 0 : wait) <= 0) continue;
        if (!read_command(line, sizeof line)) return 0;
        char out[128];
        if (!strcmp(line, "check\n")) {
            long bad = -1;
            for (size_t i = 0; i < npages && bad < 0; i++)
                if ((long)i != cur && !page_ok(i)) bad = (long)i;
            if (bad >= 0) snprintf(out, sizeof out, "bad %ld\n", bad);
            else snprintf(out, sizeof out, "ok %llu\n", (unsigned long long)writes);
        } else if (!strcmp(line, "stop\n")) {
            writing = 0;
            snprintf(out, sizeof out, "stopped %llu\n", (unsigned long long)writes);
        } else if (!strcmp(line, "go\n")) {
            writing = 1;
            next = now_ms();
            snprintf(out, sizeof out, "going\n");
        } else if (!strcmp(line, "info\n")) {
            snprintf(out, sizeof out, "pid %d region %p npages %zu\n", getpid(), (void *)region, npages);
        } else if (!strncmp(line, "exit ", 5)) {
            exit(atoi(line + 5));
        } else {
            snprintf(out, sizeof out, "unknown\n");
        }
        reply(out);
    }
}
