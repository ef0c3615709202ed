"""The op level of the transformers backend: each op mapped onto transformers' own code.

=================  ===================================================================
op                 transformers 5.24 code it runs
=================  ===================================================================
attention          masks from ``masking_utils`` (``causal_mask_function``,
                   ``sliding_window_overlay``, ``chunked_overlay``,
                   ``add_offsets_to_mask_function``) turned into the additive eager mask;
                   ``models/gpt_oss`` ``eager_attention_forward`` when sinks are given,
                   else ``models/gemma2`` ``eager_attention_forward`` (scaling, softcap).
                   Sinks together with soft-capping exist in no transformers model:
                   not implemented.
rope               ``Qwen3NextRotaryEmbedding`` + ``qwen3_next.apply_rotary_pos_emb``
                   (rotate-half, partial-aware); ``GlmRotaryEmbedding`` +
                   ``glm.apply_rotary_pos_emb`` (interleaved, partial-aware); the
                   frequencies come from ``modeling_rope_utils.ROPE_INIT_FUNCTIONS``
rope_frequencies   the ``inv_freq`` buffer and ``attention_scaling`` of that rotary module
rms_norm           ``LlamaRMSNorm`` (w, cast then multiply), ``Olmo2RMSNorm`` (w, multiply
                   then cast), ``Gemma3RMSNorm`` (1 + w, multiply then cast)
gated_mlp          ``LlamaMLP`` with ``hidden_act`` through ``ACT2FN``
embedding          ``Gemma3TextScaledWordEmbedding``
soft_cap           the three tensor operations of ``Gemma3ForCausalLM.forward``
                   (transformers has no function for it)
=================  ===================================================================

Inputs arrive as NumPy arrays in the run dtype (bfloat16 as ``ml_dtypes``) and are
converted to torch tensors of that dtype; modules are built with torch's default
dtype set to the run dtype, as ``from_pretrained(dtype=...)`` does. At float64 with
``float32_islands=lift`` every op runs inside :func:`hf_exact.exact_float64`.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np


class TransformersOps:
    """Callables with the ``refimpl.ops`` signatures, run through transformers."""

    def __init__(self, torch, transformers, context_for_dtype):
        self.torch, self.transformers = torch, transformers
        self._context_for_dtype = context_for_dtype

    def mapping(self) -> dict:
        return {
            "attention": self.attention, "rope": self.rope, "rope_frequencies": self.rope_frequencies,
            "rms_norm": self.rms_norm, "gated_mlp": self.gated_mlp, "embedding": self.embedding,
            "soft_cap": self.soft_cap,
        }

    # -- plumbing
    def _tensor(self, array: np.ndarray):
        """A NumPy (or ml_dtypes bfloat16) array as a torch tensor of the same dtype."""
        if array.dtype.name == "bfloat16":
            return self.torch.from_numpy(array.astype(np.float32)).to(self.torch.bfloat16)
        return self.torch.from_numpy(np.array(array, order="C"))  # a writable copy

    def _dtype_name(self, array: np.ndarray) -> str:
        return "bfloat16" if array.dtype.name == "bfloat16" else array.dtype.name

    @contextlib.contextmanager
    def _running(self, dtype_name: str):
        """Default dtype = run dtype while building modules, inside the precision context."""
        torch = self.torch
        previous = torch.get_default_dtype()
        with self._context_for_dtype(dtype_name)(), torch.no_grad():
            torch.set_default_dtype(getattr(torch, dtype_name) if dtype_name in ("float32", "float64") else torch.float32)
            try:
                yield
            finally:
                torch.set_default_dtype(previous)

    # -- attention
    def _mask(self, batch: int, queries: int, keys: int, sliding_window, attention_chunk_size, dtype):
        mu = self.transformers.masking_utils
        torch = self.torch
        fn = mu.causal_mask_function
        if sliding_window is not None:
            fn = mu.and_masks(fn, mu.sliding_window_overlay(sliding_window))
        if attention_chunk_size is not None:
            fn = mu.and_masks(fn, mu.chunked_overlay(attention_chunk_size, torch.zeros(batch, dtype=torch.long)))
        fn = mu.add_offsets_to_mask_function(fn, keys - queries, 0)
        b = torch.arange(batch)[:, None, None, None]
        q = torch.arange(queries)[None, None, :, None]
        kv = torch.arange(keys)[None, None, None, :]
        visible = fn(b, torch.zeros(1, dtype=torch.long)[None, :, None, None], q, kv)
        visible = visible.expand(batch, 1, queries, keys)
        return torch.where(visible, torch.zeros((), dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))

    def attention(self, q, k, v, *, scaling, sliding_window=None, attention_chunk_size=None, sinks=None,
                  attn_logit_softcapping=None):
        if sinks is not None and attn_logit_softcapping is not None:
            raise NotImplementedError("no transformers model combines attention sinks with logit soft-capping")
        with self._running(self._dtype_name(q)):
            tq, tk, tv = (self._tensor(a).transpose(1, 2) for a in (q, k, v))
            batch, heads, queries, _ = tq.shape
            mask = self._mask(batch, queries, tk.shape[2], sliding_window, attention_chunk_size, tq.dtype)
            module = SimpleNamespace(num_key_value_groups=heads // tk.shape[1], training=False, head_dim=tq.shape[-1])
            if sinks is not None:
                from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

                module.sinks = self._tensor(sinks)
                out, _ = eager_attention_forward(module, tq, tk, tv, mask, scaling=scaling)
            else:
                from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

                out, _ = eager_attention_forward(module, tq, tk, tv, mask, scaling=scaling,
                                                 softcap=attn_logit_softcapping)
            return out

    # -- RoPE
    def _rotary(self, layout, rope_parameters, head_dim, partial_rotary_factor, max_position_embeddings):
        """transformers' rotary module for ``layout``, configured like a model config would be."""
        params = {**rope_parameters, "partial_rotary_factor": partial_rotary_factor}
        extra = {} if max_position_embeddings is None else {"max_position_embeddings": max_position_embeddings}
        if layout == "interleaved":
            from transformers.models.glm import configuration_glm, modeling_glm

            config = configuration_glm.GlmConfig(head_dim=head_dim, num_attention_heads=2, hidden_size=2 * head_dim,
                                                 rope_parameters=params, partial_rotary_factor=partial_rotary_factor,
                                                 **extra)
            return modeling_glm.GlmRotaryEmbedding(config), modeling_glm.apply_rotary_pos_emb
        if layout == "rotate_half":
            from transformers.models.qwen3_next import configuration_qwen3_next, modeling_qwen3_next

            config = configuration_qwen3_next.Qwen3NextConfig(
                head_dim=head_dim, num_attention_heads=2, hidden_size=2 * head_dim, rope_parameters=params,
                partial_rotary_factor=partial_rotary_factor, **extra)
            return modeling_qwen3_next.Qwen3NextRotaryEmbedding(config), modeling_qwen3_next.apply_rotary_pos_emb
        raise ValueError(f"unknown RoPE layout {layout!r}")

    def rope(self, x, positions, *, rope_parameters, partial_rotary_factor=1.0, max_position_embeddings=None,
             layout="rotate_half"):
        with self._running(self._dtype_name(x)):
            module, apply = self._rotary(layout, rope_parameters, x.shape[-1], partial_rotary_factor,
                                         max_position_embeddings)
            tx = self._tensor(x)
            cos, sin = module(tx, self._tensor(positions))
            rotated, _ = apply(tx, tx, cos, sin, unsqueeze_dim=2)
            return rotated

    def rope_frequencies(self, *, rope_parameters, head_dim, partial_rotary_factor=1.0, max_position_embeddings=None):
        with self._running("float64"):
            module, _ = self._rotary("rotate_half", rope_parameters, head_dim, partial_rotary_factor,
                                     max_position_embeddings)
            return {"inv_freq": module.inv_freq, "attention_scaling": np.asarray(module.attention_scaling)}

    # -- norms, MLP, embedding, soft-cap
    def rms_norm(self, x, weight, *, eps, weight_offset=0.0, cast_order="cast_then_multiply"):
        if x.dtype in (np.float32, np.float64):
            # One rounding step at most: the cast order cannot matter, take the class of the offset.
            cast_order = "multiply_then_cast" if weight_offset == 1.0 else "cast_then_multiply"
        with self._running(self._dtype_name(x)):
            if (weight_offset, cast_order) == (0.0, "cast_then_multiply"):
                from transformers.models.llama.modeling_llama import LlamaRMSNorm as Norm
            elif (weight_offset, cast_order) == (0.0, "multiply_then_cast"):
                from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm as Norm
            elif (weight_offset, cast_order) == (1.0, "multiply_then_cast"):
                from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm as Norm
            else:
                raise NotImplementedError(f"no transformers RMSNorm with weight offset {weight_offset} and {cast_order}")
            norm = Norm(weight.shape[0], eps=eps)
            tx = self._tensor(x)
            norm.weight.data = self._tensor(weight)
            return norm(tx)

    def gated_mlp(self, x, gate_proj, up_proj, down_proj, *, hidden_act):
        from transformers.models.llama.modeling_llama import LlamaMLP

        with self._running(self._dtype_name(x)):
            config = SimpleNamespace(hidden_size=x.shape[-1], intermediate_size=gate_proj.shape[0],
                                     mlp_bias=False, hidden_act=hidden_act)
            mlp = LlamaMLP(config)
            for name, array in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
                getattr(mlp, name).weight.data = self._tensor(array)
            return mlp(self._tensor(x))

    def embedding(self, input_ids, weight, *, embed_scale=1.0):
        from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

        with self._running(self._dtype_name(weight)):
            module = Gemma3TextScaledWordEmbedding(weight.shape[0], weight.shape[1], None, embed_scale=embed_scale)
            module.weight.data = self._tensor(weight)
            return module(self._tensor(input_ids))

    def soft_cap(self, x, *, cap):
        with self._running(self._dtype_name(x)):
            logits = self._tensor(x)
            return self.torch.tanh(logits / cap) * cap
