/* A pidfd of a child process. */
#include "zdtm.h"
#include <signal.h>
#include <sys/prctl.h>

static int pfd;
static pid_t child;

static void check(void)
{
	if (syscall(SYS_pidfd_send_signal, pfd, SIGKILL, NULL, 0))
		fail("pidfd_send_signal: errno %d", errno);
	int st;
	if (waitpid(child, &st, 0) != child || !WIFSIGNALED(st))
		fail("child status %x", st);
}

int main(void)
{
	int p[2];
	pipe(p);
	child = fork();
	if (child == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		write(p[1], "c", 1);
		for (;;)
			pause();
	}
	char c;
	read(p[0], &c, 1);
	pfd = (int)syscall(SYS_pidfd_open, child, 0);
	if (pfd < 0)
		die("pidfd_open");
	zd_main(NULL, check);
}
