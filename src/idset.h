/*
 * idset.h: a set of batch line ids, each with the line it was first seen on: the duplicate check of
 * the first pass (core.scan_ids), for a million ids or more.
 *
 * Open addressing on the ids' FNV-1a (js_hash, the hash of ids across lines); the ids' bytes are kept
 * one after another in an arena and a slot is 16 bytes, so a million ids take about 40 MB. Pure C, no
 * Lua: unit-tested in tests/unit/test_idset.c.
 */
#ifndef AIGATE_IDSET_H
#define AIGATE_IDSET_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"

struct identry {
    uint32_t off; /* in keys */
    uint32_t len;
    uint32_t hash;
    uint32_t lineno; /* 0: an empty slot */
};

struct idset {
    struct identry *e;
    size_t cap; /* slots: 0 or a power of two */
    size_t n;   /* ids */
    struct buf keys;
};

void idset_init(struct idset *set);
/* Adds id (any bytes) seen on line lineno (from 1; numbers past 2^32 - 1 are kept as 2^32 - 1).
 * Returns 0 when it is new, the line it was first seen on when it is not (the set keeps that one), or
 * -1 when it cannot be added: out of memory, the ids' bytes past 4 GiB, or lineno < 1. */
long long idset_add(struct idset *set, const char *id, size_t len, long long lineno);
/* The line id was first seen on, or 0 when it is not in the set. */
long long idset_find(const struct idset *set, const char *id, size_t len);
/* Frees the set; it may be initialised again. */
void idset_free(struct idset *set);

#endif
