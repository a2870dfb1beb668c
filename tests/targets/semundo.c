/* A SysV semaphore user for tests/test_semundo.py. argv[1]: "undo" (semop with SEM_UNDO: holds an
 * adjustment), "used" (semop without SEM_UNDO), "fresh" (a set only SETVAL'ed: no semop ever),
 * "none" (no set); argv[2] "thread": a thread is made (and joined) first, which allocates the
 * process's undo list. Says "ready"; "check" answers PASS when the value is as it left it;
 * "exit" removes the set and exits. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <unistd.h>

static void *idle(void *arg) { return arg; }

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "none";
	int id = -1, want = 5;
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc > 2 && !strcmp(argv[2], "thread")) {
		pthread_t t;
		if (pthread_create(&t, NULL, idle, NULL) || pthread_join(t, NULL))
			return 2;
	}
	if (strcmp(mode, "none")) {
		id = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
		if (id < 0 || semctl(id, 0, SETVAL, 5))
			return 2;
		if (strcmp(mode, "fresh")) {
			struct sembuf op = {0, -2, (short)(strcmp(mode, "undo") ? 0 : SEM_UNDO)};
			if (semop(id, &op, 1))
				return 2;
			want = 3;
		}
	}
	printf("ready\n");
	char line[64];
	while (fgets(line, sizeof line, stdin)) {
		if (!strncmp(line, "check", 5)) {
			int v = id < 0 ? want : semctl(id, 0, GETVAL);
			if (v == want)
				printf("PASS\n");
			else
				printf("FAIL value %d, want %d\n", v, want);
		} else if (!strncmp(line, "exit", 4)) {
			if (id >= 0)
				semctl(id, 0, IPC_RMID);
			return 0;
		}
	}
	return 1;
}
