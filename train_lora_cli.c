// train_lora_cli.c -- the train_lora program: its subcommands, options and
// the training driver (load, data, trainable parameters, the step loop,
// checkpoints, progress and CSV log). The method itself (forward, backward,
// objectives, AdamW, data sets and batches) is train_lora.c.
//
//   ./train_lora train MODEL.bin -z TOK --objective graddiff --forget F --retain R -o ADAPTER
//   ./train_lora train --init dim=64,n_layers=2,... -z TOK --full --forget DATA -o MODEL.bin
//   ./train_lora merge MODEL.bin --lora ADAPTER -o OUT.bin [--int8]
//   ./train_lora eval MODEL.bin -z TOK --lora ADAPTER --sets DIR
//   ./train_lora train --help
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <errno.h>
#include "run.h"
#include "cli.h"
#include "eval.h"
#include "train_lora.h"
#include "dist.h"

// ----------------------------------------------------------------------------
// Training state (--resume): everything the next step depends on
//
//   0   uint32 magic "ULTS", 4 int32 version, 8 int32 step, 12 int32 full,
//   16  int64 n_params, 24 int32 forget epoch, 28 forget cursor,
//   32  int32 retain epoch, 36 retain cursor, 40 uint64 seed,
//   48  int32 rank, 52 target_mask, 56 layer_begin, 60 layer_end,
//   64  int32 MPI ranks of the run (0 = 1), 68..127 zero
//   then params, AdamW m, AdamW v (n_params fp32 each)

#define STATE_MAGIC 0x53544c55u  // "ULTS"
#define STATE_VERSION 1
#define STATE_HEADER 128

typedef struct {
    int step, full, f_epoch, f_cursor, r_epoch, r_cursor, rank, mask, lb, le, ranks;
    int64_t n_params;
    uint64_t seed;
} StateHeader;

static int save_state(const TrainModel* m, const char* path, const StateHeader* sh) {
    size_t n = m->n_params, size = STATE_HEADER + 3 * n * sizeof(float);
    unsigned char* buf = xcalloc(size, 1);
    uint32_t magic = STATE_MAGIC;
    int32_t v[] = {STATE_VERSION, sh->step, sh->full};
    memcpy(buf, &magic, 4);
    memcpy(buf + 4, v, sizeof(v));
    memcpy(buf + 16, &sh->n_params, 8);
    int32_t lv[] = {sh->f_epoch, sh->f_cursor, sh->r_epoch, sh->r_cursor};
    memcpy(buf + 24, lv, sizeof(lv));
    memcpy(buf + 40, &sh->seed, 8);
    int32_t lo[] = {sh->rank, sh->mask, sh->lb, sh->le};
    memcpy(buf + 48, lo, sizeof(lo));
    put_i32(buf + 64, sh->ranks);
    memcpy(buf + STATE_HEADER, m->params, n * sizeof(float));
    memcpy(buf + STATE_HEADER + n * sizeof(float), m->adam_m, n * sizeof(float));
    memcpy(buf + STATE_HEADER + 2 * n * sizeof(float), m->adam_v, n * sizeof(float));
    int rc = write_file_atomic(path, buf, size);
    free(buf);
    return rc;
}

static void load_state(TrainModel* m, const char* path, StateHeader* sh) {
    size_t len;
    char* buf = read_file(path, &len);
    uint32_t magic;
    int32_t v[3], lv[4], lo[4];
    if (len < STATE_HEADER) die("%s is not a training state file", path);
    memcpy(&magic, buf, 4);
    memcpy(v, buf + 4, sizeof(v));
    if (magic != STATE_MAGIC || v[0] != STATE_VERSION) die("%s is not a training state file (or another version)", path);
    sh->step = v[1];
    sh->full = v[2];
    memcpy(&sh->n_params, buf + 16, 8);
    memcpy(lv, buf + 24, sizeof(lv));
    memcpy(&sh->seed, buf + 40, 8);
    memcpy(lo, buf + 48, sizeof(lo));
    sh->f_epoch = lv[0]; sh->f_cursor = lv[1]; sh->r_epoch = lv[2]; sh->r_cursor = lv[3];
    sh->rank = lo[0]; sh->mask = lo[1]; sh->lb = lo[2]; sh->le = lo[3];
    int32_t ranks = get_i32((unsigned char*)buf + 64);
    sh->ranks = ranks > 0 ? ranks : 1;
    // the sum over ranks is ordered by their number: same ranks, same bits
    if (sh->ranks != dist_size())
        die("%s was saved by a run on %d MPI ranks: resume it on %d (mpirun -np %d)", path, sh->ranks, sh->ranks, sh->ranks);
    if (sh->full != m->full || sh->n_params != (int64_t)m->n_params ||
        (!m->full && (sh->rank != m->lora.rank || sh->mask != m->lora.target_mask || sh->lb != m->lora.layer_begin ||
                      sh->le != m->lora.layer_end)))
        die("%s was saved by a run with other trainable parameters (--full, --rank, --targets, --layers)", path);
    size_t n = m->n_params;
    if (len != STATE_HEADER + 3 * n * sizeof(float)) die("%s: size does not match its header (truncated?)", path);
    memcpy(m->params, buf + STATE_HEADER, n * sizeof(float));
    memcpy(m->adam_m, buf + STATE_HEADER + n * sizeof(float), n * sizeof(float));
    memcpy(m->adam_v, buf + STATE_HEADER + 2 * n * sizeof(float), n * sizeof(float));
    free(buf);
}

// ----------------------------------------------------------------------------
// Options

typedef struct {
    CommonOpts co;                // model, -z, -o, --system, -s
    const char* forget_path;
    const char* retain_path;
    const char* format;
    const char* init_spec;
    const char* adapter_init;
    const char* dict_path;
    const char* reinforced_path;
    const char* log_path;
    const char* gold_path;
    int objective, retain_loss;   // retain_loss -1 = per objective
    int full, rank, targets, layer_begin, layer_end, T, B, B_retain, accum, steps, warmup, cosine;
    int save_every, log_every, resume, halt_after, eval_every, eval_rows, rmu_layer, dump_rows, pack;
    float alpha, dropout, lr, min_lr_frac, wd, b1, b2, eps, clip, gamma, lambda, beta, delta, rmu_c, rmu_alpha,
          whp_alpha, stop_forget_nll;
} Options;

static void options_init(Options* o) {
    memset(o, 0, sizeof(*o));
    o->co.seed = 1337;
    o->co.accepts = CLI_TOK | CLI_OUT | CLI_SYSTEM | CLI_SEED;
    o->co.out_help = "adapter (LoRA) or model file (--full), required";
    o->format = "auto";
    o->objective = OBJ_GRADDIFF;
    o->retain_loss = -1;
    o->rank = 8; o->alpha = 16.0f; o->targets = -1; o->layer_begin = -1; o->layer_end = -1;
    o->T = 256; o->B = 4; o->B_retain = -1; o->accum = 1; o->steps = 100; o->lr = 1e-4f;
    o->b1 = 0.9f; o->b2 = 0.999f; o->eps = 1e-8f; o->clip = 1.0f;
    o->gamma = 1.0f; o->lambda = 1.0f; o->beta = -1.0f; o->rmu_layer = -1; o->rmu_c = 6.5f; o->rmu_alpha = 1200.0f;
    o->whp_alpha = 1.0f; o->save_every = 50; o->log_every = 1; o->eval_rows = 32; o->stop_forget_nll = NAN;
}

