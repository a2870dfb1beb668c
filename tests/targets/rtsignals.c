/* A target for batched injection (ckpt/ptrace/batch.py): real-time signals in every disposition, a
 * thread that blocks every signal, and threads blocked in calls that must never return early.
 *
 *   SIGRTMAX      handler, counted        SIGRTMAX-1   ignored (SIG_IGN)
 *   SIGRTMAX-2    default action (terminates: a stray one kills the target, which the tests see)
 *   SIGUSR1       handler, counted
 * Threads: "allblocked" blocks every signal and waits in read() on a pipe nobody writes; "ppoll" waits
 * in ppoll() on that pipe with every real-time signal blocked by ppoll's temporary mask (which the kernel
 * swaps for the thread's own mask before a tracer's code runs, and ppoll sets again at its restart); two threads
 * sleep an hour in nanosleep(), one blocking SIGRTMAX (its highest unblocked real-time signal is the
 * ignored one), one blocking SIGRTMAX and SIGRTMAX-1 (highest unblocked: one whose default action
 * kills); the main thread blocks nothing and reads commands from stdin. Any early return is counted.
 * Prints "ready PID", then answers:
 *   count -> "rtmax N usr1 N early N last CALL"
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int quiet[2];
static volatile int started, rtmax_count, usr1_count;
static volatile long early;
static char last[64] = "none";

static void report(const char *call, long ret, int err) {
    __atomic_add_fetch(&early, 1, __ATOMIC_SEQ_CST);
    snprintf(last, sizeof last, "%s:%ld:%d", call, ret, err);
}

static void on_rtmax(int sig) { (void)sig; __atomic_add_fetch(&rtmax_count, 1, __ATOMIC_SEQ_CST); }
static void on_usr1(int sig) { (void)sig; __atomic_add_fetch(&usr1_count, 1, __ATOMIC_SEQ_CST); }

static void *t_allblocked(void *a) {
    (void)a;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    char c;
    for (;;) { long r = read(quiet[0], &c, 1); report("read", r, errno); }
    return NULL;
}

static void *t_ppoll(void *a) {
    (void)a;
    sigset_t m;
    pthread_sigmask(SIG_SETMASK, NULL, &m);
    for (int s = SIGRTMIN; s <= SIGRTMAX; s++) sigaddset(&m, s);
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        struct pollfd p = {quiet[0], POLLIN, 0};
        long r = ppoll(&p, 1, NULL, &m);
        if (!(r < 0 && errno == EINTR)) report("ppoll", r, errno);  /* EINTR: SIGUSR1's handler ran */
    }
    return NULL;
}

static void *t_nanosleep(void *a) {
    sigset_t m;
    sigemptyset(&m);
    for (long i = 0; i < (long)a; i++) sigaddset(&m, SIGRTMAX - (int)i);
    pthread_sigmask(SIG_BLOCK, &m, NULL);
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        struct timespec ts = {3600, 0};
        long r = nanosleep(&ts, NULL);
        if (!(r < 0 && errno == EINTR)) report("nanosleep", r, errno);
    }
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (pipe(quiet)) return 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_rtmax;
    sigaction(SIGRTMAX, &sa, NULL);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);  /* no SA_RESTART: an interrupted call in another thread says EINTR */
    sa.sa_handler = SIG_IGN;
    sigaction(SIGRTMAX - 1, &sa, NULL);
    void *(*fns[])(void *) = {t_allblocked, t_ppoll, t_nanosleep, t_nanosleep};
    void *args[] = {NULL, NULL, (void *)1L, (void *)2L};
    pthread_t t;
    for (int i = 0; i < 4; i++) pthread_create(&t, NULL, fns[i], args[i]);
    while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < 4) sched_yield();
    printf("ready %d\n", getpid());
    char line[64];
    size_t len = 0;
    for (;;) {
        long r = read(0, line + len, 1);
        if (r != 1) {
            if (r < 0 && errno == EINTR) continue;  /* SIGUSR1's handler ran in this thread */
            report("read0", r, errno);
            if (r == 0) return 3;
            continue;
        }
        if (line[len] != '\n' && len + 2 < sizeof line) { len++; continue; }
        line[len] = 0;
        len = 0;
        if (!strcmp(line, "count"))
            printf("rtmax %d usr1 %d early %ld last %s\n", rtmax_count, usr1_count, early, last);
        else puts("unknown");
    }
}
