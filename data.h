// data.h -- the readers of the data files every program shares (data.c):
// one JSON value parser with a JSON-lines iterator, and one reader of QA
// TSV files. Every reader refuses what a text file should not hold (a NUL
// byte, invalid UTF-8) and names the file and line of a bad row.
#ifndef DATA_H
#define DATA_H

#include <stddef.h>

// Text files: dies when text (named name in the message) holds a NUL byte
// or is not valid UTF-8, what a reader of rows as C strings checks first.
void check_text(const char* name, const char* text, size_t len);
// read_file, then check_text; len may be NULL.
char* read_text(const char* path, size_t* len);

// ----------------------------------------------------------------------------
// JSON: objects, arrays, strings (every escape, \u with surrogate pairs),
// numbers, true/false/null. Strict: strings must be valid UTF-8 and hold no
// NUL (\u0000), nesting is capped at 64 so hostile input cannot exhaust the
// stack, nothing may follow the value but whitespace.

enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT };

typedef struct JsonValue {
    int type;
    double number;            // JSON_NUMBER, JSON_BOOL (0/1)
    char* string;             // JSON_STRING (UTF-8, NUL-terminated)
    int n;                    // JSON_ARRAY, JSON_OBJECT: item count
    struct JsonValue* items;  // (n,)
    char** keys;              // JSON_OBJECT: (n,)
} JsonValue;

// Parses one JSON value from text (surrounding whitespace allowed). Returns
// 0 on success, else -1 with a one-line reason in err (v is then empty).
int json_parse(const char* text, size_t len, JsonValue* v, char* err, size_t errlen);
void json_free(JsonValue* v);
const JsonValue* json_get(const JsonValue* obj, const char* key); // NULL when absent or obj is no object
// The string value of key, or NULL when absent or not a string.
const char* json_get_string(const JsonValue* obj, const char* key);

// JSON lines: one value per line, blank lines skipped.
//
//     JsonLines jl;
//     JsonValue v;
//     jsonl_open(&jl, path);
//     while (jsonl_next(&jl, &v)) { ... jl.line_no ...; json_free(&v); }
//     jsonl_close(&jl);
typedef struct {
    const char* name;   // the file, for messages
    char* owned;        // the text when jsonl_open read it (freed by jsonl_close)
    const char* text;
    size_t len, at;
    int line_no;        // the line of the value jsonl_next returned last
} JsonLines;

// Reads path; dies when it cannot be read or holds a NUL byte.
void jsonl_open(JsonLines* jl, const char* path);
// The same over text in memory (not copied; must outlive jl); name is for messages.
void jsonl_init(JsonLines* jl, const char* name, const char* text, size_t len);
// The next non-blank line's value into v (the caller frees it): 1, or 0 at
// the end. Dies "NAME:LINE: bad JSON: reason" on a malformed line.
int jsonl_next(JsonLines* jl, JsonValue* v);
void jsonl_close(JsonLines* jl);

// ----------------------------------------------------------------------------
// QA TSV: one row per line, question<TAB>answer[<TAB>third[<TAB>more...]].
// Blank lines, lines starting with '#' and a first line that is a header
// ("question<TAB>...") are skipped; a final \r is cut (CRLF files). A field
// may spell a newline, tab or backslash as \n, \t, \\ . The answer must
// not be empty (a question may be). The third field is whatever the file
// puts there (a split: "trained", "heldout", "forget"...); later fields are
// ignored.

typedef struct {
    char* question;
    char* answer;
    char* third;      // the third field, NULL when the row has two
    int line;         // its line in the file (1-based), for messages
} QARow;

typedef struct {
    QARow* rows;      // (n,) fields point into text
    int n;
    char* text;
} QAFile;

// Reads path; dies naming the file (and line) when it cannot be read, holds
// a NUL byte, is not valid UTF-8 or has a row without question and answer.
// A file with no rows is not an error (n = 0).
void qa_read(QAFile* f, const char* path);
// The same over a malloc'd NUL-terminated text that f takes over (cut in place).
void qa_parse(QAFile* f, const char* name, char* text, size_t len);
void qa_free(QAFile* f);

#endif
