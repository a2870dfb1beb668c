/* Two processes sharing one fd table (clone CLONE_FILES without CLONE_VM). */
#include "zdtm.h"
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>

static char stack[65536];
static int p[2];

static int child(void *a)
{
	(void)a;
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	char c;
	while (read(p[0], &c, 1) == 1) {
		int fd = open("/dev/null", O_RDONLY); /* an fd the parent must see */
		dup2(fd, 200);
		close(fd);
		write(p[1] + 0, "", 0);
	}
	return 0;
}

static int ask[2], done[2];
static int child2(void *a)
{
	(void)a;
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	char c;
	while (read(ask[0], &c, 1) == 1) {
		dup2(ask[0], 201);
		write(done[1], "d", 1);
	}
	return 0;
}

static void check(void)
{
	char c;
	write(ask[1], "?", 1);
	read(done[0], &c, 1);
	if (fcntl(201, F_GETFD) < 0)
		fail("an fd the other process made is not in our table: the fd table is no longer shared");
}

int main(void)
{
	pipe(ask);
	pipe(done);
	(void)child;
	(void)p;
	pid_t c = clone(child2, stack + sizeof stack, CLONE_FILES | SIGCHLD, NULL);
	if (c < 0)
		die("clone");
	zd_main(NULL, check);
}
