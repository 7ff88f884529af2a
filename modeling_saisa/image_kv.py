"""Reusable per-image visual keys and values: many questions about one image for the price of one.

In SAISA a layer's visual K/V depend only on the image and, through RoPE, on where it sits, never on the text
(spec/policies.md, "Text independence"). So every layer's *pre-RoPE* keys and its values can be computed once per
image and reused at any position, beside any other images, in any later prompt: the keys are re-rotated at the
image's current positions, and the vision tower and every projector are skipped.

An entry is keyed by the image's content (the preprocessed pixel tensor) together with a fingerprint of everything
that changes the K/V: a cheap content sample of the weights involved (recomputed per call, so in-place training
updates invalidate the entries), their dtypes, the visual policy and the vision feature layer / select strategy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from modeling_saisa.backbones import rotated_keys
from modeling_saisa.layout import TokenLayout
from modeling_saisa.policies import resolve_visual_policy, text_independent
from modeling_saisa.visual_kv import VisualState

if TYPE_CHECKING:
    from modeling_saisa.modeling_saisa import SaisaModel

__all__ = [
    "ImageKVStore",
    "StoredVisualKV",
    "WeightSums",
    "fingerprint_parameters",
    "image_digest",
    "model_fingerprint",
    "weights_digest",
]

_SAMPLES_PER_TENSOR = 64
_FORMAT = "saisa-image-kv/1"


def image_digest(pixels: torch.Tensor) -> str:
    """The content key of one preprocessed image: its bytes, shape and dtype."""
    pixels = pixels.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{tuple(pixels.shape)}|{pixels.dtype}|".encode())
    digest.update(pixels.view(torch.uint8).numpy().tobytes() if pixels.numel() else b"")
    return digest.hexdigest()


class WeightSums:
    """Each parameter's float64 sum (cast to the parameter's dtype), recomputed only when the tensor changed.

    The sum is the expensive half of a weights digest (a full pass over every weight: about a second per call on
    the benchmark's model on 2 CPU cores); most calls see the same weights. A tensor counts as unchanged while its
    storage (`data_ptr`) and its version counter are the same: torch bumps `Tensor._version` on every in-place
    write to the tensor, optimizer steps and `load_state_dict` included (torch 2.13 behaviour), and `p.data = ...`
    moves the storage. The exception is a write through `p.data` (`p.data.add_(...)`), which bypasses the counter:
    the strided samples of `weights_digest`, still taken every call, see any dense update of that kind, but a
    sparse one off their stride would go unseen; after such an edit call `ImageKVStore.clear()`.
    """

    def __init__(self) -> None:
        self._sums: dict[str, tuple[int, int, torch.Tensor]] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`[1]`: the sum of `tensor`, in its dtype and on its device."""
        key = (tensor.data_ptr(), tensor._version)
        cached = self._sums.get(name)
        if cached is None or cached[:2] != key:
            cached = (*key, _float64_sum(tensor.detach()).reshape(1).to(tensor.dtype))
            self._sums[name] = cached
        return cached[2]


def _float64_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The float64 sum of `tensor`, in chunks: `sum(dtype=torch.float64)` first casts the whole tensor (torch 2.13),
    a float64 copy twice the weight's size, which cost a store's first call ~0.3 s of copying and page faults on the
    benchmark's model. The chunks' float64 partial sums differ from one sum only in float64 rounding, which the
    digest's cast back to the weight's dtype removes."""
    chunk = 1 << 16 if tensor.device.type == "cpu" else 1 << 24  # float64 chunks of 512 KiB stay in a CPU's L2
    flat = tensor.reshape(-1)
    return torch.stack([part.sum(dtype=torch.float64) for part in flat.split(chunk)]).sum()


def weights_digest(named: list[tuple[str, torch.Tensor]], sums: WeightSums | None = None) -> str:
    """Names, shapes, dtypes, strided samples and sums of the parameters: cheap, and changed by any real update.

    Runs on every store call, so the samples of all parameters are gathered with one `cat` (and one copy to the
    host) per device rather than per parameter; the bytes hashed, and so the digest, are the per-parameter ones.
    """
    sums = sums or WeightSums()
    pieces: dict[torch.device, list[torch.Tensor]] = {}
    lengths = []
    for name, tensor in named:
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLES_PER_TENSOR)]
        pieces.setdefault(flat.device, []).extend((sample, sums(name, tensor)))
        lengths.append(len(sample) + 1)
    # Widening floats to the widest dtype of the cat is exact, so `.float()` after it rounds as it would per tensor.
    host = {device: torch.cat(parts).float().cpu().numpy().tobytes() for device, parts in pieces.items()}
    offsets = dict.fromkeys(host, 0)
    digest = hashlib.sha256()
    for (name, tensor), length in zip(named, lengths):
        device, start = tensor.device, offsets[tensor.device]
        offsets[device] = start + 4 * length
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(host[device][start : start + 4 * length])
    return digest.hexdigest()


def visual_policy_list(model: SaisaModel) -> list[str]:
    """The per-layer visual policy (`injected` everywhere when the config names none: SAISA)."""
    return resolve_visual_policy(model.config.visual_policy, len(model.language_model.layers))


def fingerprint_parameters(model: SaisaModel) -> list[tuple[str, torch.Tensor]]:
    """The parameters a stored image's K/V depend on: tower, projectors, and per layer its K/V parts (an `injected`
    layer) or the whole layer (a carried state: the layer's update shapes the next layer's K/V)."""
    named = [(f"vision_tower.{n}", p) for n, p in model.vision_tower.named_parameters()]
    named += [(f"multi_modal_projector.{n}", p) for n, p in model.multi_modal_projector.named_parameters()]
    policy_list = visual_policy_list(model)
    for index, layer in enumerate(model.language_model.layers):
        if policy_list[index] != "injected":
            named += [(f"layers.{index}.{n}", p) for n, p in layer.named_parameters()]
            continue
        attention = layer.self_attn
        parts = {"input_layernorm": layer.input_layernorm, "k_proj": attention.k_proj, "v_proj": attention.v_proj}
        if getattr(attention, "k_norm", None) is not None:
            parts["k_norm"] = attention.k_norm
        named += [(f"layers.{index}.{part}.{n}", p) for part, m in parts.items() for n, p in m.named_parameters()]
    return named


def model_fingerprint(model: SaisaModel, sums: WeightSums | None = None) -> dict[str, str]:
    """Everything that changes a stored image's K/V, one readable field each (so a mismatch can say what differs).

    `sums`: a `WeightSums` kept between calls (the store keeps one), so unchanged weights are not summed again.
    """
    config = model.config
    text_config = config.text_config
    named = fingerprint_parameters(model)
    return {
        "vision_model_type": str(config.vision_config.model_type),
        "text_model_type": str(text_config.model_type),
        "n_layers": str(len(model.language_model.layers)),
        "n_kv_heads": str(text_config.num_key_value_heads),
        "image_seq_length": str(config.image_seq_length),
        "dtype": ",".join(sorted({str(p.dtype) for _, p in named})),
        "visual_policy": ",".join(visual_policy_list(model)),
        "vision_feature_layer": str(config.vision_feature_layer),
        "vision_feature_select_strategy": str(config.vision_feature_select_strategy),
        "weights": weights_digest(named, sums),
    }


def _differences(stored: dict[str, str], current: dict[str, str]) -> str:
    fields = sorted(set(stored) | set(current))
    return "; ".join(
        f"{f}: store has {stored.get(f)!r}, model has {current.get(f)!r}"
        for f in fields
        if stored.get(f) != current.get(f)
    )


def check_text_independent(model: SaisaModel) -> None:
    """Refuse a policy whose visual K/V depend on the text (any `dense` layer): they cannot be stored per image."""
    policy_list = visual_policy_list(model)
    dense = [i for i, kind in enumerate(policy_list) if kind == "dense"]
    if dense or not text_independent(policy_list):
        raise ValueError(
            f"image_kv cannot be used with this visual policy: layers {dense} are `dense`, so their visual keys and "
            "values depend on the text before the image (the visual rows go through those layers' attention over "
            "the text), and a per-image store would return the wrong K/V. Use a policy without `dense` layers, or "
            "drop image_kv."
        )


class _ZeroPositions(NamedTuple):
    """The one layout field a text-independent `VisualState` reads: the visual rows' positions."""

    visual_positions: torch.Tensor