static void usage_train(const Options* o) {
    printf(
"Usage:  train_lora train MODEL.bin -z TOK [flags] -o ADAPTER        LoRA unlearning / finetuning\n"
"        train_lora train MODEL.bin -z TOK --full [flags] -o OUT.bin   train every weight\n"
"        train_lora train --init SPEC -z TOK --full [flags] -o OUT.bin a new model from scratch\n"
"Example: train_lora train llama3.q8.bin -z llama3.tok --objective graddiff --forget hp.txt \\\n"
"           --retain wiki.txt -o hp.lora --steps 200\n"
"Formats: plain text files are one token stream cut into rows of --seq-len positions,\n"
"         each row starting with BOS; .tsv is question<TAB>answer[<TAB>...] chat QA;\n"
"         .jsonl holds {\"text\": ...} (every token counts), {\"messages\": [{\"role\",\n"
"         \"content\"}, ...]} (Llama-3 chat template, assistant turns count) or\n"
"         {\"question\": ..., \"answer\": ...}. One example per row unless --pack\n"
"         (the data line reports the padding).\n");
    cli_print_common(stdout, &o->co);
    printf(
"Data:\n"
"  --forget FILE      forget set; the training data of sft (alias --data), required\n"
"  --retain FILE      retain set (required by graddiff, kl, rmu; optional for the others)\n"
"  --format F         auto|text|tsv|jsonl (default auto: by file extension)\n"
"  --pack             pack several examples per row, each with its own positions and\n"
"                     attention (as if alone): no padding waste for short examples\n"
"  --seq-len N        positions per row (default 256)\n"
"  --batch N          forget rows per micro-batch (default 4)\n"
"  --retain-batch N   retain rows per micro-batch (default: --batch)\n"
"  --accum N          micro-batches per optimizer step (default 1)\n"
"Objective:\n"
"  --objective NAME   sft|ga|graddiff|kl|npo|simnpo|whp|rmu (default graddiff)\n"
"                     sft: descent on --forget (knowledge injection, relearning attacks)\n"
"                     ga: ascent on forget; graddiff: ascent on forget + lambda * descent on retain\n"
"                     kl: ascent on forget + lambda * KL(base || model) on retain\n"
"                     npo: (2/beta) log(1 + (pi/pi_base)^beta) per forget sequence, pi_base =\n"
"                          the base with the adapter off\n"
"                     simnpo: (2/beta) softplus(beta * mean log pi + delta), no reference\n"
"                     whp: KL to the base model's predictions on the text with anchored\n"
"                          terms translated (--dict), optionally v_b - a*ReLU(v_r - v_b)\n"
"                     rmu: layer --rmu-layer activations -> c*u on forget, kept on retain\n"
"  --retain-loss L    none|nll|kl (default: none for ga, kl for kl, else nll when --retain is given)\n"
"  --gamma X          weight of the forget term (default 1)\n"
"  --lambda X         weight of the retain term (default 1)\n"
"  --beta X           NPO/SimNPO beta (default 0.1 for npo, 4.5 for simnpo)\n"
"  --delta X          SimNPO margin (default 0)\n"
"  --rmu-layer L      RMU layer (default 7, or n_layers/2 for smaller models)\n"
"  --rmu-c X          RMU steering coefficient c (default 6.5)\n"
"  --rmu-alpha X      RMU retain weight (default 1200)\n"
"  --dict FILE        WHP dictionary, lines \"anchored<TAB>generic\" (required for whp)\n"
"  --reinforced FILE  WHP reinforced adapter (default none)\n"
"  --whp-alpha X      WHP alpha (default 1)\n"
"Trainable parameters:\n"
"  --full             train every weight (embeddings, norms, matrices); -o is a model file\n"
"  --init SPEC        start from a random model, SPEC = dim=D,hidden_dim=H,n_layers=L,\n"
"                     n_heads=N,n_kv_heads=K[,head_dim=D/N][,max_seq_len=2048]\n"
"                     [,rope_theta=500000][,norm_eps=1e-5][,tied=1][,vocab_size=tokenizer's]\n"
"  --rank R           LoRA rank (default 8)\n"
"  --alpha A          LoRA alpha, scale = alpha/rank (default 16)\n"
"  --dropout P        LoRA dropout (default 0)\n"
"  --targets LIST     q,k,v,o,gate,up,down | all | attn | mlp (default all; rmu: down)\n"
"  --layers A-B       adapted layers, inclusive (default all; rmu: l-2..l)\n"
"  --adapter-init F   start from this adapter (its rank, alpha, targets and layers)\n"
"Optimisation (-s seeds the data order, init and dropout):\n"
"  --steps N          optimizer steps (default 100)\n"
"  --lr X             peak learning rate (default 1e-4)\n"
"  --warmup N         linear warmup steps (default 0)\n"
"  --schedule S       constant|cosine after warmup (default constant)\n"
"  --min-lr-frac F    cosine floor as a fraction of --lr (default 0)\n"
"  --wd X             AdamW weight decay, not on norms (default 0)\n"
"  --adam-b1 X        (default 0.9)   --adam-b2 X (default 0.999)   --adam-eps X (default 1e-8)\n"
"  --clip X           clip the gradient norm to X, 0 = off (default 1)\n"
"Stopping:\n"
"  --eval-every N     every N steps, mean NLL on the first --eval-rows rows of each set\n"
"                     (default 0 = off; 10 when a stop level is set)\n"
"  --eval-rows N      (default 32)\n"
"  --stop-forget-nll X  stop once the eval forget NLL reaches X (MUSE's rule with a gold\n"
"                     level; default none: --steps is the budget)\n"
"  --gold MODEL.bin   the stop level is this model's eval forget NLL (the retrained model;\n"
"                     default none)\n"
"Output:\n"
"  --save-every N     checkpoint every N steps, and always at the end (default 50)\n"
"  --log FILE         CSV log (default OUT.csv)\n"
"  --log-every N      progress line every N steps (default 1)\n"
"  --resume           continue from OUT.state (bit for bit)\n"
"  --halt-after N     stop after N steps of this run, checkpoint saved (default 0 = off)\n"
"  --dump-rows N      print the first N forget rows (each target token, [counted] or not;\n"
"                     whp: <- the translated token whose prediction labels it) and exit\n");
    cli_print_help_flag(stdout);
    exit(EXIT_SUCCESS);
}

// The flags whose value is a name from a list
static void parse_choice(Options* o, const char* f, const char* v) {
    if (!strcmp(f, "--objective")) {
        o->objective = objective_from_name(v);
        if (o->objective < 0) die("unknown objective '%s' (sft, ga, graddiff, kl, npo, simnpo, whp, rmu)", v);
    } else if (!strcmp(f, "--retain-loss")) {
        if (!strcmp(v, "none")) o->retain_loss = RETAIN_NONE;
        else if (!strcmp(v, "nll")) o->retain_loss = RETAIN_NLL;
        else if (!strcmp(v, "kl")) o->retain_loss = RETAIN_KL;
        else die("unknown --retain-loss '%s' (none, nll, kl)", v);
    } else if (!strcmp(f, "--targets")) {
        o->targets = parse_targets(v);
        if (o->targets < 0) die("bad --targets '%s' (a list of q,k,v,o,gate,up,down, or all, attn, mlp)", v);
    } else if (!strcmp(f, "--layers")) {
        int a, b;
        char extra;
        if (sscanf(v, "%d-%d%c", &a, &b, &extra) == 2) { o->layer_begin = a; o->layer_end = b + 1; }
        else if (sscanf(v, "%d%c", &a, &extra) == 1) { o->layer_begin = a; o->layer_end = a + 1; }
        else die("bad --layers '%s' (A-B, inclusive)", v);
    } else if (!strcmp(f, "--schedule")) {
        if (!strcmp(v, "cosine")) o->cosine = 1;
        else if (!strcmp(v, "constant")) o->cosine = 0;
        else die("unknown --schedule '%s' (constant, cosine)", v);
    }
}

