/* Deleted files on the fds a test names, 0-2 included (a program whose stderr is a deleted file,
 * as pytest's capture files are: unnamed files made with O_TMPFILE), checked by the process itself.
 *
 * usage: ghoststd DIR FDS METHOD [fork]
 *   DIR     holds the FIFOs `cmd` and `ans` (made by the test): the command channel, kept above the
 *           fds under test, so that 0-2 can be deleted files too
 *   FDS     e.g. "0,1,2,7": each becomes a deleted file with bytes of its own, at an offset of its own
 *   METHOD  tmpfile (O_TMPFILE, never named) or named (created in DIR, then unlinked)
 *   fork    a child shares every one of those open files (a tree: one open file description each)
 * commands: check -> ok | bad ...   write -> written (each file grows, each offset moves)
 *           child -> the child's pid (0 without one)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAXF 16
#define CMD_FD 40
#define ANS_FD 41

static int fds[MAXF], nfd;
static off_t size_of[MAXF], pos_of[MAXF];
static int flags_of[MAXF];
static unsigned gen_of[MAXF];

static unsigned char byte_at(int i, off_t k) { return (unsigned char)(k * 7 + fds[i] * 31 + k / 4096); }

static int fill(int i, int fd, off_t from, off_t to) {
    unsigned char buf[4096];
    for (off_t k = from; k < to;) {
        size_t n = 0;
        while (n < sizeof buf && k + (off_t)n < to) {
            buf[n] = byte_at(i, k + n);
            n++;
        }
        if (pwrite(fd, buf, n, k) != (ssize_t)n) return -1;
        k += n;
    }
    return 0;
}

static void say(const char *s) {
    size_t n = strlen(s);
    if (write(ANS_FD, s, n) != (ssize_t)n || write(ANS_FD, "\n", 1) != 1) _exit(3);
}

static int make(int i, const char *dir, const char *method) {
    int want = fds[i], f;
    /* fd 0 read-only as a shell's `< file` would be; the others read-write, fd 1 with O_APPEND */
    if (!strcmp(method, "tmpfile")) {
        f = open(dir, O_TMPFILE | O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0600);
    } else {
        char path[4096];
        snprintf(path, sizeof path, "%s/ghost-%d", dir, want);
        f = open(path, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
        if (f >= 0 && unlink(path) != 0) return -1;
    }
    if (f < 0) return -1;
    size_of[i] = 5000 + 3000 * want;
    if (fill(i, f, 0, size_of[i]) != 0) return -1;
    int g = f;
    if (want == 0) { /* a second, read-only open of the same unnamed file */
        char self[64];
        snprintf(self, sizeof self, "/proc/self/fd/%d", f);
        g = open(self, O_RDONLY | O_CLOEXEC);
        if (g < 0) return -1;
        close(f);
    }
    if (want == 1 && fcntl(g, F_SETFL, O_APPEND) != 0) return -1;
    if (g != want) {
        if (dup2(g, want) != want) return -1;
        close(g);
    }
    pos_of[i] = 100 * want + 13;
    if (lseek(want, pos_of[i], SEEK_SET) != pos_of[i]) return -1;
    flags_of[i] = fcntl(want, F_GETFL) & (O_ACCMODE | O_APPEND);
    return 0;
}

