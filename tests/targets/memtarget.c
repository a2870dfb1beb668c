/* A command-driven checkpoint target with known memory.
 *
 * It maps a region of N pages (argv[1], default 256) and fills it:
 *   pages [0, N/4)      random bytes (from a fixed seed, so runs are reproducible)
 *   pages [N/4, N/2)    written with zeros (present, zero-filled)
 *   pages [N/2, 3N/4)   text-like bytes (compressible)
 *   pages [3N/4, N)     never touched (not present)
 * plus a private mapping of a file (argv[2], optional) that it writes to, a thread blocked in read()
 * on a pipe nobody writes, and a thread spinning on a counter.
 *
 * It reports readiness and answers commands one line at a time on stdout; the main thread blocks in
 * read(0) between commands, so at dump time it is always inside a syscall. Commands (stdin):
 *   info                     -> "region ADDR npages N file ADDR fpages N brk ADDR spin ADDR"
 *   write I [I...]           new pseudo-random bytes into region page I  -> "ok"
 *   same I                   rewrite page I with its own bytes (dirty but unchanged) -> "ok"
 *   fill I BYTE              set every byte of page I to BYTE -> "ok"
 *   sum                      -> "sum HEX" (FNV-1a 64 over the region and the file mapping)
 *   mmap NPAGES              anonymous rw mapping, every page written -> "addr ADDR"
 *   munmap ADDR NPAGES       -> "ok"
 *   mremap ADDR OLD NEW      MREMAP_MAYMOVE -> "addr ADDR"
 *   mprotect ADDR NPAGES P   P is r, rw or none -> "ok"
 *   sbrk NBYTES              grow the heap and write the new bytes -> "brk ADDR"
 *   close FD                 close(FD) -> "ok" (to take away a tracker's fd behind ckpt's back)
 *   exit                     exit(0)
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
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
static unsigned char *fmap;
static size_t fpages;
static volatile uint64_t spin_counter;
static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint64_t next_rand(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return rng;
}

static void fill_random(unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i += 8) { uint64_t r = next_rand(); memcpy(p + i, &r, 8); }
}

static void fill_text(unsigned char *p, size_t n, size_t salt) {
    static const char words[] = "the quick brown fox jumps over the lazy dog; checkpoint restore page ";
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)words[(i + salt) % (sizeof(words) - 1)];
}

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ull; }
    return h;
}

static void *blocked_thread(void *arg) {
    int fd = *(int *)arg;
    char c;
    for (;;) if (read(fd, &c, 1) <= 0) pause();
    return NULL;
}

static void *spin_thread(void *arg) {
    (void)arg;
    for (;;) spin_counter++;
    return NULL;
}

/* An answer: formatted on the stack and written with one write(2), not through stdio. The test
 * reads the answer and may dump at once: stdio would still be writing its FILE's pointers and
 * unlocking its lock in libc's data after the write returned, and a dump that froze the target in
 * between saw libc's data written after it, in the next step (tests/vm: "libc data" dirty on an
 * idle step, once under load). After this write only the stack is touched until the next read(). */
static void say(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
    for (int off = 0; off < n;) {
        ssize_t w = write(1, buf + off, (size_t)(n - off));
        if (w <= 0) _exit(1);
        off += (int)w;
    }
}

static int prot_of(const char *s) {
    if (!strcmp(s, "none")) return PROT_NONE;
    if (!strcmp(s, "r")) return PROT_READ;
    return PROT_READ | PROT_WRITE;
}

