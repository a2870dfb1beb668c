/* inotify: watches on a directory and a file; events after the restore arrive with the same wd. */
#include "zdtm.h"
#include <sys/inotify.h>

static int in, wd_dir, wd_file;

static void check(void)
{
	char buf[4096];
	close(open("inotify00.dir/new", O_CREAT | O_RDWR, 0600));
	int f = open("inotify00.file", O_WRONLY);
	write(f, "x", 1);
	close(f);
	ssize_t n = read(in, buf, sizeof buf);
	int create = 0, modify = 0;
	for (char *p = buf; p < buf + n;) {
		struct inotify_event *ev = (struct inotify_event *)p;
		if (ev->wd == wd_dir && (ev->mask & IN_CREATE) && !strcmp(ev->name, "new"))
			create = 1;
		if (ev->wd == wd_file && (ev->mask & IN_MODIFY))
			modify = 1;
		p += sizeof *ev + ev->len;
	}
	if (!create || !modify)
		fail("inotify events: create %d modify %d (%zd bytes)", create, modify, n);
}

int main(void)
{
	mkdir("inotify00.dir", 0700);
	close(open("inotify00.file", O_CREAT | O_RDWR, 0600));
	in = inotify_init1(0);
	wd_file = inotify_add_watch(in, "inotify00.file", IN_MODIFY);
	wd_dir = inotify_add_watch(in, "inotify00.dir", IN_CREATE | IN_DELETE);
	if (in < 0 || wd_dir < 0 || wd_file < 0)
		die("inotify");
	zd_main(NULL, check);
}
