// run.c -- the `run` program: the engine from the command line.
//
//   run generate MODEL.bin -z TOK -i "Once upon a time"        continue a prompt
//   run MODEL.bin -z TOK -i "Once upon a time"                 the same (shorthand)
//   run chat MODEL.bin -z TOK --system "Be brief." -i Hi       the Llama-3 chat
//   run tokenize -z TOK -i TEXT                                token ids, no model
//   run --help, run SUBCOMMAND --help                          everything else
//
// Every subcommand is a few lines over the engine (run.h); eval and report
// are the evaluation harness (eval.c), bench the speed suite (bench.c).
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <errno.h>
#include <unistd.h>
#include "run.h"
#include "cli.h"
#include "eval.h"
#include "bench.h"

// ----------------------------------------------------------------------------
// The modes: each runs one subcommand on a loaded model and tokenizer

// Encodes BOS + text (special strings parsed); dies when the text, named
// what, is not UTF-8 or does not fit t's context. Returns the count; *out owns it.
static int encode_prompt(const Transformer* t, const Tokenizer* tok, const char* what, const char* text, int** out) {
    size_t len = strlen(text);
    check_text(what, text, len);
    int cap = (int)(len + 2);
    int* ids = xmalloc((size_t)cap * sizeof(int));
    int n = 0;
    if (t->config.bos_id >= 0) ids[n++] = t->config.bos_id;
    n += encode(tok, text, len, 1, ids + n, cap - n);
    if (n > t->state.seq_len)
        die("prompt of %d tokens does not fit the context of %d (raise -c)", n, t->state.seq_len);
    *out = ids;
    return n;
}

static void generate_mode(Transformer* t, const Tokenizer* tok, const CommonOpts* co) {
    int* ids;
    int n = encode_prompt(t, tok, "prompt", co->input, &ids);
    for (int i = 0; i < n; i++) print_token(tok, ids[i]);
    long t0 = time_in_ms();
    float* logits = forward_batch(t, ids, n, 0, NULL);
    long t1 = time_in_ms();
    Sampler sampler;
    build_sampler(&sampler, t->config.vocab_size, co->temperature, co->topp, co->seed);
    GenConfig g = { co->max_new, &sampler, gen_print, NULL };
    GenResult r = generate(t, tok, logits, n, &g);
    long t2 = time_in_ms();
    free_sampler(&sampler);
    if (r.stop == GEN_CONTEXT_FULL) fprintf(stderr, "\n[context of %d positions full]\n", t->state.seq_len);
    printf("\n");
    report_speed(n, t1 - t0, r.n_sampled, t2 - t1);
    free(ids);
}

static void chat_mode(Transformer* t, const Tokenizer* tok, const CommonOpts* co) {
    Sampler sampler;
    build_sampler(&sampler, t->config.vocab_size, co->temperature, co->topp, co->seed);
    chat_loop(t, tok, &sampler, co->system, co->input, co->max_new, NULL);
    free_sampler(&sampler);
}

static void tokenize_mode(const Tokenizer* tok, const char* text) {
    size_t len = strlen(text);
    check_text("text", text, len);
    int* ids = xmalloc((len + 1) * sizeof(int));
    int n = encode(tok, text, len, 1, ids, (int)len + 1);
    for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
    printf("\n");
    free(ids);
}

static void logits_mode(Transformer* t, const Tokenizer* tok, const CommonOpts* co) {
    const char* out_path = co->out;
    int* ids;
    int n = encode_prompt(t, tok, "text", co->input, &ids);
    size_t V = t->config.vocab_size;
    float* all = xmalloc((size_t)n * V * sizeof(float));
    long t0 = time_in_ms();
    forward_batch(t, ids, n, 0, all);
    long t1 = time_in_ms();
    if (write_file_atomic(out_path, all, (size_t)n * V * sizeof(float)) != 0)
        die("cannot write %s: %s", out_path, strerror(errno));
    fprintf(stderr, "wrote logits [%d x %zu] to %s (%.1f tok/s)\n", n, V, out_path, t1 > t0 ? n * 1000.0 / (t1 - t0) : 0.0);
    free(all);
    free(ids);
}

