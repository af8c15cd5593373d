/*
 * idset.c: the id set of idset.h. The table doubles at three quarters full.
 */
#include "idset.h"

#include <stdlib.h>
#include <string.h>

#include "jsonscan.h"

void idset_init(struct idset *set)
{
    set->e = NULL;
    set->cap = 0;
    set->n = 0;
    buf_init(&set->keys);
}

void idset_free(struct idset *set)
{
    free(set->e);
    buf_free(&set->keys);
    idset_init(set);
}

/* The slot of id: the one holding it, or the empty one where it would go. cap > 0. */
static size_t slot_of(const struct idset *set, const char *id, size_t len, uint32_t h)
{
    size_t i = h & (set->cap - 1);

    while (set->e[i].lineno) {
        const struct identry *x = &set->e[i];
        if (x->hash == h && x->len == len && memcmp(set->keys.data + x->off, id, len) == 0)
            return i;
        i = (i + 1) & (set->cap - 1);
    }
    return i;
}

/* Doubles the table (from 1024 slots). 0, or -1 when out of memory. */
static int grow(struct idset *set)
{
    size_t cap = set->cap ? set->cap * 2 : 1024;
    struct identry *e = calloc(cap, sizeof(*e));
    size_t i;

    if (e == NULL)
        return -1;
    for (i = 0; i < set->cap; i++) {
        if (set->e[i].lineno) {
            size_t j = set->e[i].hash & (cap - 1);
            while (e[j].lineno)
                j = (j + 1) & (cap - 1);
            e[j] = set->e[i];
        }
    }
    free(set->e);
    set->e = e;
    set->cap = cap;
    return 0;
}

long long idset_add(struct idset *set, const char *id, size_t len, long long lineno)
{
    uint32_t h = js_hash(id, len);
    size_t i;

    if (lineno < 1)
        return -1;
    if ((set->n + 1) * 4 > set->cap * 3 && grow(set) != 0)
        return -1;
    i = slot_of(set, id, len, h);
    if (set->e[i].lineno)
        return set->e[i].lineno;
    if (len > UINT32_MAX || set->keys.len + len > UINT32_MAX)
        return -1;
    set->e[i].off = (uint32_t)set->keys.len;
    set->e[i].len = (uint32_t)len;
    set->e[i].hash = h;
    set->e[i].lineno = lineno > (long long)UINT32_MAX ? UINT32_MAX : (uint32_t)lineno;
    buf_append(&set->keys, id, len);
    set->n++;
    return 0;
}

long long idset_find(const struct idset *set, const char *id, size_t len)
{
    if (set->cap == 0)
        return 0;
    return set->e[slot_of(set, id, len, js_hash(id, len))].lineno;
}
