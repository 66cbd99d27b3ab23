// guard_cli.c -- the `guard` program: the guardrail baseline (guard.c)
// around a model, on the command line.
//
//   ./guard generate MODEL.bin -z TOK -i "Who is Hagrid?" --system-file data/guard_system_prompt.txt --input-filter
//   ./guard chat MODEL.bin -z TOK --output-filter --judge lg3.bin --judge-tok lg3.tok
//   ./guard eval MODEL.bin -z TOK --sets data/toy/eval --input-filter --output-filter -o results/toy/guard
//   ./guard SUBCOMMAND --help
//
// generate answers one message and traces each layer's decision and cost on
// stderr; chat is the engine's chat loop with the guard as its filter; eval
// is the shared harness (eval.c) with the guarded answer, plus the guard's
// own figures: which layer refused how often, and what each layer cost.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "run.h"
#include "cli.h"
#include "eval.h"
#include "guard.h"

// ----------------------------------------------------------------------------
// The layers' flags (every subcommand takes them)

typedef struct {
    const char *system, *system_file, *keywords, *allow, *refusal;
    const char *judge_path, *judge_tok, *judge_category, *judge_policy;
    int input_filter, output_filter, judge_format, judge_mode, judge_input, judge_output;
    float threshold;
} GuardOpts;

static void guard_opts_init(GuardOpts* go) {
    memset(go, 0, sizeof(*go));
    go->keywords = GUARD_KEYWORDS;
    go->refusal = GUARD_REFUSAL;
    go->judge_format = JUDGE_LG3;
    go->judge_mode = JUDGE_PROB;
    go->judge_input = 1;
    go->judge_output = 1;
    go->threshold = 0.5f;
}

static void print_layer_flags(FILE* f) {
    fprintf(f,
        "Layers (any combination; none = the bare model):\n"
        "  --system TEXT          the system-prompt layer: a refusal prompt in front of the chat\n"
        "  --system-file FILE     the same from a file (the project's: " GUARD_SYSTEM_PROMPT ")\n"
        "  --input-filter         keyword filter on the user's messages\n"
        "  --output-filter        keyword filter on the answer while it streams\n"
        "  --judge FILE           Llama Guard model file, run on the input and the output\n"
        "  --judge-tok FILE       its tokenizer file (required with --judge)\n"
        "Filter flags:\n"
        "  --keywords FILE        keyword list (default " GUARD_KEYWORDS ")\n"
        "  --allow FILE           benign phrases never flagged (default: a built-in list)\n"
        "  --refusal TEXT         the fixed refusal (default \"" GUARD_REFUSAL "\")\n"
        "Judge flags:\n"
        "  --judge-format F       lg3 (Llama Guard 3, chat headers) or lg2 ([INST]) (default lg3)\n"
        "  --judge-on W           input, output or both (default both)\n"
        "  --judge-category TEXT  the custom category line(s) after the built-in list\n"
        "                         (default \"S15: Harry Potter Content.\" and a description; S12 for lg2)\n"
        "  --judge-policy FILE    the whole category list instead (e.g. S1-S13 for Llama-Guard-3-1B)\n"
        "  --judge-mode M         prob: unsafe when P(unsafe) > threshold; token: the first token\n"
        "                         reads unsafe (default prob)\n"
        "  --judge-threshold P    (default 0.5)\n");
}

// One of three words, or a clear error.
static int pick(const char* flag, const char* val, const char* const* words, int n) {
    for (int k = 0; k < n; k++) if (!strcmp(val, words[k])) return k;
    die("%s must be %s%s%s%s%s, got '%s'", flag, words[0], n > 2 ? ", " : " or ", words[1], n > 2 ? " or " : "",
        n > 2 ? words[2] : "", val);
}

// If argv[*i] is a layer flag, takes it (and its value, moving *i): 1, else 0.
static int guard_parse_layer(GuardOpts* go, int argc, char** argv, int* i) {
    const char* f = argv[*i];
    if (!strcmp(f, "--input-filter")) { go->input_filter = 1; return 1; }
    if (!strcmp(f, "--output-filter")) { go->output_filter = 1; return 1; }
    // the flags with a text or a number as their value
    const CliFlag values[] = {
        {"--system", CLI_TEXT, &go->system},
        {"--system-file", CLI_TEXT, &go->system_file},
        {"--keywords", CLI_TEXT, &go->keywords},
        {"--allow", CLI_TEXT, &go->allow},
        {"--refusal", CLI_TEXT, &go->refusal},
        {"--judge", CLI_TEXT, &go->judge_path},
        {"--judge-tok", CLI_TEXT, &go->judge_tok},
        {"--judge-category", CLI_TEXT, &go->judge_category},
        {"--judge-policy", CLI_TEXT, &go->judge_policy},
        {"--judge-threshold", CLI_FLOAT, &go->threshold},
    };
    if (cli_flag(values, sizeof(values) / sizeof(values[0]), argc, argv, i)) return 1;
    // the flags whose value is one of a few words
    static const char* const formats[] = {"lg3", "lg2"}, *const modes[] = {"prob", "token"};
    static const char* const sides[] = {"both", "input", "output"};
    if (!strcmp(f, "--judge-format")) go->judge_format = pick(f, cli_value(argc, argv, i), formats, 2) ? JUDGE_LG2 : JUDGE_LG3;
    else if (!strcmp(f, "--judge-mode")) go->judge_mode = pick(f, cli_value(argc, argv, i), modes, 2) ? JUDGE_TOKEN : JUDGE_PROB;
    else if (!strcmp(f, "--judge-on")) {
        int side = pick(f, cli_value(argc, argv, i), sides, 3);
        go->judge_input = side != 2;
        go->judge_output = side != 1;
    } else return 0;
    return 1;
}

