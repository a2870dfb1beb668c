/* What the stops of a freeze cost a tracer written in C, on this machine (bench_freeze.py --stopfloor).
 *
 *   stopfloor PID ROUNDS
 *
 * For the process PID (every thread idle: bench/freezetarget.c), ROUNDS times each:
 *   freeze  PTRACE_SEIZE + PTRACE_INTERRUPT of every thread, then a blocking waitpid for each stop,
 *           then PTRACE_DETACH of every thread: the least a ptrace freeze of the process is;
 *   step    one injected getpid() in the first thread, by PTRACE_SINGLESTEP over the syscall
 *           instruction it is stopped after (registers saved and put back): one round trip.
 * Prints one line per measure: "NAME p10 p50 p90 p99" in microseconds. No sleeping between rounds
 * beyond a 2 ms pause that lets the threads go back to their sleep.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>

#define MAXT 256

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void report(const char *name, double *v, int n) {
    qsort(v, n, sizeof *v, cmp);
    printf("%s %.1f %.1f %.1f %.1f\n", name, v[n / 10], v[n / 2], v[n * 9 / 10], v[n * 99 / 100]);
}

static int threads(int pid, int *tids) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *d = opendir(path);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < MAXT)
        if (e->d_name[0] != '.') tids[n++] = atoi(e->d_name);
    closedir(d);
    return n;
}

static int stop_all(const int *tids, int n) {
    for (int i = 0; i < n; i++)
        if (ptrace(PTRACE_SEIZE, tids[i], 0, 0) || ptrace(PTRACE_INTERRUPT, tids[i], 0, 0)) return -1;
    for (int i = 0; i < n; i++) {
        int st;
        if (waitpid(tids[i], &st, __WALL) != tids[i] || !WIFSTOPPED(st)) return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: stopfloor PID ROUNDS\n");
        return 2;
    }
    int pid = atoi(argv[1]), rounds = atoi(argv[2]);
    int tids[MAXT];
    int n = threads(pid, tids);
    if (n <= 0 || rounds < 10) {
        fprintf(stderr, "stopfloor: no threads in %d, or fewer than 10 rounds\n", pid);
        return 1;
    }
    double *freeze = calloc(rounds, sizeof(double)), *step = calloc(rounds, sizeof(double));
    struct timespec pause = {0, 2000000};
    for (int r = 0; r < rounds; r++) {
        double t0 = now_us();
        if (stop_all(tids, n)) {
            perror("stopfloor: freeze");
            return 1;
        }
        for (int i = 0; i < n; i++) ptrace(PTRACE_DETACH, tids[i], 0, 0);
        freeze[r] = now_us() - t0;
        nanosleep(&pause, NULL);
    }
    if (stop_all(tids, 1)) {
        perror("stopfloor: stop");
        return 1;
    }
    struct user_regs_struct saved, r;
    ptrace(PTRACE_GETREGS, tids[0], 0, &saved);
    errno = 0;
    long insn = ptrace(PTRACE_PEEKTEXT, tids[0], (void *)(saved.rip - 2), 0);
    if (errno || (insn & 0xffff) != 0x050f) {
        /* A busy thread stops wherever it ran (no syscall instruction to step over): its freeze
           rounds stand, its step row says it was not measured. */
        ptrace(PTRACE_DETACH, tids[0], 0, 0);
        printf("threads %d\n", n);
        report("freeze", freeze, rounds);
        printf("step - - - -\n");
        return 0;
    }
    for (int k = 0; k < rounds; k++) {
        r = saved;
        r.rip = saved.rip - 2;
        r.rax = 39; /* getpid */
        r.orig_rax = -1;
        double t0 = now_us();
        int st;
        ptrace(PTRACE_SETREGS, tids[0], 0, &r);
        ptrace(PTRACE_SINGLESTEP, tids[0], 0, 0);
        waitpid(tids[0], &st, __WALL);
        step[k] = now_us() - t0;
        ptrace(PTRACE_SETREGS, tids[0], 0, &saved);
    }
    ptrace(PTRACE_DETACH, tids[0], 0, 0);
    printf("threads %d\n", n);
    report("freeze", freeze, rounds);
    report("step", step, rounds);
    return 0;
}
