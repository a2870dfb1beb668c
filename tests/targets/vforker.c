/* A process whose only thread sits in vfork(), which a ptrace interrupt cannot stop.
 *
 * It prints "ready PID" and vforks; the child reads one line from stdin and _exits, which lets the
 * parent go on: it prints "done" and then answers "ping" with "pong" until stdin closes.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lineio.h"

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    pid_t c = vfork();
    if (c == 0) {
        char ch;
        while (read(0, &ch, 1) == 1 && ch != '\n') {}
        _exit(0);
    }
    waitpid(c, NULL, 0);
    puts("done");
    char line[64];
    for (;;) {
        if (!read_command(line, sizeof line)) return 0;
        puts(strncmp(line, "ping", 4) ? "unknown" : "pong");
    }
}
