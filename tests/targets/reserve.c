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
 *   file PATH N          map N pages of PATH privately, read-write -> "addr ADDR"
 *   fwrite P BYTE / fread P / fdrop P N   the same on the file mapping
 *   exit                 exit(0)
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
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
    char line[4352], path[4096];
    unsigned char *fm = NULL;
    while (read_command(line, sizeof line)) {
        unsigned long p = 0, n = 0;
        unsigned int b = 0;
        if (sscanf(line, "file %4095s %lu", path, &n) == 2) {
            int fd = open(path, O_RDONLY);
            fm = fd < 0 ? MAP_FAILED : mmap(NULL, n * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
            if (fd >= 0) close(fd);
            if (fm == MAP_FAILED) printf("err\n"); else printf("addr %p\n", (void *)fm);
        } else if (fm && sscanf(line, "fwrite %lu %u", &p, &b) == 2) {
            memset(fm + p * PG, (int)b, PG);
            printf("ok\n");
        } else if (fm && sscanf(line, "fread %lu", &p) == 1) {
            printf("byte %u\n", *(volatile unsigned char *)(fm + p * PG));
        } else if (fm && sscanf(line, "fdrop %lu %lu", &p, &n) == 2) {
            printf(madvise(fm + p * PG, n * PG, MADV_DONTNEED) ? "err\n" : "ok\n");
        } else if (!strncmp(line, "info", 4)) {
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