// A method flag that takes a value; returns 0 when f is not one
static int parse_value_flag(Options* o, const char* f, const char* v) {
    if (!strcmp(f, "--forget") || !strcmp(f, "--data")) o->forget_path = v;
    else if (!strcmp(f, "--retain")) o->retain_path = v;
    else if (!strcmp(f, "--format")) o->format = v;
    else if (!strcmp(f, "--init")) o->init_spec = v;
    else if (!strcmp(f, "--adapter-init")) o->adapter_init = v;
    else if (!strcmp(f, "--dict")) o->dict_path = v;
    else if (!strcmp(f, "--reinforced")) o->reinforced_path = v;
    else if (!strcmp(f, "--log")) o->log_path = v;
    else if (!strcmp(f, "--gold")) o->gold_path = v;
    else if (!strcmp(f, "--objective") || !strcmp(f, "--retain-loss") || !strcmp(f, "--targets") ||
             !strcmp(f, "--layers") || !strcmp(f, "--schedule")) parse_choice(o, f, v);
    else if (!strcmp(f, "--rank")) o->rank = parse_int_arg(f, v);
    else if (!strcmp(f, "--seq-len")) o->T = parse_int_arg(f, v);
    else if (!strcmp(f, "--batch")) o->B = parse_int_arg(f, v);
    else if (!strcmp(f, "--retain-batch")) o->B_retain = parse_int_arg(f, v);
    else if (!strcmp(f, "--accum")) o->accum = parse_int_arg(f, v);
    else if (!strcmp(f, "--steps")) o->steps = parse_int_arg(f, v);
    else if (!strcmp(f, "--warmup")) o->warmup = parse_int_arg(f, v);
    else if (!strcmp(f, "--save-every")) o->save_every = parse_int_arg(f, v);
    else if (!strcmp(f, "--log-every")) o->log_every = parse_int_arg(f, v);
    else if (!strcmp(f, "--halt-after")) o->halt_after = parse_int_arg(f, v);
    else if (!strcmp(f, "--eval-every")) o->eval_every = parse_int_arg(f, v);
    else if (!strcmp(f, "--eval-rows")) o->eval_rows = parse_int_arg(f, v);
    else if (!strcmp(f, "--rmu-layer")) o->rmu_layer = parse_int_arg(f, v);
    else if (!strcmp(f, "--dump-rows")) o->dump_rows = parse_int_arg(f, v);
    else if (!strcmp(f, "--alpha")) o->alpha = parse_float_arg(f, v);
    else if (!strcmp(f, "--dropout")) o->dropout = parse_float_arg(f, v);
    else if (!strcmp(f, "--lr")) o->lr = parse_float_arg(f, v);
    else if (!strcmp(f, "--min-lr-frac")) o->min_lr_frac = parse_float_arg(f, v);
    else if (!strcmp(f, "--wd")) o->wd = parse_float_arg(f, v);
    else if (!strcmp(f, "--adam-b1")) o->b1 = parse_float_arg(f, v);
    else if (!strcmp(f, "--adam-b2")) o->b2 = parse_float_arg(f, v);
    else if (!strcmp(f, "--adam-eps")) o->eps = parse_float_arg(f, v);
    else if (!strcmp(f, "--clip")) o->clip = parse_float_arg(f, v);
    else if (!strcmp(f, "--gamma")) o->gamma = parse_float_arg(f, v);
    else if (!strcmp(f, "--lambda")) o->lambda = parse_float_arg(f, v);
    else if (!strcmp(f, "--beta")) o->beta = parse_float_arg(f, v);
    else if (!strcmp(f, "--delta")) o->delta = parse_float_arg(f, v);
    else if (!strcmp(f, "--rmu-c")) o->rmu_c = parse_float_arg(f, v);
    else if (!strcmp(f, "--rmu-alpha")) o->rmu_alpha = parse_float_arg(f, v);
    else if (!strcmp(f, "--whp-alpha")) o->whp_alpha = parse_float_arg(f, v);
    else if (!strcmp(f, "--stop-forget-nll")) o->stop_forget_nll = parse_float_arg(f, v);
    else return 0;
    return 1;
}

// What needs what, and the defaults that depend on other flags
static void check_options(Options* o) {
    if (!o->co.tokenizer) die("a tokenizer is required (-z FILE; see --help)");
    if (!o->co.out) die("an output file is required (-o FILE; see --help)");
    if (!o->co.model && !o->init_spec) die("a model file (after train) or --init SPEC is required (see --help)");
    if (o->co.model && o->init_spec) die("give a model file or --init, not both");
    if (o->init_spec && !o->full) die("--init creates a model to train from scratch: it needs --full");
    if (!o->forget_path) die("--forget FILE is required (the training data for sft)");
    if (o->dump_rows < 0) die("--dump-rows must be >= 0");
    if (o->T < 2 || o->B < 1 || o->accum < 1 || o->steps < 0 || o->warmup < 0 || o->rank < 1 || o->log_every < 1 ||
        o->save_every < 0 || o->eval_rows < 1)
        die("--seq-len, --batch, --accum, --rank, --log-every must be positive; --steps, --warmup, --save-every non-negative");
    if (o->B_retain < 0) o->B_retain = o->B;
    if (o->lr < 0 || o->clip < 0 || o->wd < 0 || o->dropout < 0 || o->dropout >= 1) die("invalid --lr, --clip, --wd or --dropout");
    if (o->beta < 0) o->beta = o->objective == OBJ_SIMNPO ? 4.5f : 0.1f;
    if (o->beta <= 0) die("--beta must be > 0");
    if (o->retain_loss < 0) {
        if (o->objective == OBJ_GA) o->retain_loss = RETAIN_NONE;
        else if (o->objective == OBJ_KL) o->retain_loss = RETAIN_KL;
        else o->retain_loss = o->retain_path ? RETAIN_NLL : RETAIN_NONE;
    }
    int needs_retain = o->objective == OBJ_GRADDIFF || o->objective == OBJ_KL || o->retain_loss != RETAIN_NONE;
    if (needs_retain && !o->retain_path) die("objective %s needs --retain FILE", objective_name(o->objective));
    if (o->objective == OBJ_WHP && !o->dict_path) die("objective whp needs --dict FILE");
    if (o->objective == OBJ_WHP && o->pack) die("--pack is not supported with whp");
    if (o->reinforced_path && o->objective != OBJ_WHP) die("--reinforced is for the whp objective");
}

static void parse_options(Options* o, int argc, char** argv) {
    options_init(o);
    for (int i = cli_model(&o->co, argc, argv); i < argc; i++) {
        const char* f = argv[i];
        if (cli_is_help(f)) usage_train(o);
        if (cli_common(&o->co, argc, argv, &i)) continue;
        if (!strcmp(f, "--full")) o->full = 1;
        else if (!strcmp(f, "--resume")) o->resume = 1;
        else if (!strcmp(f, "--pack")) o->pack = 1;
        else if (f[0] != '-' || !parse_value_flag(o, f, cli_value(argc, argv, &i))) cli_unknown(f);
    }
    check_options(o);
}

