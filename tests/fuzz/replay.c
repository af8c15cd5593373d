/*
 * replay.c: a main() for a libFuzzer harness without libFuzzer, so the committed corpus can be
 * replayed by `make test` with the normal compiler (and by `make asan` under the sanitizers).
 *
 *   tests/fuzz/replay_<name> FILE|DIR...
 *
 * Feeds every file named, and every file of every folder named (in name order, dot files skipped),
 * to LLVMFuzzerTestOneInput, each in a heap block of its exact size so that a read past the input
 * shows under ASan. A harness signals a broken property by aborting, so reaching the end means
 * every input passed: prints "N inputs" and exits 0. Exits 2 when an input cannot be read.
 */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* Optional in a harness, as with libFuzzer: called once before the first input. */
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

static long replayed;

static int replay_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    struct stat st;
    uint8_t *data;
    size_t size;

    if (f == NULL || fstat(fileno(f), &st) != 0) {
        fprintf(stderr, "replay: cannot read %s: %s\n", path, strerror(errno));
        if (f)
            fclose(f);
        return -1;
    }
    size = (size_t)st.st_size;
    data = malloc(size ? size : 1); /* never NULL for an empty input, as libFuzzer gives */
    if (data == NULL || fread(data, 1, size, f) != size) {
        fprintf(stderr, "replay: cannot read %s: %s\n", path, data ? "short read" : "out of memory");
        free(data);
        fclose(f);
        return -1;
    }
    fclose(f);
    LLVMFuzzerTestOneInput(data, size);
    free(data);
    replayed++;
    return 0;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int replay_dir(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    char **names = NULL;
    size_t n = 0;
    size_t cap = 0;
    size_t i;
    int rc = 0;

    if (d == NULL) {
        fprintf(stderr, "replay: cannot open %s: %s\n", dir, strerror(errno));
        return -1;
    }
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        if (n == cap) {
            char **more;
            cap = cap ? cap * 2 : 64;
            more = realloc(names, cap * sizeof(*names));
            if (more == NULL)
                abort();
            names = more;
        }
        names[n] = malloc(strlen(dir) + strlen(e->d_name) + 2);
        if (names[n] == NULL)
            abort();
        sprintf(names[n], "%s/%s", dir, e->d_name);
        n++;
    }
    closedir(d);
    if (n > 0)
        qsort(names, n, sizeof(*names), by_name);
    for (i = 0; i < n; i++) {
        struct stat st;
        if (stat(names[i], &st) == 0 && S_ISREG(st.st_mode) && replay_file(names[i]) != 0)
            rc = -1;
        free(names[i]);
    }
    free(names);
    return rc;
}

int main(int argc, char **argv)
{
    int i;
    int rc = 0;
    int init_argc = argc;
    char **init_argv = argv;

    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE|DIR... (the inputs to feed to the harness)\n", argv[0]);
        return 2;
    }
    if (LLVMFuzzerInitialize)
        LLVMFuzzerInitialize(&init_argc, &init_argv);
    for (i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) != 0) {
            fprintf(stderr, "replay: cannot read %s: %s\n", argv[i], strerror(errno));
            rc = 2;
        } else if (S_ISDIR(st.st_mode) ? replay_dir(argv[i]) != 0 : replay_file(argv[i]) != 0) {
            rc = 2;
        }
    }
    printf("%ld inputs\n", replayed);
    return rc;
}
