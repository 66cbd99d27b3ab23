"""sae_export.py -- convert public SAE checkpoints to the unlearn.c SAE file.

The SAE file format is documented in sae.h (a 256-byte header, then
W_enc (n, d), b_enc (n), W_dec (n, d), b_dec (d) [, threshold (n)]
[, r_mag (n), b_mag (n)], each at a 64-byte aligned offset, fp32).

Sources:
  * EleutherAI sparsify: a folder with cfg.json and sae.safetensors
    (encoder.weight [n, d], encoder.bias [n], W_dec [n, d], b_dec [d]);
    encode = topk(relu((x - b_dec) W_enc^T + b_enc)). Its "layers.N" folders
    of the early Llama-3-8B checkpoints (sae-llama-3-8b-32x) were trained on
    hidden_states[N] = the input of block N: hook "pre" (the default here).
    Later checkpoints hook the output of layers.N: pass hook="post". The
    self-test of ./sae reports which fits.
  * SAELens: cfg.json + sae_weights.safetensors (W_enc [d, n] is transposed
    on the way; W_dec [n, d]); architectures standard (ReLU), topk, jumprelu,
    gated; hook_name "blocks.N.hook_resid_post|pre" gives layer and hook.

Python 3 + numpy only; safetensors are parsed by hand and read through
np.memmap, and the output is written through np.memmap, so a 4 GB
checkpoint converts without holding it in memory.

  python3 sae_export.py sparsify DIR OUT.bin [--layer L] [--hook pre|post]
  python3 sae_export.py saelens PATH OUT.bin [--layer L] [--hook pre|post]
  python3 sae_export.py synth-sparsify DIR [--d 64 --n 256 --k 8 --seed 0 --dtype bf16]
  python3 sae_export.py synth-saelens DIR [--arch jumprelu ...]
  python3 sae_export.py info SAE.bin
export.py calls main(argv) for `python3 export.py sae ...`.
"""
import argparse
import json
import os
import re
import struct
import sys

import numpy as np

SAE_MAGIC = 0x41534C55  # "ULSA"
SAE_VERSION = 1
HEADER_BYTES = 256
ARCHS = {"topk": 0, "relu": 1, "jumprelu": 2, "gated": 3}
HOOKS = {"post": 0, "pre": 1}


# ----------------------------------------------------------------------------
# safetensors, by hand: u64 header length, a JSON header, then the data

_DTYPES = {"F32": ("<f4", 4), "F64": ("<f8", 8), "F16": ("<f2", 2), "BF16": ("<u2", 2)}