// "dim=64,n_layers=2,..." over a config with the defaults already set
static void parse_init_spec(const char* spec, Config* c) {
    char* s = xstrdup(spec);
    for (char* tok = strtok(s, ","); tok; tok = strtok(NULL, ",")) {
        char* eq = strchr(tok, '=');
        if (!eq) die("--init: expected key=value, got '%s'", tok);
        *eq = '\0';
        const char* k = tok;
        const char* v = eq + 1;
        if (!strcmp(k, "dim")) c->dim = parse_int_arg(k, v);
        else if (!strcmp(k, "hidden_dim")) c->hidden_dim = parse_int_arg(k, v);
        else if (!strcmp(k, "n_layers")) c->n_layers = parse_int_arg(k, v);
        else if (!strcmp(k, "n_heads")) c->n_heads = parse_int_arg(k, v);
        else if (!strcmp(k, "n_kv_heads")) c->n_kv_heads = parse_int_arg(k, v);
        else if (!strcmp(k, "head_dim")) c->head_dim = parse_int_arg(k, v);
        else if (!strcmp(k, "vocab_size")) c->vocab_size = parse_int_arg(k, v);
        else if (!strcmp(k, "max_seq_len")) c->max_seq_len = parse_int_arg(k, v);
        else if (!strcmp(k, "rope_theta")) c->rope_theta = parse_float_arg(k, v);
        else if (!strcmp(k, "norm_eps")) c->norm_eps = parse_float_arg(k, v);
        else if (!strcmp(k, "tied")) c->tied_embeddings = parse_int_arg(k, v);
        else die("--init: unknown key '%s'", k);
    }
    free(s);
    if (c->n_heads > 0 && c->head_dim == 0 && c->dim % c->n_heads == 0) c->head_dim = c->dim / c->n_heads;
    if (c->n_kv_heads == 0) c->n_kv_heads = c->n_heads;
}

// ----------------------------------------------------------------------------
// Early stopping by a gold level: the eval NLL of another model file, through the engine

static double eval_nll_engine(const char* path, const Dataset* d, int rows, int vocab) {
    Transformer t;
    build_transformer(&t, path, d->T);
    if (t.config.vocab_size != vocab) die("--gold %s has another vocabulary", path);
    int T = d->T, V = vocab;
    float* logits = xmalloc((size_t)T * V * sizeof(float));
    double S = 0.0, W = 0.0;
    if (rows > d->n) rows = d->n;
    for (int r = 0; r < rows; r++) {
        const int* tk = d->tokens + (size_t)r * (T + 1);
        const int* pos = d->pos ? d->pos + (size_t)r * T : NULL;
        // each sequence of the row on its own (a packed row holds several)
        for (int s0 = 0, s1; s0 < T; s0 = s1) {
            for (s1 = s0 + 1; s1 < T && pos && pos[s1] != 0; s1++) {}
            if (!pos) s1 = T;
            forward_batch(&t, tk + s0, s1 - s0, 0, logits + (size_t)s0 * V);
        }
        for (int i = 0; i < T; i++) {
            float w = d->weights[(size_t)r * T + i];
            if (w == 0.0f) continue;
            const float* z = logits + (size_t)i * V;
            float mx = z[0];
            for (int j = 1; j < V; j++) if (z[j] > mx) mx = z[j];
            double sum = 0.0;
            for (int j = 0; j < V; j++) sum += exp((double)(z[j] - mx));
            S += w * (mx + log(sum) - z[tk[i + 1]]);
            W += w;
        }
    }
    free(logits);
    free_transformer(&t);
    return W > 0 ? S / W : NAN;
}

// ----------------------------------------------------------------------------
// The training loop

static float lr_at(const Options* o, int step) {
    if (step < o->warmup) return o->lr * (float)(step + 1) / (float)o->warmup;
    if (!o->cosine) return o->lr;
    int span = o->steps - o->warmup;
    float progress = span > 0 ? (float)(step - o->warmup) / (float)span : 1.0f;
    float floor_lr = o->lr * o->min_lr_frac;
    return floor_lr + 0.5f * (o->lr - floor_lr) * (1.0f + cosf((float)M_PI * progress));
}

static void format_eta(char* buf, size_t n, double seconds) {
    if (!(seconds >= 0) || seconds > 1e8) { snprintf(buf, n, "?"); return; }
    long s = (long)(seconds + 0.5);
    if (s >= 3600) snprintf(buf, n, "%ldh%02ldm", s / 3600, (s / 60) % 60);
    else if (s >= 60) snprintf(buf, n, "%ldm%02lds", s / 60, s % 60);
    else snprintf(buf, n, "%lds", s);
}

static void csv_field(FILE* f, double v) {
    if (isnan(v)) fprintf(f, ",");
    else fprintf(f, ",%.6g", v);
}

// --resume: the log keeps its header and the rows of the steps up to the
// checkpoint. A killed run may have logged steps after its last checkpoint
// (they run again now) or half a line; those go, so the resumed log reads as
// one uninterrupted run. Returns 1 when the log exists (with its header).
static int trim_log(const char* path, int step) {
    FILE* f = fopen(path, "rb");
    if (!f) return 0;
    fclose(f);
    size_t len, keep = 0;
    char* text = read_file(path, &len);
    for (size_t at = 0; at < len;) {
        const char* nl = memchr(text + at, '\n', len - at);
        if (!nl) break;                               // a partial last line
        if (at > 0 && atol(text + at) > step) break;  // a step after the checkpoint
        at = keep = (size_t)(nl - text) + 1;
    }
    if (keep < len && write_file_atomic(path, text, keep) != 0) die("cannot write %s: %s", path, strerror(errno));
    free(text);
    return keep > 0;
}

// ----------------------------------------------------------------------------
// The training driver, step by step: model, trainable parameters, objective,
// data, buffers, state, then the loop

typedef struct {
    Options o;
    Tokenizer tok;
    TrainModel m;
    ObjectiveConfig oc;
    Lora reinforced;          // WHP --reinforced
    Dataset forget, retain;
    int has_retain;           // a retain set is loaded and used
    Batch fb, rb, eb;         // forget, retain (--batch rows, this rank runs its share), eval batches
    float* grad_acc;          // (n_params,) the step's gradient while --accum micro-batches add up, or NULL
    Loader lf, lr;
    char* state_path;         // OUT.state
    char* log_path;
    FILE* log;
    int step;                 // optimizer steps done (across --resume)
    float stop_level;         // eval forget NLL that stops training, or NAN
} Trainer;

// The model to train: a file, or a fresh random one (--init)
static void load_model(Trainer* tr) {
    Options* o = &tr->o;
    if (o->init_spec) {
        Config c;
        memset(&c, 0, sizeof(c));
        c.vocab_size = tr->tok.vocab_size; c.max_seq_len = 2048; c.rope_theta = 500000.0f; c.norm_eps = 1e-5f;
        c.tied_embeddings = 1; c.bos_id = tr->tok.bos_id;
        for (int i = 0; i < tr->tok.n_eot && c.n_eos < MAX_EOS; i++) c.eos_ids[c.n_eos++] = tr->tok.eot_ids[i];
        parse_init_spec(o->init_spec, &c);
        train_check_config(&c, "--init"); // exactly as the loader will when the model is read back
        train_model_random(&tr->m, &c, o->co.seed);
    } else {
        train_model_from_file(&tr->m, o->co.model);
    }
    const Config* c = &tr->m.config;
    if (tr->tok.vocab_size != c->vocab_size)
        die("tokenizer has %d tokens but the model has %d: wrong tokenizer for this model", tr->tok.vocab_size,
            c->vocab_size);
    if (o->T > c->max_seq_len) die("--seq-len %d exceeds the model's maximum of %d positions", o->T, c->max_seq_len);
}

