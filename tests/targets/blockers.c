/* Threads blocked in calls that must never return early, to check that freezes and injected syscalls
 * stay invisible to the target.
 *
 *   blockers [BUSY]   BUSY: that many extra threads spinning (CPU load inside the target)
 *
 * One thread each blocks in: read() of a pipe nobody writes, clock_nanosleep() of an hour, nanosleep()
 * of an hour, futex(FUTEX_WAIT) on a word nobody changes, poll() of that pipe with no timeout,
 * and select() of it with no timeout. None of them may return: each that does counts an early
 * return (with its errno). The main thread blocks in read(0) (the line protocol); a return there
 * that is not a whole command counts too. Prints "ready PID", then answers:
 *   check -> "early N" followed by the last early return seen ("last <call> <ret> <errno>")
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int quiet[2];
static volatile int started;
static volatile long early;
static char last[128] = "none";

static void report(const char *call, long ret, int err) {
    __atomic_add_fetch(&early, 1, __ATOMIC_SEQ_CST);
    snprintf(last, sizeof last, "%s %ld %d", call, ret, err);
}

static void *t_read(void *a) {
    (void)a;
    char c;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) { long r = read(quiet[0], &c, 1); report("read", r, errno); }
    return NULL;
}

static void *t_clock_nanosleep(void *a) {
    (void)a;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        struct timespec ts = {3600, 0};
        int r = clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
        report("clock_nanosleep", r, r);
    }
    return NULL;
}

static void *t_nanosleep(void *a) {
    (void)a;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        struct timespec ts = {3600, 0};
        long r = nanosleep(&ts, NULL);
        report("nanosleep", r, errno);
    }
    return NULL;
}

static int word;
static void *t_futex(void *a) {
    (void)a;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        long r = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
        report("futex", r, errno);
    }
    return NULL;
}

static void *t_poll(void *a) {
    (void)a;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        struct pollfd p = {quiet[0], POLLIN, 0};
        long r = poll(&p, 1, -1);
        report("poll", r, errno);
    }
    return NULL;
}

static void *t_select(void *a) {
    (void)a;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        fd_set s;
        FD_ZERO(&s);
        FD_SET(quiet[0], &s);
        long r = select(quiet[0] + 1, &s, NULL, NULL, NULL);
        report("select", r, errno);
    }
    return NULL;
}

static void *t_busy(void *a) {
    (void)a;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (volatile unsigned long x = 0;; x++) {}
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (pipe(quiet)) return 1;
    void *(*fns[])(void *) = {t_read, t_clock_nanosleep, t_nanosleep, t_futex, t_poll, t_select};
    int n = (int)(sizeof fns / sizeof fns[0]), busy = argc > 1 ? atoi(argv[1]) : 0;
    pthread_t t;
    for (int i = 0; i < n; i++) pthread_create(&t, NULL, fns[i], NULL);
    for (int i = 0; i < busy; i++) pthread_create(&t, NULL, t_busy, NULL);
    while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < n + busy) sched_yield();
    printf("ready %d\n", getpid());
    char line[64];
    size_t len = 0;
    for (;;) {
        long r = read(0, line + len, 1);
        if (r != 1) { report("read0", r, errno); if (r == 0) return 3; continue; }
        if (line[len] != '\n' && len + 2 < sizeof line) { len++; continue; }
        line[len] = 0;
        len = 0;
        if (!strcmp(line, "check")) printf("early %ld last %s\n", early, last);
        else puts("unknown");
    }
}
