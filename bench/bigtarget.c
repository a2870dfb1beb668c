/* Benchmark target: MiB of memory, 1/4 zero pages, 1/4 random, 1/2 text-like (PERF-NOTES' mix).
 * stdin commands: "write PERMILLE SEED" writes new random bytes into that share of its pages
 * (chosen by SEED) -> "ok N"; "exit". Prints "ready ADDR NPAGES" when filled. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define PG 4096
static uint64_t s = 88172645463325252ull;
static uint64_t rnd(void) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s; }

static void fill_random(unsigned char *p) { for (int i = 0; i < PG; i += 8) { uint64_t r = rnd(); memcpy(p + i, &r, 8); } }

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 256;
    size_t n = mib * 256;
    unsigned char *m = mmap(NULL, n * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { perror("mmap"); return 1; }
    static const char words[] = "lorem ipsum dolor sit amet, consectetur adipiscing elit; checkpoint page ";
    for (size_t i = 0; i < n; i++) {
        unsigned char *p = m + i * PG;
        switch (i % 4) {
        case 0: memset(p, 0, PG); break;
        case 1: fill_random(p); break;
        default:
            for (int j = 0; j < PG; j++) p[j] = (unsigned char)words[(j + i) % (sizeof(words) - 1)];
            memcpy(p, &i, sizeof(i));
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %p %zu\n", (void *)m, n);
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        unsigned long permille = 0, seed = 1;
        if (sscanf(line, "write %lu %lu", &permille, &seed) >= 1) {
            s = seed * 0x9E3779B97F4A7C15ull + 1;
            size_t k = n * permille / 1000, done = 0;
            /* a stride walk: distinct pages, spread over the whole region */
            size_t step = k ? n / k : 1, off = rnd() % (step ? step : 1);
            for (size_t i = off; i < n && done < k; i += step, done++) fill_random(m + i * PG);
            printf("ok %zu\n", done);
        } else if (!strncmp(line, "exit", 4)) {
            return 0;
        }
    }
    return 0;
}
