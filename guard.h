// guard.h -- the guardrail baseline (guard.c): text normalisation, the
// keyword filter, the streaming output filter, the Llama Guard judge and
// the guarded model built from them (its answer for eval, its chat filter).
// The `guard` program is guard_cli.c; test_all links guard.o.
#ifndef GUARD_H
#define GUARD_H

#include <stddef.h>
#include "run.h"
#include "data.h"   // the jailbreak set is JSON lines

#define GUARD_KEYWORDS "data/harry_potter_keywords.txt"
#define GUARD_SYSTEM_PROMPT "data/guard_system_prompt.txt"
#define GUARD_REFUSAL "I'm sorry, but I can't help with that."

// ----------------------------------------------------------------------------
// Normalisation. Text becomes a list of words of canonical letters: case
// folded, accents stripped, leetspeak decoded (4 a, 0 o, 3 e, 5 s, 7 t, @ a,
// $ s; 1 stays '1', a letter that matches i or l), a few Cyrillic/Greek
// look-alikes and full-width forms mapped to ASCII, zero-width characters
// dropped. Everything else that is not a letter or digit separates words.
// Separators inside words are handled by the matcher, which compares
// keywords with runs of consecutive words ("H.a.r.r.y", "Vol de mort").

#define GUARD_WILD '1'  // the canonical letter of the digit 1: i or l

typedef struct {
    char* letters;    // every word's canonical letters, concatenated, NUL-terminated
    int* word_off;    // (n_words + 1,) word w is letters[word_off[w] .. word_off[w+1])
    int* src_begin;   // (n_words,) byte offset in the text of the word's first character
    int* src_end;     // (n_words,) byte offset just past its last character
    int n_words;
    int tail_open;    // 1 when the text ends inside a word (more letters may follow)
    int parsed_len;   // bytes read: a character cut off at the end is not
} NormText;

void norm_text(NormText* nt, const char* text, size_t len);
void free_norm_text(NormText* nt);
// The compact form of a phrase: its words' letters joined ("H.a.r.r.y P0tter"
// -> "harrypotter"). Writes at most cap-1 letters and a NUL; returns the full length.
int norm_compact(const char* text, size_t len, char* out, int cap);
// a == b letter by letter ('1' matches i, l and 1)
int letters_equal(const char* a, const char* b, int n);
// Optimal string alignment distance <= 1: equal, or one substitution,
// insertion, deletion or swap of two neighbours.
int within_one_edit(const char* a, int na, const char* b, int nb);

// ----------------------------------------------------------------------------
// Keyword filter

typedef struct {
    int n_terms;
    char** terms;       // (n_terms,) compact normalised keywords
    char** shown;       // (n_terms,) the keyword as written in the file
    int* term_len;      // (n_terms,)
    int max_len;
    int* by_len;        // (n_terms,) term ids sorted by length
    int* len_start;     // (max_len + 2,) by_len[len_start[L] .. len_start[L+1]) have length L
    int n_allow;
    char** allow;       // (n_allow,) compact benign phrases: a hit inside one is not a hit
    int* allow_len;
    int max_allow;
    int fuzzy_min;      // terms of at least this many letters also match within one edit
} KeywordFilter;

typedef struct {
    int term;           // index into terms, -1 for no hit
    int word_begin;     // the hit is words [word_begin, word_end] of the text
    int word_end;
    int src_begin;      // and bytes [src_begin, src_end) of it
    int src_end;
    int fuzzy;          // 1: within one edit, not exact
} KeywordHit;

// From text: one keyword per line; blank lines and lines starting with '#'
// are skipped. allow: the same for benign phrases (NULL: the built-in list).
void kw_build(KeywordFilter* f, const char* keywords, size_t len, const char* allow, size_t allow_len);
void kw_load(KeywordFilter* f, const char* keywords_path, const char* allow_path); // exits on error
void free_kw(KeywordFilter* f);
// 1 when the text holds a keyword (outside every allowed phrase); hit may be NULL.
int kw_check(const KeywordFilter* f, const char* text, size_t len, KeywordHit* hit);
extern const char* const guard_default_allow[];

// ----------------------------------------------------------------------------
// Streaming output filter: the answer is checked while it is generated and
// only text that no later token can turn into a hit is released. The last
// `holdback` letters (longest keyword + 1, longest allowed phrase) wait.

typedef struct {
    const KeywordFilter* f;
    char* text;         // the answer so far
    size_t len, cap;
    size_t released;    // bytes of text already handed out
    int flagged;
    KeywordHit hit;
    int holdback;
} StreamFilter;

void stream_init(StreamFilter* s, const KeywordFilter* f);
void free_stream(StreamFilter* s);
// Appends a piece of the answer; returns 1 once the answer is flagged. *out,
// *out_len: the newly released bytes (nothing once flagged).
int stream_push(StreamFilter* s, const char* piece, size_t n, const char** out, size_t* out_len);
// The answer is complete: checks the tail and releases the rest unless flagged.
int stream_finish(StreamFilter* s, const char** out, size_t* out_len);

