/* cache: a memcached-like in-memory cache with skewed (Zipf-like) keys.
 *
 *   cache [-m SIZE_MiB] [-o OPS/s] [-w SET_PERCENT] [-a] [-f READYFILE]
 *
 * SIZE (default 64) MiB of 256-byte items in a table; OPS lookups per second (default 20000), of
 * which SET_PERCENT (default 10) overwrite the item. Keys are skewed: a few items get most of the
 * traffic. With -a every hit also updates the item's last-access time, as an LRU cache does, so
 * reads dirty pages too: watch the writable working set grow with -a (a lesson of real caches).
 * Readiness and checksum as examples/dirtier.c.
 * Build: gcc -O2 -o cache examples/cache.c -lm */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

struct item { uint64_t key, atime, hits; unsigned char value[232]; };

static volatile sig_atomic_t stop;
static void on_signal(int s) { (void)s; stop = 1; }
static uint64_t rng = 0x2545F4914F6CDD1DULL;
static uint64_t next(void) { rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27; return rng * 2685821657736338717ULL; }

int main(int argc, char **argv) {
    size_t mib = 64;
    double ops = 20000, sets = 10;
    int lru = 0, c;
    const char *ready = NULL;
    while ((c = getopt(argc, argv, "m:o:w:af:")) != -1) {
        switch (c) {
        case 'm': mib = strtoul(optarg, NULL, 0); break;
        case 'o': ops = atof(optarg); break;
        case 'w': sets = atof(optarg); break;
        case 'a': lru = 1; break;
        case 'f': ready = optarg; break;
        default: fprintf(stderr, "usage: cache [-m MiB] [-o OPS/s] [-w SET%%] [-a] [-f READYFILE]\n"); return 2;
        }
    }
    size_t n = (mib << 20) / sizeof(struct item);
    if (n == 0) { fprintf(stderr, "cache: size too small\n"); return 2; }
    struct item *tab = mmap(NULL, n * sizeof *tab, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (tab == MAP_FAILED) { perror("mmap"); return 1; }
    for (size_t i = 0; i < n; i++) {
        tab[i].key = i;
        for (size_t k = 0; k < sizeof tab[i].value; k += 8) { uint64_t v = next(); memcpy(tab[i].value + k, &v, 8); }
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    printf("ready pid=%d items=%zu\n", getpid(), n);
    fflush(stdout);
    if (ready) { FILE *f = fopen(ready, "w"); if (f) { fprintf(f, "%d\n", getpid()); fclose(f); } }
    double per_ms = ops / 1000, owed = 0;
    uint64_t now = 0, hits = 0;
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    while (!stop) {
        for (owed += per_ms; owed >= 1; owed -= 1) {
            /* u^4 skews toward low keys: about 1/16 of the items take half of the lookups */
            double u = (double)(next() >> 11) / 9007199254740992.0;
            size_t k = (size_t)(pow(u, 4.0) * (double)n) % n;
            struct item *it = &tab[(k * 2654435761ULL) % n];  /* hashed: hot items spread over pages */
            if ((double)(next() % 10000) < sets * 100) {
                uint64_t v = next();
                memcpy(it->value, &v, 8);
                it->atime = now;
            } else {
                hits++;
                if (lru) { it->atime = now; it->hits++; }
            }
        }
        now++;
        t.tv_nsec += 1000000;
        if (t.tv_nsec >= 1000000000L) { t.tv_sec++; t.tv_nsec -= 1000000000L; }
        while (!stop && clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {}
    }
    uint64_t h = 1469598103934665603ULL;
    const unsigned char *b = (const unsigned char *)tab;
    for (size_t i = 0; i < n * sizeof *tab; i++) h = (h ^ b[i]) * 1099511628211ULL;
    printf("checksum %016llx hits %llu\n", (unsigned long long)h, (unsigned long long)hits);
    return 0;
}
