/*
 * startup_timer.c: times the start of short commands side by side. Each round runs every command once,
 * in turn, so that whatever else loads the machine weighs on all of them alike; after ROUNDS rounds it
 * prints, per command, the median and the lowest wall time and the median CPU time (user + system, from
 * wait4) in milliseconds. A command that fails (non-zero exit) voids the figures: the timer says which
 * and exits 1.
 *
 * Usage: startup_timer ROUNDS LABEL CMD [ARGS...] [-- LABEL CMD [ARGS...]]...
 * Output, one line per command: "LABEL median_wall_ms min_wall_ms median_cpu_ms". The commands'
 * standard input, output and error are /dev/null.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_COMMANDS 16

struct command {
    const char *label;
    char **argv;
    double *wall;
    double *cpu;
};

static double seconds_between(const struct timespec *a, const struct timespec *b)
{
    return (double)(b->tv_sec - a->tv_sec) + (double)(b->tv_nsec - a->tv_nsec) / 1e9;
}

/* Runs argv once with /dev/null for its standard streams; wall and CPU seconds in *wall and *cpu.
 * Returns its exit status, or -1 when it could not be run or ended by a signal. */
static int run_once(char **argv, double *wall, double *cpu)
{
    struct timespec t0, t1;
    struct rusage ru;
    int status = 0;
    pid_t pid;

    clock_gettime(CLOCK_MONOTONIC, &t0);
    pid = fork();
    if (pid == 0) {
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) {
            dup2(null, 0);
            dup2(null, 1);
            dup2(null, 2);
        }
        execvp(argv[0], argv);
        _exit(127);
    }
    if (pid < 0 || wait4(pid, &status, 0, &ru) < 0)
        return -1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    *wall = seconds_between(&t0, &t1);
    *cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           (double)ru.ru_stime.tv_usec / 1e6;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static int compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(*v), compare_doubles);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* Splits argv (after ROUNDS) at "--" into commands, each LABEL CMD [ARGS...]. Returns how many. */
static int parse_commands(int argc, char **argv, struct command *cmds)
{
    int n = 0;
    int i = 2;

    while (i < argc) {
        int end = i;
        while (end < argc && strcmp(argv[end], "--") != 0)
            end++;
        if (end - i < 2 || n == MAX_COMMANDS)
            return -1;
        argv[end < argc ? end : argc] = NULL; /* ends this command's argv (argv[argc] is NULL already) */
        cmds[n].label = argv[i];
        cmds[n].argv = argv + i + 1;
        n++;
        i = end + 1;
    }
    return n;
}

int main(int argc, char **argv)
{
    struct command cmds[MAX_COMMANDS];
    int rounds = argc > 1 ? atoi(argv[1]) : 0;
    int n = parse_commands(argc, argv, cmds);
    int r, c;

    if (rounds < 1 || n < 1) {
        fprintf(stderr, "usage: startup_timer ROUNDS LABEL CMD [ARGS...] [-- LABEL CMD [ARGS...]]...\n");
        return 2;
    }
    for (c = 0; c < n; c++) {
        cmds[c].wall = calloc((size_t)rounds, sizeof(double));
        cmds[c].cpu = calloc((size_t)rounds, sizeof(double));
        if (cmds[c].wall == NULL || cmds[c].cpu == NULL) {
            perror("startup_timer");
            return 2;
        }
    }
    for (r = 0; r < rounds; r++) {
        for (c = 0; c < n; c++) {
            int code = run_once(cmds[c].argv, &cmds[c].wall[r], &cmds[c].cpu[r]);
            if (code != 0) {
                fprintf(stderr, "startup_timer: %s (%s) failed (status %d): its figures would mean nothing\n",
                        cmds[c].label, cmds[c].argv[0], code);
                return 1;
            }
        }
    }
    for (c = 0; c < n; c++) {
        double wall = median(cmds[c].wall, rounds); /* sorts: the lowest is first afterwards */
        printf("%s %.3f %.3f %.3f\n", cmds[c].label, wall * 1e3, cmds[c].wall[0] * 1e3,
               median(cmds[c].cpu, rounds) * 1e3);
        free(cmds[c].wall);
        free(cmds[c].cpu);
    }
    return 0;
}
