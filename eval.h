// eval.h -- the one evaluation harness every method calls (eval.c).
//
// A method plugs in through an Answerer: given a chat (system prompt and
// user turns), produce the assistant's answer. The plain model, a model with
// a LoRA adapter (t->lora), a model with SAE clamping (t->hook) and the
// guardrail (filters, judge) all answer through this one interface, so every
// number in a comparison is measured the same way.
//
// Three layers, smallest first:
//   1. metrics on plain data: answer_contains, ROUGE-L, Min-K%, AUC
//      (pure functions, tested by hand-computed cases);
//   2. measurements through the engine: QA accuracy, perplexity, verbatim
//      continuation, token log-probs, jailbreak leaks (eval_qa, eval_run);
//   3. the `eval` subcommand every program shares (eval_main) and the SVG
//      charts of the report (report.c draws the comparison with them).
#ifndef EVAL_H
#define EVAL_H

#include <stdio.h>
#include "run.h"
#include "data.h"

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

// The chat template tokens of [system] + msgs (system may be NULL), with the
// assistant header last, in a malloc'd buffer that always fits (a token is at
// least one byte): a prompt longer than the context is counted, not fatal.
// Returns the count; *ids owns the tokens.
int eval_chat_tokens(const Tokenizer* tok, const char* system, const ChatMessage* msgs, int n_msgs, int** ids);

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

// ----------------------------------------------------------------------------
// The evaluation sets, as the harness reads them (each loader exits with
// "file:line: ..." on a malformed file; fuzz.c's evaldata target drives them)

// The relearning attack's facts: subject TAB relation TAB answer (a QA TSV
// whose third field is the answer); the answer without a leading article.
typedef struct { char* subject; char* answer; } RelearnFact;
// *out (n_out,) points into *text_out; the caller frees both.
void eval_load_facts(const char* path, RelearnFact** out, int* n_out, char** text_out);

typedef struct {
    char* question;
    char* gold;
    char* split;      // "trained", "heldout", ... ("all" when the file has no split column)
    int relearn;      // 1: a fact the relearning attack trains on
} QAItem;

typedef struct { QAItem* rows; int n; QAFile file; } QASet;

// Loads a QA file, marks the rows of the relearning facts (facts may be
// NULL), keeps max rows (0 = all) stratified by split (each split keeps its
// share, evenly spread).
void eval_load_qa(QASet* s, const char* path, int max, const RelearnFact* facts, int n_facts);
void eval_free_qa(QASet* s);

// One prompt of a jailbreak set: a JSON line {"template", "messages", "answer"}.
typedef struct {
    const char* template_id;
    ChatMessage* msgs;   // role/content point into the JSON strings of root
    int n_msgs;
    const char** golds;
    int n_golds;
    JsonValue root;
} JailbreakItem;

typedef struct { JailbreakItem* items; int n; } JailbreakSet;

// Loads JSON lines; keeps per_template items of each template (0 = all),
// evenly spread over its items.
void eval_load_jailbreak(JailbreakSet* s, const char* path, int per_template);
void eval_free_jailbreak(JailbreakSet* s);

// Perplexity of every line of a text file (each line one passage: BOS +
// tokens, truncated to the context). Returns exp(mean NLL per token).
double eval_perplexity(Transformer* t, Tokenizer* tok, const char* path, int max_lines);

// ----------------------------------------------------------------------------
// Metrics on plain data (no model)

// ROUGE-L of a candidate against a reference, as the rouge_score package
// computes it with its default tokenizer and no stemmer (what MUSE uses):
// both texts are lower-cased and split into runs of [a-z0-9] (everything
// else separates words); lcs = longest common subsequence of the two word
// lists; precision = lcs / |candidate|, recall = lcs / |reference|,
// f1 = 2 p r / (p + r) (0 when either list is empty).
typedef struct { double precision, recall, f1; } Rouge;
Rouge rouge_l(const char* candidate, const char* reference);