class SafeTensors:
    """Lazy reader: tensor(name) returns a read-only float32-convertible memmap view."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError(f"{path}: not a safetensors file (header of {n} bytes)")
            self.header = json.loads(f.read(n))
        self.data_start = 8 + n
        self.size = os.path.getsize(path)
        self.names = [k for k in self.header if k != "__metadata__"]

    def shape(self, name):
        return tuple(self.header[name]["shape"])

    def raw(self, name):
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        np_dtype, width = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = int(np.prod(info["shape"])) if info["shape"] else 1
        if end - begin != count * width or self.data_start + end > self.size:
            raise ValueError(f"{self.path}: tensor {name}: bad data_offsets")
        arr = np.memmap(self.path, dtype=np_dtype, mode="r", offset=self.data_start + begin, shape=(count,))
        return arr.reshape(info["shape"]), info["dtype"]

    def tensor(self, name, rows=None):
        """float32 copy of the tensor, or of rows [a, b) of its first axis."""
        arr, dtype = self.raw(name)
        if rows is not None:
            arr = arr[rows[0]:rows[1]]
        return to_f32(np.asarray(arr), dtype)


def to_f32(arr, dtype):
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def f32_to_bf16_bits(x):
    """Round-to-nearest-even float32 -> bfloat16 bits (uint16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def write_safetensors(path, tensors):
    """tensors: {name: (dtype string, numpy array already in that dtype's storage)}"""
    header, offset, blobs = {}, 0, []
    for name, (dtype, arr) in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


# ----------------------------------------------------------------------------
# The SAE file (sae.h)

def _align(n):
    return (n + 63) // 64 * 64


def sae_layout(d, n, arch):
    """Byte offsets of the tensors in the file, and the file size."""
    off, lay = HEADER_BYTES, {}
    for name, count in (("W_enc", n * d), ("b_enc", n), ("W_dec", n * d), ("b_dec", d)):
        lay[name] = off
        off = _align(off + 4 * count)
    if arch == ARCHS["jumprelu"]:
        lay["threshold"] = off
        off = _align(off + 4 * n)
    if arch == ARCHS["gated"]:
        lay["r_mag"] = off
        off = _align(off + 4 * n)
        lay["b_mag"] = off
        off = _align(off + 4 * n)
    return lay, off


class SaeWriter:
    """Writes an SAE file through a memmap: fill tensors by row ranges, then close()."""

    def __init__(self, out_path, d, n, k, arch, layer, hook, sub_bdec=1, act_scale=1.0):
        self.out_path, self.tmp = out_path, out_path + ".tmp"
        self.d, self.n, self.arch = d, n, ARCHS[arch] if isinstance(arch, str) else arch
        self.layout, size = sae_layout(d, n, self.arch)
        head = bytearray(HEADER_BYTES)
        struct.pack_into("<IiiiiiiiifqfI", head, 0, SAE_MAGIC, SAE_VERSION, d, n, k, self.arch, layer,
                         HOOKS[hook] if isinstance(hook, str) else hook, sub_bdec, act_scale, 0, 0.0, 0)
        self.mm = np.memmap(self.tmp, dtype=np.uint8, mode="w+", shape=(size,))
        self.mm[:HEADER_BYTES] = np.frombuffer(bytes(head), dtype=np.uint8)

    def view(self, name):
        count = {"W_enc": self.n * self.d, "W_dec": self.n * self.d, "b_dec": self.d}.get(name, self.n)
        off = self.layout[name]
        v = self.mm[off:off + 4 * count].view(np.float32)
        return v.reshape(self.n, self.d) if name in ("W_enc", "W_dec") else v

    def close(self):
        self.mm.flush()
        del self.mm
        os.replace(self.tmp, self.out_path)


def read_sae(path):
    """The SAE file as a dict of header fields and float32 arrays (tests, round trips)."""
    data = open(path, "rb").read()
    magic, version, d, n, k, arch, layer, hook, sub_bdec, act_scale, tokens, fvu, dtype = struct.unpack_from(
        "<IiiiiiiiifqfI", data, 0)
    if magic != SAE_MAGIC or version != SAE_VERSION:
        raise ValueError(f"{path}: not an SAE file of version {SAE_VERSION}")
    lay, size = sae_layout(d, n, arch)
    if len(data) != size:
        raise ValueError(f"{path}: {len(data)} bytes, expected {size}")
    out = dict(d=d, n=n, k=k, arch=arch, layer=layer, hook=hook, sub_bdec=sub_bdec, act_scale=act_scale,
               train_tokens=tokens, train_fvu=fvu)
    for name, off in lay.items():
        count = n * d if name in ("W_enc", "W_dec") else (d if name == "b_dec" else n)
        a = np.frombuffer(data, dtype="<f4", count=count, offset=off).copy()
        out[name] = a.reshape(n, d) if name in ("W_enc", "W_dec") else a
    return out


def sae_encode(sae, x):
    """Reference encoder (numpy, float64) following sae.h: codes (m, n)."""
    W_enc, b_enc = sae["W_enc"].astype(np.float64), sae["b_enc"].astype(np.float64)
    u = sae["act_scale"] * x.astype(np.float64) - (sae["b_dec"] if sae["sub_bdec"] else 0.0)
    pre = u @ W_enc.T + b_enc
    arch = sae["arch"]
    if arch == ARCHS["topk"]:
        f = np.zeros_like(pre)
        idx = np.argsort(-pre, axis=1)[:, :sae["k"]]
        rows = np.arange(pre.shape[0])[:, None]
        f[rows, idx] = np.maximum(pre[rows, idx], 0.0)
        return f
    if arch == ARCHS["relu"]:
        return np.maximum(pre, 0.0)
    if arch == ARCHS["jumprelu"]:
        return np.where((pre > 0) & (pre > sae["threshold"]), pre, 0.0)
    mag = np.exp(sae["r_mag"]) * (pre - b_enc) + sae["b_mag"]
    return np.where((pre > 0) & (mag > 0), mag, 0.0)


def sae_decode(sae, f):
    return (f @ sae["W_dec"].astype(np.float64) + sae["b_dec"]) / sae["act_scale"]


# ----------------------------------------------------------------------------
# Converters

CHUNK = 4096  # latents per copy step


def _copy_rows(st, name, dst, n):
    for a in range(0, n, CHUNK):
        dst[a:a + CHUNK] = st.tensor(name, rows=(a, min(n, a + CHUNK)))


def _layer_from_name(path):
    m = re.search(r"layers\.(\d+)", os.path.abspath(path))
    return int(m.group(1)) if m else None


def export_sparsify(cfg_dir, out_path, layer=None, hook="pre"):
    """EleutherAI sparsify folder (cfg.json + sae.safetensors) -> SAE file.

    layer: the N of the checkpoint's "layers.N" (taken from the folder name
    when None). hook: "pre" (hidden_states[N], the early Llama-3-8B
    checkpoints) or "post" (output of layers.N, later checkpoints)."""
    cfg = json.load(open(os.path.join(cfg_dir, "cfg.json")))
    st = SafeTensors(os.path.join(cfg_dir, "sae.safetensors"))
    for bad in ("transcode", "skip_connection", "signed"):
        if cfg.get(bad):
            raise ValueError(f"{cfg_dir}: sparsify option {bad}=true is not supported (residual-stream TopK SAEs only)")
    if "W_skip" in st.names:
        raise ValueError(f"{cfg_dir}: checkpoint has a skip connection (W_skip): not supported")
    n, d = st.shape("encoder.weight")
    if st.shape("W_dec") != (n, d) or st.shape("b_dec") != (d,) or st.shape("encoder.bias") != (n,):
        raise ValueError(f"{cfg_dir}: unexpected tensor shapes {[(k, st.shape(k)) for k in st.names]}")
    if cfg.get("d_in", d) != d:
        raise ValueError(f"{cfg_dir}: cfg d_in {cfg.get('d_in')} but encoder.weight has {d} columns")
    k = int(cfg["k"])
    if layer is None:
        layer = _layer_from_name(cfg_dir)
        if layer is None:
            raise ValueError(f"{cfg_dir}: no layers.N in the path: pass layer")
    w = SaeWriter(out_path, d, n, k, "topk", layer, hook, sub_bdec=1)
    _copy_rows(st, "encoder.weight", w.view("W_enc"), n)
    w.view("b_enc")[:] = st.tensor("encoder.bias")
    _copy_rows(st, "W_dec", w.view("W_dec"), n)
    w.view("b_dec")[:] = st.tensor("b_dec")
    w.close()
    return dict(d=d, n=n, k=k, layer=layer, hook=hook)


def export_saelens(path, out_path, layer=None, hook=None):
    """SAELens checkpoint (folder or its sae_weights.safetensors, cfg.json beside) -> SAE file.

    layer/hook default to the cfg's hook_name (blocks.N.hook_resid_post|pre)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    weights = os.path.join(path, "sae_weights.safetensors") if os.path.isdir(path) else path
    cfg = json.load(open(os.path.join(folder, "cfg.json")))
    st = SafeTensors(weights)
    arch_name = cfg.get("architecture", "standard")
    arch = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}.get(arch_name)
    if arch is None:
        raise ValueError(f"{path}: SAELens architecture {arch_name!r} is not supported")
    d, n = st.shape("W_enc")
    if st.shape("W_dec") != (n, d):
        raise ValueError(f"{path}: W_enc {st.shape('W_enc')} and W_dec {st.shape('W_dec')} do not match")
    hook_name = cfg.get("hook_name", cfg.get("hook_point", ""))
    m = re.search(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook_name)
    if layer is None:
        if not m:
            raise ValueError(f"{path}: hook_name {hook_name!r} is not blocks.N.hook_resid_pre|post: pass layer")
        layer = int(m.group(1))
    if hook is None:
        hook = m.group(2) if m else "post"
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm not in ("none", "None"):
        print(f"warning: {path}: normalize_activations={norm!r}: the scaling factor is not in the "
              "checkpoint; converted as if none (check the self-test FVU)", file=sys.stderr)
    k = 0
    if arch == "topk":
        k = int(cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k", 0))
        if k <= 0:
            raise ValueError(f"{path}: topk SAE without k in cfg.json")
    sub_bdec = 1 if cfg.get("apply_b_dec_to_input", True) else 0
    w = SaeWriter(out_path, d, n, k, arch, layer, hook, sub_bdec=sub_bdec)
    W_enc = w.view("W_enc")
    for a in range(0, d, 256):  # contiguous rows of W_enc [d, n] -> columns of ours
        W_enc[:, a:a + 256] = st.tensor("W_enc", rows=(a, min(d, a + 256))).T
    _copy_rows(st, "W_dec", w.view("W_dec"), n)
    w.view("b_dec")[:] = st.tensor("b_dec")
    if arch == "gated":
        w.view("b_enc")[:] = st.tensor("b_gate")
        w.view("r_mag")[:] = st.tensor("r_mag")
        w.view("b_mag")[:] = st.tensor("b_mag")
    else:
        w.view("b_enc")[:] = st.tensor("b_enc")
    if arch == "jumprelu":
        w.view("threshold")[:] = st.tensor("threshold")
    w.close()
    return dict(d=d, n=n, k=k, arch=arch, layer=layer, hook=hook)


# ----------------------------------------------------------------------------
# Synthetic checkpoints for the round-trip tests, with reference codes
#
# Each writer also writes reference.f32 next to the checkpoint: int32 m, d,
# n, then float32 x (m, d), codes (m, n) and reconstructions (m, d), computed
# by the original library's semantics from the stored (bf16-rounded) weights.

def _write_reference(folder, x, f, xhat):
    m, d = x.shape
    with open(os.path.join(folder, "reference.f32"), "wb") as fh:
        fh.write(struct.pack("<iii", m, d, f.shape[1]))
        for a in (x, f, xhat):
            fh.write(np.ascontiguousarray(a, dtype="<f4").tobytes())


def write_synthetic_sparsify(folder, d=64, n=256, k=8, seed=0, dtype="bf16", m=16):
    """A random EleutherAI sparsify checkpoint (cfg.json, sae.safetensors) and its reference.f32."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    enc = (rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    W_dec = enc / np.linalg.norm(enc, axis=1, keepdims=True)
    b_enc = (0.05 * rng.standard_normal(n)).astype(np.float32)
    b_dec = (0.3 * rng.standard_normal(d)).astype(np.float32)
    tensors = {"encoder.weight": enc, "encoder.bias": b_enc, "W_dec": W_dec.astype(np.float32), "b_dec": b_dec}
    if dtype == "bf16":
        stored = {name: f32_to_bf16_bits(a) for name, a in tensors.items()}
        write_safetensors(os.path.join(folder, "sae.safetensors"), {k_: ("BF16", v) for k_, v in stored.items()})
        tensors = {name: to_f32(v, "BF16") for name, v in stored.items()}
    else:
        write_safetensors(os.path.join(folder, "sae.safetensors"), {k_: ("F32", v) for k_, v in tensors.items()})
    cfg = {"expansion_factor": n // d, "normalize_decoder": True, "num_latents": n, "k": k, "multi_topk": False,
           "skip_connection": False, "signed": False, "d_in": d}
    json.dump(cfg, open(os.path.join(folder, "cfg.json"), "w"), indent=2)
    # sparsify's encode/decode, in float64
    x = (rng.standard_normal((m, d)) + 2.0 * rng.standard_normal(d)).astype(np.float32)
    pre = np.maximum((x.astype(np.float64) - tensors["b_dec"]) @ tensors["encoder.weight"].astype(np.float64).T
                     + tensors["encoder.bias"], 0.0)
    idx = np.argsort(-pre, axis=1)[:, :k]
    f = np.zeros_like(pre)
    rows = np.arange(m)[:, None]
    f[rows, idx] = pre[rows, idx]
    xhat = f @ tensors["W_dec"].astype(np.float64) + tensors["b_dec"]
    _write_reference(folder, x, f, xhat)
    return folder


def write_synthetic_saelens(folder, d=64, n=256, arch="jumprelu", layer=3, seed=0, m=16, k=8):
    """A random SAELens checkpoint (cfg.json, sae_weights.safetensors, fp32) and its reference.f32."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    W_enc = (rng.standard_normal((d, n)) / np.sqrt(d)).astype(np.float32)
    W_dec = (rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    b_dec = (0.3 * rng.standard_normal(d)).astype(np.float32)
    t = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": b_dec}
    if arch == "gated":
        t["b_gate"] = (0.05 * rng.standard_normal(n)).astype(np.float32)
        t["b_mag"] = (0.05 * rng.standard_normal(n)).astype(np.float32)
        t["r_mag"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
    else:
        t["b_enc"] = (0.05 * rng.standard_normal(n)).astype(np.float32)
    if arch == "jumprelu":
        t["threshold"] = np.abs(0.2 * rng.standard_normal(n)).astype(np.float32)
    write_safetensors(os.path.join(folder, "sae_weights.safetensors"), {k_: ("F32", v) for k_, v in t.items()})
    cfg = {"architecture": {"relu": "standard"}.get(arch, arch), "d_in": d, "d_sae": n, "dtype": "float32",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "hook_name": f"blocks.{layer}.hook_resid_post"}
    if arch == "topk":
        cfg["activation_fn_kwargs"] = {"k": k}
    json.dump(cfg, open(os.path.join(folder, "cfg.json"), "w"), indent=2)
    # SAELens semantics
    x = (rng.standard_normal((m, d)) + 2.0 * rng.standard_normal(d)).astype(np.float64)
    sae_in = x - b_dec
    if arch == "gated":
        gate = sae_in @ W_enc + t["b_gate"] > 0
        mag = np.maximum(sae_in @ (W_enc * np.exp(t["r_mag"])) + t["b_mag"], 0.0)
        f = gate * mag
    else:
        pre = sae_in @ W_enc + t["b_enc"]
        if arch == "jumprelu":
            f = np.maximum(pre, 0.0) * (pre > t["threshold"])
        elif arch == "topk":
            f = np.zeros_like(pre)
            idx = np.argsort(-pre, axis=1)[:, :k]
            rows = np.arange(m)[:, None]
            f[rows, idx] = np.maximum(pre[rows, idx], 0.0)
        else:
            f = np.maximum(pre, 0.0)
    xhat = f @ W_dec + b_dec
    _write_reference(folder, x, f, xhat)
    return folder


# ----------------------------------------------------------------------------
# Command line (also `python3 export.py sae ...`)

def main(argv=None):
    p = argparse.ArgumentParser(prog="sae_export.py", description="convert SAE checkpoints to unlearn.c SAE files")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sparsify", help="EleutherAI sparsify folder (cfg.json + sae.safetensors)")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--layer", type=int, default=None, help="default: N of layers.N in the path")
    s.add_argument("--hook", choices=["pre", "post"], default="pre",
                   help="pre: hidden_states[N] (early Llama-3-8B checkpoints, default); post: output of layers.N")
    s = sub.add_parser("saelens", help="SAELens folder or sae_weights.safetensors (cfg.json beside)")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--layer", type=int, default=None, help="default: from hook_name")
    s.add_argument("--hook", choices=["pre", "post"], default=None, help="default: from hook_name")
    s = sub.add_parser("synth-sparsify", help="write a random sparsify checkpoint + reference.f32")
    s.add_argument("out_dir")
    s.add_argument("--d", type=int, default=64)
    s.add_argument("--n", type=int, default=256)
    s.add_argument("--k", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    s = sub.add_parser("synth-saelens", help="write a random SAELens checkpoint + reference.f32")
    s.add_argument("out_dir")
    s.add_argument("--d", type=int, default=64)
    s.add_argument("--n", type=int, default=256)
    s.add_argument("--k", type=int, default=8)
    s.add_argument("--arch", choices=["relu", "topk", "jumprelu", "gated"], default="jumprelu")
    s.add_argument("--layer", type=int, default=3)
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("info", help="print an SAE file's header")
    s.add_argument("path")
    a = p.parse_args(argv)
    try:
        if a.cmd == "sparsify":
            r = export_sparsify(a.src, a.out, a.layer, a.hook)
            print(f"wrote {a.out}: topk d {r['d']} n {r['n']} k {r['k']} layer {r['layer']} hook {r['hook']}")
        elif a.cmd == "saelens":
            r = export_saelens(a.src, a.out, a.layer, a.hook)
            print(f"wrote {a.out}: {r['arch']} d {r['d']} n {r['n']} k {r['k']} layer {r['layer']} hook {r['hook']}")
        elif a.cmd == "synth-sparsify":
            write_synthetic_sparsify(a.out_dir, a.d, a.n, a.k, a.seed, a.dtype)
            print(f"wrote {a.out_dir}: cfg.json, sae.safetensors, reference.f32")
        elif a.cmd == "synth-saelens":
            write_synthetic_saelens(a.out_dir, a.d, a.n, a.arch, a.layer, a.seed, k=a.k)
            print(f"wrote {a.out_dir}: cfg.json, sae_weights.safetensors, reference.f32")
        else:
            s = read_sae(a.path)
            names = {v: k for k, v in ARCHS.items()}
            print(f"{a.path}: {names.get(s['arch'], '?')} d {s['d']} n {s['n']} k {s['k']} layer {s['layer']} "
                  f"hook {'pre' if s['hook'] else 'post'} sub_bdec {s['sub_bdec']} act_scale {s['act_scale']}")
    except (ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
