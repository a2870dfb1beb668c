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

#include "lineio.h"

static volatile int segv_count;
static volatile long early;

static void on_segv(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)si; (void)uc;
    segv_count++;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *mode = argc > 1 ? argv[1] : "dfl";
    set_disposition(SIGSEGV, mode, on_segv);
    if (!strcmp(mode, "block"))
        block_signal(SIGSEGV);
    printf("ready %d\n", getpid());
    char line[64];
    while (read_command_counted(line, sizeof line, &early)) {
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
    return 3;
}
