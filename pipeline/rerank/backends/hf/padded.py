"""The padded plan (CPU): each request's head runs once and its KV cache is reused by every batch of
its documents; tails are right-aligned in padded batches cut by :func:`plan.cut_padded`; only the
last position's hidden state meets the two LM-head rows (no, yes).

A mixin of :class:`~pipeline.rerank.backends.hf.engine.HFEngine`, which loads the model and owns the
attributes declared below. torch and transformers are imported inside the methods.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.rerank.backends.hf.plan import Pair, Plan

DEFAULT_BATCH_TOKENS_CPU = 2048  # see engine.py: padded tokens per forward on a CPU
# The head cache's bound: a 0.6B Qwen3 head (instruction + query, ~80 tokens) holds ~9 MB of K/V in
# bf16, ~18 MB in fp32, so a few recent heads: a search's slices, concurrent searches' calls.
HEAD_CACHE_BYTES = 64 << 20


class HeadCache:
    """The per-layer K/V of recent heads, least recently used first out, bounded in bytes.

    The batcher sends a long request, or a search kept within its budget, in several engine calls;
    each would run the request's head (prefix, instruction, query) again. Its K/V depends on nothing
    else (same tokens, same positions from 0), so it is kept and reused: the same numbers as running
    it. Used under the engine's score lock only.
    """

    def __init__(self, max_bytes: int = HEAD_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[int, ...], tuple[list[tuple[Any, Any]], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[int, ...]) -> list[tuple[Any, Any]] | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: tuple[int, ...], layers: list[tuple[Any, Any]]) -> None:
        """Keep ``layers`` (tensors of their own, not views of a batch) if they fit at all."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if size > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._items[key] = (layers, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, freed) = self._items.popitem(last=False)
            self.bytes -= freed