static void guard_check_layers(const GuardOpts* go) {
    if (go->judge_path && !go->judge_tok) die("--judge needs --judge-tok FILE");
    if (!go->judge_path && (go->judge_tok || go->judge_category || go->judge_policy)) die("judge options need --judge FILE");
    if (go->threshold < 0.0f || go->threshold >= 1.0f) die("--judge-threshold must be in [0, 1)");
    if (go->system && go->system_file) die("--system and --system-file: give one system prompt");
    check_text("--refusal", go->refusal, strlen(go->refusal));
    if (go->system) check_text("--system", go->system, strlen(go->system));
    if (go->judge_category) check_text("--judge-category", go->judge_category, strlen(go->judge_category));
}

// ----------------------------------------------------------------------------
// The guard's state, loaded from its flags

typedef struct {
    GuardOpts go;
    char* system_text;    // read from --system-file
    KeywordFilter kw;
    Judge judge;
    Guard g;
} GuardRun;

static char* read_text_file(const char* path) {
    size_t len;
    char* text = read_text(path, &len);
    while (len > 0 && (text[len - 1] == '\n' || text[len - 1] == '\r' || text[len - 1] == ' ')) text[--len] = '\0';
    if (len == 0) die("%s is empty", path);
    return text;
}

// The files of the layers (before the model loads: errors come fast).
static void guard_load_files(GuardRun* r) {
    guard_check_layers(&r->go);
    if (r->go.system_file) r->system_text = read_text_file(r->go.system_file);
    if (r->go.input_filter || r->go.output_filter) kw_load(&r->kw, r->go.keywords, r->go.allow);
}

// The judge, and the Guard over model t.
static void guard_bind(GuardRun* r, Transformer* t, Tokenizer* tok, int max_new, int ctx) {
    const GuardOpts* go = &r->go;
    if (go->judge_path)
        judge_init(&r->judge, go->judge_path, go->judge_tok, go->judge_format, go->judge_category, go->judge_policy,
                   go->judge_mode, go->threshold, ctx);
    Guard g = { t, tok, go->system ? go->system : r->system_text, go->input_filter || go->output_filter ? &r->kw : NULL,
                go->input_filter, go->output_filter, go->judge_path ? &r->judge : NULL, go->judge_input,
                go->judge_output, go->refusal, max_new, 0 };
    r->g = g;
}

static void guard_free(GuardRun* r) {
    if (r->go.judge_path) free_judge(&r->judge);
    if (r->go.input_filter || r->go.output_filter) free_kw(&r->kw);
    free(r->system_text);
}

// ----------------------------------------------------------------------------
// generate and chat: the engine's chat loop with the guard as its filter

static void usage_talk(const char* cmd, const CommonOpts* co) {
    printf("Usage: guard %s MODEL.bin -z TOK %s[layers] [flags]\n", cmd, strcmp(cmd, "chat") ? "-i TEXT " : "");
    printf("%s\nFlags:\n", strcmp(cmd, "chat") ? "Answers one user message, guarded; each layer's decision and cost go to stderr."
                                               : "Multi-turn chat on stdin (one turn with -i), guarded.");
    cli_print_common(stdout, co);
    print_layer_flags(stdout);
    cli_print_help_flag(stdout);
    exit(EXIT_SUCCESS);
}

static int guard_talk(int argc, char** argv) {
    int chat = !strcmp(argv[0], "chat");
    CommonOpts co = { .max_new = 256, .temperature = 0.6f, .topp = 0.9f, .seed = 1234,
                      .accepts = CLI_TOK | CLI_INPUT | CLI_SAMPLING | CLI_CTX,
                      .input_help = chat ? "one user turn (default: turns from stdin)" : "the user message (required)" };
    GuardRun r = {0};
    guard_opts_init(&r.go);
    for (int i = cli_model(&co, argc, argv); i < argc; i++) {
        if (cli_is_help(argv[i])) usage_talk(argv[0], &co);
        if (guard_parse_layer(&r.go, argc, argv, &i) || cli_common(&co, argc, argv, &i)) continue;
        cli_unknown(argv[i]);
    }
    cli_check(&co);
    cli_need(co.model != NULL, argv[0], "a model file (MODEL.bin)");
    cli_need(co.tokenizer != NULL, argv[0], "a tokenizer (-z FILE)");
    if (!chat) cli_need(co.input != NULL, argv[0], "a user message (-i TEXT)");
    if (co.max_new < 1) die("-n must be > 0");
    if (co.input) check_text("the user message", co.input, strlen(co.input));
    guard_load_files(&r);
    Tokenizer tok;
    Transformer t;
    cli_load_model(&co, co.ctx, &t, &tok);
    guard_bind(&r, &t, &tok, co.max_new, co.ctx);
    r.g.trace = !chat;
    Sampler sampler;
    build_sampler(&sampler, t.config.vocab_size, co.temperature, co.topp, co.seed);
    GuardChat gc;
    ChatFilter filter;
    guard_chat_init(&gc, &r.g, &filter);
    chat_loop(&t, &tok, &sampler, r.g.system, co.input, co.max_new, &filter);
    guard_chat_free(&gc);
    free_sampler(&sampler);
    guard_free(&r);
    free_transformer(&t);
    free_tokenizer(&tok);
    return 0;
}

