/* A multi-threaded target that checks its threads itself (tests/test_restore_threads.py).
 *
 * usage: threads N [read|nnp]
 * Starts N worker threads. Worker i sets, for itself: a TLS value, a signal mask (one real-time
 * signal of its own blocked), a name "w<i>-<kind>", a CPU affinity (CPU i % ncpu), a scheduling
 * policy (SCHED_FIFO priority 1 for worker 0 if root, SCHED_BATCH for odd i) and nice value (i % 5),
 * a parent-death signal (worker 1: SIGWINCH), a sigaltstack (even i); and it records its
 * tid, fs base, robust list head, clear_child_tid address and rseq area as glibc set them. Then it
 * does its kind of work, by i % 5:
 *   0 futex   waits in FUTEX_WAIT (no timeout) on a word of its own
 *   1 timed   waits in FUTEX_WAIT with a 1000 s timeout (restarted through restart_syscall)
 *   2 pause   waits in pause() (-ERESTARTNOHAND)
 *   3 sleep   waits in nanosleep(1000 s) (restarted through restart_syscall)
 *   4 spin    counts in a loop, and has a signal of its own pending (blocked, queued to it)
 *   5 read    waits in read() on a pipe of its own (only with "read": i % 6 then)
 * With "nnp", worker 0 sets no_new_privs for itself alone (which a restore refuses).
 * The process also has a blocked signal pending for the process as a whole (its shared queue).
 * Every check is done by the worker itself, on the main thread's request: the main thread wakes a
 * waiting worker (futex wake, a byte down its pipe, SIGUSR1) and the worker checks, reports, and
 * goes back to waiting. A wait that ends for another reason (an error, an early return) is a failure.
 *
 * Commands (one line on stdin, answered on stdout):
 *   tids     -> "tids T1 T2 ..."           the workers' tids, in order
 *   waiting  -> "waiting"                  once every waiting worker is inside its wait's syscall
 *   check    -> "ok" or "bad: ..."         every worker checks itself (and the main thread checks
 *                                          that the pending signals are where they were)
 *   advance  -> "advanced"                 once every spinning worker has counted on
 *   exit     -> exits 0
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/rseq.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "lineio.h"

#define MAX_THREADS 64
#define SHARED_SIG (SIGRTMIN + 20)
#define SPIN_SIG (SIGRTMIN + 21)
enum { FUTEX, TIMED, PAUSE, SLEEP, SPIN, READ, KINDS };
static const char *kind_names[KINDS] = {"futex", "timed", "pause", "sleep", "spin", "read"};
static int nkinds = READ; /* READ only with "read" (its pipes need a restore of pipes) */
static int own_nnp;       /* "nnp": worker 0 sets no_new_privs for itself alone */

struct worker {
    int i, kind, tid, pipe[2];
    pthread_t thread;
    long fs_base;
    void *robust_head, *tid_address;
    size_t robust_len;
    sigset_t mask;
    stack_t altstack;
    int futex_word;      /* FUTEX, TIMED: woken when it changes */
    volatile long count; /* SPIN */
    volatile int request, done;
    char error[256];
};

static struct worker workers[MAX_THREADS];
static int nworkers;
static __thread long tls_value = -1;
static __thread char tls_text[32];
static volatile sig_atomic_t usr1_count;

static void on_usr1(int sig) { (void)sig; usr1_count++; }

