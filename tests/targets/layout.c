/* A target that builds any memory layout it is told, for the property tests (tests/test_layouts.py).
 *
 * The layout comes on stdin, one line each, before anything else:
 *   map NPAGES PROT GAP GAPPAGES THP   a mapping; PROT is rw, r, none (never touched: a guard) or
 *                                      nonedata (filled, then PROT_NONE); GAP is hole (unmapped) or
 *                                      guard (PROT_NONE reservation) for the GAPPAGES pages before it;
 *                                      THP 0 sets MADV_NOHUGEPAGE, 1 leaves the system's choice
 *   run KIND NPAGES SEED               the next NPAGES pages of the last mapping: a (never touched),
 *                                      z (zeros written: present, zero), d (bytes from SEED)
 *   build                              -> "ready ADDR0 ADDR1 ..." (hex, one per mapping)
 * Every mapping lies in one reservation, so holes and guards between them are where the layout says.
 * Then commands, each answered "ok" (or "err ..."), between which the process only waits in read():
 *   data ADDR NPAGES SEED   new bytes      zero ADDR NPAGES    zeros written
 *   drop ADDR NPAGES        MADV_DONTNEED  same ADDR NPAGES    each page rewritten with its own bytes
 *   exit
 * Page bytes: splitmix64 of (SEED, page number in the mapping, word), the same in tests/test_layouts.py.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "lineio.h"

#define PG 4096

struct run { char kind; size_t npages; uint64_t seed; };
struct map {
    size_t npages, gap;
    char prot[16], gapkind[16];
    int thp;
    struct run *runs;
    size_t nruns, cap;
    unsigned char *addr;
};

static struct map *maps;
static size_t nmaps, mapcap;

static uint64_t mix(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Page `page` (counted from the mapping's start) filled from `seed`. */
static void fill_page(unsigned char *p, uint64_t seed, uint64_t page) {
    uint64_t *w = (uint64_t *)p;
    uint64_t base = mix(seed) ^ (page << 9);
    for (size_t i = 0; i < PG / 8; i++) w[i] = mix(base + i);
}

static void die(const char *what) {
    printf("err %s\n", what);
    fflush(stdout);
    exit(1);
}

static struct map *map_of(unsigned char *a) {
    for (size_t i = 0; i < nmaps; i++)
        if (a >= maps[i].addr && a < maps[i].addr + maps[i].npages * PG) return &maps[i];
    return NULL;
}

static void build(void) {
    size_t total = 0;
    for (size_t i = 0; i < nmaps; i++) total += maps[i].gap + maps[i].npages;
    unsigned char *base = mmap(NULL, total * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) die("reserve");
    size_t off = 0;
    for (size_t i = 0; i < nmaps; i++) {
        struct map *m = &maps[i];
        if (m->gap && !strcmp(m->gapkind, "hole")) munmap(base + off * PG, m->gap * PG);
        off += m->gap;
        m->addr = base + off * PG;
        off += m->npages;
        if (!strcmp(m->prot, "none")) continue; /* stays the untouched PROT_NONE reservation */
        if (mmap(m->addr, m->npages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
            == MAP_FAILED)
            die("mmap");
        if (!m->thp) madvise(m->addr, m->npages * PG, MADV_NOHUGEPAGE);
        size_t p = 0;
        for (size_t r = 0; r < m->nruns; r++) {
            struct run *u = &m->runs[r];
            for (size_t k = 0; k < u->npages && p < m->npages; k++, p++) {
                if (u->kind == 'z') memset(m->addr + p * PG, 0, PG);
                else if (u->kind == 'd') fill_page(m->addr + p * PG, u->seed, p);
            }
        }
        if (!strcmp(m->prot, "r")) mprotect(m->addr, m->npages * PG, PROT_READ);
        else if (!strcmp(m->prot, "nonedata")) mprotect(m->addr, m->npages * PG, PROT_NONE);
    }
    printf("ready");
    for (size_t i = 0; i < nmaps; i++) printf(" %p", (void *)maps[i].addr);
    printf("\n");
    fflush(stdout);
}

int main(void) {
    static char line[512];
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    for (;;) {
        if (!read_command(line, sizeof line)) return 0;
        if (!strncmp(line, "map ", 4)) {
            if (nmaps == mapcap) {
                mapcap = mapcap ? 2 * mapcap : 8;
                maps = realloc(maps, mapcap * sizeof *maps);
            }
            struct map *m = &maps[nmaps++];
            memset(m, 0, sizeof *m);
            if (sscanf(line + 4, "%zu %15s %15s %zu %d", &m->npages, m->prot, m->gapkind, &m->gap, &m->thp) != 5)
                die("map line");
        } else if (!strncmp(line, "run ", 4)) {
            if (!nmaps) die("run before map");
            struct map *m = &maps[nmaps - 1];
            if (m->nruns == m->cap) {
                m->cap = m->cap ? 2 * m->cap : 16;
                m->runs = realloc(m->runs, m->cap * sizeof *m->runs);
            }
            struct run *u = &m->runs[m->nruns++];
            if (sscanf(line + 4, " %c %zu %lu", &u->kind, &u->npages, &u->seed) != 3) die("run line");
        } else if (!strncmp(line, "build", 5)) {
            break;
        } else {
            die("layout line");
        }
    }
    build();
    for (;;) {
        unsigned long addr = 0, n = 0, seed = 0;
        char cmd[16] = "";
        if (!read_command(line, sizeof line)) return 0;
        int got = sscanf(line, "%15s %lx %lu %lu", cmd, &addr, &n, &seed);
        unsigned char *a = (unsigned char *)addr;
        struct map *m = got >= 3 ? map_of(a) : NULL;
        if (!strcmp(cmd, "exit")) return 0;
        if (!m || a + n * PG > m->addr + m->npages * PG) {
            printf("err bad range\n");
        } else if (!strcmp(cmd, "data") && got == 4) {
            for (size_t k = 0; k < n; k++) fill_page(a + k * PG, seed, (uint64_t)(a - m->addr) / PG + k);
            printf("ok\n");
        } else if (!strcmp(cmd, "zero")) {
            memset(a, 0, n * PG);
            printf("ok\n");
        } else if (!strcmp(cmd, "drop")) {
            printf(madvise(a, n * PG, MADV_DONTNEED) ? "err madvise\n" : "ok\n");
        } else if (!strcmp(cmd, "same")) {
            for (size_t k = 0; k < n; k++) {
                volatile uint64_t *w = (volatile uint64_t *)(a + k * PG);
                *w = *w;
            }
            printf("ok\n");
        } else {
            printf("err unknown command\n");
        }
        fflush(stdout);
    }
}
