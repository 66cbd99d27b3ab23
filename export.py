#!/usr/bin/env python3
"""export.py -- the Python side of unlearn.c (Python 3 + numpy only).

Subcommands:

  model HF_DIR OUT.bin [--int8] [--group-size 64]
      Convert a Hugging Face LlamaForCausalLM checkpoint (config.json plus
      model.safetensors, or sharded model-*.safetensors with an index) into
      the binary model file documented in run.h. Streams: one tensor (or a
      slice of rows) is in memory at a time, so Llama-3-8B fits in 24 GiB.
  synth OUT_DIR --preset NAME [--seed 0] [--tokenizer tokenizer.json]
      Write a deterministic random checkpoint in exact HF layout (two bf16
      shards + index, config.json, generation_config.json, tokenizer.json).
      Presets: tiny-3.2, tiny-3.0, llama-3.2-1b, llama-3.2-1b-32k (the
      benchmark's 32000-vocab shape), llama-3-8b.
  ref HF_DIR OUT.ref --ids 128000,791,... [--no-rope-scaling]
      An independent numpy forward pass that follows Hugging Face's
      modeling_llama.py (full-sequence matrices, no KV cache), fp32 throughout.
      Writes the reference dump below, which the C tests compare against.
  refdiff A.ref B.ref [--expect-above X]
      Max |logit difference| / row std between two dumps of the same tokens
      (exit 1 when it is not above X).
  inspect FILE.bin [--hf HF_DIR]
      Print a model file's header, check its exact size; with --hf, compare
      every tensor (dequantized) with the checkpoint it came from.
  tokenizer TOKENIZER_JSON OUT.tok
      Convert tokenizer.json into run.h's tokenizer file (tok_export.py).

Reference dump format (little-endian), written by `ref`:

  uint32  magic = 0x46524c55 ("ULRF" as bytes)
  int32   version = 1
  int32   n_pos, vocab_size, n_cols
  int32   tokens[n_pos]              the ids fed, BOS first
  int32   cols[n_cols]               sorted, distinct vocabulary ids kept
  float32 logits[n_pos, n_cols]      logits at those columns
  float32 row_std[n_pos]             population std (ddof 0) of the FULL row
  float32 row_max[n_pos]             max of the full row
  float32 row_logsumexp[n_pos]       log(sum(exp(row))) of the full row
  int32   row_argmax[n_pos]          first index of the max of the full row

The kept columns are every id in tokens, REF_RANDOM_COLS ids drawn with a
fixed seed, and each row's top-8 ids. So a dump stays small (about 1 MB) while
the statistics still check all 128256 columns (the C side computes the same
std / max / logsumexp / argmax over its own full rows and compares).
"""
import argparse
import json
import math
import os
import struct
import sys
import time
import zlib

import numpy as np

MODEL_MAGIC = 0x33434C55       # "ULC3"
MODEL_VERSION = 1
HEADER_BYTES = 256
ALIGN = 64
MAX_EOS = 8
# run.h header, offsets 0..119: these fields in order, then int32 eos_ids[8]
HEADER_FIELDS = ["magic", "version", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
                 "head_dim", "vocab_size", "max_seq_len", "rope_theta", "rope_scaling",
                 "rope_factor", "rope_low", "rope_high", "rope_orig", "norm_eps", "tied",
                 "weight_type", "group_size", "bos_id", "n_eos"]
HEADER_FMT = "<I9ifi3fifiiiii8i"
assert struct.calcsize(HEADER_FMT) == 120

REF_MAGIC = 0x46524C55         # "ULRF"
REF_VERSION = 1
REF_RANDOM_COLS = 1024
REF_COL_SEED = 1234
REF_TOPK = 8

CHUNK_ELEMS = 1 << 22          # rows are processed in slices of ~4M values


def die(msg):
    """One clear line on stderr and exit 1: used for every refused input."""
    print("export.py: error: " + msg, file=sys.stderr)
    sys.exit(1)


def align(n, a=ALIGN):
    return (n + a - 1) // a * a


def row_chunks(rows, cols):
    """Fixed [r0, r1) slices of about CHUNK_ELEMS values. Synth depends on
    these exact slices for its random stream, so never make them adaptive."""
    step = max(1, CHUNK_ELEMS // max(1, cols))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


# ----------------------------------------------------------------------------
# bf16 and safetensors
#
# A safetensors file is: uint64 little-endian header length N, N bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ..}
# then the raw tensor bytes; offsets are relative to the end of the header.

ST_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}


def bf16_to_f32(u16):
    """bf16 is the top half of an fp32, so widening is a 16-bit shift."""
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x):
    """Round-to-nearest-even fp32 -> bf16 (as uint16), like torch's cast."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def read_safetensors_header(path):
    """{name: (dtype string, shape tuple, absolute byte offset)} of one file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if info["dtype"] in ST_DTYPES:   # other dtypes are refused only if read
            itemsize = np.dtype(ST_DTYPES[info["dtype"]]).itemsize
            if end - begin != itemsize * int(np.prod(shape, dtype=np.int64)):
                die("%s: tensor %s has inconsistent offsets" % (path, name))
        out[name] = (info["dtype"], shape, 8 + n + begin)
    return out


