"""Streaming checkpoint I/O for the converters: find and read source weights tensor by tensor, write shards atomically.

Why not `safetensors.torch.load_file` / `save_file`: both hold a whole shard (and `save_file` a second serialised copy)
in memory, and a memory-mapped `safe_open` keeps every page it touched resident until it closes. A 7B checkpoint in
5 GB shards would then need several GB beyond one copy of the model. Here each tensor is read with plain
`readinto` from its byte range and written straight to the output file, so converting needs about two tensors of
RAM on top of the interpreter, whatever the checkpoint size. The safetensors format is simple and documented
(8-byte little-endian header length, a JSON header of `{name: {dtype, shape, data_offsets}}`, then raw
little-endian bytes), and every file we write is read back by the tests with the official library.

Pickle (`.bin`) checkpoints can execute code when unpickled, so they are read only when the caller opts in, and
even then with `torch.load(weights_only=True, mmap=True)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from modeling_saisa.model_dirs import looks_like_local_path

__all__ = [
    "CheckpointReader",
    "OutputTensor",
    "TensorRef",
    "atomic_output_dir",
    "find_weight_files",
    "parse_size",
    "resolve_repo",
    "write_safetensors_file",
    "write_safetensors_shards",
]

logger = logging.getLogger(__name__)

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

PICKLE_REFUSAL = (
    "holds only PyTorch pickle weights (*.bin). Unpickling a file can execute arbitrary code, so pickle weights are "
    "read only on request: pass --allow-pickle (allow_pickle=True) if you trust the source (they are then loaded "
    "with torch.load(weights_only=True)), or convert them to safetensors first."
)


# ----------------------------------------------------------------------------------------------------------------
# Sources


def resolve_repo(
    name: str | os.PathLike,
    *,
    what: str,
    option: str,
    allow_patterns: Sequence[str] | None = None,
) -> Path:
    """Return a local directory for `name`: the directory itself, else a hub snapshot (downloaded or cached).

    `what` / `option` only shape the error: they name the argument so that the user knows what to pass instead.
    The hub is asked only when `name` is not an existing directory and could be a repo id; with
    `HF_HUB_OFFLINE=1` a snapshot already in the cache is used and anything else fails with a clear message.
    """
    text = os.fspath(name)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{what} {text!r} is a file; {option} expects a directory or a hub repo id.")
    if looks_like_local_path(text):
        raise FileNotFoundError(f"{what} {text!r}: no such directory ({option} expects a directory or a hub repo id).")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=list(allow_patterns) if allow_patterns else None))
    except Exception as err:  # hub errors come in many classes (offline, 404, gated, invalid id); all mean "not here"
        raise FileNotFoundError(
            f"{what} {text!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {err}). If you are offline (HF_HUB_OFFLINE=1) or the repo is private, download "
            f"it yourself and pass its local directory as {option}."
        ) from err


# ----------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class TensorRef:
    """Where one source tensor lives. `begin`/`end` are absolute byte offsets for safetensors, None for pickle."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int | None = None
    end: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_safetensors_header(file: Path) -> list[TensorRef]:
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file} is not a safetensors file (shorter than its 8-byte header length).")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{file} is not a safetensors file (header length {n}).")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(
                f"{file}: the safetensors header is not valid JSON ({err}); the file is damaged."
            ) from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: the safetensors header is a JSON {type(header).__name__}, expected an object.")
    refs = []
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        fields = ("dtype", "shape", "data_offsets")
        missing = [key for key in fields if not isinstance(info, dict) or key not in info]
        if missing:
            raise ValueError(
                f"{file}: tensor {name!r} in the safetensors header lacks {missing} (each tensor needs "
                f"{list(fields)}); the file is damaged."
            )
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has dtype {info['dtype']}, which this converter cannot read.")
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(x) for x in info["shape"])
        except (TypeError, ValueError):
            raise ValueError(
                f"{file}: tensor {name!r} has shape {info['shape']!r} and data_offsets {info['data_offsets']!r}; "
                "expected lists of integers (the file is damaged)."
            ) from None
        refs.append(TensorRef(name, file, _ST_DTYPES[info["dtype"]], shape, base + begin, base + end))
    refs.sort(key=lambda r: r.begin)
    return refs


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict):
        raise ValueError(f"{file} does not hold a state dict (got {type(state).__name__}).")
    return state


def find_weight_files(directory: Path, *, allow_pickle: bool, what: str = "checkpoint") -> list[Path]:
    """The weight files of a transformers-style checkpoint directory, safetensors preferred, in index order.

    Pickle files are returned only with `allow_pickle`; a directory that has nothing else raises and says why.
    """
    directory = Path(directory)

    def from_index(index_name: str) -> list[Path]:
        with open(directory / index_name) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory / index_name} names shard(s) that are not there: {missing}.")
        return [directory / name for name in files]

    if (directory / SAFE_INDEX).is_file():
        return from_index(SAFE_INDEX)
    if (directory / SAFE_SINGLE).is_file():
        return [directory / SAFE_SINGLE]
    other_safe = sorted(directory.glob("*.safetensors"))
    if other_safe:
        return other_safe
    pickles = (directory / PICKLE_INDEX).is_file() or (directory / PICKLE_SINGLE).is_file()
    if pickles and not allow_pickle:
        raise ValueError(f"The {what} at {directory} {PICKLE_REFUSAL}")
    if (directory / PICKLE_INDEX).is_file():
        return from_index(PICKLE_INDEX)
    if (directory / PICKLE_SINGLE).is_file():
        return [directory / PICKLE_SINGLE]
    raise FileNotFoundError(
        f"No weights found in the {what} at {directory} (looked for {SAFE_INDEX}, {SAFE_SINGLE}, *.safetensors, "
        f"{PICKLE_INDEX}, {PICKLE_SINGLE}). From the hub, pickle .bin files are downloaded only with --allow-pickle."
    )