// The defaults of --targets and --layers (RMU adapts the layers below its own)
static void resolve_layers(Options* o, int L) {
    if (o->objective == OBJ_RMU) {
        if (o->rmu_layer < 0) o->rmu_layer = L > 8 ? 7 : L / 2;
        if (o->rmu_layer >= L) die("--rmu-layer %d: the model has %d layers", o->rmu_layer, L);
        if (o->targets < 0) o->targets = 1 << LORA_DOWN;
        if (o->layer_begin < 0) { o->layer_begin = o->rmu_layer >= 2 ? o->rmu_layer - 2 : 0; o->layer_end = o->rmu_layer + 1; }
        if (!o->full && o->layer_end > o->rmu_layer + 1) die("rmu: LoRA layers must be <= --rmu-layer %d", o->rmu_layer);
    }
    if (o->targets < 0) o->targets = (1 << LORA_N_TARGETS) - 1;
    if (o->layer_begin < 0) { o->layer_begin = 0; o->layer_end = L; }
    if (o->layer_begin < 0 || o->layer_end > L || o->layer_begin >= o->layer_end)
        die("--layers: the model has layers 0-%d", L - 1);
}

// --full, or a LoRA adapter (fresh, or a copy of --adapter-init)
static void setup_trainable(Trainer* tr) {
    Options* o = &tr->o;
    TrainModel* m = &tr->m;
    const Config* c = &m->config;
    int obj = o->objective;
    resolve_layers(o, c->n_layers);
    int need_ref_model = obj == OBJ_NPO || obj == OBJ_WHP || obj == OBJ_RMU || o->retain_loss == RETAIN_KL;
    if (o->full) {
        train_setup_full(m, need_ref_model);
    } else if (o->adapter_init) {
        Lora init;
        char err[512];
        if (lora_read(&init, c, o->adapter_init, err, sizeof(err)) != 0) die("%s", err);
        train_setup_lora(m, init.rank, init.alpha, o->dropout, init.target_mask, init.layer_begin, init.layer_end,
                         o->co.seed);
        for (int l = init.layer_begin; l < init.layer_end; l++)
            for (int t = 0; t < LORA_N_TARGETS; t++) {
                if (!init.pairs[l][t].a) continue;
                int in, out;
                lora_dims(c, t, &in, &out);
                memcpy(m->lora.pairs[l][t].a, init.pairs[l][t].a, (size_t)init.rank * in * sizeof(float));
                memcpy(m->lora.pairs[l][t].b, init.pairs[l][t].b, (size_t)out * init.rank * sizeof(float));
            }
        free_lora(&init);
    } else {
        train_setup_lora(m, o->rank, o->alpha, o->dropout, o->targets, o->layer_begin, o->layer_end, o->co.seed);
    }
}

static void setup_objective(Trainer* tr) {
    const Options* o = &tr->o;
    ObjectiveConfig* oc = &tr->oc;
    memset(oc, 0, sizeof(*oc));
    oc->objective = o->objective; oc->retain_loss = o->retain_loss; oc->gamma = o->gamma; oc->lambda = o->lambda;
    oc->beta = o->beta; oc->delta = o->delta; oc->rmu_layer = o->rmu_layer; oc->rmu_c = o->rmu_c;
    oc->rmu_alpha = o->rmu_alpha; oc->whp_alpha = o->whp_alpha;
    if (o->reinforced_path) {
        char err[512];
        if (lora_read(&tr->reinforced, &tr->m.config, o->reinforced_path, err, sizeof(err)) != 0) die("%s", err);
        if (tr->reinforced.rank > 64) die("--reinforced: rank %d > 64 is not supported", tr->reinforced.rank);
        oc->whp_reinforced = &tr->reinforced;
    }
    if (o->objective == OBJ_RMU) oc->rmu_u = rmu_direction(tr->m.config.dim, o->co.seed);
}

static void load_data(Trainer* tr) {
    const Options* o = &tr->o;
    const Config* c = &tr->m.config;
    tr->has_retain = o->retain_path && (o->retain_loss != RETAIN_NONE || o->objective == OBJ_RMU);
    long t_load = time_in_ms();
    if (o->objective == OBJ_WHP) {
        Term* terms;
        int nt = load_dict(o->dict_path, &terms);
        dataset_whp(&tr->forget, &tr->tok, c, o->forget_path, terms, nt, o->T);
        free_dict(terms, nt);
    } else {
        dataset_load(&tr->forget, &tr->tok, c, o->forget_path, o->format, o->co.system, o->T, o->pack);
    }
    if (tr->has_retain) dataset_load(&tr->retain, &tr->tok, c, o->retain_path, o->format, o->co.system, o->T, o->pack);
    // padding: positions that hold no token (short chat rows in long rows waste compute: --pack)
    printf("data: forget %s: %d rows, %ld counted tokens, %.0f%% padding", o->forget_path, tr->forget.n,
           tr->forget.n_tokens, 100.0 * dataset_padding(&tr->forget));
    if (tr->has_retain)
        printf(" | retain %s: %d rows, %ld counted tokens, %.0f%% padding", o->retain_path, tr->retain.n,
               tr->retain.n_tokens, 100.0 * dataset_padding(&tr->retain));
    printf(" (%.1fs)\n", (time_in_ms() - t_load) / 1000.0);
}

static void put_piece(const Tokenizer* tok, int id) {
    int len;
    const char* piece = token_piece(tok, id, &len);
    for (int k = 0; k < len; k++) putchar(piece[k] == '\n' ? '|' : piece[k]);
}

// --dump-rows: what the loss sees, each target token, in brackets when it counts
static void dump_rows(const Dataset* d, const Tokenizer* tok, int rows) {
    int T = d->T;
    for (int r = 0; r < rows && r < d->n; r++) {
        printf("row %d:", r);
        for (int i = 0; i < T; i++) {
            int id = d->tokens[(size_t)r * (T + 1) + i + 1];
            int on = d->weights[(size_t)r * T + i] > 0;
            if (d->pos && i > 0 && d->pos[(size_t)r * T + i] == 0) printf(" ||"); // a packed sequence starts
            printf(" %s%d:'", on ? "[" : "", id);
            put_piece(tok, id);
            printf("'%s", on ? "]" : "");
            if (on && d->label_pos) {
                // WHP: the translated token this position reads (its prediction is the label)
                int lp = d->label_pos[(size_t)r * T + i];
                printf("<-'");
                put_piece(tok, d->trans[(size_t)r * d->Tt + lp]);
                printf("'");
            }
        }
        printf("\n");
    }
}

