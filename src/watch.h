/*
 * watch.h: a list of parties to tell when something goes away. A server response keeps the
 * watches of the transfers tied to its client (core.request's tied_to): when the client goes away,
 * each is fired once, and a transfer that ends first takes itself off. Intrusive, so that adding
 * and removing never allocates; a watch must not move while it is on a list.
 */
#ifndef AIGATE_WATCH_H
#define AIGATE_WATCH_H

#include <stddef.h>

struct watch {
    struct watch *next;
    struct watch **pprev; /* NULL: on no list */
    void (*fire)(struct watch *w);
};

static inline void watch_add(struct watch **head, struct watch *w)
{
    w->next = *head;
    if (*head)
        (*head)->pprev = &w->next;
    w->pprev = head;
    *head = w;
}

static inline void watch_remove(struct watch *w)
{
    if (w->pprev == NULL)
        return;
    *w->pprev = w->next;
    if (w->next)
        w->next->pprev = w->pprev;
    w->next = NULL;
    w->pprev = NULL;
}

/* Takes every watch off the list; fires each when fire is set (a fired watch may free itself). */
static inline void watch_release_all(struct watch **head, int fire)
{
    while (*head) {
        struct watch *w = *head;
        watch_remove(w);
        if (fire)
            w->fire(w);
    }
}

#endif
