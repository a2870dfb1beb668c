/* SysV semaphores with SEM_UNDO: the process's undo adjustment (semadj) stays with it. */
#include "zdtm.h"
#include <sys/ipc.h>
#include <sys/sem.h>

static int id;

static void check(void)
{
	int v = semctl(id, 0, GETVAL);
	if (v != 5 - 2)
		fail("semaphore value %d, want 3 (the original's exit undid its SEM_UNDO operation)", v);
	/* the adjustment must still be this process's: an exit now gives the 2 back */
	pid_t c = fork();
	if (c == 0) {
		struct sembuf op = {0, -1, SEM_UNDO | IPC_NOWAIT};
		_exit(semop(id, &op, 1) ? 1 : 0);
	}
	int st;
	waitpid(c, &st, 0);
	if (semctl(id, 0, GETVAL) != 3)
		fail("a child's undo misbehaved");
	semctl(id, 0, IPC_RMID);
}

int main(void)
{
	id = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
	if (id < 0 || semctl(id, 0, SETVAL, 5))
		die("semget");
	struct sembuf op = {0, -2, SEM_UNDO};
	if (semop(id, &op, 1))
		die("semop");
	zd_main(NULL, check);
}