static void alloc_buffers(Trainer* tr) {
    const Options* o = &tr->o;
    TrainModel* m = &tr->m;
    const Config* c = &m->config;
    int obj = o->objective, Tt = tr->forget.Tt, T = o->T;
    // rows of one rank's micro-batch: its share of --batch (all of it without MPI)
    int B_max = (o->B > o->B_retain ? o->B : o->B_retain) / dist_size();
    int T_cap = Tt > T ? Tt : T;
    train_alloc_acts(m, B_max * T_cap, T_cap, obj == OBJ_WHP || o->retain_loss == RETAIN_KL, obj == OBJ_RMU);
    batch_alloc(&tr->fb, o->B, T, Tt, o->pack);
    if (tr->has_retain) batch_alloc(&tr->rb, o->B_retain, T, 0, o->pack);
    batch_alloc(&tr->eb, B_max, T, 0, o->pack);
    if (o->accum > 1) tr->grad_acc = xmalloc(m->n_params * sizeof(float));
    printf("model: dim %d, %d layers, vocab %d, %s | trainable: %s, %zu parameters | objective %s\n", c->dim,
           c->n_layers, c->vocab_size, c->weight_type == WEIGHT_Q8 ? "int8" : "fp32",
           m->full ? "every weight" : "LoRA", m->n_params, objective_name(obj));
    // without a file the model is --init's, every weight trainable: n_params floats;
    // trainable state: params, grads, AdamW m and v, and with --accum the step's sum
    printf("memory: weights %.1f MiB (%s), activations %.1f MiB, trainable state %.1f MiB\n",
           (m->file ? (double)m->file->file_size : (double)m->n_params * 4) / 1048576.0,
           m->file ? "mapped" : "in memory", m->acts_bytes / 1048576.0,
           m->n_params * 4.0 * ((m->no_decay ? 4.25 : 4.0) + (o->accum > 1)) / 1048576.0);
}

static char* path_with_suffix(const char* path, const char* suffix) {
    size_t n = strlen(path) + strlen(suffix) + 1;
    char* s = xmalloc(n);
    snprintf(s, n, "%s%s", path, suffix);
    return s;
}

// OUT.state (--resume), the loaders at their saved place
static void open_state(Trainer* tr) {
    const Options* o = &tr->o;
    tr->state_path = path_with_suffix(o->co.out, ".state");
    tr->log_path = o->log_path ? xstrdup(o->log_path) : path_with_suffix(o->co.out, ".csv");
    StateHeader sh = {0};
    if (o->resume) {
        load_state(&tr->m, tr->state_path, &sh);
        if (sh.seed != o->co.seed) die("%s was saved with -s %llu", tr->state_path, (unsigned long long)sh.seed);
        tr->step = sh.step;
        printf("resumed from %s at step %d\n", tr->state_path, tr->step);
    }
    loader_init(&tr->lf, &tr->forget, o->co.seed ^ 0xf0f0ull, sh.f_epoch, sh.f_cursor);
    if (tr->has_retain) loader_init(&tr->lr, &tr->retain, o->co.seed ^ 0x0f0full, sh.r_epoch, sh.r_cursor);
    if (tr->lf.cursor >= tr->forget.n || (tr->has_retain && tr->lr.cursor >= tr->retain.n))
        die("%s does not match these data sets", tr->state_path);
}

// The CSV log (kept up to the checkpoint on --resume)
static void open_log(Trainer* tr) {
    const Options* o = &tr->o;
    if (dist_rank() != 0) {   // rank 0 writes the log
        tr->log = fopen("/dev/null", "w");
        if (!tr->log) die("cannot open /dev/null");
        return;
    }
    int have_log = o->resume && trim_log(tr->log_path, tr->step);
    tr->log = fopen(tr->log_path, have_log ? "a" : "w");
    if (!tr->log) die("cannot write %s: %s", tr->log_path, strerror(errno));
    if (!have_log)
        fprintf(tr->log, "step,loss,forget_term,retain_term,forget_nll,retain_nll,retain_kl,grad_norm,lr,tokens_per_s,"
                         "elapsed_s,eta_s,eval_forget_nll,eval_retain_nll\n");
}

// Early stopping: a level given, or a gold model's eval forget NLL
static void setup_stopping(Trainer* tr) {
    Options* o = &tr->o;
    tr->stop_level = o->stop_forget_nll;
    if (o->gold_path) {
        tr->stop_level = (float)eval_nll_engine(o->gold_path, &tr->forget, o->eval_rows, tr->m.config.vocab_size);
        printf("gold: %s has eval forget NLL %.4f: training stops once the forget NLL reaches it\n", o->gold_path,
               tr->stop_level);
    }
    if ((o->gold_path || !isnan(tr->stop_level)) && !o->eval_every) o->eval_every = 10;
}

static void checkpoint(Trainer* tr) {
    TrainModel* m = &tr->m;
    if (dist_rank() != 0) return;   // the ranks hold the same state; rank 0 writes it
    StateHeader sh = {0};
    sh.step = tr->step; sh.full = m->full; sh.n_params = (int64_t)m->n_params; sh.seed = tr->o.co.seed;
    sh.ranks = dist_size();
    sh.f_epoch = tr->lf.epoch; sh.f_cursor = tr->lf.cursor;
    if (tr->has_retain) { sh.r_epoch = tr->lr.epoch; sh.r_cursor = tr->lr.cursor; }
    if (!m->full) { sh.rank = m->lora.rank; sh.mask = m->lora.target_mask; sh.lb = m->lora.layer_begin; sh.le = m->lora.layer_end; }
    if (save_state(m, tr->state_path, &sh) != 0) die("cannot write %s: %s", tr->state_path, strerror(errno));
    const char* out = tr->o.co.out;
    int rc = m->full ? save_model_fp32(m, out) : lora_save(&m->lora, &m->config, out);
    if (rc != 0) die("cannot write %s: %s", out, strerror(errno));
}

// What one optimizer step measured
typedef struct {
    LossTerms sum;            // loss and its terms, the mean over micro-batches; tokens summed
    double f_nll, r_nll, r_kl; // means over the micro-batches that computed them, or NAN
    double gnorm;
    float lr;
    double tok_s, elapsed, eta;
    double ef, er;            // eval forget / retain NLL this step, or NAN
} StepStats;

static double mean_or_nan(double sum, int n) { return n ? sum / n : NAN; }

// Rows [r*n, (r+1)*n) of b, n = b->B / P: rank r's share of a micro-batch
static Batch batch_share(const Batch* b, int r, int P) {
    Batch s = *b;
    s.B = b->B / P;
    size_t first = (size_t)r * s.B;
    s.inputs += first * b->T; s.targets += first * b->T; s.weights += first * b->T;
    if (b->pos) s.pos += first * b->T;
    if (b->Tt > 0) { s.trans_inputs += first * b->Tt; s.label_pos += first * b->T; }
    return s;
}

// One micro-batch of this rank into tr->grad_acc (--accum > 1) or m->grads.
// Each starts from zero gradients and the step adds them up afterwards, so
// a step is the same sum whether its micro-batches ran in one process or on
// several ranks (docs/mpi.md).
static void train_micro(Trainer* tr, int a, int micros, LossTerms* lt) {
    const Options* o = &tr->o;
    TrainModel* m = &tr->m;
    int P = dist_size(), r = dist_rank();
    loader_next(&tr->lf, &tr->fb);
    if (tr->has_retain) loader_next(&tr->lr, &tr->rb);
    Batch fb = batch_share(&tr->fb, r, P), rb = tr->has_retain ? batch_share(&tr->rb, r, P) : fb;
    // micro-batch a*P + r: the one a single process with --accum accum*P runs in this place
    m->dropout_seed = train_step_seed(o->co.seed, tr->step, a * P + r);
    train_zero_grads(m);
    train_objective(m, &tr->oc, &fb, tr->has_retain ? &rb : NULL, 1.0f / micros, 1, lt);
    if (!tr->grad_acc) return;
    if (a == 0) memcpy(tr->grad_acc, m->grads, m->n_params * sizeof(float));
    else for (size_t i = 0; i < m->n_params; i++) tr->grad_acc[i] += m->grads[i];
}

