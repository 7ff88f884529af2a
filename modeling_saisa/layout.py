"""Where the text queries and the visual tokens of one forward chunk sit, and who may attend to whom.

SAISA runs the backbone on *text rows only*: visual tokens have no queries, no attention output and no FFN. A
chunk `[B, S]` (after `past_length` cached tokens) is therefore split once per forward into

- query slots `[B, T]` (T = most text rows in any batch row): each slot names the sequence index of a text row
  (padding and placeholders are never queries; unused slots point at index 0 and are ignored), and
- visual rows: placeholder positions, in the order their images appear in `pixel_values` (row-major, as LLaVA).

Keys stay in *sequence order* (text and visual K/V merged back by `merge`), so the KV cache has exactly LLaVA's
length and layout and every decode step is an ordinary decoder step. The attention rule is the spec's: query i may
see key j iff `j <= i` and j is not padding (positions grow with the index under left or right padding, so this is
`pos[j] <= pos[i]`). Every query slot also sees itself: an unused slot would otherwise see nothing, and sdpa turns a
fully masked row into NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

__all__ = ["TokenLayout", "VarlenPlan"]


@dataclass
class VarlenPlan:
    """Packed keys for varlen attention: `key_gather` picks each query run's keys from the `[B, kv_length]` cache."""

    key_gather: torch.Tensor  # [sum of key lengths] flat index b * kv_length + key index
    kwargs: dict  # cu_seq_lens_q/k, max_length_q/k: forwarded by the backbone to its attention function

    def pack_keys(self, states: torch.Tensor) -> torch.Tensor:
        """Cache K/V `[B, H, kv_length, D]` -> `[1, H, sum of key lengths, D]`."""
        return states.transpose(1, 2).flatten(0, 1)[self.key_gather][None].transpose(1, 2)


