/* A process in seccomp strict mode (argv[1] "strict") or under an allow-all filter ("filter"),
 * entered after start-up: "ready" once in it, then each line read is answered "pong", with only
 * read and write (all strict mode allows). */
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    if (!strcmp(argv[1], "strict")) {
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT, 0, 0, 0)) return 1;
    } else {
        struct sock_filter allow[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
        struct sock_fprog prog = {1, allow};
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
            return 1;
    }
    if (write(1, "ready\n", 6) != 6) syscall(SYS_exit, 1);
    char c;
    while (read(0, &c, 1) == 1)
        if (c == '\n' && write(1, "pong\n", 5) != 5) break;
    syscall(SYS_exit, 0);
}
