// cli.c -- the command grammar and the common flags (see cli.h).
#include "cli.h"
#include "run.h"

#include <stdlib.h>
#include <string.h>

int cli_dispatch(const char* program, const char* about, const Command* cmds, int n_cmds, int argc, char** argv) {
    const char* name = argc >= 2 ? argv[1] : NULL;
    for (int c = 0; name && c < n_cmds; c++)
        if (!strcmp(name, cmds[c].name)) return cmds[c].main(argc - 1, argv + 1);
    int help = name && cli_is_help(name);
    if (name && !help) die("unknown subcommand '%s' (%s --help lists them)", name, program);
    FILE* f = help ? stdout : stderr;
    fprintf(f, "%s -- %s\n\nUsage: %s SUBCOMMAND [MODEL.bin] [flags]   (%s SUBCOMMAND --help for its flags)\n\n",
            program, about, program, program);
    for (int c = 0; c < n_cmds; c++) fprintf(f, "  %-10s %s\n", cmds[c].name, cmds[c].summary);
    exit(help ? EXIT_SUCCESS : EXIT_FAILURE);
}

int cli_model(CommonOpts* o, int argc, char** argv) {
    if (argc >= 2 && argv[1][0] != '-') { o->model = argv[1]; return 2; }
    return 1;
}

const char* cli_value(int argc, char** argv, int* i) {
    if (*i + 1 >= argc) die("%s needs a value (see --help)", argv[*i]);
    return argv[++*i];
}

int cli_is_help(const char* flag) { return !strcmp(flag, "-h") || !strcmp(flag, "--help"); }

void cli_unknown(const char* flag) { die("unknown option %s (see --help)", flag); }

int cli_common(CommonOpts* o, int argc, char** argv, int* i) {
    const char* f = argv[*i];
    unsigned a = o->accepts;
    if ((a & CLI_TOK) && !strcmp(f, "-z")) o->tokenizer = cli_value(argc, argv, i);
    else if ((a & CLI_INPUT) && !strcmp(f, "-i")) o->input = cli_value(argc, argv, i);
    else if ((a & CLI_MAX_NEW) && !strcmp(f, "-n")) o->max_new = parse_int_arg(f, cli_value(argc, argv, i));
    else if ((a & CLI_TEMP) && !strcmp(f, "-t")) o->temperature = parse_float_arg(f, cli_value(argc, argv, i));
    else if ((a & CLI_TOPP) && !strcmp(f, "-p")) o->topp = parse_float_arg(f, cli_value(argc, argv, i));
    else if ((a & CLI_SEED) && !strcmp(f, "-s")) o->seed = (uint64_t)parse_int_arg(f, cli_value(argc, argv, i));
    else if ((a & CLI_CTX) && !strcmp(f, "-c")) o->ctx = parse_int_arg(f, cli_value(argc, argv, i));
    else if ((a & CLI_OUT) && !strcmp(f, "-o")) o->out = cli_value(argc, argv, i);
    else if ((a & CLI_LORA) && !strcmp(f, "--lora")) o->lora = cli_value(argc, argv, i);
    else if ((a & CLI_SYSTEM) && !strcmp(f, "--system")) o->system = cli_value(argc, argv, i);
    else return 0;
    return 1;
}

void cli_check(const CommonOpts* o) {
    if (o->temperature < 0.0f) die("-t must be >= 0");
    if (o->topp <= 0.0f || o->topp > 1.0f) die("-p must be in (0, 1]");
    if (o->max_new < 0) die("-n must be >= 0");
    if (o->ctx < 0) die("-c must be > 0");
}

void cli_need(int have, const char* subcommand, const char* what) {
    if (!have) die("%s needs %s (see --help)", subcommand, what);
}

void cli_load_model(const CommonOpts* o, int ctx, Transformer* t, Tokenizer* tok) {
    build_tokenizer(tok, o->tokenizer);
    build_transformer(t, o->model, ctx);
    if (tok->vocab_size != t->config.vocab_size)
        die("tokenizer has %d tokens but the model has %d: wrong tokenizer for this model", tok->vocab_size,
            t->config.vocab_size);
    if (o->lora) load_lora(t, o->lora);
}

int cli_flag(const CliFlag* flags, int n, int argc, char** argv, int* i) {
    const char* f = argv[*i];
    for (int k = 0; k < n; k++) {
        if (strcmp(f, flags[k].name)) continue;
        const char* v = cli_value(argc, argv, i);
        if (flags[k].kind == CLI_TEXT) *(const char**)flags[k].to = v;
        else if (flags[k].kind == CLI_INT) *(int*)flags[k].to = parse_int_arg(f, v);
        else *(float*)flags[k].to = parse_float_arg(f, v);
        return 1;
    }
    return 0;
}

void cli_print_common(FILE* f, const CommonOpts* o) {
    unsigned a = o->accepts;
    if (a & CLI_TOK) fprintf(f, "  -z FILE          tokenizer file (from export.py tokenizer)%s\n", o->tokenizer ? "" : ", required");
    if (a & CLI_INPUT) fprintf(f, "  -i TEXT          %s\n", o->input_help ? o->input_help : "input text");
    if (a & CLI_MAX_NEW) fprintf(f, "  -n N             tokens to generate at most (default %d)\n", o->max_new);
    if (a & CLI_TEMP) fprintf(f, "  -t T             temperature, 0 = greedy (default %g)\n", o->temperature);
    if (a & CLI_TOPP) fprintf(f, "  -p P             top-p nucleus sampling, 1 = off (default %g)\n", o->topp);
    if (a & CLI_SEED) fprintf(f, "  -s SEED          random seed (default %llu)\n", (unsigned long long)o->seed);
    if (a & CLI_CTX) {
        if (o->ctx) fprintf(f, "  -c N             context length = KV cache size (default %d)\n", o->ctx);
        else fprintf(f, "  -c N             context length = KV cache size (default min(model max, 4096))\n");
    }
    if (a & CLI_OUT) fprintf(f, "  -o PATH          %s\n", o->out_help ? o->out_help : "output file");
    if (a & CLI_LORA)
        fprintf(f, "  --lora FILE      %s\n",
                o->lora_help ? o->lora_help : "apply a LoRA adapter (from train_lora) unmerged; works over int8");
    if (a & CLI_SYSTEM) fprintf(f, "  --system TEXT    system prompt (default none)\n");
}

void cli_print_help_flag(FILE* f) { fprintf(f, "  -h, --help       this text\n"); }