static long futex(int *addr, int op, int val, const struct timespec *ts) {
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

static void fail(struct worker *w, const char *fmt, ...) {
    if (w->error[0]) return;
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(w->error, sizeof w->error, "w%d: ", w->i);
    vsnprintf(w->error + n, sizeof w->error - n, fmt, ap);
    va_end(ap);
}

static long fs_base(void) {
    long v;
    __asm__ volatile("mov %%fs:0, %0" : "=r"(v)); /* the TCB's self pointer: the fs base */
    return v;
}

static void self_check(struct worker *w) {
    if ((int)syscall(SYS_gettid) != w->tid) fail(w, "tid %ld, was %d", syscall(SYS_gettid), w->tid);
    if (tls_value != w->i * 1000 + 7) fail(w, "TLS value %ld", tls_value);
    char want[32];
    snprintf(want, sizeof want, "tls-%d", w->i);
    if (strcmp(tls_text, want)) fail(w, "TLS text %s", tls_text);
    if (fs_base() != w->fs_base) fail(w, "fs base %lx, was %lx", fs_base(), w->fs_base);
    sigset_t cur;
    pthread_sigmask(SIG_BLOCK, NULL, &cur);
    for (int s = 1; s < NSIG; s++)
        if (sigismember(&cur, s) != sigismember(&w->mask, s)) fail(w, "signal %d blocked: %d", s, sigismember(&cur, s));
    char name[16] = {0};
    prctl(PR_GET_NAME, name);
    snprintf(want, sizeof want, "w%d-%s", w->i, kind_names[w->kind]);
    if (strcmp(name, want)) fail(w, "name %s", name);
    cpu_set_t cpus;
    sched_getaffinity(0, sizeof cpus, &cpus);
    int ncpu = CPU_COUNT(&cpus);
    if (ncpu != 1 || !CPU_ISSET(w->i % sysconf(_SC_NPROCESSORS_ONLN), &cpus)) fail(w, "affinity: %d CPUs", ncpu);
    int policy = sched_getscheduler(0);
    int fifo = w->i == 0 && !getuid();
    if (policy != (fifo ? SCHED_FIFO : w->i % 2 ? SCHED_BATCH : SCHED_OTHER)) fail(w, "policy %d", policy);
    struct sched_param sp;
    sched_getparam(0, &sp);
    if (sp.sched_priority != fifo) fail(w, "real-time priority %d", sp.sched_priority);
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, 0);
    if (nice != w->i % 5) fail(w, "nice %d", nice);
    void *head;
    size_t len;
    syscall(SYS_get_robust_list, 0, &head, &len);
    if (head != w->robust_head || len != w->robust_len) fail(w, "robust list %p/%zu, was %p", head, len, w->robust_head);
    void *tidaddr = NULL;
    prctl(PR_GET_TID_ADDRESS, &tidaddr);
    if (tidaddr != w->tid_address) fail(w, "clear_child_tid %p, was %p", tidaddr, w->tid_address);
    if (__rseq_size) {
        /* Registering the thread's own area again fails with EBUSY only if it is registered. */
        void *area = (char *)__builtin_thread_pointer() + __rseq_offset;
        long r = syscall(SYS_rseq, area, __rseq_size > 32 ? __rseq_size : 32, 0, RSEQ_SIG);
        if (r == 0 || errno != EBUSY) fail(w, "rseq area %p not registered (%ld, errno %d)", area, r, errno);
    }
    int pdeath = -1;
    prctl(PR_GET_PDEATHSIG, &pdeath);
    if (pdeath != (w->i == 1 ? SIGWINCH : 0)) fail(w, "parent-death signal %d", pdeath);
    stack_t ss;
    sigaltstack(NULL, &ss);
    if (ss.ss_sp != w->altstack.ss_sp || ss.ss_size != w->altstack.ss_size || (ss.ss_flags & SS_DISABLE) != (w->altstack.ss_flags & SS_DISABLE))
        fail(w, "sigaltstack %p/%zu/%d", ss.ss_sp, ss.ss_size, ss.ss_flags);
    if (w->kind == SPIN) {
        sigset_t pend;
        sigpending(&pend);
        if (!sigismember(&pend, SPIN_SIG)) fail(w, "its own pending signal is gone");
    }
}