static int check(char *why, size_t len) {
    for (int i = 0; i < nfd; i++) {
        int fd = fds[i];
        struct stat st;
        char link[4200], self[64];
        if (fstat(fd, &st) != 0) return snprintf(why, len, "bad fd %d: fstat: %s", fd, strerror(errno)), -1;
        if (!S_ISREG(st.st_mode) || st.st_nlink != 0)
            return snprintf(why, len, "bad fd %d: mode %o nlink %lu", fd, st.st_mode, (unsigned long)st.st_nlink), -1;
        if (st.st_size != size_of[i])
            return snprintf(why, len, "bad fd %d: size %ld, not %ld", fd, (long)st.st_size, (long)size_of[i]), -1;
        snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(self, link, sizeof link - 1);
        if (n < 10 || memcmp(link + n - 10, " (deleted)", 10) != 0)
            return snprintf(why, len, "bad fd %d: link %.*s", fd, (int)(n < 0 ? 0 : n), link), -1;
        off_t at = lseek(fd, 0, SEEK_CUR);
        if (at != pos_of[i]) return snprintf(why, len, "bad fd %d: offset %ld, not %ld", fd, (long)at, (long)pos_of[i]), -1;
        int fl = fcntl(fd, F_GETFL) & (O_ACCMODE | O_APPEND);
        if (fl != flags_of[i]) return snprintf(why, len, "bad fd %d: flags %o, not %o", fd, fl, flags_of[i]), -1;
        unsigned char buf[4096];
        for (off_t k = 0; k < size_of[i]; k += sizeof buf) {
            ssize_t got = pread(fd, buf, sizeof buf, k);
            off_t want = size_of[i] - k < (off_t)sizeof buf ? size_of[i] - k : (off_t)sizeof buf;
            if (got != want) return snprintf(why, len, "bad fd %d: short read at %ld", fd, (long)k), -1;
            for (off_t j = 0; j < want; j++)
                if (buf[j] != byte_at(i, k + j))
                    return snprintf(why, len, "bad fd %d: byte %ld differs", fd, (long)(k + j)), -1;
        }
    }
    return 0;
}

static int grow(void) {
    for (int i = 0; i < nfd; i++) {
        int fd = fds[i];
        if ((flags_of[i] & O_ACCMODE) == O_RDONLY) { /* through another open of the same file */
            char self[64];
            snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
            int w = open(self, O_WRONLY | O_CLOEXEC);
            if (w < 0) return -1;
            int r = fill(i, w, size_of[i], size_of[i] + 777);
            close(w);
            if (r) return -1;
        } else if (fill(i, fd, size_of[i], size_of[i] + 777) != 0) {
            return -1;
        }
        size_of[i] += 777;
        pos_of[i] += 7 + gen_of[i]++;
        if (lseek(fd, pos_of[i], SEEK_SET) != pos_of[i]) return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) return 2;
    char path[4096];
    snprintf(path, sizeof path, "%s/cmd", argv[1]);
    int c = open(path, O_RDONLY);
    snprintf(path, sizeof path, "%s/ans", argv[1]);
    int a = open(path, O_WRONLY);
    if (c < 0 || a < 0 || dup2(c, CMD_FD) != CMD_FD || dup2(a, ANS_FD) != ANS_FD) return 4;
    close(c);
    close(a);
    for (char *s = strtok(argv[2], ","); s && nfd < MAXF; s = strtok(NULL, ",")) fds[nfd++] = atoi(s);
    for (int i = 0; i < nfd; i++)
        if (make(i, argv[1], argv[3]) != 0) {
            char m[256];
            snprintf(m, sizeof m, "fail making fd %d: %s", fds[i], strerror(errno));
            say(m);
            return 5;
        }
    pid_t child = 0;
    if (argc == 5) {
        child = fork();
        if (child < 0) return 6;
        if (child == 0) {
            close(CMD_FD);
            close(ANS_FD);
            for (;;) pause();
        }
    }
    say("ready");
    FILE *in = fdopen(CMD_FD, "r");
    char line[256], why[512];
    while (fgets(line, sizeof line, in)) {
        line[strcspn(line, "\n")] = 0;
        if (!strcmp(line, "check")) {
            say(check(why, sizeof why) == 0 ? "ok" : why);
        } else if (!strcmp(line, "write")) {
            say(grow() == 0 ? "written" : "write failed");
        } else if (!strcmp(line, "child")) {
            snprintf(why, sizeof why, "%d", (int)child);
            say(why);
        } else {
            say("?");
        }
    }
    return 0;
}
