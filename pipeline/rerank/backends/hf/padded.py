"""The padded plan (CPU): each request's head runs once and its KV cache is reused by every batch of
its documents; tails are right-aligned in padded batches cut by :func:`plan.cut_padded`; only the
last position's hidden state meets the two LM-head rows (no, yes).

A mixin of :class:`~pipeline.rerank.backends.hf.engine.HFEngine`, which loads the model and owns the
attributes declared below. torch and transformers are imported inside the methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.rerank.backends.hf.plan import Pair, Plan

DEFAULT_BATCH_TOKENS_CPU = 2048  # see engine.py: padded tokens per forward on a CPU


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
        """Run each unique head once (right-padded, budget-cut) and keep its per-layer KV."""
        import torch

        dev = self.device
        budget = int(self.max_batch_tokens or DEFAULT_BATCH_TOKENS_CPU)
        order = sorted(range(len(heads)), key=lambda i: len(heads[i]))
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
            cache = self._new_cache()
            out = self._forward(ids.to(dev), positions.to(dev), mask.to(dev), cache)
            del out  # the cache object was filled in place
            layers = _cache_layers(cache)
            for row, i in enumerate(group):
                n = lens[row]
                kv[i] = [(k[row, :, :n], v[row, :, :n]) for k, v in layers]
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
        from transformers import DynamicCache

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
        cache = DynamicCache(layers)

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
        out = self._forward(ids.to(dev), positions.to(dev), mask.to(dev), cache)
        hidden = out.last_hidden_state
        last = hidden[torch.arange(rows, device=dev), (tail_lens - 1).to(dev)]  # [rows, hidden]
        logits = (last @ self._head_weight.T).float()  # [rows, 2] = (no, yes)
        scores = torch.softmax(logits, dim=-1)[:, 1]
        self._count(rows, rows * (width_h + width_t), int(tail_lens.sum()))
        return scores.cpu().tolist()