static void *work(void *arg) {
    struct worker *w = arg;
    w->tid = (int)syscall(SYS_gettid);
    tls_value = w->i * 1000 + 7;
    snprintf(tls_text, sizeof tls_text, "tls-%d", w->i);
    w->fs_base = fs_base();
    char name[16];
    snprintf(name, sizeof name, "w%d-%s", w->i, kind_names[w->kind]);
    prctl(PR_SET_NAME, name);
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    CPU_SET(w->i % sysconf(_SC_NPROCESSORS_ONLN), &cpus);
    sched_setaffinity(0, sizeof cpus, &cpus);
    struct sched_param sp = {0};
    if (w->i % 2) sched_setscheduler(0, SCHED_BATCH, &sp);
    sp.sched_priority = 1;
    if (w->i == 0 && !getuid()) sched_setscheduler(0, SCHED_FIFO, &sp); /* a waiting worker: never spins */
    setpriority(PRIO_PROCESS, 0, w->i % 5);
    if (w->i % 2 == 0) {
        w->altstack.ss_sp = malloc(65536);
        w->altstack.ss_size = 65536;
        w->altstack.ss_flags = 0;
        sigaltstack(&w->altstack, NULL);
    } else {
        sigaltstack(NULL, &w->altstack);
    }
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGRTMIN + 1 + w->i % 16);
    sigaddset(&block, SHARED_SIG);
    if (w->kind == SPIN) sigaddset(&block, SPIN_SIG);
    pthread_sigmask(SIG_BLOCK, &block, NULL);
    pthread_sigmask(SIG_BLOCK, NULL, &w->mask);
    if (w->kind == SPIN) pthread_sigqueue(pthread_self(), SPIN_SIG, (union sigval){.sival_int = w->i});
    syscall(SYS_get_robust_list, 0, &w->robust_head, &w->robust_len);
    prctl(PR_GET_TID_ADDRESS, &w->tid_address); /* last: main waits for it to be set */

    if (w->i == 0 && own_nnp) prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); /* per thread: refused */
    /* Its own parent-death signal, one that does nothing when it comes (ckpt restore --detach
     * leaves the restored process, its parent gone, at once). */
    if (w->i == 1) prctl(PR_SET_PDEATHSIG, SIGWINCH);
    int seen = 0; /* requests handled */
    double acc = 0; /* SPIN: kept in a vector register across the dump */
    struct timespec long_time = {1000, 0};
    for (;;) {
        if (w->kind == SPIN) {
            w->count++;
            acc += 0.5;
            if (w->request == seen) continue;
            if (acc != w->count * 0.5) fail(w, "FPU sum %f after %ld steps", acc, w->count);
        } else {
            long r = 0;
            int e = 0;
            char byte;
            int usr1 = usr1_count;
            if (w->kind == FUTEX || w->kind == TIMED) {
                r = futex(&w->futex_word, FUTEX_WAIT_PRIVATE, 0, w->kind == TIMED ? &long_time : NULL);
                e = errno;
                if (r == -1 && e == EAGAIN) r = 0; /* woken before it slept: the word changed */
                if (r == 0 && __atomic_load_n(&w->futex_word, __ATOMIC_SEQ_CST) == 0)
                    fail(w, "futex wait returned with the word unchanged");
                __atomic_store_n(&w->futex_word, 0, __ATOMIC_SEQ_CST);
            } else if (w->kind == READ) {
                r = read(w->pipe[0], &byte, 1);
                e = errno;
                if (r == 1 && byte != 'x') fail(w, "read %c", byte);
                if (r == 1) r = 0;
            } else if (w->kind == PAUSE) {
                r = pause();
                e = errno;
                if (r == -1 && e == EINTR && usr1_count != usr1) r = 0; /* our wake-up */
                else fail(w, "pause returned %ld (errno %d) unwoken", r, e);
            } else {
                r = syscall(SYS_nanosleep, &long_time, NULL); /* glibc would use clock_nanosleep */
                e = errno;
                if (r == -1 && e == EINTR && usr1_count != usr1) r = 0; /* our wake-up */
                else fail(w, "nanosleep returned %ld (errno %d) unwoken", r, e);
            }
            if (r != 0) fail(w, "%s wait failed: %ld errno %d", kind_names[w->kind], r, e);
            if (w->request == seen) {
                fail(w, "woken without a request");
                continue;
            }
        }
        seen = w->request;
        self_check(w);
        __atomic_store_n(&w->done, seen, __ATOMIC_SEQ_CST);
        futex((int *)&w->done, FUTEX_WAKE_PRIVATE, 1, NULL);
    }
    return NULL;
}

/* The syscall a waiting worker must be in (the main thread sees it in /proc). */
static long waits_in(int kind) {
    switch (kind) {
    case FUTEX: case TIMED: return SYS_futex;
    case READ: return SYS_read;
    case PAUSE: return SYS_pause;
    case SLEEP: return SYS_nanosleep;
    }
    return -1;
}

/* Until the worker is in the syscall it waits in (after a check it is on its way back to it). */
static void wait_until_in(int tid, long nr) {
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/self/task/%d/syscall", tid);
    for (;;) {
        FILE *f = fopen(path, "r");
        if (!f) return;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        long in = strncmp(buf, "running", 7) ? strtol(buf, NULL, 10) : -1;
        /* A timed wait interrupted (by a freeze) goes on in restart_syscall. */
        if (in == nr || in == SYS_restart_syscall) return;
        sched_yield();
    }
}

