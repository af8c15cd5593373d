/*
 * measure.c: runs a command and reports what it cost: wall seconds, user and system CPU seconds and
 * peak RSS (getrusage of the child, via wait4). Usage: measure REPORT_FILE CMD [ARGS...]; writes
 * "wall W user U sys S maxrss_kb K status X" to REPORT_FILE and exits with the command's status.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct timespec t0, t1;
    struct rusage ru;
    FILE *report;
    pid_t pid;
    int status = 0;
    int code;

    if (argc < 3) {
        fprintf(stderr, "usage: measure REPORT_FILE CMD [ARGS...]\n");
        return 2;
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pid = fork();
    if (pid == 0) {
        execvp(argv[2], argv + 2);
        perror("measure: exec");
        _exit(127);
    }
    if (pid < 0 || wait4(pid, &status, 0, &ru) < 0) {
        perror("measure");
        return 2;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    report = fopen(argv[1], "w");
    if (report == NULL) {
        perror("measure: report");
        return 2;
    }
    fprintf(report, "wall %.6f user %.6f sys %.6f maxrss_kb %ld status %d\n",
            (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9,
            (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6,
            (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6, ru.ru_maxrss, code);
    fclose(report);
    return code;
}
