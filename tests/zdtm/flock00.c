/* File locks: flock (shared and exclusive), POSIX record locks on ranges, OFD locks. Another
 * process (a child forked at check time) must find each as it was. */
#include "zdtm.h"
#include <sys/file.h>

static int fl, fs, fp, fo;

static int probe(int fd, int type, off_t start, off_t len, int ofd)
{
	struct flock l = {.l_type = (short)type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
	if (fcntl(fd, ofd ? F_OFD_GETLK : F_GETLK, &l))
		return -2;
	return l.l_type;
}

static void check(void)
{
	int p[2];
	pipe(p);
	pid_t c = fork();
	if (c == 0) {
		/* in the child: every lock the parent holds conflicts with ours */
		char r[8] = "-----";
		int a = open("flock00.a", O_RDWR), b = open("flock00.b", O_RDWR), cc = open("flock00.c", O_RDWR),
		    d = open("flock00.d", O_RDWR);
		r[0] = flock(a, LOCK_SH | LOCK_NB) ? 'x' : 'o';         /* exclusive held: x */
		r[1] = flock(b, LOCK_EX | LOCK_NB) ? 'x' : 'o';         /* shared held: x */
		r[2] = flock(b, LOCK_SH | LOCK_NB) ? 'x' : 'o';         /* shared held: o */
		r[3] = probe(cc, F_WRLCK, 100, 10, 0) == F_WRLCK ? 'w' : probe(cc, F_WRLCK, 100, 10, 0) == F_RDLCK ? 'r' : 'u';
		r[4] = probe(d, F_WRLCK, 0, 0, 1) == F_WRLCK ? 'w' : 'u';
		r[5] = probe(cc, F_WRLCK, 300, 10, 0) == F_RDLCK ? 'r' : 'u';
		r[6] = probe(cc, F_WRLCK, 200, 10, 0) == F_UNLCK ? 'u' : '?';
		write(p[1], r, 7);
		_exit(0);
	}
	char r[8] = {0};
	read(p[0], r, 7);
	waitpid(c, NULL, 0);
	close(p[0]);
	close(p[1]);
	if (strcmp(r, "xxowwru"))
		fail("locks seen by another process: %s, want xxowwru (flock ex, flock sh, posix wr, ofd wr, posix rd, none)", r);
}

int main(void)
{
	struct flock l = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 100, .l_len = 10};
	fl = open("flock00.a", O_RDWR | O_CREAT, 0600);
	fs = open("flock00.b", O_RDWR | O_CREAT, 0600);
	fp = open("flock00.c", O_RDWR | O_CREAT, 0600);
	fo = open("flock00.d", O_RDWR | O_CREAT, 0600);
	if (flock(fl, LOCK_EX) || flock(fs, LOCK_SH) || fcntl(fp, F_SETLK, &l))
		die("lock");
	l.l_type = F_RDLCK;
	l.l_start = 300;
	if (fcntl(fp, F_SETLK, &l))
		die("rdlock");
	struct flock o = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
	if (fcntl(fo, F_OFD_SETLK, &o))
		die("ofd");
	zd_main(NULL, check);
}