// ----------------------------------------------------------------------------
// Judge: a Llama Guard model run by the same engine.

enum { JUDGE_LG3 = 0, JUDGE_LG2 = 1 };
enum { JUDGE_PROB = 0, JUDGE_TOKEN = 1 };

// The built-in category list of a format with the custom category appended
// (custom NULL: the default "S15: Harry Potter Content." for lg3, S12 for lg2).
// Returns a malloc'd string.
char* judge_categories(int format, const char* custom);
// The judge prompt for conv (the last message is the one assessed: role
// "user" -> User, "assistant" -> Agent). Message text is plain text: special
// token strings typed by a user never become special ids. Returns the count.
int judge_encode(const Tokenizer* tok, int format, const char* categories, const ChatMessage* conv, int n_conv,
                 int* ids, int max_ids);

typedef struct {
    Transformer t;
    Tokenizer tok;
    int format;
    char* categories;
    int mode;             // JUDGE_PROB: P(unsafe) > threshold; JUDGE_TOKEN: the first token
    float threshold;
    int safe_ids[4], n_safe;     // "safe", " safe", "Safe", " Safe" where single tokens
    int unsafe_ids[4], n_unsafe;
    int* ids;
    int cap;
} Judge;

typedef struct {
    int unsafe;           // the verdict
    int parsed;           // the first non-blank token was safe/unsafe
    float p_unsafe;       // P(unsafe) / (P(safe) + P(unsafe)) at the verdict position
    int prompt_tokens;
    int gen_tokens;
    double ms;
    char categories[64];  // the second line ("S15"), when asked for
} Verdict;

void judge_init(Judge* j, const char* model_path, const char* tok_path, int format, const char* custom,
                const char* policy_path, int mode, float threshold, int ctx);
void free_judge(Judge* j);
void judge_run(Judge* j, const ChatMessage* conv, int n_conv, int want_categories, Verdict* v);

// ----------------------------------------------------------------------------
// The guarded model: the layers around the engine, in order. The first one
// that objects replaces the answer with the refusal (later ones do not run:
// a query the input filter refuses costs no model call).

int is_refusal(const char* answer, const char* refusal);   // the refusal or a known refusal phrase

typedef struct {
    Transformer* t;
    Tokenizer* tok;
    const char* system;   // the system-prompt layer's text; NULL: off
    KeywordFilter* kw;    // loaded when a filter is on
    int input_filter;
    int output_filter;
    Judge* judge;         // NULL: no judge
    int judge_input;
    int judge_output;
    const char* refusal;
    int max_new;          // answer tokens at most
    int trace;            // each layer's decision and cost on stderr
} Guard;

// What each layer did for one answer: the extra metrics of `guard eval`.
enum {
    GUARD_REFUSED,            // the final answer is a refusal (a layer's or the model's own)
    GUARD_REFUSED_MODEL,      // the model's own answer is a refusal (the system prompt at work)
    GUARD_REFUSED_INPUT,      // the layer that replaced the answer: the input filter ...
    GUARD_REFUSED_JUDGE_IN,
    GUARD_REFUSED_OUTPUT,
    GUARD_REFUSED_JUDGE_OUT,
    GUARD_JUDGE_IN_TOKENS,    // tokens the judge read and wrote, on the input ...
    GUARD_JUDGE_OUT_TOKENS,   // ... and on the answer
    GUARD_MS_INPUT,           // milliseconds in each layer, and in the model's answer
    GUARD_MS_JUDGE_IN,
    GUARD_MS_ANSWER,
    GUARD_MS_OUTPUT,
    GUARD_MS_JUDGE_OUT,
    GUARD_N_STATS
};
extern const char* const guard_stat_names[GUARD_N_STATS];
int guard_stat_on(const Guard* g, int stat);   // 1: the stat's layer is on

// The guarded answer to conv (greedy, the system prompt first when that
// layer is on; conv's messages are all the user's text, few-shot answers
// included). Returns it malloc'd; stats (GUARD_N_STATS, or NULL) gets what
// each layer did. *prompt_tokens: the model's prompt, system prompt included.
char* guard_answer(Guard* g, const ChatMessage* conv, int n_conv, double* stats, int* prompt_tokens);

// The guard in the engine's chat loop: the input layers before the model
// answers, the streaming output filter on every token (what it releases is
// shown at once; with an output judge nothing shows until it has judged),
// the refusal in place of a flagged answer.
typedef struct {
    Guard* g;
    StreamFilter sf;
    size_t shown;         // bytes of this answer shown so far
    int flagged;          // the output filter stopped this answer
} GuardChat;

void guard_chat_init(GuardChat* c, Guard* g, ChatFilter* f);
void guard_chat_free(GuardChat* c);

#endif