// Gradients of --accum micro-batches on every rank, summed over the ranks,
// clipping, one AdamW update (the same on every rank)
static void train_step(Trainer* tr, StepStats* st, int last_saved) {
    const Options* o = &tr->o;
    TrainModel* m = &tr->m;
    int micros = o->accum * dist_size();
    // loss, forget and retain term (means over the micro-batches), tokens, and the NLLs' sums and counts
    double sum[10] = {0};
    for (int a = 0; a < o->accum; a++) {
        LossTerms lt;
        train_micro(tr, a, micros, &lt);
        sum[0] += lt.loss / micros;
        sum[1] += lt.forget_term / micros;
        sum[2] += lt.retain_term / micros;
        sum[3] += lt.tokens;
        double nll[3] = {lt.forget_nll, lt.retain_nll, lt.retain_kl};
        for (int k = 0; k < 3; k++) if (!isnan(nll[k])) { sum[4 + 2 * k] += nll[k]; sum[5 + 2 * k] += 1; }
    }
    if (tr->grad_acc) memcpy(m->grads, tr->grad_acc, m->n_params * sizeof(float));
    dist_sum_floats(m->grads, m->n_params);   // the one sum of the step's gradients over the ranks
    dist_sum_doubles(sum, 10);
    st->sum = (LossTerms){.loss = sum[0], .forget_term = sum[1], .retain_term = sum[2], .tokens = sum[3]};
    double fn = sum[4], rn = sum[6], rk = sum[8];
    int nfn = (int)sum[5], nrn = (int)sum[7], nrk = (int)sum[9];
    st->f_nll = mean_or_nan(fn, nfn); st->r_nll = mean_or_nan(rn, nrn); st->r_kl = mean_or_nan(rk, nrk);
    st->gnorm = train_grad_norm(m);
    if (!isfinite(st->sum.loss) || !isfinite(st->gnorm)) {
        fclose(tr->log);
        char kept[1024];
        if (last_saved > 0 || o->resume)
            snprintf(kept, sizeof(kept), "the last good checkpoint (step %d) is kept in %s", last_saved, o->co.out);
        else snprintf(kept, sizeof(kept), "no checkpoint had been saved yet (see --save-every)");
        dist_fail("the loss is %s at step %d (grad norm %g): training stopped, %s",
            isfinite(st->sum.loss) ? "finite but the gradient is not" : "NaN or Inf", tr->step + 1, st->gnorm, kept);
    }
    if (o->clip > 0 && st->gnorm > o->clip) train_scale_grads(m, (float)(o->clip / (st->gnorm + 1e-6)));
    st->lr = lr_at(o, tr->step);
    train_adamw(m, st->lr, o->b1, o->b2, o->eps, o->wd, tr->step + 1);
    tr->step++;
}

// Every --eval-every steps: the eval NLLs; returns 1 when the stop level is reached
static int eval_step(Trainer* tr, StepStats* st) {
    const Options* o = &tr->o;
    st->ef = st->er = NAN;
    if (!o->eval_every || (tr->step % o->eval_every != 0 && tr->step != o->steps)) return 0;
    st->ef = train_eval_nll(&tr->m, &tr->forget, o->eval_rows, &tr->eb);
    if (tr->has_retain) st->er = train_eval_nll(&tr->m, &tr->retain, o->eval_rows, &tr->eb);
    printf("eval step %d | forget nll %.4f", tr->step, st->ef);
    if (tr->has_retain) printf(" | retain nll %.4f", st->er);
    if (!isnan(tr->stop_level)) printf(" | stop level %.4f", tr->stop_level);
    printf("\n");
    return !isnan(tr->stop_level) && st->ef >= tr->stop_level;
}

// The progress line (every --log-every steps) and the CSV row (every step)
static void report_step(Trainer* tr, const StepStats* st, double ema_tok_s, int force) {
    const Options* o = &tr->o;
    int obj = o->objective;
    if (tr->step % o->log_every == 0 || tr->step == o->steps || force) {
        char eta_s[32];
        format_eta(eta_s, sizeof(eta_s), st->eta);
        printf("step %d/%d | loss %.4f", tr->step, o->steps, st->sum.loss);
        if (!isnan(st->f_nll)) printf(" | forget nll %.4f", st->f_nll);
        if (!isnan(st->r_nll)) printf(" | retain nll %.4f", st->r_nll);
        if (!isnan(st->r_kl)) printf(" | retain kl %.4f", fmax(st->r_kl, 0.0)); // >= 0 up to rounding
        if (obj == OBJ_RMU || obj == OBJ_NPO || obj == OBJ_SIMNPO || obj == OBJ_WHP)
            printf(" | forget term %.4f", st->sum.forget_term);
        if (obj == OBJ_RMU) printf(" | retain term %.4f", st->sum.retain_term);
        printf(" | gnorm %.3f | lr %.2e | %.0f tok/s | ETA %s\n", st->gnorm, st->lr, ema_tok_s, eta_s);
        fflush(stdout);
    }
    FILE* log = tr->log;
    fprintf(log, "%d", tr->step);
    csv_field(log, st->sum.loss); csv_field(log, st->sum.forget_term); csv_field(log, st->sum.retain_term);
    csv_field(log, st->f_nll); csv_field(log, st->r_nll); csv_field(log, st->r_kl); csv_field(log, st->gnorm);
    csv_field(log, st->lr); csv_field(log, st->tok_s); csv_field(log, st->elapsed); csv_field(log, st->eta);
    csv_field(log, st->ef); csv_field(log, st->er);
    fprintf(log, "\n");
    fflush(log);
}

// Steps until --steps, the stop level, or --halt-after; checkpoints on the
// way. Returns the steps this run made.
static int train_loop(Trainer* tr) {
    const Options* o = &tr->o;
    long t_start = time_in_ms();
    int steps_run = 0, last_saved = tr->step;
    double ema_tok_s = 0.0;
    while (tr->step < o->steps) {
        long t0 = time_in_ms();
        StepStats st;
        train_step(tr, &st, last_saved);
        steps_run++;
        long t1 = time_in_ms();
        double dt = (t1 - t0) / 1000.0;
        st.tok_s = dt > 0 ? st.sum.tokens / dt : 0.0;
        ema_tok_s = steps_run == 1 ? st.tok_s : 0.9 * ema_tok_s + 0.1 * st.tok_s;
        st.elapsed = (t1 - t_start) / 1000.0;
        st.eta = st.elapsed / steps_run * (o->steps - tr->step);
        int stop = eval_step(tr, &st);
        report_step(tr, &st, ema_tok_s, stop);
        int halt = o->halt_after > 0 && steps_run >= o->halt_after;
        if ((o->save_every && tr->step % o->save_every == 0) || tr->step == o->steps || stop || halt) {
            checkpoint(tr);
            last_saved = tr->step;
        }
        if (stop) { printf("early stop at step %d: eval forget NLL %.4f >= %.4f\n", tr->step, st.ef, tr->stop_level); break; }
        if (halt) { printf("halted after %d steps (resume with --resume)\n", steps_run); break; }
    }
    if (steps_run == 0) checkpoint(tr);
    return steps_run;
}

static void trainer_free(Trainer* tr) {
    batch_free(&tr->fb);
    if (tr->has_retain) { batch_free(&tr->rb); free(tr->lr.perm); dataset_free(&tr->retain); }
    batch_free(&tr->eb);
    free(tr->lf.perm);
    dataset_free(&tr->forget);
    free(tr->oc.rmu_u);
    if (tr->o.reinforced_path) free_lora(&tr->reinforced);
    free(tr->state_path); free(tr->log_path); free(tr->grad_acc);
    train_model_free(&tr->m);
    free_tokenizer(&tr->tok);
}

