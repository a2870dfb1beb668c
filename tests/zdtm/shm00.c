/* SysV shared memory attached twice, and a POSIX shm (/dev/shm) file mapped shared. */
#include "zdtm.h"
#include <sys/ipc.h>
#include <sys/shm.h>

static int id;
static char *a, *b, *p;
static char name[64];

static void touch(void) { a[100] = 'T'; }

static void check(void)
{
	struct shmid_ds ds;
	if (strcmp(a + 4096, "sysv-bytes") || a[100] != b[100])
		fail("sysv bytes: %s", a + 4096);
	a[9] = 'Z';
	if (b[9] != 'Z')
		fail("the two attaches no longer share");
	if (shmctl(id, IPC_STAT, &ds) || ds.shm_segsz != 8 * 4096)
		fail("IPC_STAT on the old id: errno %d", errno);
	if (strcmp(p, "posix-shm"))
		fail("posix shm: %s", p);
	int fd = shm_open(name, O_RDWR, 0);
	char c = 0;
	p[1] = 'Y';
	pread(fd, &c, 1, 1);
	if (c != 'Y')
		fail("the /dev/shm mapping no longer shares the file");
	close(fd);
}

int main(void)
{
	id = shmget(IPC_PRIVATE, 8 * 4096, IPC_CREAT | 0600);
	a = shmat(id, NULL, 0);
	b = shmat(id, NULL, 0);
	if (id < 0 || a == (void *)-1 || b == (void *)-1)
		die("shm");
	strcpy(a + 4096, "sysv-bytes");
	/* Named after the runner too: one left by a killed run is known stale once its runner is gone
	 * (tests/leftovers.py), while this program's own pid is free between the dump and the restore. */
	snprintf(name, sizeof name, "/zdtm-shm00-%d-%d", getppid(), getpid());
	int fd = shm_open(name, O_RDWR | O_CREAT, 0600);
	ftruncate(fd, 4096);
	p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	strcpy(p, "posix-shm");
	zd_main(touch, check);
}
