/* dirtier: a memory load generator for studying pre-copy migration (cf. QEMU's mig_mon mm_dirty).
 *
 *   dirtier [-m SIZE] [-r MB/s] [-p seq|random|hot] [-H HOTSIZE] [-s SEED] [-f READYFILE] [-S] [-N]
 *
 * Fills SIZE bytes (default 64M) with random data (incompressible, so bytes on a wire are bytes of
 * memory), prints "ready pid=P base=0xADDR pages=N" on stdout (and creates READYFILE), then writes
 * 8 bytes into pages at RATE MB/s of pages (a page counts once per write) in 10 ms slices:
 *   seq     pages 0, 1, 2, ... wrapping around;
 *   random  uniformly over all pages;
 *   hot     uniformly over the first HOTSIZE bytes (default SIZE/8): a hot set.
 * -N: no transparent huge pages for the buffer (MADV_NOHUGEPAGE): soft-dirty marks a whole 2 MiB
 *     huge page for one write, which would inflate exact counts.
 * -S (step mode): no timed writes; commands on stdin, one per line:
 *   step N   write N pages by the pattern, answer "wrote I1 I2 ..." (page indices, in write order)
 *   sum      answer "checksum X"
 * On SIGINT/SIGTERM (or end of stdin in step mode) it prints "checksum X" and exits 0: the checksum
 * of all its memory, to compare a process before and after a migration.
 * Build: gcc -O2 -o dirtier examples/dirtier.c */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define SLICE_NS 10000000L

static volatile sig_atomic_t stop;
static uint64_t rng;

static uint64_t next(void) { /* xorshift64*: fast, seeded, the same sequence on every machine */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 2685821657736338717ULL;
}

static size_t parse_size(const char *s) {
    char *end;
    double v = strtod(s, &end);
    switch (*end) {
    case 'g': case 'G': v *= 1024; /* fall through */
    case 'm': case 'M': v *= 1024; /* fall through */
    case 'k': case 'K': v *= 1024; break;
    case 0: break;
    default: fprintf(stderr, "dirtier: bad size %s\n", s); exit(2);
    }
    return (size_t)v;
}

static uint64_t checksum(const uint64_t *w, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ w[i]) * 1099511628211ULL;
    return h;
}

static void on_signal(int s) { (void)s; stop = 1; }

int main(int argc, char **argv) {
    size_t size = 64UL << 20, hot = 0;
    double rate = 10.0;
    const char *pattern = "random", *ready = NULL;
    int step = 0, nohuge = 0, c;
    rng = 1;
    while ((c = getopt(argc, argv, "m:r:p:H:s:f:SN")) != -1) {
        switch (c) {
        case 'm': size = parse_size(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'p': pattern = optarg; break;
        case 'H': hot = parse_size(optarg); break;
        case 's': rng = strtoull(optarg, NULL, 0) * 0x9E3779B97F4A7C15ULL | 1; break;
        case 'f': ready = optarg; break;
        case 'S': step = 1; break;
        case 'N': nohuge = 1; break;
        default:
            fprintf(stderr, "usage: dirtier [-m SIZE] [-r MB/s] [-p seq|random|hot] [-H HOT] [-s SEED] "
                            "[-f READYFILE] [-S] [-N]\n");
            return 2;
        }
    }
    int pat = !strcmp(pattern, "seq") ? 0 : !strcmp(pattern, "random") ? 1 : !strcmp(pattern, "hot") ? 2 : -1;
    size_t pages = size / PAGE;
    if (pat < 0 || pages == 0) {
        fprintf(stderr, "dirtier: pattern is seq, random or hot; size at least 4K\n");
        return 2;
    }
    size_t hot_pages = hot ? hot / PAGE : pages / 8;
    if (hot_pages == 0) hot_pages = 1;
    if (hot_pages > pages) hot_pages = pages;
    uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("mmap"); return 1; }
    if (nohuge && madvise(mem, pages * PAGE, MADV_NOHUGEPAGE)) { perror("madvise"); return 1; }
    size_t words = pages * PAGE / 8;
    for (size_t i = 0; i < words; i++) mem[i] = next();
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    printf("ready pid=%d base=%p pages=%zu\n", getpid(), (void *)mem, pages);
    fflush(stdout);
    if (ready) {
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s.tmp", ready);
        FILE *f = fopen(tmp, "w");
        if (!f || fprintf(f, "%d\n", getpid()) < 0 || fclose(f) || rename(tmp, ready)) {
            perror(ready);
            return 1;
        }
    }
    size_t seq = 0;
#define PICK() (pat == 0 ? (seq++ % pages) : pat == 1 ? next() % pages : next() % hot_pages)
#define TOUCH(i) (mem[(i) * (PAGE / 8) + next() % (PAGE / 8)] = next())
    if (step) {
        char line[256];
        while (!stop && fgets(line, sizeof line, stdin)) {
            long n;
            if (sscanf(line, "step %ld", &n) == 1 && n >= 0) {
                printf("wrote");
                for (long k = 0; k < n; k++) {
                    size_t i = PICK();
                    TOUCH(i);
                    printf(" %zu", i);
                }
                printf("\n");
            } else if (!strncmp(line, "sum", 3)) {
                printf("checksum %016llx\n", (unsigned long long)checksum(mem, words));
            } else {
                printf("error unknown command\n");
            }
            fflush(stdout);
        }
    } else {
        double per_slice = rate * 1e6 / PAGE * (SLICE_NS / 1e9), owed = 0;
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        while (!stop) {
            for (owed += per_slice; owed >= 1; owed -= 1) {
                size_t i = PICK();
                TOUCH(i);
            }
            t.tv_nsec += SLICE_NS;
            if (t.tv_nsec >= 1000000000L) { t.tv_sec++; t.tv_nsec -= 1000000000L; }
            /* Pacing against an absolute clock, but time the process did not run (stopped, throttled
             * by --auto-converge, descheduled) is lost, not made up in a burst: like CPU-bound work. */
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            if ((now.tv_sec - t.tv_sec) * 1000000000L + (now.tv_nsec - t.tv_nsec) > SLICE_NS) t = now;
            while (!stop && clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {}
        }
    }
    printf("checksum %016llx\n", (unsigned long long)checksum(mem, words));
    fflush(stdout);
    return 0;
}