class CheckpointReader:
    """Lists the tensors of a set of weight files without loading them, and reads them one at a time.

    Safetensors tensors are read from their byte range into fresh memory (no mmap, so nothing stays resident after
    the caller drops the tensor). Pickle shards are memory-mapped one file at a time: reading in file order (the
    order of `refs`) keeps at most one shard mapped.
    """

    def __init__(self, files: Sequence[Path]):
        self.files = [Path(f) for f in files]
        self.refs: dict[str, TensorRef] = {}
        for file in self.files:
            if file.suffix == ".safetensors":
                refs = _read_safetensors_header(file)
            else:
                state = _load_pickle(file)
                refs = [TensorRef(k, file, v.dtype, tuple(v.shape)) for k, v in state.items()]
                del state
            for ref in refs:
                if ref.name in self.refs:
                    raise ValueError(f"Tensor {ref.name!r} appears in both {self.refs[ref.name].file} and {file}.")
                self.refs[ref.name] = ref
        self._handles: dict[Path, object] = {}
        self._pickle: tuple[Path, dict[str, torch.Tensor]] | None = None

    @property
    def total_bytes(self) -> int:
        return sum(ref.nbytes for ref in self.refs.values())

    def order(self, name: str) -> tuple[int, int]:
        """Sort key that reads the files sequentially."""
        ref = self.refs[name]
        return self.files.index(ref.file), ref.begin or 0

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        """Tensor `name` in fresh memory. With `rows` > its first dimension, the tensor comes back with that many rows,
        the extra ones uninitialised: growing an embedding then costs no second copy of it."""
        ref = self.refs[name]
        shape = ref.shape if rows is None else (max(rows, ref.shape[0]), *ref.shape[1:])
        if ref.begin is None:
            if self._pickle is None or self._pickle[0] != ref.file:
                self._pickle = None  # drop the previous mapping before opening the next one
                self._pickle = (ref.file, _load_pickle(ref.file))
            mapped = self._pickle[1][name]
            if rows is None:
                return mapped.clone()  # a copy detached from the mapping, so the mapping can be released
            value = torch.empty(shape, dtype=ref.dtype)
            value[: ref.shape[0]].copy_(mapped)
            return value
        handle = self._handles.get(ref.file)
        if handle is None:
            handle = self._handles[ref.file] = open(ref.file, "rb")  # noqa: SIM115 - closed in close()
        size = ref.end - ref.begin
        if size != ref.nbytes:
            raise ValueError(f"{ref.file}: tensor {name!r} spans {size} bytes, expected {ref.nbytes}.")
        total = math.prod(shape) * ref.dtype.itemsize
        if total == 0:
            return torch.empty(shape, dtype=ref.dtype)
        buffer = bytearray(total)
        handle.seek(ref.begin)
        if handle.readinto(memoryview(buffer)[:size]) != size:
            raise ValueError(f"{ref.file} is truncated (tensor {name!r}).")
        return torch.frombuffer(buffer, dtype=ref.dtype).reshape(shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._pickle = None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------------
# Writing


@dataclass
class OutputTensor:
    """One tensor of the output: its final name, shape and dtype, and how to produce it (called once, when written)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(size: int | str) -> int:
    """`5000000`, `"5GB"`, `"500MB"`, `"2GiB"` -> bytes (decimal units, like transformers' `max_shard_size`)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _plan_shards(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_safetensors_file(
    path: Path, tensors: Sequence[OutputTensor], on_tensor: Callable[[OutputTensor], None] = lambda t: None
) -> None:
    """Write one safetensors file: the header from the planned shapes, then each tensor as it is produced."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"Cannot write tensor {t.name!r} of dtype {t.dtype} to safetensors.")
        header[t.name] = {
            "dtype": _ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            value = t.produce()
            if tuple(value.shape) != t.shape or value.dtype != t.dtype:
                raise ValueError(
                    f"Tensor {t.name!r} came out as {value.dtype}{list(value.shape)}, planned {t.dtype}{list(t.shape)}."
                )
            if value.numel():
                # A uint8 view shares memory with `value`: numpy hands the bytes to the file without another copy.
                f.write(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del value
            on_tensor(t)


def write_safetensors_shards(
    directory: Path,
    tensors: Sequence[OutputTensor],
    *,
    max_shard_size: int | str = "5GB",
    on_tensor: Callable[[OutputTensor], None] = lambda t: None,
) -> list[str]:
    """Write `tensors` in order as `model.safetensors` or `model-0000k-of-0000n.safetensors` plus the index json
    (the names transformers' `save_pretrained` uses). Returns the file names written.
    """
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("Duplicate output tensor names.")
    shards = _plan_shards(tensors, parse_size(max_shard_size))
    if len(shards) == 1:
        write_safetensors_file(Path(directory) / SAFE_SINGLE, shards[0], on_tensor)
        return [SAFE_SINGLE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_file(Path(directory) / file, shard, on_tensor)
        files.append(file)
        weight_map.update({t.name: file for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": dict(sorted(weight_map.items()))}
    with open(Path(directory) / SAFE_INDEX, "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return [*files, SAFE_INDEX]


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out`; on success rename it to `out`, on any failure delete it.

    Why beside: a rename is atomic only within one filesystem, and readers must never see a half-written `out`.
    `out` may exist only as an empty directory (rename(2) replaces that atomically); anything else is refused up
    front so that no data is ever overwritten.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"Output {out} already exists and is not an empty directory; remove it or pick another.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; give the result the usual permissions
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
