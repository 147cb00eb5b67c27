"""Reading a sharded (DCP) checkpoint without running code from it.

`torch.distributed.checkpoint` stores its index (`dcp/.metadata`) with `pickle` and non-tensor
values (optimizer hyperparameters) with `torch.save`, and its reader loads both with full
unpickling: a crafted file runs its payload. Resume reads DCP through `SafeReader`, whose
unpickler accepts only the classes a DCP index is made of (metadata dataclasses, torch.Size,
dtypes, layouts, paths) and refuses any other global, and `SafeLoadPlanner`, which reads the
non-tensor values with `torch.load(weights_only=True)`. Read paths (generate, export, eval,
report, doctor) never touch DCP: they read the consolidated `model.safetensors`.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

_DCP_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    *(
        (_DCP_META, n)
        for n in (
            "Metadata",
            "ChunkStorageMetadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "MetadataIndex",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # returns a torch.layout by name, nothing else
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"refusing {module}.{name}: not a class a checkpoint index is made of"
        )


def load_dcp_metadata(data: bytes) -> Metadata:
    """Unpickle a DCP index, allowing only DCP's own metadata classes."""
    meta = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(meta, Metadata):
        raise pickle.UnpicklingError(f"not a DCP index: {type(meta).__name__}")
    return meta


class SafeReader(FileSystemReader):
    """FileSystemReader whose index is read by the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            meta = load_dcp_metadata(f.read())
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that loads non-tensor values with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
