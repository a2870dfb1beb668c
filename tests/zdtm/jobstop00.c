/* A child in a job-control stop (SIGTSTP): it is still stopped, its parent can continue it, and it
 * then runs on with its SIGCONT handler and its memory. */
#include "zdtm.h"
#include <signal.h>
#include <time.h>

static pid_t child;
static volatile sig_atomic_t conts;
static volatile long mark = 0x5eed;

static void on_cont(int sig)
{
	(void)sig;
	conts++;
}

static char state_of(pid_t pid)
{
	char path[64], buf[512], *p;
	snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
	if (zd_readfile(path, buf, sizeof buf) <= 0 || !(p = strrchr(buf, ')')))
		return '?';
	return p[2];
}

static void check(void)
{
	int st;
	char s = state_of(child);
	/* A restored child is let go with its stop signal queued: it stops when it next runs, which on
	 * a loaded machine may come after this check starts (bounded: 30 s). */
	for (int i = 0; i < 3000 && s != 'T'; i++) {
		struct timespec ts = {0, 10 * 1000 * 1000};
		nanosleep(&ts, NULL);
		s = state_of(child);
	}
	if (s != 'T')
		fail("the child is in state %c, not T (stopped)", s);
	/* A restored child's stop is a new one, which its parent may wait for (the original's was
	 * taken before "ready"); either way it is a SIGTSTP stop. */
	pid_t got = waitpid(child, &st, WUNTRACED | WNOHANG);
	if (got == child && (!WIFSTOPPED(st) || WSTOPSIG(st) != SIGTSTP))
		fail("waitpid(WUNTRACED) saw status %x", st);
	kill(child, SIGCONT);
	if (waitpid(child, &st, 0) != child || !WIFEXITED(st))
		fail("the continued child: status %x", st);
	else if (WEXITSTATUS(st) != 0)
		fail("the continued child found itself changed (exit %d)", WEXITSTATUS(st));
}

int main(void)
{
	int st;
	child = fork();
	if (child < 0)
		die("fork");
	if (child == 0) {
		struct sigaction sa = {.sa_handler = on_cont, .sa_flags = SA_RESTART};
		/* A group of its own, its parent in another of the same session: not orphaned, so
		 * SIGTSTP stops it (the kernel discards it in an orphaned group), as CRIU's test does. */
		setpgid(0, 0);
		sigaction(SIGCONT, &sa, NULL);
		raise(SIGTSTP);
		_exit(conts == 1 && mark == 0x5eed ? 0 : 1);
	}
	if (waitpid(child, &st, WUNTRACED) != child || !WIFSTOPPED(st) || WSTOPSIG(st) != SIGTSTP)
		die("the child did not stop with SIGTSTP (status %x)", st);
	zd_main(NULL, check);
}
