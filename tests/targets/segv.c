/* A one-thread target for a batch's run that unmaps its own code (ckpt/ptrace/batch.py
 * assemble_sp's unmap): the return from that munmap faults, and the run ends in the stop of a
 * SIGSEGV the kernel forces. argv[1] sets SIGSEGV's disposition:
 *   dfl      default action (a SIGSEGV that got through would kill the target with a core dump)
 *   handler  a handler that counts (SA_SIGINFO)
 *   ignore   SIG_IGN
 *   block    blocked in the thread's mask
 * A forced SIGSEGV that is blocked or ignored is unblocked and reset to SIG_DFL by the kernel: the
 * target must see neither. It reads commands on stdin (an early return of read is counted). Prints
 * "ready PID", then answers:
 *   state -> "segv N action A blocked B early E" (A: dfl, ign or handler; B: 0 or 1)
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile int segv_count;
static volatile long early;

static void on_segv(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)si; (void)uc;
    segv_count++;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *mode = argc > 1 ? argv[1] : "dfl";
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    if (!strcmp(mode, "handler")) {
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO | SA_RESTART;
        sigaction(SIGSEGV, &sa, NULL);
    } else if (!strcmp(mode, "ignore")) {
        sa.sa_handler = SIG_IGN;
        sigaction(SIGSEGV, &sa, NULL);
    } else if (!strcmp(mode, "block")) {
        sigset_t m;
        sigemptyset(&m);
        sigaddset(&m, SIGSEGV);
        sigprocmask(SIG_BLOCK, &m, NULL);
    }
    printf("ready %d\n", getpid());
    char line[64];
    size_t len = 0;
    for (;;) {
        long r = read(0, line + len, 1);
        if (r != 1) {
            early++;
            if (r == 0) return 3;
            continue;
        }
        if (line[len] != '\n' && len + 2 < sizeof line) { len++; continue; }
        line[len] = 0;
        len = 0;
        if (!strcmp(line, "state")) {
            struct sigaction now;
            sigset_t m;
            sigaction(SIGSEGV, NULL, &now);
            sigprocmask(SIG_BLOCK, NULL, &m);
            const char *a = now.sa_handler == SIG_DFL ? "dfl" : now.sa_handler == SIG_IGN ? "ign" : "handler";
            printf("segv %d action %s blocked %d early %ld\n", segv_count, a, sigismember(&m, SIGSEGV), early);
        } else
            puts("unknown");
    }
}
