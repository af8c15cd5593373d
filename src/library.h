/*
 * library.h: the aigate Lua library built into the binary.
 *
 * tools/embed_lua compiles every .lua under lua/ at build time into gen/lua_library.c: one entry per
 * module with its bytecode (debug information kept), its chunk name "=aigate/<file>" and the size and
 * modification time of the file it came from. A searcher in package.searchers, right after
 * package.preload's, loads modules from there, so that starting aigate compiles no Lua; the host
 * (main.c) reads the files instead when told to (AIGATE_LIBRARY_PATH) or when it runs from a source tree
 * whose files changed since the build (library_matches).
 */
#ifndef AIGATE_LIBRARY_H
#define AIGATE_LIBRARY_H

#include <stddef.h>

#include <lua.h>

/* The start of every built-in module's chunk name (its source in debug information). */
#define LIBRARY_CHUNK_PREFIX "=aigate/"

struct library_module {
    const char *name;      /* "aigate.cmd.run" */
    const char *chunkname; /* "=aigate/cmd/run.lua": the file below lua/ */
    const unsigned char *code;
    size_t len;
    long long size; /* of the file, and its modification time */
    long long mtime_sec;
    long mtime_nsec;
};

extern const struct library_module library_modules[];
extern const int library_module_count;

/* 1 when every built-in module's file is in lua_dir (a lua/ directory) with the size and modification
 * time it had when the binary was built, else 0. */
int library_matches(const char *lua_dir);

/* Puts the built-in library's searcher in package.searchers, second, after package.preload's. */
void library_add_searcher(lua_State *L);

#endif
