/* A SysV segment with id 0 (the first of a fresh IPC namespace), and what lies around it.
 *
 * usage: sysvzero target KEY     (KEY in hex; run inside the namespace: nsenter --ipc=...)
 *        sysvzero keeper         (the process that keeps the namespace: unshare --ipc)
 *
 * target: one reservation of 7 pages, made of
 *   page 0     left PROT_NONE (so that page 1 merges with nothing below)
 *   page 1     private anonymous memory (maps: inode 0, like the segment's)
 *   pages 2-4  the segment KEY (3 pages, mode 0600) attached there with SHM_REMAP: its page 0 and
 *              2 written, page 1 a hole
 *   pages 5-6  MAP_SHARED|MAP_ANONYMOUS memory (/dev/zero (deleted), the same device as the
 *              segment), both pages written
 * and answers "ready ID ADDR" (the segment's id, its address in hex). Commands, one line each:
 *   check        "ok", or "bad: ..." naming what differs from what it wrote: the bytes of all
 *                three, IPC_STAT of its id (size, key, mode), shmget(KEY) giving the same id, the
 *                shared anonymous memory still shared (a child's write seen)
 *   write        new bytes in each of the three (an incremental layer must carry them): "written"
 *   peek OFF     the string at offset OFF of the segment: "peek STR"
 *   poke OFF STR writes STR (and its NUL) there: "poked"
 *   pid          "pid N"
 * keeper: "ready", then
 *   attach KEY   shmget(KEY, 0, 0) and shmat: "attached ID"
 *   peek / poke  as above, in its own attach
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lineio.h"

#define PG 4096

static char *seg, *priv, *anon;
static int id = -1, gen;
static key_t key;

static void put(char *p, const char *what, int n) { snprintf(p, 64, "%s-%d", what, n); }

static void fill(void) {
    put(priv, "private", gen);
    put(seg, "sysv-page0", gen);
    put(seg + 2 * PG, "sysv-page2", gen);
    put(anon, "anon-page0", gen);
    put(anon + PG, "anon-page1", gen);
}

static int is(const char *p, const char *what) {
    char want[64];
    put(want, what, gen);
    return strcmp(p, want) == 0;
}

static int zeros(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) return 0;
    return 1;
}

static int anon_shared(void) {
    char old = anon[PG - 1];
    pid_t c = fork();
    if (c == 0) { anon[PG - 1] = (char)(old + 1); _exit(0); }
    int st;
    waitpid(c, &st, 0);
    int ok = anon[PG - 1] == (char)(old + 1);
    anon[PG - 1] = old;
    return ok;
}

static void check(void) {
    char out[512] = "";
    struct shmid_ds ds;
    if (!is(priv, "private")) strcat(out, " private");
    if (!is(seg, "sysv-page0") || !zeros(seg + PG, PG) || !is(seg + 2 * PG, "sysv-page2")) strcat(out, " sysv-bytes");
    if (!is(anon, "anon-page0") || !is(anon + PG, "anon-page1")) strcat(out, " anon-bytes");
    if (shmctl(id, IPC_STAT, &ds)) strcat(out, " ipc-stat");
    else if (ds.shm_segsz != 3 * PG || ds.shm_perm.__key != key || (ds.shm_perm.mode & 0777) != 0600)
        strcat(out, " ipc-stat-fields");
    if (shmget(key, 0, 0) != id) strcat(out, " shmget-id");
    if (!anon_shared()) strcat(out, " anon-not-shared");
    printf(out[0] ? "bad:%s\n" : "ok\n", out);
}

static void peek_poke(char *line, char *base) {
    long off;
    char str[256];
    if (sscanf(line, "peek %ld", &off) == 1 && off >= 0 && off < 3 * PG - 256) {
        printf("peek %.255s\n", base + off);
    } else if (sscanf(line, "poke %ld %255s", &off, str) == 2 && off >= 0 && off < 3 * PG - 256) {
        strcpy(base + off, str);
        printf("poked\n");
    } else {
        printf("bad command: %s", line);
    }
}

static void die(const char *what) {
    printf("fail %s: %s\n", what, strerror(errno));
    exit(1);
}

int main(int argc, char **argv) {
    char line[512];
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc == 3 && !strcmp(argv[1], "target")) {
        key = (key_t)strtoul(argv[2], NULL, 16);
        char *res = mmap(NULL, 7 * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (res == MAP_FAILED) die("reserve");
        priv = mmap(res + PG, PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        anon = mmap(res + 5 * PG, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (priv == MAP_FAILED || anon == MAP_FAILED) die("mmap");
        id = shmget(key, 3 * PG, IPC_CREAT | IPC_EXCL | 0600);
        if (id < 0) die("shmget");
        seg = shmat(id, res + 2 * PG, SHM_REMAP);
        if (seg == (void *)-1) die("shmat");
        fill();
        printf("ready %d %lx\n", id, (unsigned long)seg);
        while (read_command(line, sizeof line)) {
            if (!strcmp(line, "check\n")) check();
            else if (!strcmp(line, "write\n")) { gen++; fill(); printf("written\n"); }
            else if (!strcmp(line, "pid\n")) printf("pid %d\n", getpid());
            else peek_poke(line, seg);
        }
        return 0;
    }
    if (argc == 2 && !strcmp(argv[1], "keeper")) {
        char *mine = NULL;
        printf("ready\n");
        while (read_command(line, sizeof line)) {
            unsigned long k;
            if (sscanf(line, "attach %lx", &k) == 1) {
                int got = shmget((key_t)k, 0, 0);
                mine = got < 0 ? (void *)-1 : shmat(got, NULL, 0);
                if (mine == (void *)-1) { mine = NULL; printf("fail attach: %s\n", strerror(errno)); }
                else printf("attached %d\n", got);
            } else if (mine) {
                peek_poke(line, mine);
            } else {
                printf("bad: not attached\n");
            }
        }
        return 0;
    }
    fprintf(stderr, "usage: sysvzero target KEY | keeper\n");
    return 2;
}