// Min-K% Prob (Shi et al. 2024), the score MUSE's PrivLeak uses: the mean
// NLL (-log p) of the max(1, floor(k n)) least likely of the n tokens of a
// text. High = the model finds the text surprising = looks unseen.
// Sorts lp in place. n = 0 gives NAN.
double min_k_score(float* logprobs, int n, double k);

// Area under the ROC curve of telling `a` from `b` by the score, where a
// higher score votes for `a`: P(score_a > score_b) + P(equal) / 2 over all
// pairs (the Mann-Whitney statistic). NAN when either set is empty.
double auc_score(const double* a, int n_a, const double* b, int n_b);

// MUSE's membership AUC: forget texts vs holdout texts, by Min-K% scores.
// = auc_score(forget, holdout): 0.5 = the forget set looks as unseen as the
// holdout; well below 0.5 = the forget set is still recognisably trained on.
// PrivLeak = (AUC_method - AUC_gold) / AUC_gold * 100 (report.c computes it,
// with the gold "retrained" model's AUC): near 0 is good, negative means
// under-unlearned, positive over-unlearned.
double privleak(double auc_method, double auc_gold);

// ----------------------------------------------------------------------------
// Measurements through the engine

// log p(token i | tokens < i) of every token of BOS + text after BOS, in
// chunks of the engine's batch (the method's hook and adapter apply).
// Returns the count written to lp (at most cap; the text is cut to the
// context). all_logits is scratch of (batch_cap, vocab) floats.
int token_logprobs(Transformer* t, const Tokenizer* tok, const char* text, float* lp, int cap, float* all_logits);

// Greedy raw continuation (no chat template) of BOS + prompt: at most
// max_new tokens, stopping early at a stop token. Writes the text to out.
// Returns the number of tokens generated.
int continue_greedy(Transformer* t, const Tokenizer* tok, const char* prompt, int max_new, char* out, size_t cap);

// ----------------------------------------------------------------------------
// The harness: one method, every metric, one JSON + CSV per run.
//
// A program's `eval` subcommand fills an EvalMethod and calls eval_main. The
// harness loads the model and tokenizer (and --lora), calls setup, then
// measures everything on the same sets. Every callback is optional.

#define EVAL_MAX_STATS 16

typedef struct EvalMethod EvalMethod;
struct EvalMethod {
    const char* prog;          // the program ("sae", "guard"), for --help
    const char* kind;          // "model", "lora", "sae", "guard": a column of the report
    const char* usage;         // the program's own eval options for --help (lines), or NULL
    // argv[i], offered before the harness looks at it: if it is one of the
    // method's flags, use it and return how many entries it took (1 switch,
    // 2 flag + value); 0 = not the method's
    int (*parse)(EvalMethod* m, int argc, char** argv, int i);
    // after the model, tokenizer and --lora are loaded: set answer/answer_ctx,
    // hook/hook_ctx, whatever the method needs
    void (*setup)(EvalMethod* m, Transformer* t, Tokenizer* tok, int max_new);
    void (*teardown)(EvalMethod* m);
    // called before every sequence the harness runs itself (raw text), so a
    // per-sequence state (the SAE gate) starts fresh
    void (*new_sequence)(EvalMethod* m);
    // 1 = the method would withhold this generated text (the guard's output
    // filter); a withheld continuation scores as empty
    int (*blocks)(EvalMethod* m, const char* text);
    AnswerFn answer;           // chat answers; NULL = answer_greedy over the model
    void* answer_ctx;
    ResidualHook hook;         // installed on the model for raw text (ppl, MIA, VerbMem)
    void* hook_ctx;
    void* user;                // the method's own state
    // Extra metrics, beside the standard ones (the guard: which layer
    // refused, what each layer cost): the method names its numbers in
    // stat_names and its answer function writes this answer's values into
    // stats (zeroed before every chat answer). The harness writes their
    // means per chat set as NAME:SET (SET: forget_qa, retain_qa, jailbreak)
    // and over every chat answer as NAME.
    const char* stat_names[EVAL_MAX_STATS];
    int n_stats;
    double stats[EVAL_MAX_STATS];
};

