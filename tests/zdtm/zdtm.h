/* The protocol of every program of ckpt's zdtm-style corpus (tests/zdtm, run by tests/test_zdtm.py).
 *
 * A program sets up the property it is about, says "ready" on stdout, then answers lines on stdin:
 *   touch  -> runs its touch() (changes between a full and an incremental dump), answers "touched"
 *   check  -> checks every property it set, answers "PASS" or "FAIL <why>"
 *   exit   -> exits 0
 * Stdin and stdout are pipes of the runner; after a restore they are those of `ckpt restore`, which
 * the runner holds the same way, so the same lines work before and after. The program blocks in
 * read(0) meanwhile: that is where the dump finds it (like zdtm's test_waitsig()). */
#ifndef ZDTM_H
#define ZDTM_H
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static char zd_why[600];
static int zd_failed;

/* Record the first failure of a check (the reason names the property and both values). */
#define fail(...)                                                                \
	do {                                                                     \
		if (!zd_failed) {                                                \
			int n_ = snprintf(zd_why, sizeof zd_why, "line %d: ", __LINE__); \
			snprintf(zd_why + n_, sizeof zd_why - (size_t)n_, __VA_ARGS__); \
		}                                                                \
		zd_failed = 1;                                                   \
	} while (0)

/* Setup failed: the program is broken, not the restore. */
#define die(...)                                             \
	do {                                                 \
		dprintf(1, "setup-error line %d: ", __LINE__);  \
		dprintf(1, __VA_ARGS__);                     \
		dprintf(1, " (errno %d)\n", errno);          \
		exit(2);                                     \
	} while (0)

static inline void zd_write(const char *s)
{
	size_t n = strlen(s);
	while (n) {
		ssize_t w = write(1, s, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			exit(3);
		}
		s += w;
		n -= (size_t)w;
	}
}

/* A line from stdin, retried across signals (some programs have handlers and timers running). */
static inline int zd_readline(char *buf, size_t size)
{
	size_t n = 0;
	while (n + 1 < size) {
		char c;
		ssize_t r = read(0, &c, 1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		if (c == '\n')
			break;
		buf[n++] = c;
	}
	buf[n] = 0;
	return 0;
}

/* Pages every program dirties on "touch", so that an incremental layer always holds something. */
static char zd_heap_pages[3 * 4096];

static inline void zd_main(void (*touch)(void), void (*check)(void))
{
	char line[64];
	zd_write("ready\n");
	while (zd_readline(line, sizeof line) == 0) {
		if (!strcmp(line, "touch")) {
			for (size_t i = 0; i < sizeof zd_heap_pages; i += 512)
				zd_heap_pages[i]++;
			if (touch)
				touch();
			zd_write("touched\n");
		} else if (!strcmp(line, "check")) {
			char out[700];
			zd_failed = 0;
			for (size_t i = 0; i < sizeof zd_heap_pages; i += 512)
				if (zd_heap_pages[i] != zd_heap_pages[0])
					fail("zdtm heap pages differ");
			check();
			snprintf(out, sizeof out, zd_failed ? "FAIL %s\n" : "PASS\n", zd_why);
			for (char *p = out; *p && p[1]; p++)
				if (*p == '\n')
					*p = ' ';
			zd_write(out);
		} else if (!strcmp(line, "exit")) {
			exit(0);
		}
	}
	exit(1);
}

/* A line of /proc/self/status (or another such file) starting with `key`, value copied to out. */
static inline int zd_status(const char *path, const char *key, char *out, size_t size)
{
	FILE *f = fopen(path, "r");
	char ln[512];
	size_t kl = strlen(key);
	int found = -1;
	if (!f)
		return -1;
	while (fgets(ln, sizeof ln, f)) {
		if (!strncmp(ln, key, kl)) {
			char *v = ln + kl;
			while (*v == ' ' || *v == '\t' || *v == ':')
				v++;
			v[strcspn(v, "\n")] = 0;
			snprintf(out, size, "%s", v);
			found = 0;
			break;
		}
	}
	fclose(f);
	return found;
}

/* The whole of a small file (e.g. /proc/self/...) as a string. */
static inline int zd_readfile(const char *path, char *out, size_t size)
{
	int fd = open(path, O_RDONLY);
	ssize_t n, total = 0;
	if (fd < 0)
		return -1;
	while ((n = read(fd, out + total, size - 1 - (size_t)total)) > 0)
		total += n;
	close(fd);
	out[total] = 0;
	return (int)total;
}

/* The VmFlags line of the mapping that contains addr. */
static inline int zd_vmflags(void *addr, char *out, size_t size)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	char ln[512];
	int in = 0;
	uintptr_t a = (uintptr_t)addr;
	if (!f)
		return -1;
	while (fgets(ln, sizeof ln, f)) {
		unsigned long lo, hi;
		if (sscanf(ln, "%lx-%lx ", &lo, &hi) == 2 && strchr(ln, '-') < strchr(ln, ' ')) {
			in = a >= lo && a < hi;
			continue;
		}
		if (in && !strncmp(ln, "VmFlags:", 8)) {
			snprintf(out, size, "%s", ln + 8);
			out[strcspn(out, "\n")] = 0;
			fclose(f);
			return 0;
		}
	}
	fclose(f);
	return -1;
}

static inline int zd_has_flag(const char *flags, const char *flag)
{
	char pad[600];
	char want[8];
	snprintf(pad, sizeof pad, " %s ", flags);
	snprintf(want, sizeof want, " %s ", flag);
	return strstr(pad, want) != NULL;
}

#endif
