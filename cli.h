// cli.h -- the command grammar every program shares (run, train_lora, sae, guard):
//
//     PROGRAM SUBCOMMAND [MODEL.bin] [flags]
//
// and the common flags, which mean the same wherever a subcommand takes them:
//
//     -z FILE   tokenizer file            -i TEXT   input text (the prompt)
//     -n N      tokens to generate        -t T      temperature (0 = greedy)
//     -p P      top-p (1 = off)           -s SEED   random seed
//     -c N      context length            -o PATH   output file (or prefix)
//     --lora FILE    a LoRA adapter       --system TEXT  system prompt
//
// Flags of one method have long names (--clamp, --scale, --objective).
// Every subcommand has --help, listing its flags with their defaults.
#ifndef CLI_H
#define CLI_H

#include <stdio.h>
#include <stdint.h>
#include "run.h"

// Which common flags a subcommand takes (a bit each).
enum {
    CLI_TOK = 1 << 0, CLI_INPUT = 1 << 1, CLI_MAX_NEW = 1 << 2, CLI_TEMP = 1 << 3, CLI_TOPP = 1 << 4,
    CLI_SEED = 1 << 5, CLI_CTX = 1 << 6, CLI_OUT = 1 << 7, CLI_LORA = 1 << 8, CLI_SYSTEM = 1 << 9,
    CLI_SAMPLING = CLI_MAX_NEW | CLI_TEMP | CLI_TOPP | CLI_SEED,
};

typedef struct {
    const char* model;      // the positional MODEL.bin, or NULL
    const char* tokenizer;  // -z
    const char* input;      // -i
    int max_new;            // -n
    float temperature;      // -t
    float topp;             // -p
    uint64_t seed;          // -s
    int ctx;                // -c; 0 = the model's, at most 4096
    const char* out;        // -o
    const char* lora;       // --lora
    const char* system;     // --system
    unsigned accepts;       // CLI_* bits: the common flags this subcommand takes
    // what each flag means here, for --help (NULL: the common wording)
    const char* input_help;
    const char* out_help;
    const char* lora_help;
} CommonOpts;

// A subcommand of a program: its name, its main (argv[0] is the name), one line.
typedef struct {
    const char* name;
    int (*main)(int argc, char** argv);
    const char* summary;
} Command;

// Runs the subcommand named by argv[1]. With none, or -h, prints the
// program's usage (the table) and exits 1 (0 for -h); an unknown one dies.
int cli_dispatch(const char* program, const char* about, const Command* cmds, int n_cmds, int argc, char** argv);
// The positional MODEL: argv[1] when it is not a flag. Returns the index of the first flag.
int cli_model(CommonOpts* o, int argc, char** argv);
// If argv[*i] is a common flag o->accepts, takes it (and its value, moving
// *i) into o and returns 1; otherwise returns 0.
int cli_common(CommonOpts* o, int argc, char** argv, int* i);
// The value after flag argv[*i] (moves *i); dies when there is none.
const char* cli_value(int argc, char** argv, int* i);
int cli_is_help(const char* flag);                       // -h or --help
void cli_unknown(const char* flag) __attribute__((noreturn)); // dies: unknown option
// Dies on out-of-range common values (-t < 0, -p outside (0, 1], -n < 0, -c < 0).
void cli_check(const CommonOpts* o);
// Dies with "SUBCOMMAND needs WHAT" unless have.
void cli_need(int have, const char* subcommand, const char* what);
// The tokenizer (-z) and the model (MODEL.bin) with a KV cache of ctx positions
// (0: the model's, at most 4096); dies when they disagree on the vocabulary.
// Applies the adapter of --lora when o has one.
void cli_load_model(const CommonOpts* o, int ctx, Transformer* t, Tokenizer* tok);

// A method's own flag with a plain value, as a row of a table (cli_flag).
typedef enum { CLI_TEXT, CLI_INT, CLI_FLOAT } CliValue;
typedef struct {
    const char* name;   // e.g. "--lr"
    CliValue kind;      // the value as is, or read by parse_int_arg / parse_float_arg
    void* to;           // the const char*, int or float it sets
} CliFlag;
// If argv[*i] is one of the n flags, reads its value (moving *i) into the
// flag's variable and returns 1; otherwise returns 0.
int cli_flag(const CliFlag* flags, int n, int argc, char** argv, int* i);

// --help lists the common flags (cli_print_common), then the subcommand's
// own, and last the line of -h itself (cli_print_help_flag).
// The lines of the common flags o accepts, with o's values as defaults.
void cli_print_common(FILE* f, const CommonOpts* o);
void cli_print_help_flag(FILE* f);

#endif