// Perplexity: the text is cut into windows of the context length, each
// starting with BOS; every token after BOS is predicted from its prefix.
static void ppl_mode(Transformer* t, const Tokenizer* tok, const CommonOpts* co) {
    const char* path = co->input;
    size_t len;
    char* text = read_file(path, &len);
    if (!utf8_valid(text, len)) die("%s is not valid UTF-8", path);
    int* ids = xmalloc((len + 1) * sizeof(int));
    int n = encode(tok, text, len, 0, ids, (int)len + 1);
    if (n == 0) die("%s has no text", path);
    int ctx = t->state.seq_len, V = t->config.vocab_size;
    int win = ctx - 1; // tokens per window besides BOS
    int* window = xmalloc((size_t)ctx * sizeof(int));
    float* all = xmalloc((size_t)t->state.batch_cap * V * sizeof(float));
    double nll = 0.0;
    long count = 0, t0 = time_in_ms();
    for (int start = 0; start < n; start += win) {
        int m = n - start < win ? n - start : win;
        window[0] = t->config.bos_id >= 0 ? t->config.bos_id : ids[0];
        memcpy(window + 1, ids + start, m * sizeof(int));
        // chunk by batch_cap so the logits buffer stays small
        for (int p = 0; p < m; p += t->state.batch_cap) {
            int k = m - p < t->state.batch_cap ? m - p : t->state.batch_cap;
            forward_batch(t, window + p, k, p, all);
            for (int i = 0; i < k; i++) {
                nll += cross_entropy(all + (size_t)i * V, V, window[p + i + 1]);
                count++;
            }
        }
        fprintf(stderr, "\rppl: %ld/%d tokens", count, n);
    }
    long t1 = time_in_ms();
    fprintf(stderr, "\n");
    printf("perplexity %.4f over %ld tokens\n", exp(nll / count), count);
    fprintf(stderr, "%.1f tok/s\n", t1 > t0 ? count * 1000.0 / (t1 - t0) : 0.0);
    free(all); free(window); free(ids); free(text);
}

// GreedyAnswerer holds a non-const tokenizer
static void qa_mode(Transformer* t, const Tokenizer* tok, const CommonOpts* co) {
    const char* path = co->input;
    const char* log_path = co->out;
    GreedyAnswerer g = {t, (Tokenizer*)tok, co->max_new, co->system};
    FILE* log = NULL;
    if (log_path && !(log = fopen(log_path, "w")))
        die("cannot write %s: %s", log_path, strerror(errno));
    QAResult r;
    eval_qa(path, answer_greedy, &g, 0, log, &r);
    if (log) fclose(log);
    for (int i = 0; i < r.n_splits; i++)
        printf("%-8s %5.1f%% (%d/%d)\n", r.splits[i].name, 100.0 * r.splits[i].correct / r.splits[i].total,
               r.splits[i].correct, r.splits[i].total);
    printf("%-8s %5.1f%% (%d/%d)\n", "total", 100.0 * qa_accuracy(&r, NULL), r.correct, r.total);
    fprintf(stderr, "%.1f s, %.1f prompt tokens per question\n", r.seconds, r.total ? (double)r.prompt_tokens / r.total : 0.0);
}

// ----------------------------------------------------------------------------
// Subcommands: flags (cli.h), then the model, then one of the modes above

// Parses a subcommand's flags (run's subcommands have only common ones);
// --help prints "run USAGE", the lines of about, and the flags with defaults.
static void parse_flags(CommonOpts* co, int argc, char** argv, const char* usage, const char* about) {
    for (int i = cli_model(co, argc, argv); i < argc; i++) {
        if (cli_is_help(argv[i])) {
            printf("Usage: run %s\n%s\nFlags:\n", usage, about);
            cli_print_common(stdout, co);
            cli_print_help_flag(stdout);
            exit(EXIT_SUCCESS);
        }
        if (!cli_common(co, argc, argv, &i)) cli_unknown(argv[i]);
    }
    cli_check(co);
}

// run's defaults of the common flags; accepts: the CLI_* flags a subcommand takes
static CommonOpts run_opts(unsigned accepts) {
    return (CommonOpts){ .max_new = 256, .temperature = 0.6f, .topp = 0.9f, .seed = 1234, .accepts = accepts };
}

// A subcommand that runs one mode on a model: its flags, its --help, what it requires.
typedef struct {
    const char* name;
    unsigned accepts;          // the common flags it takes (CLI_*)
    const char* usage;         // --help: "run " usage, then about
    const char* about;
    const char* input_help;    // what -i means here
    const char* out_help;      // what -o means here, or NULL
    const char* required;      // "a prompt (-i TEXT)" when -i is required, else NULL
    int needs_out;             // -o is required too
    void (*mode)(Transformer* t, const Tokenizer* tok, const CommonOpts* co);
} ModelCommand;