class StoredVisualKV:
    """A visual policy serving stored pre-RoPE K/V: each layer's keys are rotated at the images' current positions."""

    def __init__(self, model: SaisaModel, keys: list[torch.Tensor], values: list[torch.Tensor], layout: TokenLayout):
        # keys/values: one `[n_layers, n_v, H, D]` per image of the chunk, in the layout's image order.
        self.keys, self.values = keys, values
        probe = keys[0].new_empty(1)
        cos, sin = model.language_model.rotary_emb(probe, position_ids=layout.visual_positions)
        self.cos, self.sin = cos.to(keys[0].dtype), sin.to(keys[0].dtype)  # [n_images, n_v, D]

    def key_values(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Rotated out of place, image by image, into one buffer: the store's entries stay unrotated, and one image
        # (the usual prompt) costs no stacking copy at all; `layout.merge` copies these into sequence order next.
        if len(self.keys) == 1:
            return rotated_keys(self.keys[0][layer_idx], self.cos[0], self.sin[0]), self.values[0][layer_idx]
        keys = self.keys[0].new_empty(len(self.keys), *self.keys[0].shape[1:])
        for out, image_keys, cos, sin in zip(keys, self.keys, self.cos, self.sin):
            rotated_keys(image_keys[layer_idx], cos, sin, out=out)
        return keys.flatten(0, 1), torch.cat([v[layer_idx] for v in self.values])

    def after_merge(self, layer_idx: int, keys: torch.Tensor | None, values: torch.Tensor | None) -> None:
        """Nothing to carry: every layer's visual K/V are stored."""


class ImageKVStore:
    """Every layer's pre-RoPE visual keys and values per image, least-recently-used, bounded by exact bytes.

    Pass it as `image_kv=` to `SaisaForConditionalGeneration.forward` / `generate` (or the pipeline's
    `generate_kwargs`): stored images skip the vision tower and all projectors; the others are computed and added.
    The store serves one model at a time: when the model's fingerprint changes (other weights, dtype, policy, ...)
    the entries of the old one are dropped; a store loaded from disk refuses a model it was not made for.
    """

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int (bytes of K/V to keep); got {max_bytes!r}.")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._fingerprint: dict[str, str] | None = None
        self._sums = WeightSums()  # per-parameter sums, recomputed only for tensors that changed
        self._strict = False  # a loaded store must match its model exactly
        self._bytes = self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: str) -> bool:
        return digest in self._entries

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "bytes": self._bytes,
            "entries": len(self._entries),
        }

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def get(self, digest: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The entry for an image digest (marked most recently used), or None."""
        entry = self._entries.get(digest)
        if entry is not None:
            self._entries.move_to_end(digest)
        return entry

    def put(self, digest: str, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add one image's `[n_layers, n_v, H, D]` keys (pre-RoPE) and values; evict the oldest beyond max_bytes."""
        if keys.shape != values.shape or keys.ndim != 4:
            raise ValueError(
                f"keys and values must both be [n_layers, n_v, n_kv_heads, head_dim]; got {tuple(keys.shape)} "
                f"and {tuple(values.shape)}."
            )
        size = keys.nbytes + values.nbytes
        if digest in self._entries:
            old_k, old_v = self._entries.pop(digest)
            self._bytes -= old_k.nbytes + old_v.nbytes
        if size > self.max_bytes:
            return  # an entry larger than the whole store is not kept (and evicts nothing)
        while self._bytes + size > self.max_bytes:
            _, (old_k, old_v) = self._entries.popitem(last=False)
            self._bytes -= old_k.nbytes + old_v.nbytes
            self.evictions += 1
        self._entries[digest] = (keys.detach(), values.detach())
        self._bytes += size

    def bind(self, model: SaisaModel) -> None:
        """Make the store serve `model` (checked per call: in-place weight updates change the fingerprint)."""
        model = getattr(model, "model", model) if not hasattr(model, "vision_tower") else model  # the LM wrapper too
        check_text_independent(model)
        current = model_fingerprint(model, self._sums)
        if self._fingerprint is not None and current != self._fingerprint:
            if self._strict:
                raise ValueError(
                    "This ImageKVStore was made for another model: " + _differences(self._fingerprint, current)
                )
            self.clear()
        self._fingerprint = current

    def policy(self, model: SaisaModel, pixel_values: torch.Tensor, layout: TokenLayout) -> StoredVisualKV:
        """The chunk's visual policy: hits from the store, misses computed (once per distinct image) and added."""
        self.bind(model)
        digests = [image_digest(p) for p in pixel_values]
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        missing: dict[str, int] = {}
        for index, digest in enumerate(digests):
            if digest in found or digest in missing:
                continue
            entry = self.get(digest)
            if entry is None:
                missing[digest] = index
            else:
                found[digest] = entry
        self.hits += len(digests) - len(missing)
        self.misses += len(missing)
        if missing:
            found.update(self._compute(model, pixel_values, missing))
        device = layout.visual_positions.device
        keys = [found[d][0].to(device) for d in digests]
        return StoredVisualKV(model, keys, [found[d][1].to(device) for d in digests], layout)

    def _compute(
        self, model: SaisaModel, pixel_values: torch.Tensor, missing: dict[str, int]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        index = torch.tensor(list(missing.values()), dtype=torch.long, device=pixel_values.device)
        features = model.get_image_features(pixel_values[index], return_dict=True).pooler_output
        n_layers = len(model.language_model.layers)
        # The policy's own per-layer visual work (carried state included), at position 0 where RoPE is the identity
        # (cos 1, sin 0): the keys come out exactly unrotated.
        at_zero = _ZeroPositions(torch.zeros(features.shape[:2], dtype=torch.long, device=features.device))
        state = VisualState(model, features, at_zero, visual_policy_list(model))
        del features
        entries: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer_idx in range(n_layers):
            keys, values = state.key_values(layer_idx)
            state.after_merge(layer_idx, None, None)
            keys, values = keys.unflatten(0, (len(missing), -1)), values.unflatten(0, (len(missing), -1))
            if not entries:  # one entry per image, in its own storage at its exact size, filled layer by layer
                entries = [
                    (keys.new_empty(n_layers, *keys.shape[1:]), values.new_empty(n_layers, *values.shape[1:]))
                    for _ in missing
                ]
            for (stored_keys, stored_values), image_keys, image_values in zip(entries, keys, values):
                stored_keys[layer_idx].copy_(image_keys)
                stored_values[layer_idx].copy_(image_values)
            del keys, values
        del state
        computed = dict(zip(missing, entries))
        for digest, (keys, values) in computed.items():
            self.put(digest, keys, values)
        return computed

    def save(self, directory: str | os.PathLike) -> None:
        """Write the entries and the fingerprint to `directory` (safetensors + json), atomically."""
        if self._fingerprint is None:
            raise ValueError("Nothing to save: this ImageKVStore has not been used with a model yet.")
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for position, (digest, (keys, values)) in enumerate(self._entries.items()):
            tensors[f"{position}.{digest}.keys"] = keys.contiguous().cpu()
            tensors[f"{position}.{digest}.values"] = values.contiguous().cpu()
        meta = {"format": _FORMAT, "max_bytes": self.max_bytes, "fingerprint": self._fingerprint}
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            save_file(tensors, str(staging / "image_kv.safetensors"), metadata={"format": _FORMAT})
            (staging / "image_kv.json").write_text(json.dumps(meta, indent=2))
            if directory.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
                os.replace(directory, old / "store")
                os.replace(staging, directory)
                shutil.rmtree(old)
            else:
                os.replace(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @classmethod
    def load(
        cls, directory: str | os.PathLike, model: SaisaModel | None = None, max_bytes: int | None = None
    ) -> ImageKVStore:
        """A store saved by `save`; it refuses (now if `model` is given, else at first use) any other model."""
        directory = Path(directory)
        meta_path = directory / "image_kv.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not a saved ImageKVStore: it has no image_kv.json.")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(
                f"{directory}: expected an image-KV store of format {_FORMAT!r}; got {meta.get('format')!r}."
            )
        store = cls(max_bytes or int(meta["max_bytes"]))
        store._fingerprint = dict(meta["fingerprint"])
        store._strict = True
        tensors = load_file(str(directory / "image_kv.safetensors"))
        order = sorted({name.rsplit(".", 1)[0] for name in tensors}, key=lambda key: int(key.split(".", 1)[0]))
        for key in order:
            store.put(key.split(".", 1)[1], tensors[f"{key}.keys"], tensors[f"{key}.values"])
        if model is not None:
            store.bind(model)
        return store
