/* Threads blocked in syscalls that a signal must interrupt with EINTR, after a restore as before it
 * (tests/test_resume_in_syscall.py).
 *
 *   insyscall KIND...    KIND: pause | read | futex | sleep. The main thread blocks in the first,
 *                        one more thread in each of the others; +KIND: a child process, forked
 *                        first, blocks in KIND (a tree, tests/test_resume_every_path.py).
 *
 * SIGUSR1 has a handler without SA_RESTART, so each of these calls returns -1/EINTR when the signal
 * comes while the thread is inside it. Each call is made once, by syscall(2) (the numbers are the
 * test's). Prints "ready TID:NR ..." (the main thread first) once every other thread is inside its
 * syscall; the test sees the main thread there itself. When its call returns, each thread prints
 * "ret TID R ERRNO HANDLED" and ends; the main thread then waits for the others (and a child's exit
 * status 0), prints "done" and exits 0. A child is listed in "ready" like a thread (PID:NR).
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
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
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

/* Until thread (or child process) `tid` is blocked in syscall `nr` (as tests/targets/threads.c). */
static void wait_until_in(int tid, long nr) {
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/syscall", tid);
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
    /* INSYSCALL_PDEATHSIG=1: SIGUSR1 when the parent dies (ends the main thread's call with EINTR). */
    if (getenv("INSYSCALL_PDEATHSIG") && prctl(PR_SET_PDEATHSIG, SIGUSR1)) return 1;
    long main_nr = nr_of(argv[1]);
    int n = argc - 2;
    pid_t kids[MAX_THREADS];
    long kid_nr[MAX_THREADS];
    int nk = 0;
    for (int i = 0; i < n; i++) {
        if (argv[i + 2][0] != '+') continue;
        kid_nr[nk] = nr_of(argv[i + 2] + 1);
        if (kid_nr[nk] < 0) return 1;
        kids[nk] = fork();
        if (kids[nk] < 0) return 1;
        if (kids[nk] == 0) {
            block_in(kid_nr[nk]);
            _exit(0);
        }
        nk++;
    }
    int nw = 0;
    for (int i = 0; i < n; i++) {
        if (argv[i + 2][0] == '+') continue;
        workers[nw].nr = nr_of(argv[i + 2]);
        if (workers[nw].nr < 0 || main_nr < 0) return 1;
        if (pthread_create(&workers[nw].th, NULL, run, &workers[nw])) return 1;
        nw++;
    }
    n = nw;
    char line[1024];
    int len = snprintf(line, sizeof line, "ready %d:%ld", getpid(), main_nr);
    for (int i = 0; i < nk; i++) {
        wait_until_in(kids[i], kid_nr[i]);
        len += snprintf(line + len, sizeof line - len, " %d:%ld", kids[i], kid_nr[i]);
    }
    for (int i = 0; i < n; i++) {
        while (!__atomic_load_n(&workers[i].tid, __ATOMIC_SEQ_CST)) sched_yield();
        wait_until_in(workers[i].tid, workers[i].nr);
        len += snprintf(line + len, sizeof line - len, " %d:%ld", workers[i].tid, workers[i].nr);
    }
    line[len++] = '\n';
    if (write(1, line, len) != len) return 2;
    block_in(main_nr);
    for (int i = 0; i < n; i++) pthread_join(workers[i].th, NULL);
    for (int i = 0; i < nk; i++) {
        int st;
        if (waitpid(kids[i], &st, 0) != kids[i] || !WIFEXITED(st) || WEXITSTATUS(st)) return 4;
    }
    if (write(1, "done\n", 5) != 5) return 2;
    return 0;
}
