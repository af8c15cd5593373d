/*
 * jsontext.h: writing JSON strings (src/jsontext.c), one rule for C and Lua.
 *
 * js_quote is how aigate writes every JSON string: the escaping of lua-cjson ('"', '\\', control
 * bytes as \b \f \n \r \t or \u00XX, DEL as \u007f) without its "\/" for '/'. The Lua encoder
 * (aigate.json's quote, through core.json_quote) and the batch engine both call it, so a request body
 * or a result line written in C has the bytes the Lua encoder would write.
 */
#ifndef AIGATE_JSONTEXT_H
#define AIGATE_JSONTEXT_H

#include <stddef.h>

#include "buf.h"

/* Appends s[0..len) as a JSON string, quotes included. */
void js_quote(struct buf *b, const char *s, size_t len);

/* Does a string token need js_unescape (jsonscan.h) + js_quote to read as js_quote writes it? 0 when its
 * bytes are already what js_quote would write for the text it stands for. */
int js_needs_requote(const char *tok, size_t len);

#endif
