/* Processes that share clone()'s tables (tests/test_shared_tables.py). Each argument makes one
 * process, cloned from the one named by its first character ('0' the main process, '1' the
 * first made, ...) with the flags the rest spells: F CLONE_FILES, S CLONE_FS, V CLONE_VM with
 * H CLONE_SIGHAND (needs V), '-' none. Every process idles in pause(). Prints
 * "ready PID P1 P2 ..." (the pids made, in argument order) once all exist. Each child has a stack
 * of its own; with V it shares the memory, so it writes nothing but its own stack. */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#define MAX 32
static char stacks[MAX][16384];
static int nargs;
static char **args;
static int told[2];

static int run(void *a);

static void make_children(int self) {
    /* Only the owner of index `self` clones the processes whose parent digit names it. */
    for (int i = 0; i < nargs; i++) {
        if (args[i][0] - '0' != self) continue;
        int flags = SIGCHLD;
        for (const char *c = args[i] + 1; *c; c++) {
            if (*c == 'F') flags |= CLONE_FILES;
            if (*c == 'S') flags |= CLONE_FS;
            if (*c == 'V') flags |= CLONE_VM;
            if (*c == 'H') flags |= CLONE_SIGHAND;
        }
        int pid = clone(run, stacks[i] + sizeof stacks[i], flags, (void *)(long)(i + 1));
        if (pid < 0) { perror("clone"); _exit(1); }
    }
}

static int run(void *a) {
    int self = (int)(long)a;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    make_children(self);
    char line[32];
    int n = snprintf(line, sizeof line, "%d %d\n", self, getpid());
    if (write(told[1], line, n) != n) _exit(1);
    for (;;) pause();
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    nargs = argc - 1 > MAX ? MAX : argc - 1;
    args = argv + 1;
    if (pipe(told)) return 1;
    make_children(0);
    /* Each process made says "INDEX PID" on the pipe once it has made its own children (a write of
     * a few bytes to a pipe is atomic). */
    int known[MAX + 1] = {0};
    char buf[64];
    int len = 0;
    for (int got = 0; got < nargs;) {
        long r = read(told[0], buf + len, 1);
        if (r != 1) return 2;
        if (buf[len] != '\n' && len + 2 < (int)sizeof buf) { len++; continue; }
        buf[len] = 0;
        len = 0;
        int idx, pid;
        if (sscanf(buf, "%d %d", &idx, &pid) == 2 && idx >= 1 && idx <= nargs) { known[idx] = pid; got++; }
    }
    printf("ready %d", getpid());
    for (int i = 1; i <= nargs; i++) printf(" %d", known[i]);
    printf("\n");
    for (;;) pause();
}
