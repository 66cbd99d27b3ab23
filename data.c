// data.c -- the readers of the data files every program shares (see data.h).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <stdint.h>
#include <math.h>
#include "run.h"
#include "data.h"

// ----------------------------------------------------------------------------
// JSON

typedef struct { const char* s; size_t n, at; char* err; size_t errlen; int depth; } JsonReader;

static int json_fail(JsonReader* r, const char* what) {
    snprintf(r->err, r->errlen, "%s at byte %zu", what, r->at);
    return -1;
}

static void json_ws(JsonReader* r) {
    while (r->at < r->n && (r->s[r->at] == ' ' || r->s[r->at] == '\t' || r->s[r->at] == '\n' || r->s[r->at] == '\r')) r->at++;
}

static int json_hex4(JsonReader* r, uint32_t* v) {
    if (r->at + 4 > r->n) return json_fail(r, "short \\u escape");
    *v = 0;
    for (int i = 0; i < 4; i++) {
        char c = r->s[r->at++];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return json_fail(r, "bad \\u escape");
        *v = *v * 16 + (uint32_t)d;
    }
    return 0;
}

static size_t utf8_put(char* o, uint32_t c) {
    if (c < 0x80) { o[0] = (char)c; return 1; }
    if (c < 0x800) { o[0] = (char)(0xC0 | (c >> 6)); o[1] = (char)(0x80 | (c & 0x3F)); return 2; }
    if (c < 0x10000) { o[0] = (char)(0xE0 | (c >> 12)); o[1] = (char)(0x80 | ((c >> 6) & 0x3F)); o[2] = (char)(0x80 | (c & 0x3F)); return 3; }
    o[0] = (char)(0xF0 | (c >> 18)); o[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((c >> 6) & 0x3F)); o[3] = (char)(0x80 | (c & 0x3F));
    return 4;
}

// One \u escape (r->at just past the 'u'), a surrogate pair taking two, into o.
static int json_unicode(JsonReader* r, char* o, size_t* k) {
    uint32_t v;
    if (json_hex4(r, &v) < 0) return -1;
    if (v >= 0xD800 && v <= 0xDBFF) {
        uint32_t lo;
        if (r->at + 2 > r->n || r->s[r->at] != '\\' || r->s[r->at + 1] != 'u') return json_fail(r, "lone surrogate");
        r->at += 2;
        if (json_hex4(r, &lo) < 0) return -1;
        if (lo < 0xDC00 || lo > 0xDFFF) return json_fail(r, "bad surrogate pair");
        v = 0x10000 + ((v - 0xD800) << 10) + (lo - 0xDC00);
    } else if (v >= 0xDC00 && v <= 0xDFFF) {
        return json_fail(r, "lone surrogate");
    }
    if (v == 0) return json_fail(r, "NUL in string");
    *k += utf8_put(o + *k, v);
    return 0;
}

// An escape never decodes longer than it is written, so the raw span up to
// the closing quote bounds the decoded string.
static int json_string(JsonReader* r, char** out) {
    size_t end = ++r->at; // past the opening quote
    while (end < r->n && r->s[end] != '"') end += r->s[end] == '\\' ? 2 : 1;
    char* b = xmalloc((end < r->n ? end - r->at : r->n - r->at) + 1);
    size_t k = 0;
    while (1) {
        if (r->at >= r->n) { free(b); return json_fail(r, "unterminated string"); }
        unsigned char c = (unsigned char)r->s[r->at];
        if (c == '"') { r->at++; break; }
        if (c < 0x20) { free(b); return json_fail(r, "control character in string"); }
        if (c != '\\') { b[k++] = (char)c; r->at++; continue; }
        if (++r->at >= r->n) { free(b); return json_fail(r, "unterminated escape"); }
        char e = r->s[r->at++];
        const char* simple = e ? strchr("\"\\/bfnrt", e) : NULL;
        if (simple) b[k++] = "\"\\/\b\f\n\r\t"[simple - "\"\\/bfnrt"];
        else if (e != 'u') { free(b); return json_fail(r, "bad escape"); }
        else if (json_unicode(r, b, &k) < 0) { free(b); return -1; }
    }
    b[k] = '\0';
    if (!utf8_valid(b, k)) { free(b); return json_fail(r, "string is not valid UTF-8"); }
    *out = b;
    return 0;
}

static int json_value(JsonReader* r, JsonValue* v);