def _cache_layers(cache: Any) -> list[tuple[Any, Any]]:
    """(keys, values) per layer from a transformers cache object, across 4.x and 5.x layouts."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


class PaddedPlan:
    """Head KV once per request, then padded tail batches on top of it."""

    device: str
    max_batch_tokens: int | None
    _decoder: Any
    _cache_kw: str
    _head_weight: Any
    _fused: (
        PaddedDecoder | None
    )  # None: transformers' decoder forward (a model it does not reproduce)
    _heads: HeadCache
    counters: Any  # the engine's HFStats

    if TYPE_CHECKING:  # the engine's

        def cut_batches(self, plan: Plan) -> list[list[Pair]]: ...

        def _count(self, rows: int, padded: int, real: int) -> None: ...

    def _score_padded(self, plan: Plan, out: list[list[float]]) -> int:
        kv: list[list[tuple[Any, Any]]] = [[] for _ in plan.heads]
        forwards = self._run_heads(plan.heads, kv)
        for batch in self.cut_batches(plan):
            scores = self._run_tails(batch, plan.heads, kv)
            forwards += 1
            for p, s in zip(batch, scores, strict=True):
                out[p.req][p.doc] = s
        return forwards

    def _forward(self, ids: Any, positions: Any, mask: Any, cache: Any) -> Any:
        kwargs = {self._cache_kw: cache}
        return self._decoder(
            input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **kwargs
        )

    def _run_heads(self, heads: list[list[int]], kv: list[list[tuple[Any, Any]]]) -> int:
        """Each unique head's per-layer KV: from the head cache, else run once (right-padded,
        budget-cut) and kept there."""
        import torch

        dev = self.device
        budget = int(self.max_batch_tokens or DEFAULT_BATCH_TOKENS_CPU)
        todo = []
        for i, head in enumerate(heads):
            hit = self._heads.get(tuple(head))
            if hit is None:
                todo.append(i)
            else:
                kv[i] = hit
                self.counters.head_cache_hits += 1
        order = sorted(todo, key=lambda i: len(heads[i]))
        groups: list[list[int]] = []
        for i in order:
            n = len(heads[i])
            if groups and (len(groups[-1]) + 1) * n <= budget:
                groups[-1].append(i)
            else:
                groups.append([i])
        for group in groups:
            lens = [len(heads[i]) for i in group]
            width = max(lens)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : lens[row]] = torch.tensor(heads[i])
            lens_t = torch.tensor(lens)
            valid = torch.arange(width)[None, :] < lens_t[:, None]  # [B, W]
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            # Right padding: real queries never see pads; pad queries see real keys (no empty rows).
            mask = (causal[None] & valid[:, None, :])[:, None]
            positions = torch.arange(width)[None].expand(len(group), -1)
            if self._fused is not None:
                layers = self._fused.heads(
                    ids.to(dev), positions.to(dev), mask.to(dev), lens_t.to(dev)
                )
            else:
                cache = self._new_cache()
                self._forward(ids.to(dev), positions.to(dev), mask.to(dev), cache)
                layers = _cache_layers(cache)  # the cache object was filled in place
            for row, i in enumerate(group):
                n = lens[row]
                kv[i] = [(k[row, :, :n].clone(), v[row, :, :n].clone()) for k, v in layers]
                self._heads.put(tuple(heads[i]), kv[i])
            self._count(len(group), len(group) * width, sum(lens))
        return len(groups)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache()

    def _run_tails(
        self, batch: list[Pair], heads: list[list[int]], kv: list[list[tuple[Any, Any]]]
    ) -> list[float]:
        """One forward over the tails of ``batch`` on top of their heads' cached KV."""
        import torch

        dev = self.device
        rows = len(batch)
        uniq = sorted({p.head for p in batch})
        slot = {h: i for i, h in enumerate(uniq)}
        head_lens = torch.tensor([len(heads[h]) for h in uniq])
        width_h = int(head_lens.max())
        tail_lens = torch.tensor([len(p.tail) for p in batch])
        width_t = int(tail_lens.max())
        row_slot = torch.tensor([slot[p.head] for p in batch], device=dev)

        # Left-pad every head's KV to width_h (zeros: finite, masked out), then gather one per row.
        layers = []
        for layer in range(len(kv[uniq[0]])):
            ks, vs = [], []
            for h in uniq:
                k, v = kv[h][layer]
                pad = width_h - k.shape[-2]
                ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)) if pad else k)
                vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)) if pad else v)
            if len(uniq) == 1:
                k_all = ks[0].unsqueeze(0).expand(rows, -1, -1, -1)
                v_all = vs[0].unsqueeze(0).expand(rows, -1, -1, -1)
            else:
                k_all = torch.stack(ks).index_select(0, row_slot)
                v_all = torch.stack(vs).index_select(0, row_slot)
            layers.append((k_all, v_all))

        ids = torch.zeros(rows, width_t, dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, : len(p.tail)] = torch.tensor(p.tail)
        row_head_len = head_lens[[slot[p.head] for p in batch]]  # [rows]
        positions = row_head_len[:, None] + torch.arange(width_t)[None, :]
        head_valid = (
            torch.arange(width_h)[None, :] >= (width_h - row_head_len)[:, None]
        )  # [rows, Wh]
        causal = torch.ones(width_t, width_t, dtype=torch.bool).tril()
        mask = torch.cat(
            [
                head_valid[:, None, :].expand(rows, width_t, width_h),
                causal[None].expand(rows, -1, -1),
            ],
            dim=-1,
        )[:, None]  # [rows, 1, Wt, Wh + Wt]
        ids, positions, mask, last = (
            ids.to(dev),
            positions.to(dev),
            mask.to(dev),
            (tail_lens - 1).to(dev),
        )
        if self._fused is not None:
            scores = self._fused.tails(ids, positions, mask, layers, last)
        else:
            from transformers import DynamicCache

            hidden = self._forward(ids, positions, mask, DynamicCache(layers)).last_hidden_state
            logits = (hidden[torch.arange(rows, device=dev), last] @ self._head_weight.T).float()
            scores = torch.softmax(logits, dim=-1)[:, 1]  # [rows, 2] = (no, yes) → P(yes)
        self._count(rows, rows * (width_h + width_t), int(tail_lens.sum()))
        return scores.cpu().tolist()


