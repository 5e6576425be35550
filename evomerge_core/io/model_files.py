"""Model directories on disk: lazy safetensors reading by tensor name (single file or shards
with an index), a streaming sharded safetensors writer, and copying of the non-weight files
(config, tokenizer/processor, generation config).

Reading does not mmap: each tensor is read with one `readinto` into a fresh buffer, so the
process holds only the tensors it is using (mmapped pages would count towards its RSS).
Writing plans the shard layout up front from the tensor shapes, writes each header first and
then streams tensors into place, so memory stays near one tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from evomerge_core.errors import SourceError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# Non-weight files a model directory may carry (config, tokenizer, processor, generation).
AUX_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "video_preprocessor_config.json",
)
TOKENIZER_FILES: tuple[str, ...] = tuple(
    f for f in AUX_FILES if f not in ("config.json", "generation_config.json")
)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; raises SourceError for a corrupted file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise SourceError(f"{path} is corrupted (too short to be safetensors); re-download or rebuild it")
            (hlen,) = struct.unpack("<Q", raw_len)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise SourceError(f"{path} is corrupted (bad header length); re-download or rebuild it")
            header = json.loads(fh.read(hlen))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise SourceError(f"weights file {path} is missing; re-download or rebuild the model") from None
        raise SourceError(f"{path} is corrupted (unreadable header: {exc}); re-download or rebuild it") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path} is corrupted (header is not a JSON object); re-download or rebuild it")
    data_start = 8 + hlen
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{path} is corrupted (bad entry for tensor {name!r}); re-download or rebuild it") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise SourceError(f"{path} is corrupted (tensor {name!r} has inconsistent offsets); re-download or rebuild it")
        spans.append((begin, end))
        infos[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
    expected = max((e for _, e in spans), default=0)
    if data_start + expected != size:
        raise SourceError(
            f"{path} is corrupted (expected {data_start + expected} bytes, file has {size}; truncated?); re-download or rebuild it"
        )
    return infos


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (from the index when sharded)."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise SourceError(f"{index} is corrupted; re-download or rebuild the model") from None
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    raise SourceError(f"no safetensors weights in {model_dir}; expected {SINGLE_FILE} or {SAFETENSORS_INDEX}")


class LazyModelReader:
    """Read tensors by name from a model directory's safetensors files, one at a time."""

    def __init__(self, model_dir: Path | str):
        self.model_dir = Path(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        index = self.model_dir / SAFETENSORS_INDEX
        expected: dict[str, str] | None = None
        if index.is_file():
            expected = json.loads(index.read_text())["weight_map"]
        for path in weight_files(self.model_dir):
            for name, info in read_header(path).items():
                if name in self.tensors:
                    raise SourceError(f"tensor {name} appears in two weight files of {self.model_dir}; the model is malformed")
                self.tensors[name] = info
        if expected is not None:
            missing = sorted(set(expected) - set(self.tensors))
            if missing:
                raise SourceError(f"tensor {missing[0]} listed in {index} is missing from the shards; re-download the model")

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into a fresh CPU tensor."""
        try:
            info = self.tensors[name]
        except KeyError:
            raise SourceError(f"tensor {name} not found in {self.model_dir}") from None
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            buf = out.reshape(-1).view(torch.uint8).numpy()
            try:
                with open(info.file, "rb", buffering=0) as fh:
                    fh.seek(info.start)
                    got = fh.readinto(memoryview(buf))
            except OSError as exc:
                raise SourceError(f"cannot read {info.file}: {exc}") from None
            if got != info.nbytes:
                raise SourceError(f"{info.file} is truncated while reading {name}; re-download or rebuild it")
        return out


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor to be written: name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def plan_shards(tensors: Sequence[PlannedTensor], shard_size: int) -> list[list[PlannedTensor]]:
    """Split tensors (in order) into shards of at most `shard_size` bytes (a bigger tensor alone)."""
    shards: list[list[PlannedTensor]] = [[]]
    used = 0
    for t in tensors:
        if shards[-1] and used + t.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += t.nbytes
    return shards


def _header_bytes(shard: Sequence[PlannedTensor]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardPlan:
    """Where planned tensors go: shards of at most `shard_size` bytes, their file names, the
    write order, and the index json of a sharded output (what every shard writer shares)."""

    def __init__(self, out_dir: Path, tensors: Sequence[PlannedTensor], shard_size: int = 5 * 10**9):
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(list(tensors), shard_size)
        n = len(self.shards)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(si, t) for si, shard in enumerate(self.shards) for t in shard]

    def check_complete(self, written: int, cleanup: Callable[[], None]) -> None:
        """RuntimeError (after `cleanup`) when fewer than all planned tensors were written."""
        if written != len(self._order):
            missing = self._order[written][1].name
            cleanup()
            raise RuntimeError(f"writer closed before tensor {missing} was written")

    def write_index(self) -> None:
        """Write `model.safetensors.index.json` (sharded output only)."""
        if len(self.files) > 1:
            weight_map = {t.name: self.files[si] for si, t in self._order}
            total = sum(t.nbytes for _, t in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))


class ShardedWriter(ShardPlan):
    """Write planned tensors, streamed in plan order, as (sharded) safetensors + index json."""

    def __init__(self, out_dir: Path, tensors: Sequence[PlannedTensor], shard_size: int = 5 * 10**9):
        super().__init__(out_dir, tensors, shard_size)
        self._pos = 0
        self._fh = None
        self._shard = -1

    def expected_names(self) -> Iterator[str]:
        """Tensor names in the order `write` must receive them."""
        return (t.name for _, t in self._order)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (must be the next planned name, dtype and shape)."""
        si, planned = self._order[self._pos]
        if name != planned.name or tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(f"writer expected {planned} but got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if si != self._shard:
            self._close_file()
            self._shard = si
            self._fh = open(self.out_dir / self.files[si], "wb")
            self._fh.write(_header_bytes(self.shards[si]))
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._fh.write(memoryview(data.view(torch.uint8).numpy()))
        self._pos += 1

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        """Finish the last shard and write the index (sharded output only)."""
        self.check_complete(self._pos, self._close_file)
        self._close_file()
        self.write_index()

    def abort(self) -> None:
        """Close any open file without finishing (the caller removes the directory)."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass  # a failed flush (disk full): the caller removes the directory
            self._fh = None


def write_state_dict(out_dir: Path, tensors: Mapping[str, torch.Tensor], shard_size: int = 5 * 10**9) -> None:
    """Write an in-memory state dict as (sharded) safetensors into an existing directory."""
    plan = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(Path(out_dir), plan, shard_size)
    for name in list(writer.expected_names()):
        writer.write(name, tensors[name])
    writer.close()


def read_config(model_dir: Path) -> dict:
    """config.json of a model directory as a dict; SourceError when missing or invalid."""
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SourceError(f"{model_dir} has no config.json; is it a Hugging Face model directory?") from None
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path} is not valid JSON ({exc}); re-download or rebuild the model") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path} is not a JSON object; re-download or rebuild the model")
    return data


def copy_files(src: Path, dst: Path, names: Iterable[str]) -> list[str]:
    """Copy the named files that exist in `src` to `dst`; returns the names copied."""
    copied = []
    for name in names:
        path = Path(src) / name
        if path.is_file():
            shutil.copy2(path, Path(dst) / name)
            copied.append(name)
    return copied