static const ModelCommand model_commands[] = {
    {.name = "generate", .mode = generate_mode,
     .accepts = CLI_TOK | CLI_INPUT | CLI_SAMPLING | CLI_CTX | CLI_LORA,
     .usage = "generate MODEL.bin -z TOK -i TEXT [flags]   (or: run MODEL.bin -z TOK -i TEXT ...)",
     .about = "Continues the prompt (BOS + TEXT). Speed (tokens/s) is printed on stderr.",
     .input_help = "the prompt, required; special strings such as <|eot_id|> become special tokens",
     .required = "a prompt (-i TEXT)"},
    {.name = "chat", .mode = chat_mode,
     .accepts = CLI_TOK | CLI_INPUT | CLI_SAMPLING | CLI_CTX | CLI_LORA | CLI_SYSTEM,
     .usage = "chat MODEL.bin -z TOK [-i TEXT] [flags]",
     .about = "The Llama-3 chat template; the dialogue stays in the KV cache across turns.\n"
              "Speed (tokens/s) per turn is printed on stderr.",
     .input_help = "one user message: print only its answer (default: read user turns from stdin)"},
    {.name = "logits", .mode = logits_mode,
     .accepts = CLI_TOK | CLI_INPUT | CLI_CTX | CLI_LORA | CLI_OUT,
     .usage = "logits MODEL.bin -z TOK -i TEXT -o FILE [flags]",
     .about = "Writes the logits of every position of BOS + tokens(TEXT) (what the reference tests compare).",
     .input_help = "the text, required (BOS is prepended; special strings become special tokens)",
     .out_help = "the float32 logits [n x vocab], required",
     .required = "-i TEXT and -o FILE", .needs_out = 1},
    {.name = "ppl", .mode = ppl_mode,
     .accepts = CLI_TOK | CLI_INPUT | CLI_CTX | CLI_LORA,
     .usage = "ppl MODEL.bin -z TOK -i FILE [flags]",
     .about = "Perplexity of a text file, in windows of the context length, each starting with BOS.",
     .input_help = "path of the text file to score, required",
     .required = "a text file (-i FILE)"},
    {.name = "qa", .mode = qa_mode,
     .accepts = CLI_TOK | CLI_INPUT | CLI_MAX_NEW | CLI_CTX | CLI_LORA | CLI_SYSTEM | CLI_OUT,
     .usage = "qa MODEL.bin -z TOK -i FILE [flags]",
     .about = "QA accuracy: greedy chat answers, correct when the answer contains the gold one as whole words.\n"
              "Prints the percent correct of every split and the total.",
     .input_help = "path of the QA set (question TAB answer [TAB split] rows), required",
     .out_help = "a per-row log (default none)",
     .required = "a QA set (-i FILE)"},
};
#define N_MODEL_COMMANDS (int)(sizeof(model_commands) / sizeof(model_commands[0]))

static int run_model_command(const ModelCommand* mc, int argc, char** argv) {
    CommonOpts co = run_opts(mc->accepts);
    co.input_help = mc->input_help;
    co.out_help = mc->out_help;
    parse_flags(&co, argc, argv, mc->usage, mc->about);
    cli_need(co.model != NULL, mc->name, "a model file as its first argument");
    cli_need(co.tokenizer != NULL, mc->name, "a tokenizer (-z FILE)");
    if (mc->required) cli_need(co.input != NULL && (!mc->needs_out || co.out != NULL), mc->name, mc->required);
    Tokenizer tok;
    Transformer t;
    cli_load_model(&co, co.ctx, &t, &tok);
    mc->mode(&t, &tok, &co);
    free_transformer(&t);
    free_tokenizer(&tok);
    return 0;
}

// generate, chat, logits, ppl, qa: argv[0] names the subcommand
static int model_main(int argc, char** argv) {
    for (int c = 0; c < N_MODEL_COMMANDS; c++)
        if (!strcmp(argv[0], model_commands[c].name)) return run_model_command(&model_commands[c], argc, argv);
    die("no subcommand %s", argv[0]);
}

static int tokenize_main(int argc, char** argv) {
    CommonOpts co = run_opts(CLI_TOK | CLI_INPUT);
    co.input_help = "the text, required; special strings such as <|eot_id|> become special tokens";
    parse_flags(&co, argc, argv, "tokenize -z TOK -i TEXT", "Prints the ids of TEXT (no BOS; no model needed).");
    if (co.model) die("tokenize takes no model file (run tokenize -z TOK -i TEXT)");
    cli_need(co.tokenizer != NULL, "tokenize", "a tokenizer (-z FILE)");
    cli_need(co.input != NULL, "tokenize", "a text (-i TEXT)");
    Tokenizer tok;
    build_tokenizer(&tok, co.tokenizer);
    tokenize_mode(&tok, co.input);
    free_tokenizer(&tok);
    return 0;
}

// the evaluation harness (eval.c) on the plain model, or with --lora
static int eval_cmd(int argc, char** argv) { return eval_main(argc, argv, NULL); }

static const Command COMMANDS[] = {
    {"generate", model_main, "continue a prompt (run MODEL.bin ... is short for run generate MODEL.bin ...)"},
    {"chat", model_main, "Llama-3 chat: answer -i, or user turns read from stdin"},
    {"tokenize", tokenize_main, "print the token ids of -i TEXT (no model)"},
    {"logits", model_main, "write the float32 logits of -i TEXT to -o FILE"},
    {"ppl", model_main, "perplexity of a text file"},
    {"qa", model_main, "QA accuracy of greedy chat answers on a TSV set"},
    {"eval", eval_cmd, "the shared evaluation harness (forget/retain QA, perplexity, ...)"},
    {"report", eval_report_main, "the comparison table and charts of every method (make demo)"},
    {"bench", bench_main, "engine speed on one model file, CSV (make bench)"},
};

int main(int argc, char** argv) {
    // run MODEL.bin ...: a first argument that is a path (no subcommand has
    // a '.' or '/' in its name) or an existing file is a model to generate with
    if (argc >= 2 && argv[1][0] != '-' && (strpbrk(argv[1], "./") || access(argv[1], F_OK) == 0))
        return run_model_command(&model_commands[0], argc, argv);
    const char* about = "Llama-3 inference on the CPU: generate, chat, evaluate, measure";
    return cli_dispatch("run", about, COMMANDS, sizeof(COMMANDS) / sizeof(COMMANDS[0]), argc, argv);
}