class PaddedDecoder:
    """The Qwen3 decoder over right-padded rows ``[rows, width]``, on top of cached head KV.

    Padded for the attention only: the linears, norms and MLP run the rows' real tokens packed, and
    the q/k/v kernels gather them into padded rows as they write the attention's layout (a pad reads
    a real token of its row: finite, masked out), so padding costs attention work, not GEMM work.
    Runs the loaded model's modules (its linears as the engine set them up: torch, oneDNN or int8)
    with the elementwise work of :mod:`~pipeline.rerank.backends.hf.fused` between them: one RMSNorm
    with the residual add before it, one norm + RoPE + head split for q and for k, one SiLU·up (in
    fp32 on oneDNN linears, the SiLU and the product in the gate and up GEMMs' epilogues instead). Two
    things transformers' layer cannot know are skipped: a head forward stops once the last layer's
    K/V exist (its queries, attention and MLP feed nothing), and a tail forward runs the last layer's
    query, attention, o_proj and MLP for each row's last token only (the only one that is scored).
    """

    def __init__(
        self,
        decoder: Any,
        head_weight: Any,
        kernels: Any,
        upcast_attention: bool,
        native_attention: bool = False,
    ) -> None:
        from pipeline.rerank.backends.hf.linear import gate_in_epilogue
        from pipeline.rerank.backends.hf.packed import check_supported

        check_supported(decoder.config, "fused padded decoder")
        cfg = decoder.config
        self.eps = float(cfg.rms_norm_eps)
        self.n_q = int(cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_q)
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.layers = list(decoder.layers)
        self.final_w = decoder.norm.weight
        self.head_weight = head_weight  # [2, hidden]: (no, yes)
        self.k = kernels
        self.attend = PaddedAttention(self.head_dim**-0.5, upcast_attention, native_attention)
        self.gate_in_epilogue = all(
            gate_in_epilogue(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in self.layers
        )

    def heads(self, ids: Any, positions: Any, mask: Any, lens: Any) -> list[tuple[Any, Any]]:
        """Per layer (keys, values) ``[rows, kv_heads, width, dim]`` of a head forward (``lens``: each
        row's real tokens)."""
        import torch

        _, kv = self._run(ids, positions, mask, lens, torch.zeros_like(lens), None, None)
        return kv

    def tails(
        self, ids: Any, positions: Any, mask: Any, past: list[tuple[Any, Any]], last: Any
    ) -> Any:
        """P(yes) per row (fp32, ``[rows]``), read at ``last`` (each row's last real token)."""
        import torch

        # the heads are left-padded to the widest, and each row's positions start at its head's length
        first = past[0][0].shape[2] - positions[:, 0]
        x, _ = self._run(ids, positions, mask, last + 1, first, past, last)
        hidden = self.k.rms(x, self.final_w, self.eps)
        logits = (hidden @ self.head_weight.T).float()  # [rows, 2] = (no, yes)
        return torch.softmax(logits, dim=-1)[:, 1]

    def _run(
        self,
        ids: Any,
        positions: Any,
        mask: Any,
        lens: Any,
        first: Any,
        past: list[tuple[Any, Any]] | None,
        last: Any,
    ) -> tuple[Any, list[tuple[Any, Any]]]:
        """The rows' real tokens packed ``[tokens, hidden]`` through the linears and the norms, in
        padded rows ``[rows, heads, width, dim]`` through the attention only: the linears (~85% of a
        forward) never run a pad (2-4% of the tokens of a sorted batch, more of a short one).
        ``mask`` ``[rows, 1, width, keys]``, and the same as each row's ``first`` key and ``lens``
        real queries (:class:`Visible`)."""
        import torch

        k, eps, dim = self.k, self.eps, self.head_dim
        rows, width = ids.shape
        real = torch.arange(width, device=ids.device)[None, :] < lens[:, None]  # [rows, width]
        start = torch.cumsum(lens, 0) - lens
        # the token each padded slot reads: its own, a pad its row's last (finite, masked out)
        slots = torch.minimum(
            start[:, None] + torch.arange(width, device=ids.device), (start + lens - 1)[:, None]
        )
        spots = None if bool(real.all()) else real.flatten().nonzero().squeeze(1)  # packed → padded
        x = self.embed(ids.flatten() if spots is None else ids.flatten()[spots])  # [tokens, hidden]
        cos, sin = self.rotary(x, positions)  # [rows, width, dim]
        seen = Visible(mask, first, lens, spots)
        kv: list[tuple[Any, Any]] = []
        h = k.rms(x, self.layers[0].input_layernorm.weight, eps)
        final = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            att, mlp = layer.self_attn, layer.mlp
            keys = k.norm_rope(att.k_proj(h), slots, att.k_norm.weight, cos, sin, eps)
            values = k.split_heads(att.v_proj(h), slots, dim)
            if past is None:
                kv.append((keys, values))
                if i == final:
                    return x, kv
            q_slots, q_cos, q_sin, q_seen = slots, cos, sin, seen
            if i == final:  # the scored token of each row only
                at = torch.arange(rows, device=ids.device)
                scored = start + last
                h, x = h[scored], x[scored]
                q_slots = at[:, None]
                q_cos, q_sin = cos[at, last][:, None], sin[at, last][:, None]
                q_seen = seen.at(at, last)
            queries = k.norm_rope(att.q_proj(h), q_slots, att.q_norm.weight, q_cos, q_sin, eps)
            prior = None if past is None else past[i]
            a = self.attend(att, queries, keys, values, q_seen, prior)  # [tokens, heads, dim]
            a = a.flatten(1)
            x, h = k.add_rms(x, att.o_proj(a), layer.post_attention_layernorm.weight, eps)
            if self.gate_in_epilogue:
                down = mlp.down_proj(mlp.up_proj.times(h, mlp.gate_proj.silu(h)))
            else:
                down = mlp.down_proj(k.silu_mul(mlp.gate_proj(h), mlp.up_proj(h)))
            if i == final:
                x = x + down
            else:
                x, h = k.add_rms(x, down, self.layers[i + 1].input_layernorm.weight, eps)
        return x, kv


@dataclass(frozen=True)
class Visible:
    """Which keys each query of a padded forward sees, in the two forms its attention paths read:
    ``mask`` ``[rows, 1, queries, keys]`` (boolean; the torch paths), and the form every padded
    plan's mask has, read by the native op: row r's first visible key ``first[r]`` (a left-padded
    head's pads before it; 0 for a head forward), causal over this forward's keys, and its first
    ``lens[r]`` queries real (right padding after them). ``spots``: the real slots of the padded
    rows in packed order (None: all real)."""

    mask: Any
    first: Any
    lens: Any
    spots: Any | None

    def at(self, rows: Any, query: Any) -> Visible:
        """One query per row (``query[r]`` of row ``rows[r]``): the last layer's scored token."""
        import torch

        mask = self.mask[rows, :, query][:, :, None]
        return Visible(mask, self.first[rows], torch.ones_like(query), None)


class PaddedAttention:
    """The padded decoder's attention: grouped GEMMs on a CPU (:func:`attention.grouped_attention`;
    bf16/fp16 with ``upcast``: the scores in fp32 and the probabilities × values GEMM in the model's
    dtype, as flash kernels do — 34% faster than all-fp32 and 20% faster than torch's CPU flash kernel
    with a mask on the reranker's shapes, docs/benchmarks.md), chunked SDPA elsewhere
    (:func:`attention.chunked_sdpa`). With ``native`` (the engine's dtype loaded in the native op): the
    same numbers in :func:`native.native_attention`, both GEMMs on oneDNN's brgemm and the softmax
    between them in cache (bf16: the scores GEMM bf16 in, fp32 out), for 16 queries per row or more
    (fewer, the last layer's scored token, would fill a tile of 16 mostly with padding)."""

    def __init__(self, scale: float, upcast: bool, native: bool = False) -> None:
        self.scale = scale
        self.upcast = upcast
        self.native = native

    def _native(self, x: Any) -> bool:
        import torch

        from pipeline.rerank.backends.hf.native import ROW_TILE

        return (
            self.native
            and x.device.type == "cpu"
            and (x.dtype == torch.float32 or self.upcast)
            and x.shape[2] >= ROW_TILE
        )

    def __call__(
        self,
        module: Any,
        q: Any,
        k: Any,
        v: Any,
        seen: Visible,
        past: tuple[Any, Any] | None = None,
    ) -> Any:
        """The real queries' attention packed ``[tokens, heads, dim]``. ``past``: a cached head's
        (keys, values), before ``k`` and ``v`` along the keys."""
        import torch

        from pipeline.rerank.backends.hf.attention import chunked_sdpa, grouped_attention

        if self._native(q):
            from pipeline.rerank.backends.hf.native import native_attention

            return native_attention(q, k, v, seen.first, seen.lens, self.scale, past)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        mask = seen.mask
        if q.device.type == "cpu" and q.dtype == torch.float32:
            out = grouped_attention(q, k, v, mask, self.scale)
        elif q.device.type == "cpu" and self.upcast:  # fp32 scores, probabilities × values as is
            out = grouped_attention(q.float(), k.float(), v, mask, self.scale)
        else:
            out = chunked_sdpa(module, q, k, v, mask, scaling=self.scale)[0]
        out = out.flatten(0, 1)  # [rows · queries, heads, dim]
        return out if seen.spots is None else out.index_select(0, seen.spots)