static int status_has(const char *path, const char *key, int sig) {
    char line[256];
    FILE *f = fopen(path, "r");
    int found = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, strlen(key))) found = (strtoull(line + strlen(key), NULL, 16) >> (sig - 1)) & 1;
    if (f) fclose(f);
    return found;
}

static void check(void) {
    static int gen;
    gen++;
    const char *bad = NULL;
    static char msg[512];
    if (!status_has("/proc/self/status", "ShdPnd:", SHARED_SIG)) bad = "the process's shared pending signal is gone";
    for (int i = 0; i < nworkers && !bad; i++) {
        struct worker *w = &workers[i];
        char path[64];
        snprintf(path, sizeof path, "/proc/self/task/%d/status", w->tid);
        if (w->kind == SPIN && !status_has(path, "SigPnd:", SPIN_SIG)) {
            snprintf(msg, sizeof msg, "w%d: its pending signal is not its own", i);
            bad = msg;
        }
    }
    for (int i = 0; i < nworkers && !bad; i++) {
        struct worker *w = &workers[i];
        w->request = gen;
        if (w->kind == FUTEX || w->kind == TIMED) {
            __atomic_store_n(&w->futex_word, 1, __ATOMIC_SEQ_CST);
            futex(&w->futex_word, FUTEX_WAKE_PRIVATE, 1, NULL);
        } else if (w->kind == READ) {
            if (write(w->pipe[1], "x", 1) != 1) bad = "write to a worker's pipe failed";
        } else if (w->kind == SLEEP || w->kind == PAUSE) {
            wait_until_in(w->tid, waits_in(w->kind)); /* a signal before it waits would not wake it */
            pthread_kill(w->thread, SIGUSR1);
        }
        int d;
        while ((d = __atomic_load_n(&w->done, __ATOMIC_SEQ_CST)) != gen) futex((int *)&w->done, FUTEX_WAIT_PRIVATE, d, NULL);
        if (w->error[0]) bad = w->error;
    }
    printf("%s%s\n", bad ? "bad: " : "ok", bad ? bad : "");
}

int main(int argc, char **argv) {
    nworkers = argc > 1 ? atoi(argv[1]) : 4;
    if (argc > 2 && !strcmp(argv[2], "read")) nkinds = KINDS;
    if (argc > 2 && !strcmp(argv[2], "nnp")) own_nnp = 1;
    if (nworkers < 0 || nworkers > MAX_THREADS) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    struct sigaction sa = {.sa_handler = on_usr1}; /* no SA_RESTART: nanosleep returns EINTR */
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SHARED_SIG);
    sigaddset(&block, SPIN_SIG);
    pthread_sigmask(SIG_BLOCK, &block, NULL);
    kill(getpid(), SHARED_SIG); /* pending for the process: every thread blocks it */
    for (int i = 0; i < nworkers; i++) {
        struct worker *w = &workers[i];
        w->i = i;
        w->kind = i % nkinds;
        if (w->kind == READ && pipe(w->pipe)) return 3;
        pthread_create(&w->thread, NULL, work, w);
    }
    for (int i = 0; i < nworkers; i++)
        while (!__atomic_load_n(&workers[i].tid_address, __ATOMIC_SEQ_CST) || !workers[i].mask.__val[0]) sched_yield();
    printf("ready %d\n", nworkers);
    char line[256];
    while (read_command(line, sizeof line)) {
        if (!strncmp(line, "tids", 4)) {
            printf("tids");
            for (int i = 0; i < nworkers; i++) printf(" %d", workers[i].tid);
            printf("\n");
        } else if (!strncmp(line, "waiting", 7)) {
            for (int i = 0; i < nworkers; i++)
                if (workers[i].kind != SPIN) wait_until_in(workers[i].tid, waits_in(workers[i].kind));
            printf("waiting\n");
        } else if (!strncmp(line, "check", 5)) {
            check();
        } else if (!strncmp(line, "advance", 7)) {
            for (int i = 0; i < nworkers; i++) {
                long c = workers[i].count;
                while (workers[i].kind == SPIN && workers[i].count == c) sched_yield();
            }
            printf("advanced\n");
        } else if (!strncmp(line, "exit", 4)) {
            exit(0);
        } else {
            printf("unknown command\n");
        }
    }
    return 0;
}
