/*
 * scan.h: the first pass of `aigate batch` over an input file, and the id rule's Lua bindings
 * (src/scan.c): core.scan_ids, core.line_id, core.utf8_bad (see CORE_API.md).
 *
 * The first pass reads every line's id (the rule of jsonscan.h, completed by aigate.batch's line_id),
 * counts what is to run and finds duplicates; it also records what it read (struct input: a hash of
 * each line, the file's identity, size and time), so that the run, which reads the file again, can
 * check that each line is the one the duplicate check saw. The engine checks with the functions here,
 * Lua with the record's methods (input:check, input:check_end, input:unchanged).
 */
#ifndef AIGATE_SCAN_H
#define AIGATE_SCAN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

#include <lua.h>

/* What the first pass read of an input file (a Lua userdata, made by core.scan_ids). */
struct input;

/* The record at index idx of L; raises when it is something else. */
struct input *input_arg(lua_State *L, int idx);
/* How many lines the first pass read (blank and oversize ones included). */
size_t input_lines(const struct input *in);
/* The path the first pass read. */
const char *input_path(const struct input *in);

/* The checks: each returns NULL when what the run sees is what the first pass read, else why not, a
 * sentence to follow "the input changed: " (written into why[size] or a constant). */
/* Line lineno (from 1) of the run: line[0..len), or a line of oversize bytes (> 0: line is not read,
 * and may be NULL) skipped as longer than max_line. */
const char *input_line_differs(const struct input *in, long long lineno, const char *line, size_t len,
                               size_t oversize, char *why, size_t size);
/* The run's input ended after line lineno, `bytes` bytes in (-1: not known; lineno < 0: not known). */
const char *input_end_differs(const struct input *in, long long lineno, long long bytes, char *why,
                              size_t size);
/* st: a stat of the input now. */
const char *input_stat_differs(const struct input *in, const struct stat *st, char *why, size_t size);
/* Stats the input's path now (as input:unchanged does): also "it cannot be read any more (...)". */
const char *input_stat(const struct input *in, char *why, size_t size);

/* The hash input_line_differs compares: of a line's bytes, or of its length alone for an oversize
 * line (> 0), which is never held. */
uint32_t input_line_hash(const char *line, size_t len, size_t oversize);

/* Puts scan_ids, line_id and utf8_bad into the table on top of L. */
void core_register_scan(lua_State *L);

#endif