static int json_push(JsonValue* v, int* cap) {
    if (v->n == *cap) {
        *cap = *cap ? *cap * 2 : 4;
        v->items = xrealloc(v->items, (size_t)*cap * sizeof(JsonValue));
        if (v->type == JSON_OBJECT) v->keys = xrealloc(v->keys, (size_t)*cap * sizeof(char*));
    }
    memset(&v->items[v->n], 0, sizeof(JsonValue));
    if (v->keys) v->keys[v->n] = NULL;
    return v->n++;
}

// An object or array; r->at is on its opening bracket.
static int json_container(JsonReader* r, JsonValue* v) {
    if (++r->depth > 64) return json_fail(r, "nested too deeply");
    v->type = r->s[r->at] == '{' ? JSON_OBJECT : JSON_ARRAY;
    char close = v->type == JSON_OBJECT ? '}' : ']';
    int cap = 0;
    r->at++;
    json_ws(r);
    if (r->at < r->n && r->s[r->at] == close) { r->at++; r->depth--; return 0; }
    while (1) {
        char* key = NULL;
        if (v->type == JSON_OBJECT) {
            json_ws(r);
            if (r->at >= r->n || r->s[r->at] != '"') return json_fail(r, "expected a key");
            if (json_string(r, &key) < 0) return -1;
            json_ws(r);
            if (r->at >= r->n || r->s[r->at] != ':') { free(key); return json_fail(r, "expected ':'"); }
            r->at++;
        }
        int k = json_push(v, &cap);
        if (v->type == JSON_OBJECT) v->keys[k] = key;
        if (json_value(r, &v->items[k]) < 0) return -1;
        json_ws(r);
        if (r->at < r->n && r->s[r->at] == ',') { r->at++; continue; }
        if (r->at < r->n && r->s[r->at] == close) { r->at++; break; }
        return json_fail(r, "expected ',' or a closing bracket");
    }
    r->depth--;
    return 0;
}

static int json_number(JsonReader* r, JsonValue* v) {
    char tmp[64];
    size_t k = 0;
    while (r->at + k < r->n && k < sizeof(tmp) - 1 && strchr("+-0123456789.eE", r->s[r->at + k])) { tmp[k] = r->s[r->at + k]; k++; }
    tmp[k] = '\0';
    char* end;
    v->number = strtod(tmp, &end);
    if (k == 0 || end != tmp + k || !isfinite(v->number)) return json_fail(r, "bad number");
    v->type = JSON_NUMBER;
    r->at += k;
    return 0;
}

static int json_value(JsonReader* r, JsonValue* v) {
    memset(v, 0, sizeof(*v));
    json_ws(r);
    if (r->at >= r->n) return json_fail(r, "unexpected end");
    char c = r->s[r->at];
    if (c == '{' || c == '[') return json_container(r, v);
    if (c == '"') { v->type = JSON_STRING; return json_string(r, &v->string); }
    size_t left = r->n - r->at;
    if (left >= 4 && !strncmp(r->s + r->at, "true", 4)) { v->type = JSON_BOOL; v->number = 1; r->at += 4; return 0; }
    if (left >= 5 && !strncmp(r->s + r->at, "false", 5)) { v->type = JSON_BOOL; r->at += 5; return 0; }
    if (left >= 4 && !strncmp(r->s + r->at, "null", 4)) { v->type = JSON_NULL; r->at += 4; return 0; }
    if (c == '-' || (c >= '0' && c <= '9')) return json_number(r, v);
    return json_fail(r, "unexpected character");
}

