/* Children: two zombies (one exited with a status, one killed by a signal) and a living child. */
#include "zdtm.h"
#include <signal.h>
#include <sys/prctl.h>

static pid_t z1, z2, live;

static void check(void)
{
	int st;
	if (waitpid(z1, &st, WNOHANG) != z1 || !WIFEXITED(st) || WEXITSTATUS(st) != 42)
		fail("zombie 1: status %x", st);
	if (waitpid(z2, &st, WNOHANG) != z2 || !WIFSIGNALED(st) || WTERMSIG(st) != SIGTERM)
		fail("zombie 2: status %x", st);
	if (waitpid(live, &st, WNOHANG) != 0)
		fail("the living child ended");
	kill(live, SIGKILL);
	if (waitpid(live, &st, 0) != live || !WIFSIGNALED(st))
		fail("living child: status %x", st);
}

int main(void)
{
	int p[2];
	pipe(p);
	z1 = fork();
	if (z1 == 0)
		_exit(42);
	z2 = fork();
	if (z2 == 0) {
		for (;;)
			pause();
	}
	live = fork();
	if (live == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		close(p[0]);
		write(p[1], "l", 1);
		for (;;)
			pause();
	}
	kill(z2, SIGTERM);
	char c;
	read(p[0], &c, 1);
	siginfo_t si;
	/* both zombies exist before the dump (waitid with WNOWAIT leaves them zombies) */
	waitid(P_PID, (id_t)z1, &si, WEXITED | WNOWAIT);
	waitid(P_PID, (id_t)z2, &si, WEXITED | WNOWAIT);
	zd_main(NULL, check);
}
