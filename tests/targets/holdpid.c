/* Holds a given pid (tests/test_tree_pid_held.py): clone3 with set_tid makes a child with exactly
 * that pid, which pauses. Prints "held N" (or "busy <errno>" when the pid could not be had), then
 * waits for stdin's EOF and kills and reaps the child. Usage: holdpid PID */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	pid_t want = (pid_t)atoi(argv[1]);
	struct clone_args args;
	memset(&args, 0, sizeof args);
	args.exit_signal = SIGCHLD;
	args.set_tid = (uint64_t)(uintptr_t)&want;
	args.set_tid_size = 1;
	long pid = syscall(SYS_clone3, &args, sizeof args);
	if (pid == 0) {
		for (;;)
			pause();
	}
	if (pid < 0) {
		printf("busy %d\n", errno);
		fflush(stdout);
		return 0;
	}
	printf("held %ld\n", pid);
	fflush(stdout);
	char buf[64];
	while (read(0, buf, sizeof buf) > 0)
		;
	kill((pid_t)pid, SIGKILL);
	waitpid((pid_t)pid, NULL, 0);
	return 0;
}
