/* SysV shared memory shared by the processes of a tree (issue 12 B3/B4), checked by the processes
 * themselves after a checkpoint/restore.
 *
 *   seg A  key 0x5ce1PPPP (PID's low bits), 3 pages, attached by the parent, inherited by the child
 *          (fork copies attaches): the same segment at the same address in both
 *   seg B  IPC_PRIVATE, 2 pages, attached twice by the parent (two addresses), then IPC_RMID: the
 *          child inherits both attaches; it lives while attached, SHM_DEST set, key 0
 *
 * Prints "ready CHILD" once both are set up (and, after "ready", the parent's pages PPPP). Then
 * SIGUSR1 to the child: it checks the bytes it sees, writes its mark into A and B, exits 0 (or 3).
 * Then SIGUSR1 to the parent: it reaps the child, checks the child's marks through its own attaches
 * (the segments are shared again, not copies), that a write through B's first attach shows through
 * its second, IPC_STAT of A (key, size, mode, two attaches... now one: the child exited) and of B
 * (SHM_DEST), and prints "ok" or what is wrong. With argument "twice", the child attaches A a second
 * time itself before "ready" (one process attached twice to a segment another process holds too).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <unistd.h>

#define PG 4096
static unsigned char *a, *b1, *b2;
static int aid, bid;

static void die(const char *what) {
    fprintf(stderr, "%s: %s\n", what, strerror(errno));
    exit(2);
}

static void fill(unsigned char *p, size_t n, int seed) {
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(i * 7 + seed);
}

static int same(const unsigned char *p, size_t n, int seed) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != (unsigned char)(i * 7 + seed)) return 0;
    return 1;
}

static void wait_usr1(void) {
    sigset_t s;
    int sig;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    if (sigwait(&s, &sig)) die("sigwait");
}

int main(int argc, char **argv) {
    int twice = argc > 1 && !strcmp(argv[1], "twice");
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    sigprocmask(SIG_BLOCK, &s, NULL);

    aid = shmget(0x5ce10000 | (getpid() & 0xffff), 3 * PG, IPC_CREAT | IPC_EXCL | 0640);
    if (aid < 0) die("shmget A");
    a = shmat(aid, NULL, 0);
    if (a == (void *)-1) die("shmat A");
    fill(a, 3 * PG, 1);
    bid = shmget(IPC_PRIVATE, 2 * PG, IPC_CREAT | 0600);
    if (bid < 0) die("shmget B");
    b1 = shmat(bid, NULL, 0);
    b2 = shmat(bid, NULL, 0);
    if (b1 == (void *)-1 || b2 == (void *)-1) die("shmat B");
    fill(b1, 2 * PG, 2);
    if (shmctl(bid, IPC_RMID, NULL)) die("IPC_RMID");

    int ready[2];
    if (pipe(ready)) die("pipe");
    pid_t c = fork();
    if (c < 0) die("fork");
    if (c == 0) {
        unsigned char *a2 = NULL;
        close(ready[0]);
        if (twice) {
            a2 = shmat(aid, NULL, SHM_RDONLY);
            if (a2 == (void *)-1) die("shmat A again");
        }
        if (write(ready[1], "k", 1) != 1) die("write");
        close(ready[1]);
        wait_usr1();
        int ok = same(a, 3 * PG, 1) && same(b1, 2 * PG, 2) && b1 != b2 && same(b2, 2 * PG, 2);
        if (a2) ok = ok && same(a2, 3 * PG, 1);
        memcpy(a + PG + 5, "child-A", 7);
        memcpy(b2 + 9, "child-B", 7);
        if (a2) ok = ok && !memcmp(a2 + PG + 5, "child-A", 7);  /* its own two attaches: one segment */
        _exit(ok ? 0 : 3);
    }
    close(ready[1]);
    char k;
    if (read(ready[0], &k, 1) != 1) die("read");
    close(ready[0]);
    printf("ready %d\n", c);
    fflush(stdout);
    wait_usr1();
    int st;
    if (waitpid(c, &st, 0) != c) die("waitpid");
    char bad[512] = "";
    size_t n = 0;
#define BAD(...) (n += snprintf(bad + n, n < sizeof bad ? sizeof bad - n : 0, __VA_ARGS__))
    if (!WIFEXITED(st) || WEXITSTATUS(st)) BAD("child %#x; ", st);
    if (memcmp(a + PG + 5, "child-A", 7)) BAD("A not shared; ");
    if (memcmp(b1 + 9, "child-B", 7) || memcmp(b2 + 9, "child-B", 7)) BAD("B not shared; ");
    b1[3 * 7] ^= 0xff;
    if (b2[3 * 7] != b1[3 * 7]) BAD("B's two attaches differ; ");
    struct shmid_ds ds;
    if (shmctl(aid, IPC_STAT, &ds)) BAD("IPC_STAT A %d: %s; ", aid, strerror(errno));
    else if (ds.shm_segsz != 3 * PG || ds.shm_nattch != 1 || (ds.shm_perm.mode & 0777) != 0640 ||
             ds.shm_perm.__key != (key_t)(0x5ce10000 | (getpid() & 0xffff)))
        BAD("A: size %zu nattch %lu mode %o; ", ds.shm_segsz, (unsigned long)ds.shm_nattch, ds.shm_perm.mode);
    if (shmctl(bid, IPC_STAT, &ds)) BAD("IPC_STAT B %d: %s; ", bid, strerror(errno));
    else if (ds.shm_segsz != 2 * PG || ds.shm_nattch != 2 || !(ds.shm_perm.mode & SHM_DEST) || ds.shm_perm.__key)
        BAD("B: size %zu nattch %lu mode %o; ", ds.shm_segsz, (unsigned long)ds.shm_nattch, ds.shm_perm.mode);
    printf("%s\n", n ? bad : "ok");
    shmctl(aid, IPC_RMID, NULL);
    return n ? 1 : 0;
}
