/* A process tree that checks itself after a restore (tests/test_restore_tree.py).
 *
 *   R (root) ── A ── G        A: plain child, G: A's child
 *             ├─ Z            Z: exited with status 7, never reaped (a zombie)
 *             ├─ P            P: its own process group
 *             └─ S            S: a new session
 *
 * Every live process fills pages with a pattern of its own, says it is set up, and waits in pause()
 * for SIGUSR1. Then it checks its pid, parent, group, session and memory: children exit 0 if all is
 * as before (else a code naming the first difference), and R reaps them all, Z first (status 7
 * expected), and prints "tree ok" or what differed, then exits 0 or 1.
 * Usage: tree            prints "ready R A G Z P S" once everything is in place.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define NPAGES 16
static unsigned char mem[NPAGES * 4096];
static volatile sig_atomic_t go;
static pid_t mypid, rpid, apid;

static void on_usr1(int s) { (void)s; go = 1; }

static void fill(int role) {
    for (size_t i = 0; i < sizeof mem; i++) mem[i] = (unsigned char)(role * 31 + i * 7);
}

static int mem_ok(int role) {
    for (size_t i = 0; i < sizeof mem; i++)
        if (mem[i] != (unsigned char)(role * 31 + i * 7)) return 0;
    return 1;
}

static void wait_go(void) {
    while (!go) pause();
}

/* 0 if all holds, else the number of the first check that failed (10 + n). */
static int check(int role, pid_t parent, pid_t want_pgid, pid_t want_sid) {
    if (getpid() != mypid) return 11;
    if (getppid() != parent) return 12;
    if (getpgid(0) != want_pgid) return 13;
    if (getsid(0) != want_sid) return 14;
    if (!mem_ok(role)) return 15;
    return 0;
}

static void ready(int fd) {
    char c = 1;
    if (write(fd, &c, 1) != 1) _exit(2);
    close(fd);
}

int main(void) {
    int rd[2];
    signal(SIGUSR1, on_usr1);
    if (pipe(rd)) return 2;
    rpid = mypid = getpid();
    fill(1);

    pid_t a = fork();
    if (a == 0) {
        close(rd[0]);
        mypid = apid = getpid();
        fill(2);
        pid_t g = fork();
        if (g == 0) {
            mypid = getpid();
            fill(3);
            ready(rd[1]);
            wait_go();
            _exit(check(3, apid, getpgid(apid), getsid(apid)));
        }
        ready(rd[1]);
        wait_go();
        int rc = check(2, rpid, getpgid(rpid), getsid(rpid)), st;
        if (waitpid(g, &st, 0) != g) rc = 21;
        else if (!rc && !(WIFEXITED(st) && WEXITSTATUS(st) == 0)) rc = 22;
        _exit(rc);
    }
    pid_t z = fork();
    if (z == 0) _exit(7);
    pid_t p = fork();
    if (p == 0) {
        close(rd[0]);
        mypid = getpid();
        setpgid(0, 0);
        fill(4);
        ready(rd[1]);
        wait_go();
        _exit(check(4, rpid, mypid, getsid(rpid)));
    }
    setpgid(p, p); /* either may run first: both ask for the same */
    pid_t s = fork();
    if (s == 0) {
        close(rd[0]);
        mypid = getpid();
        if (setsid() < 0) _exit(2);
        fill(5);
        ready(rd[1]);
        wait_go();
        _exit(check(5, rpid, mypid, mypid));
    }
    close(rd[1]);
    char buf[4];
    for (int n = 0; n < 4;) {
        ssize_t k = read(rd[0], buf, 1);
        if (k <= 0) return 2;
        n += (int)k;
    }
    close(rd[0]);
    siginfo_t si;
    if (waitid(P_PID, (id_t)z, &si, WEXITED | WNOWAIT)) return 2; /* Z is a zombie now */
    pid_t g = 0;
    {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/task/%d/children", a, a);
        FILE *f = fopen(path, "r");
        if (!f || fscanf(f, "%d", &g) != 1) return 2;
        fclose(f);
    }
    printf("ready %d %d %d %d %d %d\n", rpid, a, g, z, p, s);
    fflush(stdout);

    wait_go();
    int st;
    char out[256] = "";
    if (getpid() != mypid || !mem_ok(1)) strcat(out, " root");
    if (waitpid(z, &st, WNOHANG) != z || !WIFEXITED(st) || WEXITSTATUS(st) != 7) strcat(out, " zombie");
    pid_t kids[3] = {a, p, s};
    const char *names[3] = {"A", "P", "S"};
    for (int i = 0; i < 3; i++) {
        if (waitpid(kids[i], &st, 0) != kids[i]) {
            snprintf(out + strlen(out), 40, " %s:nowait", names[i]);
        } else if (!WIFEXITED(st) || WEXITSTATUS(st)) {
            snprintf(out + strlen(out), 40, " %s:%d", names[i], WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
        }
    }
    printf("tree %s\n", out[0] ? out : "ok");
    fflush(stdout);
    return out[0] ? 1 : 0;
}