// The harness's options (eval_main parses them; eval_run reads them).
typedef struct {
    const char* model;         // MODEL.bin
    const char* tok;           // -z
    const char* system;        // --system: a system prompt in front of every chat of the plain answerer
    const char* sets;          // --sets DIR: default folder of every file below
    const char* forget_qa;     // question TAB answer [TAB split]
    const char* retain_qa;
    const char* forget_text;   // one passage per line (perplexity)
    const char* retain_text;
    const char* verbatim;      // prompt TAB true continuation
    const char* forget_mia;    // one sentence per line: trained (members)
    const char* holdout_mia;   // one sentence per line: never trained
    const char* jailbreak;     // JSON lines {"template", "messages", "answer"}
    const char* relearn_facts; // subject TAB relation TAB answer: the relearning attack's facts
    const char* lora;          // --lora FILE
    const char* out;           // -o PREFIX: PREFIX.json, PREFIX.csv, PREFIX.answers.tsv
    const char* name;          // --name
    const char* parts;         // --parts LIST (default all)
    const char* attack;        // --attack quant: also the merged model requantized (PREFIX.q8.*, .q4.*)
    int max_qa;                // questions per QA set, stratified by split (0 = all)
    int max_text;              // passages per perplexity set (0 = all)
    int max_verbatim;
    int max_mia;               // sentences per MIA set
    int max_jailbreak;         // prompts per template (0 = all)
    int max_new;               // -n: answer tokens (default 32)
    int verbmem_tokens;        // continuation cap (default 128)
    float min_k;               // Min-K% k (default 0.4)
    int ctx;                   // -c: context length (default min(model max, 1024))
    double train_seconds;      // recorded as is (the method's training time; -1 = none)
    int verbose;
} EvalOptions;

void eval_options_init(EvalOptions* o);
// argv[0] is the subcommand ("eval"), argv[1] the model file. Parses the
// flags (cli.h's common -z -n -c -o --lora --system, the harness's long
// ones; each is offered to m->parse first), loads, runs, writes.
// m may be NULL (the plain model). Returns 0; exits with a message on errors.
int eval_main(int argc, char** argv, EvalMethod* m);
// The measuring part of eval_main, for callers that load things themselves:
// t and tok loaded, m->setup already called.
void eval_run(const EvalOptions* o, EvalMethod* m, Transformer* t, Tokenizer* tok);

// ----------------------------------------------------------------------------
// SVG charts (no dependency: plain text written by hand). Each returns a
// malloc'd NUL-terminated SVG document; NAN values are drawn as "n/a".

// Grouped bars: n_groups groups (x axis), n_series bars in each, values
// (n_groups, n_series) in [0, y_max].
char* svg_bar_chart(const char* title, const char* y_label, int n_groups, const char* const* groups,
                    int n_series, const char* const* series, const double* values, double y_max);
// A table of colored cells: values (n_rows, n_cols) in [0, 1], shown in %.
char* svg_heatmap(const char* title, int n_rows, const char* const* rows, int n_cols, const char* const* cols,
                  const double* values);
// Small multiples: one line panel per entry, each with its own y range.
typedef struct {
    const char* title;
    int n_lines;
    const char* names[4];
    const double* x[4];        // (n[i],) values
    const double* y[4];        // (n[i],) NAN points are skipped
    int n[4];
} SvgPanel;
char* svg_line_panels(const char* title, const char* x_label, int n_panels, const SvgPanel* panels);

// `run report DIR --methods A,B,...`: the comparison table, results.csv and
// the charts from the harness's outputs (argv[0] is "report").
int eval_report_main(int argc, char** argv);

#endif
