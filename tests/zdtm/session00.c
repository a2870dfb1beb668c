/* A child that made its own session, and a grandchild in a process group of its own in it. The
 * runner talks to the top process, which asks the others over pipes. */
#include "zdtm.h"
#include <signal.h>
#include <sys/prctl.h>

static int ask[2], answer[2];
static pid_t child, grandchild;

static void child_loop(void)
{
	char c;
	pid_t sid = getsid(0), pg = getpgrp();
	while (read(ask[0], &c, 1) == 1) {
		char r = (getsid(0) == sid && sid == getpid() && getpgrp() == pg && pg == getpid() &&
			  getpgid(grandchild) == grandchild && getsid(grandchild) == sid)
				 ? 'y'
				 : 'n';
		write(answer[1], &r, 1);
	}
	_exit(0);
}

static void check(void)
{
	char r = 0;
	if (write(ask[1], "?", 1) != 1 || read(answer[0], &r, 1) != 1 || r != 'y')
		fail("session/group of the child or grandchild changed (%c)", r);
	if (getsid(child) != child || getpgid(child) != child)
		fail("child %d: sid %d pgid %d", child, getsid(child), getpgid(child));
	/* (the top process's own group and session are ckpt restore's after a restore, as CRIU's
	 * --shell-job gives them: not checked) */
}

int main(void)
{
	int gp[2];
	pipe(ask);
	pipe(answer);
	pipe(gp);
	child = fork();
	if (child == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		setsid();
		grandchild = fork();
		if (grandchild == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			setpgid(0, 0);
			write(gp[1], "g", 1);
			for (;;)
				pause();
		}
		char c;
		read(gp[0], &c, 1);
		child_loop();
	}
	char c;
	write(ask[1], "?", 1);
	read(answer[0], &c, 1); /* the child is set up */
	if (c != 'y')
		die("child setup");
	zd_main(NULL, check);
}