void json_free(JsonValue* v) {
    for (int i = 0; i < v->n; i++) {
        json_free(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items); free(v->keys); free(v->string);
    memset(v, 0, sizeof(*v));
}

int json_parse(const char* text, size_t len, JsonValue* v, char* err, size_t errlen) {
    JsonReader r = {text, len, 0, err, errlen, 0};
    if (json_value(&r, v) < 0) { json_free(v); return -1; }
    json_ws(&r);
    if (r.at != len) { json_fail(&r, "trailing characters"); json_free(v); return -1; }
    return 0;
}

const JsonValue* json_get(const JsonValue* obj, const char* key) {
    if (!obj || obj->type != JSON_OBJECT) return NULL;
    for (int i = 0; i < obj->n; i++) if (obj->keys[i] && !strcmp(obj->keys[i], key)) return &obj->items[i];
    return NULL;
}

const char* json_get_string(const JsonValue* obj, const char* key) {
    const JsonValue* v = json_get(obj, key);
    return v && v->type == JSON_STRING ? v->string : NULL;
}

// ----------------------------------------------------------------------------
// JSON lines

void jsonl_init(JsonLines* jl, const char* name, const char* text, size_t len) {
    // a NUL would end a line early where a reader treats it as a C string
    if (memchr(text, '\0', len)) die("%s holds a NUL byte", name);
    memset(jl, 0, sizeof(*jl));
    jl->name = name;
    jl->text = text;
    jl->len = len;
}

void jsonl_open(JsonLines* jl, const char* path) {
    size_t len;
    char* text = read_file(path, &len);
    jsonl_init(jl, path, text, len);
    jl->owned = text;
}

int jsonl_next(JsonLines* jl, JsonValue* v) {
    while (jl->at < jl->len) {
        const char* line = jl->text + jl->at;
        const char* nl = memchr(line, '\n', jl->len - jl->at);
        size_t n = nl ? (size_t)(nl - line) : jl->len - jl->at;
        jl->at += n + (nl != NULL);
        jl->line_no++;
        size_t b = 0;
        while (b < n && (line[b] == ' ' || line[b] == '\t' || line[b] == '\r')) b++;
        if (b == n) continue;
        char err[128];
        if (json_parse(line, n, v, err, sizeof(err)) != 0) die("%s:%d: bad JSON: %s", jl->name, jl->line_no, err);
        return 1;
    }
    return 0;
}

void jsonl_close(JsonLines* jl) {
    free(jl->owned);
    memset(jl, 0, sizeof(*jl));
}

// ----------------------------------------------------------------------------
// QA TSV

// \n, \t and \\ in place (the text only shrinks); other backslashes stay.
static void tsv_unescape(char* s) {
    char* o = s;
    for (; *s; s++) {
        if (s[0] == '\\' && (s[1] == 'n' || s[1] == 't' || s[1] == '\\')) {
            *o++ = s[1] == 'n' ? '\n' : s[1] == 't' ? '\t' : '\\';
            s++;
        } else {
            *o++ = *s;
        }
    }
    *o = '\0';
}

// The field starting at s: cut at the next tab; returns what follows it (NULL at the last field).
static char* tsv_field(char* s) {
    char* tab = strchr(s, '\t');
    if (!tab) return NULL;
    *tab = '\0';
    return tab + 1;
}

void check_text(const char* name, const char* text, size_t len) {
    if (strlen(text) != len) die("%s holds a NUL byte", name);
    if (!utf8_valid(text, len)) die("%s is not valid UTF-8", name);
}

char* read_text(const char* path, size_t* len) {
    size_t n;
    char* text = read_file(path, &n);
    check_text(path, text, n);
    if (len) *len = n;
    return text;
}

void qa_parse(QAFile* f, const char* name, char* text, size_t len) {
    check_text(name, text, len); // rows are C strings
    memset(f, 0, sizeof(*f));
    f->text = text;
    int cap = 0, line_no = 0;
    for (char* line = text; *line;) {
        char* nl = strchr(line, '\n');
        char* next = nl ? nl + 1 : line + strlen(line);
        if (nl) *nl = '\0';
        size_t l = strlen(line);
        if (l && line[l - 1] == '\r') line[--l] = '\0';
        line_no++;
        int header = line_no == 1 && !strncasecmp(line, "question\t", 9);
        if (l && line[0] != '#' && !header) {
            QARow r = {.question = line, .line = line_no};
            r.answer = tsv_field(line);
            if (!r.answer || !r.answer[0] || r.answer[0] == '\t')
                die("%s:%d: expected question<TAB>answer[<TAB>more fields], the answer not empty", name, line_no);
            r.third = tsv_field(r.answer);
            if (r.third) tsv_field(r.third);
            tsv_unescape(r.question);
            tsv_unescape(r.answer);
            if (r.third) tsv_unescape(r.third);
            if (f->n == cap) { cap = cap ? 2 * cap : 64; f->rows = xrealloc(f->rows, (size_t)cap * sizeof(QARow)); }
            f->rows[f->n++] = r;
        }
        line = next;
    }
}

void qa_read(QAFile* f, const char* path) {
    size_t len;
    char* text = read_file(path, &len);
    qa_parse(f, path, text, len);
}

void qa_free(QAFile* f) {
    free(f->rows);
    free(f->text);
    memset(f, 0, sizeof(*f));
}
