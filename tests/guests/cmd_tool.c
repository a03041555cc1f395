/* Test guest (WASI command) for the command ABI's edges; argv[1] picks the behaviour:
 *   echo            stdin to stdout
 *   args            argv (one per line) and then the environment, on stdout
 *   cat PATH        the file at PATH to stdout, then tries to open it for writing
 *   count           how many times main ran in this instance (1 in a fresh one)
 *   exit N          "failing with N" (plus 3000 bytes of filler before it) on stderr, exit(N)
 *   exit0           some output, then exit(0) through proc_exit
 *   spam N          N bytes of 'x' to stdout; prints to stderr how many were accepted
 *   noise N         N bytes of 'e' to stderr
 *   loop | trap | grow   spins forever | traps | mallocs 60 KiB blocks until refused, then exits 1
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;
static int runs;

static void write_all(int fd, char c, long n) {
    char buf[4096];
    memset(buf, c, sizeof buf);
    long accepted = 0;
    while (n > 0) {
        long chunk = n < (long)sizeof buf ? n : (long)sizeof buf;
        ssize_t w = write(fd, buf, (size_t)chunk);
        if (w < 0) {
            if (fd == 1) fprintf(stderr, "write failed after %ld bytes: errno %d\n", accepted, errno);
            return;
        }
        accepted += w;
        n -= w;
    }
    if (fd == 1) fprintf(stderr, "wrote %ld bytes\n", accepted);
}

int main(int argc, char **argv) {
    runs++;
    const char *mode = argc > 1 ? argv[1] : "echo";
    if (strcmp(mode, "echo") == 0) {
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) fwrite(buf, 1, n, stdout);
    } else if (strcmp(mode, "args") == 0) {
        for (int i = 0; i < argc; i++) printf("%s\n", argv[i]);
        for (char **e = environ; *e; e++) printf("%s\n", *e);
    } else if (strcmp(mode, "cat") == 0 && argc > 2) {
        FILE *f = fopen(argv[2], "rb");
        if (!f) {
            fprintf(stderr, "cannot open %s\n", argv[2]);
            return 1;
        }
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) fwrite(buf, 1, n, stdout);
        fclose(f);
        FILE *w = fopen(argv[2], "ab");
        fprintf(stderr, "open for writing: %s\n", w ? "allowed" : "refused");
    } else if (strcmp(mode, "count") == 0) {
        printf("%d\n", runs);
    } else if (strcmp(mode, "exit") == 0 && argc > 2) {
        for (int i = 0; i < 30; i++) fprintf(stderr, "filler line %02d .......................................................................................\n", i);
        fprintf(stderr, "failing with %s\n", argv[2]);
        exit(atoi(argv[2]));
    } else if (strcmp(mode, "exit0") == 0) {
        printf("done\n");
        exit(0);
    } else if (strcmp(mode, "spam") == 0 && argc > 2) {
        write_all(1, 'x', atol(argv[2]));
    } else if (strcmp(mode, "noise") == 0 && argc > 2) {
        write_all(2, 'e', atol(argv[2]));
    } else if (strcmp(mode, "loop") == 0) {
        volatile unsigned long i = 0;
        for (;;) i++;
    } else if (strcmp(mode, "trap") == 0) {
        __builtin_trap();
    } else if (strcmp(mode, "grow") == 0) {
        static char *volatile kept[4096]; /* volatile: the compiler may not drop the allocations */
        for (int i = 0; i < 4096; i++) {
            if (!(kept[i] = malloc(60 << 10))) {
                fprintf(stderr, "out of memory after %d blocks of 60 KiB\n", i);
                return 1;
            }
        }
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    return 0;
}
