/* Threads blocked in calls that a signal must end with EINTR, over and over, whatever a dump does
 * around it (tests/test_thaw_in_syscall.py).
 *
 *   wakeups
 *
 * One thread each loops on: pause(), nanosleep() of an hour, clock_nanosleep() of an hour, read() of
 * a pipe nobody writes, futex(FUTEX_WAIT) on a word nobody changes, poll() of that pipe with no
 * timeout. SIGUSR1 has a handler without SA_RESTART, so each call returns -1/EINTR (clock_nanosleep:
 * EINTR) when the signal comes while the thread is inside it, after one run of the handler. Each
 * return prints "ret KIND R ERRNO HANDLED" (HANDLED: handler runs since the last return): one
 * SIGUSR1, one line "ret KIND -1 4 1". A call that returns by itself (an early return) prints a
 * line nobody asked for; a signal whose handler ran outside the call (before a restarted one that
 * then sleeps on) prints nothing until the next one, which then shows HANDLED 2.
 * Prints "ready PID TID:KIND..." once every thread is inside its call; the main thread then sleeps
 * in read(0) until stdin closes.
 *
 *   wakeups CHILDREN
 *
 * A process tree (tests/test_tree_thaw.py): the process first forks CHILDREN children, each then
 * the same as its parent (its own six threads, its own ready line, its main thread in read(0)), and
 * each names its calls KIND@PID, in its ready line and in its ret lines.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NKINDS 6
static const char *kinds[NKINDS] = {"pause", "nanosleep", "clock_nanosleep", "read", "futex", "poll"};
static const long nrs[NKINDS] = {SYS_pause, SYS_nanosleep, SYS_clock_nanosleep, SYS_read, SYS_futex, SYS_poll};
static char labels[NKINDS][32];
static int quiet[2];
static int word;
static volatile int tids[NKINDS];
static __thread volatile sig_atomic_t handled;

static void on_usr1(int s) { (void)s; handled++; }

static void *run(void *a) {
    int k = (int)(long)a;
    char c;
    struct pollfd p = {quiet[0], POLLIN, 0};
    tids[k] = gettid();
    for (;;) {
        struct timespec ts = {3600, 0};
        long r = 0;
        int err = 0;
        switch (k) {
        /* syscall(2) each: libc may make one call of another (nanosleep of clock_nanosleep). */
        case 0: r = syscall(SYS_pause); break;
        case 1: r = syscall(SYS_nanosleep, &ts, NULL); break;
        case 2: r = syscall(SYS_clock_nanosleep, CLOCK_MONOTONIC, 0, &ts, NULL); break;
        case 3: r = syscall(SYS_read, quiet[0], &c, 1); break;
        case 4: r = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0); break;
        case 5: r = syscall(SYS_poll, &p, 1, -1); break;
        }
        err = errno;
        int n = handled;
        handled = 0;
        char line[96];
        int len = snprintf(line, sizeof line, "ret %s %ld %d %d\n", labels[k], r, err, n);
        if (write(1, line, len) != len) _exit(2);
    }
    return NULL;
}

/* Until thread `tid` is blocked in syscall `nr`. */
static void wait_until_in(int tid, long nr) {
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/self/task/%d/syscall", tid);
    for (;;) {
        FILE *f = fopen(path, "r");
        if (!f) exit(3);
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        if (strncmp(buf, "running", 7) && strtol(buf, NULL, 10) == nr) return;
        sched_yield();
    }
}

int main(int argc, char **argv) {
    int children = argc > 1 ? atoi(argv[1]) : 0;
    for (int i = 0; i < children; i++) {
        pid_t c = fork();
        if (c < 0) return 1;
        if (c == 0) break;
    }
    for (int k = 0; k < NKINDS; k++) {
        if (children)
            snprintf(labels[k], sizeof labels[k], "%s@%d", kinds[k], getpid());
        else
            snprintf(labels[k], sizeof labels[k], "%s", kinds[k]);
    }
    if (pipe(quiet)) return 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1; /* no SA_RESTART: each call returns EINTR */
    sigaction(SIGUSR1, &sa, NULL);
    pthread_t th[NKINDS];
    for (int k = 0; k < NKINDS; k++)
        if (pthread_create(&th[k], NULL, run, (void *)(long)k)) return 1;
    char line[1024];
    int len = snprintf(line, sizeof line, "ready %d", getpid());
    for (int k = 0; k < NKINDS; k++) {
        while (!__atomic_load_n(&tids[k], __ATOMIC_SEQ_CST)) sched_yield();
        wait_until_in(tids[k], nrs[k]);
        len += snprintf(line + len, sizeof line - len, " %d:%s", tids[k], labels[k]);
    }
    line[len++] = '\n';
    if (write(1, line, len) != len) return 2;
    char c;
    while (read(0, &c, 1) > 0) {
    }
    return 0;
}
