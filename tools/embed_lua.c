/*
 * embed_lua.c: the build's generator of gen/lua_library.c, the aigate Lua library compiled to Lua
 * bytecode and held in the binary (src/library.h says how the host uses it).
 *
 * Usage: embed_lua OUT.c ROOT FILE.lua...
 * Each FILE is under ROOT (the Makefile passes every .lua under lua/); its module name is its path
 * below ROOT with the ".lua" dropped and '/' made '.', and "x/init.lua" is module "x", as the file
 * searcher's "?/init.lua" would find it. Each is compiled here, by the same Lua the binary links, and
 * dumped with its debug information: error messages and tracebacks keep their line numbers, and the
 * chunk name "=aigate/<file>" tells the library's code from the user's (the instruction budget counts
 * only the latter). The size and modification time of each file go along, so that a binary in a
 * source tree sees when a file has been edited since it was built.
 *
 * A file that does not compile stops the build with Lua's message (file:line: what is wrong).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <lauxlib.h>
#include <lua.h>

struct bytes {
    unsigned char *data;
    size_t len, cap;
};

static int collect(lua_State *L, const void *p, size_t n, void *ud)
{
    struct bytes *b = ud;

    (void)L;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        unsigned char *data;
        while (cap < b->len + n)
            cap *= 2;
        data = realloc(b->data, cap);
        if (data == NULL)
            return 1;
        b->data = data;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *text = NULL;
    long n;

    if (f == NULL)
        return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
        text = malloc((size_t)n + 1);
        if (text && fread(text, 1, (size_t)n, f) != (size_t)n) {
            free(text);
            text = NULL;
        }
        *len = (size_t)n;
    }
    fclose(f);
    return text;
}

/* "aigate/cmd/run.lua" -> "aigate.cmd.run"; "aigate/init.lua" -> "aigate". NULL when not a .lua. */
static char *module_name(const char *rel)
{
    size_t n = strlen(rel);
    char *name;
    size_t i;

    if (n < 5 || strcmp(rel + n - 4, ".lua") != 0)
        return NULL;
    name = malloc(n);
    if (name == NULL)
        return NULL;
    memcpy(name, rel, n - 4);
    name[n - 4] = '\0';
    if (n - 4 > 5 && strcmp(name + n - 4 - 5, "/init") == 0)
        name[n - 4 - 5] = '\0';
    for (i = 0; name[i]; i++)
        if (name[i] == '/')
            name[i] = '.';
    return name;
}

/* Writes one module's bytecode as a C array; returns 0, or -1 with a message on stderr. */
static int emit_module(lua_State *L, FILE *out, int index, const char *path, const char *rel)
{
    struct bytes code = { 0 };
    char chunkname[1024];
    size_t len = 0, i;
    char *text = read_file(path, &len);
    int rc = -1;

    if (text == NULL) {
        fprintf(stderr, "embed_lua: cannot read %s: %s\n", path, strerror(errno));
        return -1;
    }
    snprintf(chunkname, sizeof(chunkname), "=%s", rel);
    if (luaL_loadbufferx(L, text, len, chunkname, "t") != LUA_OK) {
        fprintf(stderr, "embed_lua: %s does not compile: %s\n", path, lua_tostring(L, -1));
    } else if (lua_dump(L, collect, &code, 0) != 0) {
        fprintf(stderr, "embed_lua: out of memory dumping %s\n", path);
    } else {
        fprintf(out, "static const unsigned char module_%d[%zu] = {", index, code.len);
        for (i = 0; i < code.len; i++)
            fprintf(out, "%s%u,", i % 24 ? "" : "\n", code.data[i]);
        fputs("\n};\n\n", out);
        rc = 0;
    }
    lua_settop(L, 0);
    free(code.data);
    free(text);
    return rc;
}

/* Whether rel is a plain relative path: letters, digits, '_', '-', '.' and '/' only (it goes into C
 * strings and module names as it is). */
static int plain_path(const char *rel)
{
    return *rel != '\0' &&
           strspn(rel, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./") == strlen(rel);
}

static void free_all(lua_State *L, struct stat *st, char **names, int n)
{
    int i;

    for (i = 0; i < n; i++)
        free(names[i]);
    free(names);
    free(st);
    lua_close(L);
}

int main(int argc, char **argv)
{
    const char *out_path, *root;
    char **names;
    struct stat *st;
    size_t root_len;
    lua_State *L;
    FILE *out;
    int i;

    if (argc < 4) {
        fputs("usage: embed_lua OUT.c ROOT FILE.lua...\n", stderr);
        return 2;
    }
    out_path = argv[1];
    root = argv[2];
    root_len = strlen(root);
    st = calloc((size_t)argc, sizeof(*st));
    names = calloc((size_t)argc, sizeof(*names));
    L = luaL_newstate();
    out = fopen(out_path, "w");
    if (st == NULL || names == NULL || L == NULL || out == NULL) {
        fprintf(stderr, "embed_lua: cannot write %s\n", out_path);
        return 1;
    }
    fputs("/* Generated by tools/embed_lua from the Lua files under lua/: do not edit. */\n"
          "#include \"library.h\"\n\n",
          out);
    for (i = 3; i < argc; i++) {
        const char *rel = argv[i] + root_len + 1;
        int j;
        if (strncmp(argv[i], root, root_len) != 0 || argv[i][root_len] != '/' || !plain_path(rel) ||
            (names[i] = module_name(rel)) == NULL) {
            fprintf(stderr, "embed_lua: %s is not a .lua file under %s/ with a plain name\n", argv[i], root);
            goto fail;
        }
        /* x.lua and x/init.lua: require would take the first, silently; the build says so instead. */
        for (j = 3; j < i; j++) {
            if (strcmp(names[j], names[i]) == 0) {
                fprintf(stderr, "embed_lua: %s and %s are both module %s: keep one\n", argv[j], argv[i],
                        names[i]);
                goto fail;
            }
        }
        /* Before reading: an edit after this moment changes the time, and the binary will see it. */
        if (stat(argv[i], &st[i]) != 0) {
            fprintf(stderr, "embed_lua: cannot stat %s: %s\n", argv[i], strerror(errno));
            goto fail;
        }
        if (emit_module(L, out, i, argv[i], rel) != 0)
            goto fail;
    }
    fputs("const struct library_module library_modules[] = {\n", out);
    for (i = 3; i < argc; i++) {
        const char *rel = argv[i] + root_len + 1;
        fprintf(out, "    { \"%s\", \"=%s\", module_%d, sizeof(module_%d), %lld, %lld, %ld },\n", names[i],
                rel, i, i, (long long)st[i].st_size, (long long)st[i].st_mtim.tv_sec,
                (long)st[i].st_mtim.tv_nsec);
    }
    fprintf(out, "};\n\nconst int library_module_count = %d;\n", argc - 3);
    if (fclose(out) != 0) {
        fprintf(stderr, "embed_lua: cannot write %s\n", out_path);
        out = NULL;
        goto fail;
    }
    free_all(L, st, names, argc);
    return 0;
fail:
    if (out)
        fclose(out);
    remove(out_path);
    free_all(L, st, names, argc);
    return 1;
}
