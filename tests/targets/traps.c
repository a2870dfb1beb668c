/* A target for injected syscalls run in one stop (a single-step over the syscall, whose exit the
 * kernel reports with a SIGTRAP it forces: ckpt/ptrace/inject.py, step_over_syscall). argv[1] sets
 * SIGTRAP's disposition in every thread:
 *   dfl      default action (a SIGTRAP that got through would kill the target with a core dump)
 *   handler  a handler that counts and keeps the last si_code (SA_SIGINFO)
 *   ignore   SIG_IGN
 *   block    blocked in the main thread's mask (the worker thread does not block it)
 * A worker thread sleeps an hour in nanosleep(); the main thread reads commands on stdin. Any early
 * return of either is counted. Prints "ready PID", then answers:
 *   count -> "trap N code C early E"
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "lineio.h"

static volatile int trap_count, trap_code, started;
static volatile long early;

static void on_trap(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    __atomic_add_fetch(&trap_count, 1, __ATOMIC_SEQ_CST);
    trap_code = si->si_code;
}

static void *sleeper(void *a) {
    (void)a;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        struct timespec ts = {3600, 0};
        if (!(nanosleep(&ts, NULL) != 0 && errno == EINTR)) __atomic_add_fetch(&early, 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *mode = argc > 1 ? argv[1] : "dfl";
    set_disposition(SIGTRAP, mode, on_trap);
    pthread_t t;
    pthread_create(&t, NULL, sleeper, NULL);
    if (!strcmp(mode, "block"))
        block_signal(SIGTRAP);  /* (the main thread only) */
    while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < 1) sched_yield();
    printf("ready %d\n", getpid());
    char line[64];
    while (read_command_counted(line, sizeof line, &early)) {
        if (!strcmp(line, "count")) printf("trap %d code %d early %ld\n", trap_count, trap_code, early);
        else puts("unknown");
    }
    return 3;
}
