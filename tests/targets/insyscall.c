/* Threads blocked in syscalls that a signal must interrupt with EINTR, after a restore as before it
 * (tests/test_resume_in_syscall.py).
 *
 *   insyscall KIND...    KIND: pause | read | futex | sleep. The main thread blocks in the first,
 *                        one more thread in each of the others.
 *
 * SIGUSR1 has a handler without SA_RESTART, so each of these calls returns -1/EINTR when the signal
 * comes while the thread is inside it. Each call is made once, by syscall(2) (the numbers are the
 * test's). Prints "ready TID:NR ..." (the main thread first) once every other thread is inside its
 * syscall; the test sees the main thread there itself. When its call returns, each thread prints
 * "ret TID R ERRNO HANDLED" and ends; the main thread then waits for the others, prints "done" and
 * exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 16
static int quiet[2];
static int word;
static __thread volatile sig_atomic_t handled;

static void on_usr1(int s) { (void)s; handled++; }

static long nr_of(const char *kind) {
    if (!strcmp(kind, "pause")) return SYS_pause;
    if (!strcmp(kind, "read")) return SYS_read;
    if (!strcmp(kind, "futex")) return SYS_futex;
    if (!strcmp(kind, "sleep")) return SYS_nanosleep;
    return -1;
}

static void block_in(long nr) {
    char c;
    struct timespec ts = {3600, 0}, rem;
    long r = -1;
    switch (nr) {
    case SYS_pause: r = syscall(SYS_pause); break;
    case SYS_read: r = syscall(SYS_read, quiet[0], &c, 1); break;
    case SYS_futex: r = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0); break;
    case SYS_nanosleep: r = syscall(SYS_nanosleep, &ts, &rem); break;
    }
    int err = errno;
    char line[96];
    int n = snprintf(line, sizeof line, "ret %ld %ld %d %d\n", (long)gettid(), r, err, (int)handled);
    if (write(1, line, n) != n) _exit(2);
}

struct worker {
    pthread_t th;
    long nr;
    volatile int tid;
};
static struct worker workers[MAX_THREADS];

static void *run(void *a) {
    struct worker *w = a;
    w->tid = gettid();
    block_in(w->nr);
    return NULL;
}

/* Until thread `tid` is blocked in syscall `nr` (as tests/targets/threads.c). */
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
    if (argc < 2 || argc - 1 > MAX_THREADS || pipe(quiet)) return 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1; /* no SA_RESTART: the call returns EINTR */
    sigaction(SIGUSR1, &sa, NULL);
    long main_nr = nr_of(argv[1]);
    int n = argc - 2;
    for (int i = 0; i < n; i++) {
        workers[i].nr = nr_of(argv[i + 2]);
        if (workers[i].nr < 0 || main_nr < 0) return 1;
        if (pthread_create(&workers[i].th, NULL, run, &workers[i])) return 1;
    }
    char line[1024];
    int len = snprintf(line, sizeof line, "ready %d:%ld", getpid(), main_nr);
    for (int i = 0; i < n; i++) {
        while (!__atomic_load_n(&workers[i].tid, __ATOMIC_SEQ_CST)) sched_yield();
        wait_until_in(workers[i].tid, workers[i].nr);
        len += snprintf(line + len, sizeof line - len, " %d:%ld", workers[i].tid, workers[i].nr);
    }
    line[len++] = '\n';
    if (write(1, line, len) != len) return 2;
    block_in(main_nr);
    for (int i = 0; i < n; i++) pthread_join(workers[i].th, NULL);
    if (write(1, "done\n", 5) != 5) return 2;
    return 0;
}
