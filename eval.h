// eval.h -- the one evaluation harness every method calls (eval.c).
//
// A method plugs in through an Answerer: given a chat (system prompt and
// user turns), produce the assistant's answer. The plain model, a model with
// a LoRA adapter (t->lora), a model with SAE clamping (t->hook) and the
// guardrail (filters, judge) all answer through this one interface, so every
// number in a comparison is measured the same way.
#ifndef EVAL_H
#define EVAL_H

#include "run.h"

// Writes the answer to msgs (NUL-terminated, at most cap-1 bytes) into out.
// Returns the number of prompt tokens the method used (for the cost column).
typedef int (*AnswerFn)(void* ctx, const ChatMessage* msgs, int n_msgs, char* out, size_t cap);

typedef struct {
    Transformer* t;
    Tokenizer* tok;
    int max_new;        // answer length cap in tokens (default 48)
    const char* system; // system prompt added in front of every chat, or NULL
} GreedyAnswerer;

// The plain method: the Llama-3 chat template, greedy decoding until an
// end-of-turn id or max_new tokens. ctx is a GreedyAnswerer.
int answer_greedy(void* ctx, const ChatMessage* msgs, int n_msgs, char* out, size_t cap);

// 1 if gold occurs in answer, case-insensitive, as whole words (so the gold
// "doe" is not found in "does", nor "Rome" in "Romeo").
int answer_contains(const char* answer, const char* gold);

// QA accuracy on a TSV file of question TAB answer [TAB split] rows. Rows
// are counted per split ("trained", "heldout"; anything else "all").
#define EVAL_MAX_SPLITS 4
typedef struct {
    char name[16];
    int total;
    int correct;
} SplitScore;

typedef struct {
    SplitScore splits[EVAL_MAX_SPLITS];
    int n_splits;
    int total, correct;
    long prompt_tokens;   // summed over questions
    double seconds;
} QAResult;

// Runs every question of path through fn. If log is not NULL, each row is
// written to it as question TAB gold TAB answer TAB correct. max_rows <= 0
// means all rows. Exits with a message if the file cannot be parsed.
void eval_qa(const char* path, AnswerFn fn, void* ctx, int max_rows, FILE* log, QAResult* res);
double qa_accuracy(const QAResult* r, const char* split); // split NULL = all rows

// Perplexity of every line of a text file (each line one passage: BOS +
// tokens, truncated to the context). Returns exp(mean NLL per token).
double eval_perplexity(Transformer* t, Tokenizer* tok, const char* path, int max_lines);

#endif
