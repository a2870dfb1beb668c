/* A process with one huge MAP_NORESERVE reservation, as Go, the JVM and ASan make, of which it touches
 * only what it is told to.
 *
 * argv[1]: the reservation's size in GiB (default 64); argv[2]: "huge" for MADV_HUGEPAGE, "small" for
 * MADV_NOHUGEPAGE (default: the system's THP policy). Commands (stdin), page numbers from the start:
 *   info                 -> "base ADDR pages N"
 *   write P BYTE         set every byte of page P to BYTE -> "ok"
 *   poke P BYTE          set the first byte of page P -> "ok"
 *   read P               read a byte of page P (maps the zero page if untouched) -> "byte N"
 *   drop P N             MADV_DONTNEED pages [P, P+N) -> "ok"
 *   exit                 exit(0)
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "lineio.h"

#define PG 4096UL
#define HUGE (2UL << 20)

int main(int argc, char **argv) {
    size_t gib = argc > 1 ? strtoull(argv[1], NULL, 0) : 64;
    size_t len = gib << 30;
    unsigned char *raw = mmap(NULL, len + HUGE, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) { perror("mmap"); return 1; }
    /* 2 MiB-aligned, so that huge pages line up with page numbers the tests choose */
    unsigned char *base = (unsigned char *)(((uintptr_t)raw + HUGE - 1) & ~(HUGE - 1));
    if (argc > 2 && !strcmp(argv[2], "huge")) madvise(base, len, MADV_HUGEPAGE);
    if (argc > 2 && !strcmp(argv[2], "small")) madvise(base, len, MADV_NOHUGEPAGE);
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    char line[256];
    while (read_command(line, sizeof line)) {
        unsigned long p = 0, n = 0;
        unsigned int b = 0;
        if (!strncmp(line, "info", 4)) {
            printf("base %p pages %lu\n", (void *)base, (unsigned long)(len / PG));
        } else if (sscanf(line, "write %lu %u", &p, &b) == 2) {
            memset(base + p * PG, (int)b, PG);
            printf("ok\n");
        } else if (sscanf(line, "poke %lu %u", &p, &b) == 2) {
            base[p * PG] = (unsigned char)b;
            printf("ok\n");
        } else if (sscanf(line, "read %lu", &p) == 1) {
            printf("byte %u\n", *(volatile unsigned char *)(base + p * PG));
        } else if (sscanf(line, "drop %lu %lu", &p, &n) == 2) {
            printf(madvise(base + p * PG, n * PG, MADV_DONTNEED) ? "err\n" : "ok\n");
        } else if (!strncmp(line, "exit", 4)) {
            return 0;
        } else {
            printf("unknown\n");
        }
    }
    return 0;
}
