/* A target that checks its own privileges and the files it holds, for the credential tests.
 *
 * Arguments, applied in order before "ready":
 *   fd:PATH     open PATH read-only (the first one becomes fd 3)
 *   map:PATH    map PATH's first page read-only, private
 *   seccomp     install a filter: getpriority -> errno ENOTTY, acct -> kill the process
 *   notify      install a filter (with a listener) that sends getpriority to user space
 *   nnp         prctl(PR_SET_NO_NEW_PRIVS, 1)
 *   strict      enter SECCOMP_MODE_STRICT after "ready" (then only "try 0" and "exit" work)
 * Commands (stdin):
 *   status      -> "nnp N secbits N"          (as prctl reports them to the process itself)
 *   try NR      -> "ret R errno E"            (syscall NR with zero arguments)
 *   read        -> "fd XXXX map XXXX"         (the first 4 bytes of fd 3 and of the mapping, hex)
 *   exit        -> exit(0)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "lineio.h"

static int install(unsigned int flags, struct sock_filter *f, unsigned short n) {
    struct sock_fprog prog = {.len = n, .filter = f};
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
}

static void filter_errno_kill(void) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getpriority, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOTTY),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_acct, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    if (install(0, f, sizeof f / sizeof f[0]) < 0) { perror("seccomp"); exit(2); }
}

static void filter_notify(void) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getpriority, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    if (install(SECCOMP_FILTER_FLAG_NEW_LISTENER, f, sizeof f / sizeof f[0]) < 0) { perror("seccomp"); exit(2); }
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int fd = -1;
    unsigned char *map = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strncmp(argv[i], "fd:", 3)) {
            fd = open(argv[i] + 3, O_RDONLY);
            if (fd < 0) { perror(argv[i]); return 2; }
        } else if (!strncmp(argv[i], "map:", 4)) {
            int m = open(argv[i] + 4, O_RDONLY);
            map = m < 0 ? MAP_FAILED : mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, m, 0);
            if (map == MAP_FAILED) { perror(argv[i]); return 2; }
            close(m);
        } else if (!strcmp(argv[i], "seccomp")) {
            filter_errno_kill();
        } else if (!strcmp(argv[i], "notify")) {
            filter_notify();
        } else if (!strcmp(argv[i], "nnp")) {
            if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) { perror("nnp"); return 2; }
        }
    }
    printf("ready\n");
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "strict") && prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT, 0, 0, 0)) return 2;
    char line[256];
    while (read_command(line, sizeof line)) {
        if (!strncmp(line, "status", 6)) {
            printf("nnp %d secbits %d\n", prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0), prctl(PR_GET_SECUREBITS, 0, 0, 0, 0));
        } else if (!strncmp(line, "try ", 4)) {
            errno = 0;
            long r = syscall(atol(line + 4), 0, 0, 0, 0, 0, 0);
            printf("ret %ld errno %d\n", r, r < 0 ? errno : 0);
        } else if (!strncmp(line, "read", 4)) {
            unsigned char b[4] = {0};
            if (fd < 0 || pread(fd, b, 4, 0) != 4) memset(b, 0, 4);
            unsigned char *m = map ? map : (unsigned char *)"\0\0\0";
            printf("fd %02x%02x%02x%02x map %02x%02x%02x%02x\n", b[0], b[1], b[2], b[3], m[0], m[1], m[2], m[3]);
        } else if (!strncmp(line, "exit", 4)) {
            syscall(SYS_exit, 0);  /* exit_group is not allowed in strict mode */
        } else {
            printf("?\n");
        }
    }
    return 0;
}