int main(int argc, char **argv) {
    npages = argc > 1 ? strtoul(argv[1], NULL, 0) : 256;
    if (npages < 8) npages = 8;
    region = mmap(NULL, npages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) { perror("mmap"); return 1; }
    size_t q = npages / 4;
    fill_random(region, q * PG);
    memset(region + q * PG, 0, q * PG);
    for (size_t i = 2 * q; i < 3 * q; i++) fill_text(region + i * PG, PG, i);

    if (argc > 2) {
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) { perror("open"); return 1; }
        off_t sz = lseek(fd, 0, SEEK_END);
        fpages = (size_t)sz / PG;
        fmap = mmap(NULL, fpages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
        if (fmap == MAP_FAILED) { perror("mmap file"); return 1; }
        close(fd);
        /* Write to the first two pages only: the rest stay file pages, some never faulted in. */
        for (size_t i = 0; i < fpages && i < 2; i++) memset(fmap + i * PG + 100, 0xAB, 200);
    }

    static int pfd[2];
    if (pipe(pfd)) { perror("pipe"); return 1; }
    pthread_t t1, t2;
    pthread_create(&t1, NULL, blocked_thread, &pfd[0]);
    pthread_create(&t2, NULL, spin_thread, NULL);
    while (spin_counter == 0) ;  /* the spinner is really running before we say ready */

    say("ready %d\n", getpid());
    char line[512];
    for (;;) {
        if (!read_command(line, sizeof line)) return 0;
        char cmd[32] = {0};
        sscanf(line, "%31s", cmd);
        if (!strcmp(cmd, "info")) {
            say("region %p npages %zu file %p fpages %zu brk %p spin %p\n", (void *)region, npages, (void *)fmap, fpages,
                   sbrk(0), (void *)&spin_counter);
        } else if (!strcmp(cmd, "write")) {
            char *p = line + 5;
            char *end;
            for (;;) {
                unsigned long i = strtoul(p, &end, 0);
                if (end == p) break;
                if (i < npages) fill_random(region + i * PG, PG);
                p = end;
            }
            say("%s\n", "ok");
        } else if (!strcmp(cmd, "same")) {
            unsigned long i = strtoul(line + 4, NULL, 0);
            if (i < npages) {
                unsigned char buf[PG];
                memcpy(buf, region + i * PG, PG);
                memcpy((void *)(region + i * PG), buf, PG);
                __asm__ volatile("" ::: "memory");
            }
            say("%s\n", "ok");
        } else if (!strcmp(cmd, "fill")) {
            unsigned long i, b;
            sscanf(line + 4, "%lu %lu", &i, &b);
            if (i < npages) memset(region + i * PG, (int)b, PG);
            say("%s\n", "ok");
        } else if (!strcmp(cmd, "sum")) {
            uint64_t h = fnv(0xcbf29ce484222325ull, region, npages * PG);
            if (fmap) h = fnv(h, fmap, fpages * PG);
            say("sum %016llx\n", (unsigned long long)h);
        } else if (!strcmp(cmd, "mmap")) {
            unsigned long np = strtoul(line + 4, NULL, 0);
            unsigned char *p = mmap(NULL, np * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) { say("%s\n", "err"); continue; }
            for (unsigned long i = 0; i < np; i++) fill_text(p + i * PG, PG, i * 7 + 3);
            say("addr %p\n", (void *)p);
        } else if (!strcmp(cmd, "munmap")) {
            void *a; unsigned long np;
            sscanf(line + 6, "%p %lu", &a, &np);
            say("%s\n", munmap(a, np * PG) ? "err" : "ok");
        } else if (!strcmp(cmd, "mremap")) {
            void *a; unsigned long o, nw;
            sscanf(line + 6, "%p %lu %lu", &a, &o, &nw);
            void *p = mremap(a, o * PG, nw * PG, MREMAP_MAYMOVE);
            if (p == MAP_FAILED) { say("%s\n", "err"); continue; }
            say("addr %p\n", p);
        } else if (!strcmp(cmd, "mprotect")) {
            void *a; unsigned long np; char pr[8];
            sscanf(line + 8, "%p %lu %7s", &a, &np, pr);
            say("%s\n", mprotect(a, np * PG, prot_of(pr)) ? "err" : "ok");
        } else if (!strcmp(cmd, "sbrk")) {
            long nb = strtol(line + 4, NULL, 0);
            unsigned char *p = sbrk(nb);
            if (p == (void *)-1) { say("%s\n", "err"); continue; }
            fill_text(p, (size_t)nb, 11);
            say("brk %p\n", sbrk(0));
        } else if (!strcmp(cmd, "close")) {
            say("%s\n", close(atoi(line + 5)) ? "err" : "ok");
        } else if (!strcmp(cmd, "exit")) {
            return 0;
        } else {
            say("%s\n", "unknown");
        }
    }
}