class Checkpoint:
    """A HF checkpoint directory. Tensors are read on demand through a fresh
    np.memmap per call (unmapped right after), so only what is asked for is
    ever resident, whatever the size of the model."""

    def __init__(self, hf_dir):
        self.dir = hf_dir
        self.config = load_json(os.path.join(hf_dir, "config.json"), required=True)
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.exists(index):
            files = sorted(set(load_json(index)["weight_map"].values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            die("%s: no model.safetensors or model.safetensors.index.json" % hf_dir)
        self.tensors = {}   # name -> (path, dtype, shape, offset)
        for fn in files:
            path = os.path.join(hf_dir, fn)
            for name, (dt, shape, off) in read_safetensors_header(path).items():
                self.tensors[name] = (path, dt, shape, off)

    def shape(self, name):
        if name not in self.tensors:
            die("missing tensor %s in %s" % (name, self.dir))
        return self.tensors[name][2]

    def rows(self, name, r0=0, r1=None):
        """fp32 copy of rows [r0, r1) of a 2-D tensor (all of a 1-D one)."""
        self.shape(name)   # dies when missing
        path, dt, shape, off = self.tensors[name]
        if dt not in ST_DTYPES:
            die("tensor %s has unsupported dtype %s (BF16, F16, F32 only)" % (name, dt))
        if len(shape) == 1:
            r0, r1, cols = 0, 1, shape[0]
        else:
            cols = shape[1]
            r1 = shape[0] if r1 is None else r1
        dtype = np.dtype(ST_DTYPES[dt])
        mm = np.memmap(path, dtype=dtype, mode="r", offset=off + r0 * cols * dtype.itemsize,
                       shape=(r1 - r0, cols))
        out = bf16_to_f32(mm) if dt == "BF16" else mm.astype(np.float32)
        del mm
        return out.reshape(shape) if len(shape) == 1 else out

    def tensor(self, name):
        return self.rows(name)


def load_json(path, required=False):
    if not os.path.exists(path):
        if required:
            die("%s not found" % path)
        return None
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------
# Config: HF config.json -> the run.h header fields

def model_config(hf_dir, hf):
    """Validate a HF config and return the run.h header fields as a dict."""
    arch = hf.get("architectures") or []
    if "LlamaForCausalLM" not in arch and hf.get("model_type") != "llama":
        die("unsupported architecture %s (only LlamaForCausalLM)" % (arch or hf.get("model_type")))
    if hf.get("hidden_act", "silu") != "silu":
        die("unsupported hidden_act %s" % hf.get("hidden_act"))
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        die("attention/mlp biases are not supported")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    c = dict(dim=dim, hidden_dim=hf["intermediate_size"], n_layers=hf["num_hidden_layers"],
             n_heads=heads, n_kv_heads=hf.get("num_key_value_heads", heads),
             head_dim=hf.get("head_dim") or dim // heads, vocab_size=hf["vocab_size"],
             max_seq_len=hf.get("max_position_embeddings", 8192),
             rope_theta=float(hf.get("rope_theta", 10000.0)), rope_scaling=0, rope_factor=0.0,
             rope_low=0.0, rope_high=0.0, rope_orig=0, norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
             tied=int(bool(hf.get("tie_word_embeddings", False))))
    if c["n_heads"] % c["n_kv_heads"] or c["head_dim"] % 2:
        die("n_heads must be a multiple of n_kv_heads and head_dim even")
    rs = hf.get("rope_scaling")
    if rs is not None:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "llama3":
            c.update(rope_scaling=1, rope_factor=float(rs["factor"]),
                     rope_low=float(rs["low_freq_factor"]), rope_high=float(rs["high_freq_factor"]),
                     rope_orig=int(rs["original_max_position_embeddings"]))
        elif kind != "default":
            die("unsupported rope_scaling type %r (only llama3 or none)" % kind)
    # special ids: config.json, merged with generation_config.json's eos list
    gen = load_json(os.path.join(hf_dir, "generation_config.json")) or {}
    bos = hf.get("bos_token_id")
    bos = gen.get("bos_token_id") if bos is None else bos
    if bos is None:
        die("no bos_token_id in config.json or generation_config.json")
    eos = []
    for v in (hf.get("eos_token_id"), gen.get("eos_token_id")):
        for e in (v if isinstance(v, list) else [] if v is None else [v]):
            if e not in eos:
                eos.append(int(e))
    if not 1 <= len(eos) <= MAX_EOS:
        die("need 1..%d eos ids, got %s" % (MAX_EOS, eos))
    c.update(bos_id=int(bos), eos_ids=eos)
    return c


def pack_header(c, weight_type, group_size):
    """The 256-byte run.h header. Unused eos slots hold -1; rope fields are 0
    when there is no scaling."""
    c = dict(c, magic=MODEL_MAGIC, version=MODEL_VERSION, weight_type=weight_type,
             group_size=group_size, n_eos=len(c["eos_ids"]))
    eos = c["eos_ids"] + [-1] * (MAX_EOS - len(c["eos_ids"]))
    h = struct.pack(HEADER_FMT, *[c[k] for k in HEADER_FIELDS], *eos)
    return h + bytes(HEADER_BYTES - len(h))


def unpack_header(b):
    """The inverse of pack_header (weight_type and group_size included)."""
    v = struct.unpack(HEADER_FMT, b[:120])
    c = dict(zip(HEADER_FIELDS, v[:len(HEADER_FIELDS)]))
    c["eos_ids"] = list(v[len(HEADER_FIELDS):][:max(0, min(MAX_EOS, c["n_eos"]))])
    return c


def layout(c, q8, gs):
    """The tensors of a model file in run.h order, with their byte offsets.
    Returns (list of dicts, exact file size; every block, the last one
    included, is padded to a multiple of 64 bytes, as engine.c's
    model_file_size counts). Each dict: name, hf (HF name pattern, {i} =
    layer), n (stacked layers), rows, cols, matrix (bool), off (fp32 data or
    int8 q), soff (Q8_0 scales, matrices only)."""
    d, hd, L = c["dim"], c["head_dim"], c["n_layers"]
    qd, kvd = c["n_heads"] * hd, c["n_kv_heads"] * hd
    p = "model.layers.{i}."
    spec = [("token_embedding", "model.embed_tokens.weight", 1, c["vocab_size"], d, True),
            ("rms_att", p + "input_layernorm.weight", L, 1, d, False),
            ("wq", p + "self_attn.q_proj.weight", L, qd, d, True),
            ("wk", p + "self_attn.k_proj.weight", L, kvd, d, True),
            ("wv", p + "self_attn.v_proj.weight", L, kvd, d, True),
            ("wo", p + "self_attn.o_proj.weight", L, d, qd, True),
            ("rms_ffn", p + "post_attention_layernorm.weight", L, 1, d, False),
            ("w_gate", p + "mlp.gate_proj.weight", L, c["hidden_dim"], d, True),
            ("w_up", p + "mlp.up_proj.weight", L, c["hidden_dim"], d, True),
            ("w_down", p + "mlp.down_proj.weight", L, d, c["hidden_dim"], True),
            ("rms_final", "model.norm.weight", 1, 1, d, False)]
    if not c["tied"]:
        spec.append(("wcls", "lm_head.weight", 1, c["vocab_size"], d, True))
    out, off = [], HEADER_BYTES
    for name, hf, n, rows, cols, matrix in spec:
        t = dict(name=name, hf=hf, n=n, rows=rows, cols=cols, matrix=matrix, off=align(off))
        count = n * rows * cols
        if matrix and q8:
            t["soff"] = align(t["off"] + count)
            off = t["soff"] + count // gs * 4
        else:
            off = t["off"] + count * 4
        out.append(t)
    return out, align(off)   # the last tensor is padded to 64 bytes too


# ----------------------------------------------------------------------------
# model: HF checkpoint -> run.h model file

def quantize_q8(w, gs):
    """Q8_0 of w (rows, cols): groups of gs along each row, scale = max|w|/127,
    q = round(w / scale) (half to even) in [-127, 127]; an all-zero group gets
    scale 0 and q 0. Returns q int8 (rows, cols), s fp32 (rows, cols/gs)."""
    g = w.reshape(w.shape[0], -1, gs)                                 # (rows, groups, gs)
    s = (np.abs(g).max(axis=2) / np.float32(127.0)).astype(np.float32)  # (rows, groups)
    safe = np.where(s > 0, s, np.float32(1.0))[:, :, None]
    q = np.clip(np.rint(g / safe), -127, 127).astype(np.int8)
    return q.reshape(w.shape), s


def export_model(args):
    ck = Checkpoint(args.hf_dir)
    c = model_config(args.hf_dir, ck.config)
    q8, gs = args.int8, args.group_size if args.int8 else 0
    if q8:
        for n in (c["dim"], c["hidden_dim"], c["n_heads"] * c["head_dim"]):
            if gs <= 0 or n % gs:
                die("matrix width %d is not a multiple of group size %d" % (n, gs))
    tensors, total = layout(c, q8, gs)
    for t in tensors:   # check every tensor before writing anything
        for i in range(t["n"]):
            name = t["hf"].format(i=i)
            want = (t["cols"],) if not t["matrix"] else (t["rows"], t["cols"])
            if ck.shape(name) != want:
                die("tensor %s has shape %s, expected %s" % (name, ck.shape(name), want))
            if ck.tensors[name][1] not in ST_DTYPES:
                die("tensor %s has unsupported dtype %s" % (name, ck.tensors[name][1]))
    tmp = args.out + ".tmp"
    t_start = time.time()
    try:
        with open(tmp, "wb") as f:
            f.write(pack_header(c, int(q8), gs))
            for t in tensors:
                write_tensor(f, ck, t, q8, gs)
                shape = "[%d, %d]" % (t["rows"], t["cols"]) if t["matrix"] else "[%d]" % t["cols"]
                print("%-16s %2d x %-14s %s  %.1fs" % (t["name"], t["n"], shape,
                      "q8_0" if q8 and t["matrix"] else "fp32", time.time() - t_start), flush=True)
            f.truncate(total)   # gaps between tensors read back as zeros
        if os.path.getsize(tmp) != total:
            die("internal error: wrote %d bytes, expected %d" % (os.path.getsize(tmp), total))
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print("wrote %s (%d bytes, %.1fs)" % (args.out, total, time.time() - t_start))


def write_tensor(f, ck, t, q8, gs):
    """Stream one (stacked) tensor into place, layer by layer and row slice by
    row slice. Q8_0 matrices put the int8 values of all layers first, then
    all scales, so each write seeks to its own spot in the two blocks."""
    rows, cols = t["rows"], t["cols"]
    for i in range(t["n"]):
        name = t["hf"].format(i=i)
        for r0, r1 in row_chunks(rows, cols):
            w = ck.rows(name, r0, r1).reshape(r1 - r0, cols)   # (r1-r0, cols) fp32
            first = i * rows + r0                              # row index in the stacked tensor
            if q8 and t["matrix"]:
                q, s = quantize_q8(w, gs)
                f.seek(t["off"] + first * cols)
                f.write(q.tobytes())
                f.seek(t["soff"] + first * (cols // gs) * 4)
                f.write(s.tobytes())
            else:
                f.seek(t["off"] + first * cols * 4)
                f.write(w.astype("<f4").tobytes())


# ----------------------------------------------------------------------------
# inspect: read a model file back

def inspect_model(args):
    size = os.path.getsize(args.file)
    with open(args.file, "rb") as f:
        c = unpack_header(f.read(HEADER_BYTES))
    for k, v in c.items():
        print("%-16s %s" % (k, hex(v) if k == "magic" else v))
    if c["magic"] != MODEL_MAGIC or c["version"] != MODEL_VERSION:
        die("bad magic/version")
    q8, gs = c["weight_type"] == 1, c["group_size"]
    tensors, total = layout(c, q8, gs)
    for t in tensors:
        print("%-16s %2d x [%6d, %5d] at %d%s" % (t["name"], t["n"], t["rows"], t["cols"], t["off"],
              " (scales at %d)" % t["soff"] if "soff" in t else ""))
    print("file size %d, expected %d: %s" % (size, total, "OK" if size == total else "MISMATCH"))
    if size != total:
        sys.exit(1)
    if args.hf:
        compare_with_checkpoint(args.file, Checkpoint(args.hf), tensors, q8, gs)


def compare_with_checkpoint(path, ck, tensors, q8, gs):
    """Dequantize every tensor of the file and compare with the checkpoint:
    fp32 must be bit-exact, Q8_0 within half a quantization step."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for t in tensors:
        rows, cols, n = t["rows"], t["cols"], t["n"]
        worst = 0.0
        for i in range(n):
            w = ck.tensor(t["hf"].format(i=i)).reshape(rows, cols)
            if q8 and t["matrix"]:
                q = mm[t["off"] + i * rows * cols:][:rows * cols].view(np.int8).reshape(rows, -1, gs)
                sb = t["soff"] + i * rows * (cols // gs) * 4
                s = mm[sb:sb + rows * (cols // gs) * 4].view(np.float32).reshape(rows, -1, 1)
                err = np.abs(q * s - w.reshape(rows, -1, gs)) / np.maximum(s, 1e-30)
                worst = max(worst, float(err.max()))   # in units of the scale
                full = np.abs(q).max(axis=2, keepdims=True) == 127   # scale = max|w| / 127
                ok = worst <= 0.5 + 1e-3 and bool(np.all(full | (s == 0)))
            else:
                b = t["off"] + i * rows * cols * 4
                got = mm[b:b + rows * cols * 4].view(np.float32).reshape(rows, cols)
                worst = max(worst, float(np.abs(got - w).max()))
                ok = worst == 0.0
        print("%-16s max error %g%s %s" % (t["name"], worst, " scales" if q8 and t["matrix"] else "",
                                           "OK" if ok else "FAIL"))
        if not ok:
            sys.exit(1)


# ----------------------------------------------------------------------------
# synth: deterministic random checkpoints in exact HF layout

PRESETS = {
    # tiny Llama-3.2: GQA, tied, llama3 scaling. original_max_position_embeddings
    # is 64 (the real one is 8192) so that, with theta 500000 and head_dim 32,
    # 13 of the 16 rotary frequencies are divided by 32 and one is smoothed:
    # the scaling then changes logits clearly within a 150-200 token prompt.
    "tiny-3.2": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     tie_word_embeddings=True, max_position_embeddings=4096,
                     rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=64, rope_type="llama3")),
    # tiny Llama-3.0: MHA, untied lm_head, no scaling.
    "tiny-3.0": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                     tie_word_embeddings=False, max_position_embeddings=2048, rope_scaling=None),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         tie_word_embeddings=True, max_position_embeddings=131072,
                         rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192,
                                           rope_type="llama3")),
    # the benchmark's comparison shape (make bench): Llama-3.2-1B's dims
    # with a Llama-2-sized 32000 vocab, 1.04B parameters. No Llama-3
    # tokenizer fits it, so its special ids are Llama-2's (bos 1, eos 2).
    "llama-3.2-1b-32k": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                             tie_word_embeddings=True, max_position_embeddings=131072,
                             rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=8192,
                                               rope_type="llama3"),
                             vocab_size=32000, bos_token_id=1, eos_token_id=[2]),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       tie_word_embeddings=False, max_position_embeddings=8192, rope_scaling=None),
}
LLAMA3_EOS = [128001, 128008, 128009]
# std of each kind of synthetic weight, divided by sqrt(fan_in) for matrices
# (see synth_specs for why)
SYNTH_STD = {"tied_embed": 6.0, "embed": 12.0, "lm": 6.0, "mat": 1.0, "norm": 0.2}


def synth_config(preset):
    """config.json and generation_config.json of a preset. Llama-3.0-like
    presets put a single eos id in config.json and the list in
    generation_config.json, as Meta-Llama-3-8B-Instruct does, so the export
    has to merge both."""
    p = PRESETS[preset]
    v30 = p["rope_scaling"] is None
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False,
               attention_dropout=0.0, bos_token_id=128000,
               eos_token_id=128001 if v30 else LLAMA3_EOS, hidden_act="silu",
               initializer_range=0.02, mlp_bias=False, pretraining_tp=1, rms_norm_eps=1e-5,
               rope_theta=500000.0, torch_dtype="bfloat16", transformers_version="4.45.0",
               use_cache=True, vocab_size=128256)
    cfg.update(p)   # a preset may override the vocab and its special ids
    gen = dict(bos_token_id=cfg["bos_token_id"], eos_token_id=p.get("eos_token_id", LLAMA3_EOS),
               do_sample=True, temperature=0.6, top_p=0.9, transformers_version="4.45.0")
    return cfg, gen


def synth_specs(cfg):
    """[(HF name, shape, kind)] in HF order. kind picks the initialisation:
    every matrix is N(0, k^2 / fan_in) (fan_in = row length), k = SYNTH_STD.
      mat         k = 1   q, k, v, o, gate, up, down: unit scale per element
                          through every projection; attention scores q.k /
                          sqrt(head_dim) have std about 1, sharp enough that
                          positions (RoPE, llama3 scaling) change the logits
      lm          k = 6   logits = normed h . row have std about 6 whatever
      tied_embed  k = 6   dim is (tied: the embedding is the classifier)
      embed       k = 12  untied: the current token makes up most of the
                          residual stream, so predictions are confident
      norm        1 + N(0, 0.2^2): not all ones, so a missing, swapped or
                          "1 + w" norm weight changes the logits
    Why confident: with 128256 Gaussian-like logits the top two are close,
    and int8 rounding would flip the argmax often. With these values the
    int8 model agrees with fp32 on the argmax at ~97-98% of the positions of
    the reference prompt. Tied models predict mostly the current token (its
    embedding is in the residual and is its classifier row), as random
    tied models do."""
    d, hid, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    qd, kvd = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    tied = cfg["tie_word_embeddings"]
    specs = [("model.embed_tokens.weight", (cfg["vocab_size"], d), "tied_embed" if tied else "embed")]
    for i in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % i
        specs += [(p + "input_layernorm.weight", (d,), "norm"),
                  (p + "self_attn.q_proj.weight", (qd, d), "mat"),
                  (p + "self_attn.k_proj.weight", (kvd, d), "mat"),
                  (p + "self_attn.v_proj.weight", (kvd, d), "mat"),
                  (p + "self_attn.o_proj.weight", (d, qd), "mat"),
                  (p + "post_attention_layernorm.weight", (d,), "norm"),
                  (p + "mlp.gate_proj.weight", (hid, d), "mat"),
                  (p + "mlp.up_proj.weight", (hid, d), "mat"),
                  (p + "mlp.down_proj.weight", (d, hid), "mat")]
    specs.append(("model.norm.weight", (d,), "norm"))
    if not tied:
        specs.append(("lm_head.weight", (cfg["vocab_size"], d), "lm"))
    return specs


def synth_rows(name, shape, kind, seed):
    """Yield the tensor as fp32 row slices. Each tensor has its own generator
    seeded from (seed, crc32(name)), and slices are fixed (row_chunks), so
    the bytes do not depend on tensor order, memory or machine."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    std = SYNTH_STD[kind] / (1.0 if kind == "norm" else math.sqrt(shape[-1]))
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    for r0, r1 in row_chunks(rows, cols):
        w = rng.standard_normal((r1 - r0, cols), dtype=np.float32) * np.float32(std)
        yield w + np.float32(1.0) if kind == "norm" else w


def write_safetensors(path, specs, seed):
    """A bf16 safetensors file, streamed: the header is known from the shapes,
    then each tensor is generated and written a slice at a time."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in specs:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)   # the format pads the JSON with spaces to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for name, shape, kind in specs:
            for w in synth_rows(name, shape, kind, seed):
                f.write(f32_to_bf16(w).astype("<u2").tobytes())
    return off


def synth(args):
    if not os.path.exists(args.tokenizer):
        die("tokenizer %s not found (use --tokenizer)" % args.tokenizer)
    cfg, gen = synth_config(args.preset)
    os.makedirs(args.out_dir, exist_ok=True)
    specs = synth_specs(cfg)
    # two shards, split after half the layers, like HF's size-based sharding
    half = 1 + 9 * ((cfg["num_hidden_layers"] + 1) // 2)
    shards = [specs[:half], specs[half:]]
    names = ["model-%05d-of-%05d.safetensors" % (k + 1, len(shards)) for k in range(len(shards))]
    t0, total, weight_map = time.time(), 0, {}
    for fn, part in zip(names, shards):
        total += write_safetensors(os.path.join(args.out_dir, fn), part, args.seed)
        weight_map.update({name: fn for name, _, _ in part})
        print("wrote %s (%d tensors, %.1fs)" % (fn, len(part), time.time() - t0), flush=True)
    for fn, obj in [("config.json", cfg), ("generation_config.json", gen),
                    ("model.safetensors.index.json",
                     {"metadata": {"total_size": total}, "weight_map": weight_map})]:
        with open(os.path.join(args.out_dir, fn), "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    from tok_export import open_json_bytes
    with open_json_bytes(args.tokenizer) as src, open(os.path.join(args.out_dir, "tokenizer.json"), "wb") as dst:
        dst.write(src.read())
    print("synth %s seed %d -> %s (%d bytes of weights, %.1fs)" % (args.preset, args.seed, args.out_dir,
                                                                total, time.time() - t0))


# ----------------------------------------------------------------------------
# tokenizer: delegated to tok_export.py

def export_tok(args):
    """`tokenizer`: the converter lives in tok_export.py (standard library only)."""
    from tok_export import export_tokenizer
    try:
        info = export_tokenizer(args.tokenizer, args.out)
    except (ValueError, OSError) as e:
        die(str(e))
    print("wrote %s: %s" % (args.out, info))



# ----------------------------------------------------------------------------
# ref: an independent numpy forward pass, Hugging Face semantics

def llama3_inv_freq(c, scaling=True):
    """Rotary inverse frequencies (head_dim/2,) as HF's rope init computes them:
    default 1/theta^(2i/d), then _compute_llama3_parameters when the config
    asks for llama3 scaling (low frequencies divided by factor, a smooth
    blend between the two wavelength thresholds). float64 math, fp32 result."""
    d = c["head_dim"]
    inv = 1.0 / (c["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if not (scaling and c["rope_scaling"] == 1):
        return inv.astype(np.float32)
    factor, low, high, old = c["rope_factor"], c["rope_low"], c["rope_high"], c["rope_orig"]
    low_freq_wavelen, high_freq_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    inv_llama = np.where(wavelen > low_freq_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, inv_llama).astype(np.float32)


def rms_norm(x, w, eps):
    """HF LlamaRMSNorm: x / sqrt(mean(x^2) + eps) * w, in fp32. x (T, dim)."""
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + np.float32(eps))).astype(np.float32) * w


def rotate_half(x):
    """(..., d) -> concat(-x[..., d/2:], x[..., :d/2])."""
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def reference_logits(ck, c, ids, scaling=True):
    """Logits (T, vocab) of LlamaForCausalLM on ids, HF style: whole sequence
    at once, causal mask, rotate_half RoPE on HF-layout q/k, repeat_kv."""
    T, hd, H, KV = len(ids), c["head_dim"], c["n_heads"], c["n_kv_heads"]
    x = ck.tensor("model.embed_tokens.weight")[np.array(ids)]           # (T, dim)
    freqs = np.arange(T, dtype=np.float32)[:, None] * llama3_inv_freq(c, scaling)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)                       # (T, hd)
    cos, sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)     # (T, T)
    W = ck.tensor   # (out, in) fp32, read from the safetensors on each use
    for i in range(c["n_layers"]):
        p = "model.layers.%d." % i
        h = rms_norm(x, W(p + "input_layernorm.weight"), c["norm_eps"])
        q = (h @ W(p + "self_attn.q_proj.weight").T).reshape(T, H, hd).transpose(1, 0, 2)   # (H, T, hd)
        k = (h @ W(p + "self_attn.k_proj.weight").T).reshape(T, KV, hd).transpose(1, 0, 2)  # (KV, T, hd)
        v = (h @ W(p + "self_attn.v_proj.weight").T).reshape(T, KV, hd).transpose(1, 0, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # repeat_kv: query head h reads kv head h // (H / KV); now (H, T, hd)
        k, v = np.repeat(k, H // KV, axis=0), np.repeat(v, H // KV, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.float32(math.sqrt(hd)) + mask  # (H, T, T)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        att = (probs @ v).transpose(1, 0, 2).reshape(T, H * hd)             # (T, H*hd)
        x = x + att @ W(p + "self_attn.o_proj.weight").T
        h = rms_norm(x, W(p + "post_attention_layernorm.weight"), c["norm_eps"])
        gate, up = h @ W(p + "mlp.gate_proj.weight").T, h @ W(p + "mlp.up_proj.weight").T  # (T, hidden)
        x = x + (gate / (np.float32(1) + np.exp(-gate)) * up) @ W(p + "mlp.down_proj.weight").T
    h = rms_norm(x, W("model.norm.weight"), c["norm_eps"])
    cls = W("model.embed_tokens.weight" if c["tied"] else "lm_head.weight")   # (vocab, dim)
    return (h @ cls.T).astype(np.float32)                                   # (T, vocab)


def write_ref(path, ids, logits):
    """The reference dump (format in the module docstring)."""
    T, V = logits.shape
    rng = np.random.default_rng(REF_COL_SEED)
    top = np.argpartition(-logits, REF_TOPK, axis=1)[:, :REF_TOPK]
    cols = np.unique(np.concatenate([np.array(ids), rng.choice(V, REF_RANDOM_COLS, replace=False),
                                     top.ravel()])).astype(np.int32)
    l64 = logits.astype(np.float64)
    mx = l64.max(axis=1)
    lse = mx + np.log(np.exp(l64 - mx[:, None]).sum(axis=1))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Iiiii", REF_MAGIC, REF_VERSION, T, V, len(cols)))
        f.write(np.asarray(ids, dtype="<i4").tobytes() + cols.astype("<i4").tobytes())
        f.write(np.ascontiguousarray(logits[:, cols]).astype("<f4").tobytes())
        for stat in (l64.std(axis=1), mx, lse):
            f.write(stat.astype("<f4").tobytes())
        f.write(logits.argmax(axis=1).astype("<i4").tobytes())
    os.replace(tmp, path)
    return len(cols)


def read_ref(path):
    with open(path, "rb") as f:
        b = f.read()
    magic, ver, T, V, C = struct.unpack("<Iiiii", b[:20])
    if magic != REF_MAGIC or ver != REF_VERSION:
        die("%s: not a reference dump" % path)
    a = np.frombuffer(b, dtype="<i4", offset=20, count=T + C)
    o = 20 + 4 * (T + C)
    logits = np.frombuffer(b, dtype="<f4", offset=o, count=T * C).reshape(T, C)
    stats = np.frombuffer(b, dtype="<f4", offset=o + 4 * T * C, count=3 * T).reshape(3, T)
    argmax = np.frombuffer(b, dtype="<i4", offset=o + 4 * T * C + 12 * T, count=T)
    if o + 4 * T * C + 16 * T != len(b):
        die("%s: wrong size" % path)
    return dict(vocab=V, tokens=a[:T], cols=a[T:], logits=logits, std=stats[0], max=stats[1],
                lse=stats[2], argmax=argmax)


def ref(args):
    ck = Checkpoint(args.hf_dir)
    c = model_config(args.hf_dir, ck.config)
    ids = [int(t) for t in args.ids.replace(",", " ").split()]
    if not ids or min(ids) < 0 or max(ids) >= c["vocab_size"]:
        die("token ids must be in [0, %d)" % c["vocab_size"])
    t0 = time.time()
    logits = reference_logits(ck, c, ids, scaling=not args.no_rope_scaling)
    n_cols = write_ref(args.out, ids, logits)
    print("ref %s: %d positions, %d columns kept, %d bytes, %.1fs" % (
        args.out, len(ids), n_cols, os.path.getsize(args.out), time.time() - t0))


def refdiff(args):
    """Compare two dumps of the same tokens on their common columns."""
    a, b = read_ref(args.a), read_ref(args.b)
    if not np.array_equal(a["tokens"], b["tokens"]):
        die("the two dumps were made from different tokens")
    common, ia, ib = np.intersect1d(a["cols"], b["cols"], return_indices=True)
    rel = np.abs(a["logits"][:, ia] - b["logits"][:, ib]) / a["std"][:, None]   # (T, n_common)
    per_pos = rel.max(axis=1)
    print("max |delta logit| / row std = %.6g (at position %d), first position above 1e-4: %s" % (
        per_pos.max(), per_pos.argmax(), next((p for p in range(len(per_pos)) if per_pos[p] > 1e-4), "none")))
    print("argmax differs at %d of %d positions" % ((a["argmax"] != b["argmax"]).sum(), len(per_pos)))
    if args.expect_above is not None and not per_pos.max() > args.expect_above:
        die("the dumps differ by less than %g row stds" % args.expect_above)


# ----------------------------------------------------------------------------

# ----------------------------------------------------------------------------
# LoRA adapters <-> Hugging Face PEFT (the adapter format is in run.h)

LORA_MAGIC = 0x414C4C55        # "ULLA"
LORA_VERSION = 1
LORA_HEADER_BYTES = 128
LORA_HEADER_FMT = "<Iiif10iq"   # magic .. vocab_size, int64 n_floats
LORA_TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj"}


def lora_io_dims(c, target):
    """(in, out) of the base matrix a target adapts, as engine.c's lora_dims."""
    q_dim, kv_dim = c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]
    return {"q": (c["dim"], q_dim), "k": (c["dim"], kv_dim), "v": (c["dim"], kv_dim),
            "o": (q_dim, c["dim"]), "gate": (c["dim"], c["hidden_dim"]),
            "up": (c["dim"], c["hidden_dim"]), "down": (c["hidden_dim"], c["dim"])}[target]


def lora_blocks(c, rank, mask, begin, end):
    """(layer, target, A shape, B shape) in the adapter payload's order."""
    for l in range(begin, end):
        for t, name in enumerate(LORA_TARGETS):
            if mask >> t & 1:
                i, o = lora_io_dims(c, name)
                yield l, name, (rank, i), (o, rank)


def peft_export(args):
    """adapter file -> adapter_model.safetensors (F32) + adapter_config.json.
    q_proj/k_proj rows are in Hugging Face's layout on both sides, so the
    tensors are copied as they are."""
    with open(args.adapter, "rb") as f:
        data = f.read()
    if len(data) < LORA_HEADER_BYTES:
        die("%s: too small to be an adapter" % args.adapter)
    (magic, version, rank, alpha, mask, begin, end, dim, hidden, n_layers, n_heads, n_kv, head_dim,
     vocab, n_floats) = struct.unpack(LORA_HEADER_FMT, data[:struct.calcsize(LORA_HEADER_FMT)])
    if magic != LORA_MAGIC or version != LORA_VERSION:
        die("%s: not an unlearn.c adapter (bad magic or version)" % args.adapter)
    if len(data) != LORA_HEADER_BYTES + 4 * n_floats:
        die("%s: size does not match its header" % args.adapter)
    c = dict(dim=dim, hidden_dim=hidden, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim)
    payload = np.frombuffer(data, dtype="<f4", offset=LORA_HEADER_BYTES)
    tensors, at = [], 0
    for l, name, a_shape, b_shape in lora_blocks(c, rank, mask, begin, end):
        prefix = "base_model.model.model.layers.%d.%s" % (l, PEFT_MODULES[name])
        for suffix, shape in (("lora_A.weight", a_shape), ("lora_B.weight", b_shape)):
            n = shape[0] * shape[1]
            tensors.append((prefix + "." + suffix, shape, payload[at:at + n]))
            at += n
    if at != n_floats:
        die("%s: payload size does not match its header" % args.adapter)
    os.makedirs(args.out_dir, exist_ok=True)
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in tensors:
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + 4 * shape[0] * shape[1]]}
        off += 4 * shape[0] * shape[1]
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    out = os.path.join(args.out_dir, "adapter_model.safetensors")
    with open(out + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for _, _, w in tensors:
            f.write(w.astype("<f4").tobytes())
    os.replace(out + ".tmp", out)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "target_modules": [PEFT_MODULES[n].split(".")[1] for t, n in enumerate(LORA_TARGETS) if mask >> t & 1],
              "layers_to_transform": list(range(begin, end)), "base_model_name_or_path": args.base or ""}
    cfg_path = os.path.join(args.out_dir, "adapter_config.json")
    with open(cfg_path + ".tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(cfg_path + ".tmp", cfg_path)
    print("wrote %s: rank %d, alpha %g, %s, layers %d-%d" % (args.out_dir, rank, alpha,
          ",".join(config["target_modules"]), begin, end - 1), file=sys.stderr)


def peft_import(args):
    """adapter_model.safetensors + adapter_config.json -> adapter file, for
    the model file given with --model (whose dims go into the header)."""
    cfg = load_json(os.path.join(args.peft_dir, "adapter_config.json"), required=True)
    if cfg.get("peft_type", "LORA") != "LORA":
        die("%s: peft_type %s is not LORA" % (args.peft_dir, cfg.get("peft_type")))
    if cfg.get("use_rslora") or cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        die("%s: rsLoRA, DoRA and per-module ranks are not supported" % args.peft_dir)
    if cfg.get("bias", "none") != "none" or cfg.get("fan_in_fan_out"):
        die("%s: LoRA biases and fan_in_fan_out are not supported" % args.peft_dir)
    with open(args.model, "rb") as f:
        c = unpack_header(f.read(HEADER_BYTES))
    if c["magic"] != MODEL_MAGIC:
        die("%s: not an unlearn.c model file" % args.model)
    st = os.path.join(args.peft_dir, "adapter_model.safetensors")
    found = read_safetensors_header(st)
    # layer -> {target: (A name, B name)}; keys look like
    # base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
    per_layer = {}
    for key in found:
        parts = key.split(".")
        if "layers" not in parts or not key.endswith(".weight") or parts[-2] not in ("lora_A", "lora_B"):
            die("%s: unexpected tensor %s" % (st, key))
        layer = int(parts[parts.index("layers") + 1])
        module = ".".join(parts[parts.index("layers") + 2:-2])
        names = [n for n, m in PEFT_MODULES.items() if m == module]
        if not names:
            die("%s: LoRA on %s is not one of q/k/v/o/gate/up/down" % (st, module))
        per_layer.setdefault(layer, {}).setdefault(names[0], {})[parts[-2]] = key
    layers = sorted(per_layer)
    targets = set(per_layer[layers[0]])
    if layers != list(range(layers[0], layers[-1] + 1)) or any(set(per_layer[l]) != targets for l in layers):
        die("%s: adapted layers must be a contiguous range with the same targets in each" % st)
    mask = sum(1 << t for t, n in enumerate(LORA_TARGETS) if n in targets)
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    out, n_floats = [], 0
    for l, name, a_shape, b_shape in lora_blocks(c, rank, mask, layers[0], layers[-1] + 1):
        for which, shape in (("lora_A", a_shape), ("lora_B", b_shape)):
            key = per_layer[l][name].get(which)
            if key is None or found[key][1] != shape:
                die("%s: %s of layer %d %s missing or not %s" % (st, which, l, name, shape))
            dt, _, off = found[key]
            mm = np.memmap(st, dtype=np.dtype(ST_DTYPES[dt]), mode="r", offset=off, shape=shape)
            w = bf16_to_f32(mm) if dt == "BF16" else mm.astype(np.float32)
            out.append(w.astype("<f4").tobytes())
            n_floats += shape[0] * shape[1]
    header = struct.pack(LORA_HEADER_FMT, LORA_MAGIC, LORA_VERSION, rank, alpha, mask, layers[0], layers[-1] + 1,
                         c["dim"], c["hidden_dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"], c["head_dim"],
                         c["vocab_size"], n_floats)
    with open(args.out + ".tmp", "wb") as f:
        f.write(header + bytes(LORA_HEADER_BYTES - len(header)))
        for b in out:
            f.write(b)
    os.replace(args.out + ".tmp", args.out)
    print("wrote %s: rank %d, alpha %g, mask %s, layers %d-%d" % (args.out, rank, alpha,
          ",".join(sorted(targets, key=LORA_TARGETS.index)), layers[0], layers[-1]), file=sys.stderr)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "sae":
        # python3 export.py sae sparsify|saelens|synth-sparsify|synth-saelens|info ...
        import sae_export
        sys.exit(sae_export.main(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def command(name, fn, help, *positional):
        p = sub.add_parser(name, help=help)
        for a in positional:
            p.add_argument(a)
        p.set_defaults(fn=fn)
        return p
    p = command("model", export_model, "HF checkpoint -> model file", "hf_dir", "out")
    p.add_argument("--int8", action="store_true", help="Q8_0 matrices (norms stay fp32)")
    p.add_argument("--group-size", type=int, default=64)
    p = command("synth", synth, "random checkpoint in HF layout", "out_dir")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--seed", type=int, default=0)
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--tokenizer", default=os.path.join(here, "tests", "llama3", "tokenizer.json.gz"),
                   help="tokenizer.json (or .json.gz) copied into the checkpoint")
    p = command("ref", ref, "numpy reference logits dump", "hf_dir", "out")
    p.add_argument("--ids", required=True, help="comma-separated token ids, BOS included")
    p.add_argument("--no-rope-scaling", action="store_true", help="ignore llama3 rope scaling")
    p = command("refdiff", refdiff, "compare two reference dumps", "a", "b")
    p.add_argument("--expect-above", type=float, help="fail unless the max difference exceeds this")
    p = command("inspect", inspect_model, "check a model file", "file")
    p.add_argument("--hf", help="checkpoint to compare every tensor with")
    command("tokenizer", export_tok, "tokenizer.json -> tokenizer file", "tokenizer", "out")
    p = command("peft", peft_export, "adapter file -> Hugging Face PEFT directory", "adapter", "out_dir")
    p.add_argument("--base", help="base_model_name_or_path to record in adapter_config.json")
    p = command("lora", peft_import, "Hugging Face PEFT directory -> adapter file", "peft_dir", "out")
    p.add_argument("--model", required=True, help="the model file the adapter is for (its dims go in the header)")
    # listed for --help only: `sae` is dispatched to sae_export.py above
    sub.add_parser("sae", help="SAE checkpoints (sparsify, SAELens) -> SAE file; see sae_export.py")
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