@dataclass
class TokenLayout:
    past_length: int
    seq_length: int
    query_index: torch.Tensor  # [B, T] sequence index (within the chunk) of each query slot, 0 where unused
    query_valid: torch.Tensor  # [B, T] bool: the slot holds a text row
    query_positions: torch.Tensor  # [B, T] position ids of the query slots
    query_source: torch.Tensor  # [n_text] flat slot index b*T+t of every used slot
    text_target: torch.Tensor  # [n_text] flat sequence index b*S+s of the same rows
    visual_target: torch.Tensor  # [n_visual] flat sequence index of every visual row, image-major
    padding_target: torch.Tensor  # [n_padding] flat sequence index of every padding row
    visual_positions: torch.Tensor  # [n_images, n_v] position ids of the visual rows
    key_valid: torch.Tensor  # [B, past_length + S] bool: the key is not padding
    ends_with_image: torch.Tensor  # [B] bool: the row's last non-padding token is visual
    is_text: torch.Tensor  # [B, S] bool: the row is a query (text, not padding)

    @classmethod
    def build(
        cls,
        is_visual: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_length: int,
        image_seq_length: int,
    ) -> TokenLayout:
        """`is_visual` `[B, S]`, `attention_mask` `[B, past_length + S]` (2-D), `position_ids` `[B, S]`."""
        batch, seq = is_visual.shape
        key_valid = attention_mask.bool()
        is_text = key_valid[:, past_length:] & ~is_visual
        counts = is_text.sum(1)
        width = int(counts.max())  # the one host sync this layout needs for its shapes
        # A stable sort moves each row's text rows to the front, in sequence order.
        order = torch.sort(is_text.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]
        slots = torch.arange(width, device=order.device)
        query_valid = slots[None, :] < counts[:, None]
        query_index = torch.where(query_valid, order, 0)
        query_positions = position_ids.gather(1, query_index).masked_fill(~query_valid, 0)
        query_source = query_valid.flatten().nonzero().squeeze(1)
        row_offsets = torch.arange(batch, device=order.device)[:, None] * seq
        text_target = (query_index + row_offsets).flatten()[query_source]
        visual_target = is_visual.flatten().nonzero().squeeze(1)
        padding_target = (~(is_text | is_visual)).flatten().nonzero().squeeze(1)
        visual_positions = position_ids.flatten()[visual_target].view(-1, image_seq_length)
        # Last non-padding row of each chunk row (right or left padding alike).
        chunk_valid = key_valid[:, past_length:]
        last = seq - 1 - chunk_valid.flip(1).to(torch.uint8).argmax(1)
        ends_with_image = is_visual.gather(1, last[:, None]).squeeze(1) & chunk_valid.any(1)
        return cls(
            past_length=past_length,
            seq_length=seq,
            query_index=query_index,
            query_valid=query_valid,
            query_positions=query_positions,
            query_source=query_source,
            text_target=text_target,
            visual_target=visual_target,
            padding_target=padding_target,
            visual_positions=visual_positions,
            key_valid=key_valid,
            ends_with_image=ends_with_image,
            is_text=is_text,
        )

    @property
    def batch_size(self) -> int:
        return self.query_index.shape[0]

    def merge(self, text_states: torch.Tensor, visual_states: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """Text K/V + visual K/V `[n_visual, H, D]` -> the chunk's K/V `[B, H, S, D]` in sequence order.

        Text K/V come per query slot `[B, H, T, D]`, or `packed` `[1, H, n_text, D]` (varlen backends). Padding rows
        get zeros (they are masked; zeros keep NaN out of `0 * value`).
        """
        _, heads, _, dim = text_states.shape
        rows = text_states.transpose(1, 2).flatten(0, 1)
        rows = rows if packed else rows[self.query_source]
        merged = rows.new_empty(self.batch_size * self.seq_length, heads, dim)
        if self.padding_target.numel():
            merged.index_fill_(0, self.padding_target, 0.0)
        merged.index_copy_(0, self.text_target, rows)
        merged.index_copy_(0, self.visual_target, visual_states.to(merged.dtype))
        return merged.view(self.batch_size, self.seq_length, heads, dim).transpose(1, 2)

    def pack(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """`[B, S, ...]` -> the text rows packed row-major `[1, n_text, ...]` (the varlen backends' query layout)."""
        return per_sequence.flatten(0, 1)[self.text_target][None]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed text rows `[1, n_text, X]` -> per query slot `[B, T, X]` (zeros in unused slots)."""
        width = self.query_index.shape[1]
        out = packed.new_zeros(self.batch_size * width, packed.shape[-1])
        out.index_copy_(0, self.query_source, packed[0])
        return out.view(self.batch_size, width, -1)

    def varlen_plan(self, kv_length: int) -> VarlenPlan:
        """Flash-style variable-length attention for the packed text rows, exact by construction.

        Each maximal run of text rows in a batch row is one query sequence; its keys are the row's non-padding keys
        up to the run's last row. Bottom-right causal alignment then lets query i see exactly the keys j <= i.
        """
        is_text = self.is_text
        previous = torch.nn.functional.pad(is_text, (1, 0))[:, :-1]
        following = torch.nn.functional.pad(is_text, (0, 1))[:, 1:]
        starts = (is_text & ~previous).nonzero()  # [n_seg, 2] (row, first index), row-major = packed order
        ends = (is_text & ~following).nonzero()[:, 1] + 1
        rows = starts[:, 0]
        first_key = self.key_valid.to(torch.uint8).argmax(1)[rows]  # padding sits before the first valid key
        q_lengths = ends - starts[:, 1]
        k_lengths = self.past_length + ends - first_key
        zero = q_lengths.new_zeros(1)
        cu_q = torch.cat([zero, q_lengths.cumsum(0)]).to(torch.int32)
        cu_k = torch.cat([zero, k_lengths.cumsum(0)]).to(torch.int32)
        segment = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), k_lengths)
        offset = torch.arange(int(cu_k[-1]), device=rows.device) - cu_k[:-1].long()[segment]
        key_gather = rows[segment] * kv_length + first_key[segment] + offset
        return VarlenPlan(
            key_gather=key_gather,
            kwargs={
                "cu_seq_lens_q": cu_q,
                "cu_seq_lens_k": cu_k,
                "max_length_q": int(q_lengths.max()),
                "max_length_k": int(k_lengths.max()),
            },
        )

    def to_sequence(self, query_states: torch.Tensor) -> torch.Tensor:
        """Per-slot states `[B, T, ...]` -> `[B, S, ...]` at their text rows, zeros at visual and padding rows."""
        batch, _, *rest = query_states.shape
        out = query_states.new_zeros(batch * self.seq_length, *rest)
        out.index_copy_(0, self.text_target, query_states.flatten(0, 1)[self.query_source])
        return out.view(batch, self.seq_length, *rest)

    def shift_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Next-token labels per query slot: slot at sequence index s predicts `labels[s + 1]`.

        Labels whose preceding row is visual or padding are never predicted (no text row precedes them), which is
        exactly the spec: SAISA has outputs at text rows only.
        """
        padded = torch.nn.functional.pad(labels, (0, 1), value=-100)
        shifted = padded.gather(1, self.query_index + 1)
        return shifted.masked_fill(~self.query_valid, -100)

    def mask_function(self, kv_length: int, sliding_window: int | None = None) -> Callable:
        """The attention rule as a transformers mask function `(b, h, q, kv) -> bool` over query slots."""
        query_key = self.query_index + self.past_length  # key index of each query's own row
        # Static caches hand back their whole buffer: keys past the chunk are empty (and beyond every query anyway).
        key_valid = torch.nn.functional.pad(self.key_valid, (0, max(0, kv_length - self.key_valid.shape[1])))

        def saisa_mask(batch_idx, head_idx, q_idx, kv_idx):
            own = query_key[batch_idx, q_idx]
            allowed = (kv_idx <= own) & key_valid[batch_idx, kv_idx]
            if sliding_window is not None:
                allowed = allowed & (kv_idx > own - sliding_window)
            return allowed | (kv_idx == own)

        return saisa_mask

    def attention_mask(
        self,
        attn_implementation: str,
        kv_length: int,
        dtype: torch.dtype,
        sliding_window: int | None = None,
    ):
        """The prepared mask for the active backend (eager: additive float, sdpa: bool, flex: BlockMask).

        Built by transformers' own mask interface from `mask_function`, so every backend sees the same rule.
        A prepared 4-D mask passes through the backbone's `create_causal_mask` unchanged.
        """
        interface = ALL_MASK_ATTENTION_FUNCTIONS[attn_implementation]
        return interface(
            batch_size=self.batch_size,
            q_length=self.query_index.shape[1],
            kv_length=kv_length,
            mask_function=self.mask_function(kv_length, sliding_window),
            attention_mask=None,
            allow_is_causal_skip=False,
            dtype=dtype,
            device=self.query_index.device,
        )