// ----------------------------------------------------------------------------
// Under mpirun: the ranks must start from the same model, options, data and
// trainable state, or their sums would mix different runs. Checked before
// the first step; a difference stops every rank with one error.

static uint64_t hash_dataset(uint64_t h, const Dataset* d) {
    int32_t shape[3] = {d->n, d->T, d->Tt};
    h = dist_hash(h, shape, sizeof(shape));
    h = dist_hash(h, d->tokens, (size_t)d->n * (d->T + 1) * sizeof(int));
    h = dist_hash(h, d->weights, (size_t)d->n * d->T * sizeof(float));
    if (d->pos) h = dist_hash(h, d->pos, (size_t)d->n * d->T * sizeof(int));
    if (d->Tt) h = dist_hash(h, d->trans, (size_t)d->n * d->Tt * sizeof(int));
    return h;
}

static void check_ranks_agree(const Trainer* tr) {
    const Options* o = &tr->o;
    const TrainModel* m = &tr->m;
    uint64_t h = dist_hash(DIST_HASH_INIT, &m->config, sizeof(m->config));
    if (m->file) h = dist_hash_sampled(h, m->file->data, m->file->file_size);
    dist_check_same(h, "the model file (its header, size or weights)");
    int32_t iv[] = {o->B, o->B_retain, o->accum, o->steps, o->T, o->objective, o->retain_loss, o->warmup, o->cosine,
                    o->save_every, o->eval_every, o->eval_rows, o->halt_after, o->pack, o->rmu_layer};
    float fv[] = {o->lr, o->min_lr_frac, o->wd, o->b1, o->b2, o->eps, o->clip, o->gamma, o->lambda, o->beta, o->delta,
                  o->dropout, o->rmu_c, o->rmu_alpha, o->whp_alpha, tr->stop_level};
    h = dist_hash(dist_hash(dist_hash(DIST_HASH_INIT, iv, sizeof(iv)), fv, sizeof(fv)), &o->co.seed, sizeof(o->co.seed));
    dist_check_same(h, "the training options");
    h = hash_dataset(DIST_HASH_INIT, &tr->forget);
    if (tr->has_retain) h = hash_dataset(h, &tr->retain);
    dist_check_same(h, "the data (--forget, --retain, the tokenizer)");
    int32_t lv[] = {m->full, m->lora.rank, m->lora.target_mask, m->lora.layer_begin, m->lora.layer_end, tr->step,
                    tr->lf.epoch, tr->lf.cursor};
    h = dist_hash(DIST_HASH_INIT, lv, sizeof(lv));
    h = dist_hash(h, &m->n_params, sizeof(m->n_params));
    h = dist_hash_sampled(h, m->params, m->n_params * sizeof(float));
    h = dist_hash_sampled(h, m->adam_m, m->n_params * sizeof(float));
    dist_check_same(h, "the trainable parameters (adapter shape, --adapter-init, the --resume state)");
}

// --batch and --retain-batch are the rows of a micro-batch over all ranks
static void check_shares(const Options* o) {
    int P = dist_size();
    if (o->B % P || o->B_retain % P)
        dist_fail("--batch %d and --retain-batch %d must be multiples of the %d MPI ranks", o->B, o->B_retain, P);
}

// Under mpirun: the cost of the step's sum over the ranks
static void report_sums(const Trainer* tr, int steps_run) {
    double seconds, wait, bytes;
    dist_sum_stats(&seconds, &wait, &bytes);
    if (dist_size() == 1 || steps_run == 0) return;
    printf("allreduce: %d ranks, %.2f ms per step, %.0f bytes per step (%zu parameters), after %.2f ms per step "
           "waiting for the slowest rank\n", dist_size(), 1000.0 * seconds / steps_run, bytes / steps_run,
           tr->m.n_params, 1000.0 * wait / steps_run);
}

static int train_cmd(int argc, char** argv) {
    static Trainer tr; // zeroed: what a run does not use stays empty for trainer_free
    parse_options(&tr.o, argc, argv);
    dist_init(&argc, &argv);
    check_shares(&tr.o);
    build_tokenizer(&tr.tok, tr.o.co.tokenizer);
    load_model(&tr);
    setup_trainable(&tr);
    setup_objective(&tr);
    load_data(&tr);
    if (tr.o.dump_rows) { dump_rows(&tr.forget, &tr.tok, tr.o.dump_rows); dist_finalize(); exit(EXIT_SUCCESS); }
    alloc_buffers(&tr);
    open_state(&tr);
    setup_stopping(&tr);
    check_ranks_agree(&tr);
    open_log(&tr);
    int steps_run = train_loop(&tr);
    fclose(tr.log);
    report_sums(&tr, steps_run);
    printf("saved %s (%s) at step %d; log %s\n", tr.o.co.out, tr.m.full ? "model" : "adapter", tr.step, tr.log_path);
    trainer_free(&tr);
    dist_finalize();
    return 0;
}

// ----------------------------------------------------------------------------
// merge and eval, and the subcommand table

static void usage_merge(const CommonOpts* co) {
    printf("Usage: train_lora merge MODEL.bin --lora ADAPTER -o OUT.bin [--int8]   merge an adapter into a model file\n");
    cli_print_common(stdout, co);
    printf("  --int8           write OUT.bin in int8 (Q8_0; default fp32)\n");
    cli_print_help_flag(stdout);
    exit(EXIT_SUCCESS);
}

static int merge_cmd(int argc, char** argv) {
    CommonOpts co = {.accepts = CLI_LORA | CLI_OUT, .out_help = "the merged model file, required",
                     .lora_help = "the adapter to merge, required"};
    int int8 = 0;
    for (int i = cli_model(&co, argc, argv); i < argc; i++) {
        if (cli_is_help(argv[i])) usage_merge(&co);
        if (cli_common(&co, argc, argv, &i)) continue;
        if (!strcmp(argv[i], "--int8")) int8 = 1;
        else cli_unknown(argv[i]);
    }
    cli_need(co.model != NULL, "merge", "a model file (MODEL.bin)");
    cli_need(co.lora != NULL, "merge", "--lora ADAPTER");
    cli_need(co.out != NULL, "merge", "-o OUT.bin");
    long t0 = time_in_ms();
    if (merge_model(co.model, co.lora, co.out, int8 ? WEIGHT_Q8 : WEIGHT_FP32) != 0) die("cannot write %s: %s", co.out, strerror(errno));
    printf("merged %s into %s -> %s (%s, %.1fs)\n", co.lora, co.model, co.out, int8 ? "int8" : "fp32",
           (time_in_ms() - t0) / 1000.0);
    return 0;
}

// the shared harness with the trained adapter applied (--lora ADAPTER)
static int eval_cmd(int argc, char** argv) {
    EvalMethod m = {.prog = "train_lora", .kind = "lora"};
    return eval_main(argc, argv, &m);
}

static const Command COMMANDS[] = {
    {"train", train_cmd, "train a LoRA adapter (or every weight, --full) with an unlearning objective"},
    {"merge", merge_cmd, "merge an adapter into a model file (fp32 or int8)"},
    {"eval", eval_cmd, "the shared evaluation harness with an adapter (--lora)"},
};

int main(int argc, char** argv) {
    const char* about = "machine unlearning by LoRA or full training";
    return cli_dispatch("train_lora", about, COMMANDS, sizeof(COMMANDS) / sizeof(COMMANDS[0]), argc, argv);
}
