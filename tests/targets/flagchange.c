/* A target whose mappings' VmFlags change on command, for tests/test_flagwatch.py.
 *
 * Prints "ready PID BASE" with BASE the address of a 64-page anonymous region (every page written).
 * Commands on stdin, one answer line each ("ok ..." or "err ERRNO"):
 *   madv ADV OFF N     madvise(BASE + OFF pages, N pages, ADV) from the main thread
 *   tmadv ADV OFF N    the same from a new thread, joined before the answer
 *   lmadv ADV OFF N    the same from a thread started at the beginning (it then goes on waiting)
 *   xmadv ADV OFF N    the same from that thread, which then exits (joined before the answer)
 *   mlock OFF N | munlock OFF N | mprot PROT OFF N
 *   map N              a new anonymous mapping of N pages, written: "ok ADDR"
 *   unmap ADDR N
 *   grow KIB           the stack grows by about KIB KiB (written), then returns
 *   write OFF          one page written (no flag changes; through /proc/self/mem, so never a fault)
 *   uffd               a userfaultfd of its own (kept open)
 *   low                "ok ADDR": a 16-page region below 4 GiB (MAP_32BIT), between PROT_NONE pages
 *   i386 NR A B C      the 32-bit system call NR (i386 numbers) through int 0x80: "ok RESULT"
 *   sleeper            a thread that sleeps in clock_nanosleep from now on (a freeze interrupts it,
 *                      and it goes on through restart_syscall)
 *   noop
 */
#define _GNU_SOURCE
#include <alloca.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define PAGES 64

static unsigned char *base;
static int to_worker[2], from_worker[2];
static int self_mem;

struct job { int adv; long off, n; int exit_after; int ret; };

static int do_madv(struct job *j) {
    return madvise(base + j->off * PAGE, j->n * PAGE, j->adv) ? -errno : 0;
}

static void *oneshot(void *arg) {
    struct job *j = arg;
    j->ret = do_madv(j);
    return NULL;
}

static void *worker(void *arg) {
    (void)arg;
    struct job j;
    while (read(to_worker[0], &j, sizeof j) == (ssize_t)sizeof j) {
        j.ret = do_madv(&j);
        (void)!write(from_worker[1], &j, sizeof j);
        if (j.exit_after) return NULL;
    }
    return NULL;
}

static void *sleeper(void *arg) {
    (void)arg;
    struct timespec ts = {3600, 0};
    for (;;) clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
    return NULL;
}

static pthread_t long_lived;
static int long_alive;

static void start_worker(void) {
    pthread_create(&long_lived, NULL, worker, NULL);
    long_alive = 1;
}

static void __attribute__((noinline)) grow(long kib) {
    volatile unsigned char *p = alloca((size_t)kib * 1024);
    for (long i = 0; i < kib * 1024; i += PAGE) p[i] = 1;
}

static void answer(int ret) {
    if (ret < 0) printf("err %d\n", -ret);
    else printf("ok\n");
    fflush(stdout);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    /* Between two PROT_NONE pages: the region never merges with a neighbour, so advice over all of
     * it changes its flags and nothing in /proc/PID/maps. */
    unsigned char *r = mmap(NULL, (PAGES + 2) * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r == MAP_FAILED) return 1;
    base = r + PAGE;
    if (mprotect(base, PAGES * PAGE, PROT_READ | PROT_WRITE)) return 1;
    for (int i = 0; i < PAGES; i++) memset(base + i * PAGE, i + 1, PAGE);
    if (pipe(to_worker) || pipe(from_worker)) return 1;
    self_mem = open("/proc/self/mem", O_RDWR | O_CLOEXEC);
    if (self_mem < 0) return 1;
    start_worker();
    printf("ready %d %p\n", getpid(), (void *)base);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        char cmd[16];
        long a = 0, b = 0, c = 0;
        int n = sscanf(line, "%15s %li %li %li", cmd, &a, &b, &c);
        if (n < 1) continue;
        if (!strcmp(cmd, "madv")) {
            struct job j = {(int)a, b, c, 0, 0};
            answer(do_madv(&j));
        } else if (!strcmp(cmd, "tmadv")) {
            struct job j = {(int)a, b, c, 0, 0};
            pthread_t t;
            pthread_create(&t, NULL, oneshot, &j);
            pthread_join(t, NULL);
            answer(j.ret);
        } else if (!strcmp(cmd, "lmadv") || !strcmp(cmd, "xmadv")) {
            if (!long_alive) start_worker();
            struct job j = {(int)a, b, c, !strcmp(cmd, "xmadv"), 0};
            (void)!write(to_worker[1], &j, sizeof j);
            (void)!read(from_worker[0], &j, sizeof j);
            if (j.exit_after) {
                pthread_join(long_lived, NULL);
                long_alive = 0;
            }
            answer(j.ret);
        } else if (!strcmp(cmd, "mlock")) {
            answer(mlock(base + a * PAGE, b * PAGE) ? -errno : 0);
        } else if (!strcmp(cmd, "munlock")) {
            answer(munlock(base + a * PAGE, b * PAGE) ? -errno : 0);
        } else if (!strcmp(cmd, "mprot")) {
            answer(mprotect(base + b * PAGE, c * PAGE, (int)a) ? -errno : 0);
        } else if (!strcmp(cmd, "map")) {
            unsigned char *m = mmap(NULL, a * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m == MAP_FAILED) { answer(-errno); continue; }
            for (long i = 0; i < a; i++) m[i * PAGE] = 7;
            printf("ok %p\n", (void *)m);
        } else if (!strcmp(cmd, "unmap")) {
            answer(munmap((void *)a, b * PAGE) ? -errno : 0);
        } else if (!strcmp(cmd, "grow")) {
            grow(a);
            answer(0);
        } else if (!strcmp(cmd, "write")) {
            /* Through /proc/self/mem: a page made read-only (or a guard) answers, never faults. */
            static unsigned char v;
            v++;
            answer(pwrite(self_mem, &v, 1, (off_t)(uintptr_t)(base + a * PAGE + 8)) == 1 ? 0 : -errno);
        } else if (!strcmp(cmd, "uffd")) {
            long fd = syscall(SYS_userfaultfd, 1 /* UFFD_USER_MODE_ONLY */);
            answer(fd < 0 ? -errno : 0);
        } else if (!strcmp(cmd, "low")) {
            unsigned char *l = mmap(NULL, 18 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
            if (l == MAP_FAILED || mprotect(l + PAGE, 16 * PAGE, PROT_READ | PROT_WRITE)) { answer(-errno); continue; }
            memset(l + PAGE, 3, 16 * PAGE);
            printf("ok %p\n", (void *)(l + PAGE));
        } else if (!strcmp(cmd, "i386")) {
            long nr = a, r;
            unsigned long x, y, z;
            n = sscanf(line, "%15s %li %li %li %li", cmd, &nr, (long *)&x, (long *)&y, (long *)&z);
            if (n != 5) { answer(-EINVAL); continue; }
            __asm__ volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(x), "c"(y), "d"(z) : "memory");
            printf("ok %ld\n", r);
        } else if (!strcmp(cmd, "sleeper")) {
            pthread_t t;
            answer(-pthread_create(&t, NULL, sleeper, NULL));
        } else if (!strcmp(cmd, "noop")) {
            answer(0);
        } else {
            printf("err 22\n");
        }
    }
    return 0;
}