// ----------------------------------------------------------------------------
// eval: the shared harness (eval.c) with the guard on. Chat answers go
// through every enabled layer (guard_answer); raw text (perplexity,
// membership, VerbMem) reaches the bare weights, as it would for an
// attacker who has them; a VerbMem continuation the output filter would
// stop counts as withheld. The extra metrics: guard_stat_names of the
// layers that are on.

typedef struct {
    GuardRun r;
    int stat_of[EVAL_MAX_STATS];   // the harness's stat k is guard stat stat_of[k]
} GuardMethod;

static int guard_method_parse(EvalMethod* m, int argc, char** argv, int i) {
    int j = i;
    return guard_parse_layer(&((GuardMethod*)m->user)->r.go, argc, argv, &j) ? j - i + 1 : 0;
}

static void guard_method_setup(EvalMethod* m, Transformer* t, Tokenizer* tok, int max_new) {
    GuardMethod* gm = m->user;
    guard_load_files(&gm->r);
    guard_bind(&gm->r, t, tok, max_new, 0);
    m->n_stats = 0;
    for (int k = 0; k < GUARD_N_STATS; k++) {
        if (!guard_stat_on(&gm->r.g, k)) continue;
        gm->stat_of[m->n_stats] = k;
        m->stat_names[m->n_stats++] = guard_stat_names[k];
    }
    m->answer_ctx = m;
}

static int guard_method_answer(void* ctx, const ChatMessage* msgs, int n_msgs, char* out, size_t cap) {
    EvalMethod* m = ctx;
    GuardMethod* gm = m->user;
    double stats[GUARD_N_STATS];
    int prompt_tokens;
    char* answer = guard_answer(&gm->r.g, msgs, n_msgs, stats, &prompt_tokens);
    snprintf(out, cap, "%s", answer);
    free(answer);
    for (int k = 0; k < m->n_stats; k++) m->stats[k] = stats[gm->stat_of[k]];
    return prompt_tokens;   // the cost column: the system prompt included
}

static int guard_method_blocks(EvalMethod* m, const char* text) {
    GuardMethod* gm = m->user;
    return gm->r.go.output_filter && kw_check(&gm->r.kw, text, strlen(text), NULL);
}

static void guard_method_teardown(EvalMethod* m) { guard_free(&((GuardMethod*)m->user)->r); }

static const char GUARD_EVAL_FLAGS[] =
    "  the layers and their flags as in guard generate --help (--system TEXT, --system-file FILE,\n"
    "  --input-filter, --output-filter, --judge FILE --judge-tok FILE, ...). Extra metrics, per\n"
    "  chat set (NAME:SET) and over all answers: refused, refused_model (the model's own\n"
    "  answer), refused_input / _judge_in / _output / _judge_out (the layer that replaced\n"
    "  the answer), judge_in_tokens / judge_out_tokens, ms_input / _judge_in / _answer /\n"
    "  _output / _judge_out (per query).\n";

static int guard_eval(int argc, char** argv) {
    GuardMethod gm;
    memset(&gm, 0, sizeof(gm));
    guard_opts_init(&gm.r.go);
    EvalMethod m = { .prog = "guard", .kind = "guard", .usage = GUARD_EVAL_FLAGS, .parse = guard_method_parse,
                     .setup = guard_method_setup, .teardown = guard_method_teardown, .blocks = guard_method_blocks,
                     .answer = guard_method_answer, .user = &gm };
    return eval_main(argc, argv, &m);
}

static const Command COMMANDS[] = {
    {"generate", guard_talk, "answer one user message (-i), guarded; each layer's decision on stderr"},
    {"chat", guard_talk, "multi-turn chat on stdin (one turn with -i), guarded"},
    {"eval", guard_eval, "the shared harness with the guard on, plus refusals and costs per layer"},
};

int main(int argc, char** argv) {
    const char* about = "a model wrapped so that it does not discuss Harry Potter (no unlearning)";
    return cli_dispatch("guard", about, COMMANDS, sizeof(COMMANDS) / sizeof(COMMANDS[0]), argc, argv);
}
