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

MoE and MLA ops (a router's linear becomes the identity, ``F.linear(logits, I)``,
which is exact, so the router module sees the case's logits):

=========================  ==========================================================
op                         transformers 5.24 code it runs
=========================  ==========================================================
softmax_top_k              ``Qwen3MoeTopKRouter`` (softmax over all, top-k, optional
                           renormalisation)
top_k_softmax              ``GptOssTopKRouter`` (router bias 0)
sigmoid_group_top_k        ``DeepseekV3TopkRouter`` (``e_score_correction_bias`` buffer)
sigmoid_bias_top_k         ``MiniMaxM2TopKRouter`` with the block's correction bias
llama4_top_k_sigmoid       ``Llama4Router`` (its dense scores; chosen = score > 0)
soft_capped_softmax_top_k  not implemented: transformers has no Grok model
swiglu_expert              ``DeepseekV3Experts`` with one expert, weight 1
input_major_swiglu_expert  ``Llama4TextExperts`` with one expert
clamped_swiglu_expert      ``GptOssExperts`` with one expert, weight 1
moe_dispatch               ``DeepseekV3Experts`` (weight on output); ``Llama4TextMoe``
                           with the routing given and no shared expert (weight on
                           input; the stacks transposed to its input-major layout)
mla                        ``DeepseekV3Attention`` with ``DeepseekV3RotaryEmbedding`` and
                           the causal additive mask (both forms: transformers has one)
moe_block                  the MoE module of the architecture (``DeepseekV3MoE``,
                           ``Glm4MoeMoE``, ``Qwen3MoeSparseMoeBlock``,
                           ``MiniMaxM2SparseMoeBlock``, ``Llama4TextMoe``, ``GptOssMLP``,
                           ``Qwen3NextSparseMoeBlock``) built from the case's config;
                           Grok 2.5: not implemented
gated_attention            ``Qwen3NextAttention`` with ``Qwen3NextRotaryEmbedding`` and the
                           causal additive mask (eager attention)
gated_delta_rule           ``qwen3_next.torch_recurrent_gated_delta_rule`` /
                           ``torch_chunk_gated_delta_rule`` (they repeat-interleave q, k to
                           Hv heads themselves), ``use_qk_l2norm_in_kernel=False``
causal_conv1d              ``qwen3_next.causal_conv1d_fn`` (no state) /
                           ``causal_conv1d_update`` (state of K-1 inputs, rolled in place)
gated_rms_norm             ``Qwen3NextRMSNormGated``
gated_deltanet             ``Qwen3NextGatedDeltaNet`` with a ``DynamicCache`` (the op's K-1
                           conv state padded to transformers' K columns); transformers
                           chooses its own form (chunks of 64; the recurrence for one
                           cached token) whatever ``chunk_size`` says
mtp_layer                  ``modeling_layers.MtpLayer`` around the architecture's decoder
                           layer (``DeepseekV3DecoderLayer``, ``Glm4MoeDecoderLayer``) and
                           RMSNorm, built from the case's config through
                           ``get_mtp_config()`` (MoE block), with the model's rotary module
                           and the causal additive mask; ``shared_head.norm`` is its
                           ``post_norm``. Qwen3-Next (no MTP in transformers): the same
                           ``MtpLayer`` around ``Qwen3NextDecoderLayer`` (one full-attention
                           layer) and ``Qwen3NextRMSNorm`` (1 + w), its ``fc`` /
                           ``pre_fc_norm_*`` / ``norm`` renamed as transformers' conversion
                           mapping does for that layout
=========================  ==========================================================

Routing outputs are made dense by scattering the router's ``(N, k)`` weights and
indices into ``(N, E)`` (the comparison is then independent of the slot order).

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
            "softmax_top_k": self.softmax_top_k, "top_k_softmax": self.top_k_softmax,
            "sigmoid_group_top_k": self.sigmoid_group_top_k, "sigmoid_bias_top_k": self.sigmoid_bias_top_k,
            "llama4_top_k_sigmoid": self.llama4_top_k_sigmoid,
            "soft_capped_softmax_top_k": self.soft_capped_softmax_top_k,
            "swiglu_expert": self.swiglu_expert, "input_major_swiglu_expert": self.input_major_swiglu_expert,
            "clamped_swiglu_expert": self.clamped_swiglu_expert, "moe_dispatch": self.moe_dispatch,
            "mla": self.mla, "moe_block": self.moe_block, "gated_attention": self.gated_attention,
            "mtp_layer": self.mtp_layer,
            "gated_delta_rule": self.gated_delta_rule, "causal_conv1d": self.causal_conv1d,
            "gated_rms_norm": self.gated_rms_norm, "gated_deltanet": self.gated_deltanet,
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

    # -- MoE routers
    def _identity_router(self, module, logits):
        """``logits`` as a tensor, with ``module``'s router weight set to the identity (and any
        router bias to 0) so that the router's linear returns them unchanged."""
        tl = self._tensor(logits)
        module.weight.data = self.torch.eye(tl.shape[1], dtype=tl.dtype)
        if getattr(module, "bias", None) is not None:
            module.bias.data = self.torch.zeros(tl.shape[1], dtype=tl.dtype)
        return tl

    def _dense_routing(self, weights, indices, num_experts):
        torch = self.torch
        rows = weights.shape[0]
        dense = torch.zeros(rows, num_experts, dtype=weights.dtype).scatter(1, indices, weights)
        selected = torch.zeros(rows, num_experts, dtype=torch.int64).scatter(1, indices, 1)
        return {"routing_weights": dense, "selected": selected}

    def softmax_top_k(self, router_logits, *, top_k, norm_topk_prob):
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

        num_experts = router_logits.shape[1]
        with self._running(self._dtype_name(router_logits)):
            router = Qwen3MoeTopKRouter(SimpleNamespace(num_experts_per_tok=top_k, num_experts=num_experts,
                                                        norm_topk_prob=norm_topk_prob, hidden_size=num_experts))
            _, weights, indices = router(self._identity_router(router, router_logits))
            return self._dense_routing(weights, indices, num_experts)

    def top_k_softmax(self, router_logits, *, top_k):
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

        num_experts = router_logits.shape[1]
        with self._running(self._dtype_name(router_logits)):
            router = GptOssTopKRouter(SimpleNamespace(num_experts_per_tok=top_k, num_local_experts=num_experts,
                                                      hidden_size=num_experts))
            _, weights, indices = router(self._identity_router(router, router_logits))
            return self._dense_routing(weights, indices, num_experts)

    def sigmoid_group_top_k(self, router_logits, e_score_correction_bias, *, top_k, n_group, topk_group,
                            norm_topk_prob, routed_scaling_factor):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

        num_experts = router_logits.shape[1]
        with self._running(self._dtype_name(router_logits)):
            router = DeepseekV3TopkRouter(SimpleNamespace(
                num_experts_per_tok=top_k, num_local_experts=num_experts, hidden_size=num_experts,
                routed_scaling_factor=routed_scaling_factor, n_group=n_group, topk_group=topk_group,
                norm_topk_prob=norm_topk_prob))
            logits = self._identity_router(router, router_logits)
            router.e_score_correction_bias.data = self._tensor(e_score_correction_bias)
            _, weights, indices = router(logits)
            return self._dense_routing(weights, indices, num_experts)

    def sigmoid_bias_top_k(self, router_logits, e_score_correction_bias, *, top_k):
        from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2TopKRouter

        num_experts = router_logits.shape[1]
        with self._running(self._dtype_name(router_logits)):
            router = MiniMaxM2TopKRouter(SimpleNamespace(num_experts_per_tok=top_k, num_local_experts=num_experts,
                                                         hidden_size=num_experts))
            logits = self._identity_router(router, router_logits)
            _, weights, indices = router(logits, self._tensor(e_score_correction_bias))
            return self._dense_routing(weights, indices, num_experts)

    def llama4_top_k_sigmoid(self, router_logits, *, top_k):
        from transformers.models.llama4.modeling_llama4 import Llama4Router

        num_experts = router_logits.shape[1]
        with self._running(self._dtype_name(router_logits)):
            router = Llama4Router(SimpleNamespace(hidden_size=num_experts, num_local_experts=num_experts,
                                                  num_experts_per_tok=top_k))
            # Llama4Router returns dense scores, sigmoid(-inf) = 0 where not chosen.
            scores, _ = router(self._identity_router(router, router_logits))
            return {"routing_weights": scores, "selected": (scores > 0).long()}

    def soft_capped_softmax_top_k(self, router_logits, *, top_k, router_logit_softcapping):
        raise NotImplementedError("transformers has no Grok 2.5 model (its router runs in sglang)")

    # -- experts and dispatch
    def _experts(self, cls, **config):
        return cls(SimpleNamespace(_experts_implementation="eager", **config))

    def _assign(self, module, **arrays):
        for name, array in arrays.items():
            getattr(module, name).data = self._tensor(array)
        return module

    def swiglu_expert(self, x, gate_up_proj, down_proj, *, hidden_act="silu"):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

        torch = self.torch
        with self._running(self._dtype_name(x)):
            experts = self._experts(DeepseekV3Experts, num_local_experts=1, hidden_size=x.shape[1],
                                    moe_intermediate_size=gate_up_proj.shape[0] // 2, hidden_act=hidden_act)
            self._assign(experts, gate_up_proj=gate_up_proj[None], down_proj=down_proj[None])
            tx = self._tensor(x)
            rows = tx.shape[0]
            return experts(tx, torch.zeros(rows, 1, dtype=torch.int64), torch.ones(rows, 1, dtype=tx.dtype))

    def input_major_swiglu_expert(self, x, gate_up_proj, down_proj):
        from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

        with self._running(self._dtype_name(x)):
            experts = Llama4TextExperts(SimpleNamespace(num_local_experts=1, intermediate_size=down_proj.shape[0],
                                                        hidden_size=x.shape[1], hidden_act="silu"))
            self._assign(experts, gate_up_proj=gate_up_proj[None], down_proj=down_proj[None])
            return experts(self._tensor(x))

    def clamped_swiglu_expert(self, x, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, *,
                              swiglu_limit, alpha=1.702):
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        torch = self.torch
        with self._running(self._dtype_name(x)):
            experts = self._experts(GptOssExperts, intermediate_size=down_proj.shape[0], num_local_experts=1,
                                    hidden_size=x.shape[1], swiglu_alpha=alpha, swiglu_limit=swiglu_limit)
            self._assign(experts, gate_up_proj=gate_up_proj[None], gate_up_proj_bias=gate_up_proj_bias[None],
                         down_proj=down_proj[None], down_proj_bias=down_proj_bias[None])
            tx = self._tensor(x)
            rows = tx.shape[0]
            return experts(tx, torch.zeros(rows, 1, dtype=torch.int64), torch.ones(rows, 1, dtype=tx.dtype))

    def moe_dispatch(self, x, routing_weights, indices, gate_up_proj, down_proj, *, weight_on="output"):
        num_experts, two_i, hidden = gate_up_proj.shape
        with self._running(self._dtype_name(x)):
            tx, tw, ti = self._tensor(x), self._tensor(routing_weights), self._tensor(indices)
            if weight_on == "output":
                from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

                experts = self._experts(DeepseekV3Experts, num_local_experts=num_experts, hidden_size=hidden,
                                        moe_intermediate_size=two_i // 2, hidden_act="silu")
                self._assign(experts, gate_up_proj=gate_up_proj, down_proj=down_proj)
                return experts(tx, ti, tw)
            if weight_on == "input":
                return self._llama4_weight_on_input(tx, tw, ti, gate_up_proj, down_proj)
            raise ValueError(f"unknown weight_on {weight_on!r}")

    def _llama4_weight_on_input(self, tx, tw, ti, gate_up_proj, down_proj):
        """``Llama4TextMoe.forward`` with the given routing as its router's dense scores and no shared expert."""
        from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

        torch = self.torch
        num_experts, two_i, hidden = gate_up_proj.shape
        moe = Llama4TextMoe(SimpleNamespace(num_experts_per_tok=ti.shape[1], hidden_size=hidden,
                                            num_local_experts=num_experts, intermediate_size=two_i // 2,
                                            hidden_act="silu"))
        # Llama 4 stores the stacks input-major: (E, M, 2I) and (E, I, M).
        self._assign(moe.experts, gate_up_proj=np.ascontiguousarray(gate_up_proj.transpose(0, 2, 1)),
                     down_proj=np.ascontiguousarray(down_proj.transpose(0, 2, 1)))
        scores = torch.zeros(tx.shape[0], num_experts, dtype=tx.dtype).scatter(1, ti, tw)

        class GivenRouting(torch.nn.Module):
            def forward(self, hidden_states):
                return scores, None

        class NoSharedExpert(torch.nn.Module):
            def forward(self, hidden_states):
                return torch.zeros_like(hidden_states)

        moe.router, moe.shared_expert = GivenRouting(), NoSharedExpert()
        out, _ = moe(tx)
        return out

    # -- MLA
    def mla(self, hidden_states, positions, *, form, num_attention_heads, q_lora_rank, kv_lora_rank,
            qk_nope_head_dim, qk_rope_head_dim, v_head_dim, rope_parameters, rope_interleave, rms_norm_eps,
            max_position_embeddings, attention_bias, **weights):
        if form not in ("literal", "absorbed"):
            raise ValueError(f"unknown MLA form {form!r}")
        from transformers.models.deepseek_v3 import configuration_deepseek_v3, modeling_deepseek_v3

        batch, length, hidden = hidden_states.shape
        with self._running(self._dtype_name(hidden_states)):
            extra = {} if max_position_embeddings is None else {"max_position_embeddings": max_position_embeddings}
            config = configuration_deepseek_v3.DeepseekV3Config(
                hidden_size=hidden, num_attention_heads=num_attention_heads, num_key_value_heads=num_attention_heads,
                q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
                qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim, rope_parameters=dict(rope_parameters),
                rope_interleave=rope_interleave, rms_norm_eps=rms_norm_eps, attention_bias=attention_bias,
                attention_dropout=0.0, **extra)
            config._attn_implementation = "eager"
            attention = modeling_deepseek_v3.DeepseekV3Attention(config, layer_idx=0).eval()
            state = {name: self._tensor(array) for name, array in weights.items()}
            attention.load_state_dict(state, strict=True, assign=True)
            rotary = modeling_deepseek_v3.DeepseekV3RotaryEmbedding(config)
            tx = self._tensor(hidden_states)
            cos_sin = rotary(tx, self._tensor(positions))
            mask = self._mask(batch, length, length, None, None, tx.dtype)
            out, _ = attention(tx, cos_sin, mask)
            return out

    # -- gated attention (Qwen3-Next)
    def gated_attention(self, hidden_states, positions, *, num_attention_heads, num_key_value_heads, head_dim,
                        rope_parameters, partial_rotary_factor=0.25, rms_norm_eps=1e-6, max_position_embeddings=None,
                        attention_bias=False, **weights):
        from transformers.models.qwen3_next import configuration_qwen3_next, modeling_qwen3_next

        batch, length, hidden = hidden_states.shape
        with self._running(self._dtype_name(hidden_states)):
            extra = {} if max_position_embeddings is None else {"max_position_embeddings": max_position_embeddings}
            config = configuration_qwen3_next.Qwen3NextConfig(
                hidden_size=hidden, num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                head_dim=head_dim, rope_parameters=dict(rope_parameters), partial_rotary_factor=partial_rotary_factor,
                rms_norm_eps=rms_norm_eps, attention_bias=attention_bias, attention_dropout=0.0,
                num_hidden_layers=1, layer_types=["full_attention"], **extra)
            config._attn_implementation = "eager"
            attention = modeling_qwen3_next.Qwen3NextAttention(config, layer_idx=0).eval()
            state = {name: self._tensor(array) for name, array in weights.items()}
            attention.load_state_dict(state, strict=True, assign=True)
            rotary = modeling_qwen3_next.Qwen3NextRotaryEmbedding(config)
            tx = self._tensor(hidden_states)
            cos_sin = rotary(tx, self._tensor(positions))
            mask = self._mask(batch, length, length, None, None, tx.dtype)
            out, _ = attention(tx, cos_sin, mask)
            return out

    # -- Gated DeltaNet (Qwen3-Next)
    def gated_delta_rule(self, q, k, v, g, beta, initial_state=None, *, form="chunked", chunk_size=64):
        from transformers.models.qwen3_next import modeling_qwen3_next as qn

        with self._running(self._dtype_name(q)):
            tensors = {name: self._tensor(a) for name, a in (("query", q), ("key", k), ("value", v), ("g", g),
                                                               ("beta", beta))}
            state = None if initial_state is None else self._tensor(initial_state)
            # The functions repeat-interleave q and k to Hv heads themselves; no L2 norm (the op's q, k as given).
            if form == "recurrent":
                o, final = qn.torch_recurrent_gated_delta_rule(**tensors, initial_state=state, output_final_state=True,
                                                               use_qk_l2norm_in_kernel=False)
            elif form == "chunked":
                o, final = qn.torch_chunk_gated_delta_rule(**tensors, chunk_size=chunk_size, initial_state=state,
                                                           output_final_state=True, use_qk_l2norm_in_kernel=False)
            else:
                raise ValueError(f"unknown delta-rule form {form!r}")
            return {"o": o, "final_state": final}

    def causal_conv1d(self, x, weight, conv_state=None, *, activation="silu"):
        from transformers.models.qwen3_next import modeling_qwen3_next as qn

        torch = self.torch
        with self._running(self._dtype_name(x)):
            tx, tw = self._tensor(x).transpose(1, 2), self._tensor(weight)
            batch, channels, _ = tx.shape
            state = (torch.zeros(batch, channels, tw.shape[1] - 1, dtype=tx.dtype) if conv_state is None
                     else self._tensor(conv_state))
            if conv_state is None:
                out = qn.causal_conv1d_fn(tx, tw, None, activation=activation)
                qn.causal_conv1d_update(tx, state, tw, None, activation)  # only to roll the state
            else:
                out = qn.causal_conv1d_update(tx, state, tw, None, activation)
            return {"out": out.transpose(1, 2), "conv_state": state}

    def gated_rms_norm(self, x, weight, z, *, eps):
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

        with self._running(self._dtype_name(x)):
            norm = Qwen3NextRMSNormGated(weight.shape[0], eps=eps)
            norm.weight.data = self._tensor(weight)
            return norm(self._tensor(x), self._tensor(z))

    def gated_deltanet(self, hidden_states, recurrent_state=None, conv_state=None, *, linear_num_key_heads,
                       linear_num_value_heads, linear_key_head_dim, linear_value_head_dim, linear_conv_kernel_dim,
                       rms_norm_eps, chunk_size=64, **weights):
        from transformers.models.qwen3_next import configuration_qwen3_next, modeling_qwen3_next

        torch = self.torch
        with self._running(self._dtype_name(hidden_states)):
            config = configuration_qwen3_next.Qwen3NextConfig(
                hidden_size=hidden_states.shape[-1], linear_num_key_heads=linear_num_key_heads,
                linear_num_value_heads=linear_num_value_heads, linear_key_head_dim=linear_key_head_dim,
                linear_value_head_dim=linear_value_head_dim, linear_conv_kernel_dim=linear_conv_kernel_dim,
                rms_norm_eps=rms_norm_eps, hidden_act="silu", num_hidden_layers=1, layer_types=["linear_attention"])
            layer = modeling_qwen3_next.Qwen3NextGatedDeltaNet(config, layer_idx=0).eval()
            layer.load_state_dict({n: self._tensor(a) for n, a in weights.items()}, strict=True, assign=True)
            cache = self.transformers.DynamicCache(config=config)
            if conv_state is not None:
                # transformers keeps K conv inputs, the op K-1: its oldest column is never read.
                tc = self._tensor(conv_state)
                cache.update_conv_state(torch.nn.functional.pad(tc, (1, 0)), 0,
                                        conv_kernel_size=linear_conv_kernel_dim)
                cache.update_recurrent_state(self._tensor(recurrent_state), 0)
            # transformers picks its own form: chunks of 64 for T > 1, the recurrence for one cached token.
            out = layer(self._tensor(hidden_states), cache=cache)
            return {"output": out, "recurrent_state": cache.get_recurrent_state(0),
                    "conv_state": cache.get_conv_state(0)[..., 1:]}

    # -- MoE block
    #: architectures entry -> (transformers model package, MoE module class)
    MOE_BLOCKS = {
        "DeepseekV3ForCausalLM": ("deepseek_v3", "DeepseekV3MoE"),
        "Glm4MoeForCausalLM": ("glm4_moe", "Glm4MoeMoE"),
        "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeSparseMoeBlock"),
        "MiniMaxM2ForCausalLM": ("minimax_m2", "MiniMaxM2SparseMoeBlock"),
        "Llama4ForCausalLM": ("llama4", "Llama4TextMoe"),
        "GptOssForCausalLM": ("gpt_oss", "GptOssMLP"),
        "Qwen3NextForCausalLM": ("qwen3_next", "Qwen3NextSparseMoeBlock"),
    }

    def moe_block(self, hidden_states, *, config, **weights):
        import importlib

        architecture = (config.get("architectures") or [None])[0]
        if architecture not in self.MOE_BLOCKS:
            raise NotImplementedError(f"transformers has no MoE block for architecture {architecture!r}")
        package, class_name = self.MOE_BLOCKS[architecture]
        with self._running(self._dtype_name(hidden_states)):
            settings = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
            hf_config = self.transformers.AutoConfig.for_model(config["model_type"], **settings)
            hf_config._experts_implementation = "eager"
            hf_config._attn_implementation = "eager"
            modeling = importlib.import_module(f"transformers.models.{package}.modeling_{package}")
            block = getattr(modeling, class_name)(hf_config).eval()
            state = {name: self._tensor(array) for name, array in weights.items()}
            block.load_state_dict(state, strict=True, assign=True)
            tx = self._tensor(hidden_states)
            out = block(tx)
            # Llama 4 and gpt-oss return (output, router scores or logits); Llama 4 flattens the tokens.
            out = out[0] if isinstance(out, tuple) else out
            return out.reshape(tx.shape)

    # -- multi-token prediction
    #: architectures entry -> (transformers model package, decoder layer class, RMSNorm class, rotary class)
    MTP_LAYERS = {
        "DeepseekV3ForCausalLM": ("deepseek_v3", "DeepseekV3DecoderLayer", "DeepseekV3RMSNorm",
                                  "DeepseekV3RotaryEmbedding"),
        "Glm4MoeForCausalLM": ("glm4_moe", "Glm4MoeDecoderLayer", "Glm4MoeRMSNorm", "Glm4MoeRotaryEmbedding"),
        "Qwen3NextForCausalLM": ("qwen3_next", "Qwen3NextDecoderLayer", "Qwen3NextRMSNorm",
                                 "Qwen3NextRotaryEmbedding"),
    }
    #: Names of an MTP depth's own tensors, as the checkpoint stores them, to ``MtpLayer``'s (the renaming of
    #: ``conversion_mapping.py`` ``MtpModel``: DeepSeek / GLM and the ``fc`` / ``pre_fc_norm_*`` layout).
    MTP_RENAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
                   "shared_head.norm.weight": "post_norm.weight", "fc.weight": "eh_proj.weight",
                   "pre_fc_norm_embedding.weight": "enorm.weight", "pre_fc_norm_hidden.weight": "hnorm.weight",
                   "norm.weight": "post_norm.weight"}

    @classmethod
    def _mtp_state(cls, weights: dict, num_experts: int) -> dict:
        """Checkpoint names (relative to the depth: ``model.layers.{L + k - 1}.``, or ``mtp.`` with the block
        under ``layers.0.``) as ``MtpLayer`` state-dict names, routed experts stacked as the models hold them."""
        block = {n[len("layers.0."):]: w for n, w in weights.items() if n.startswith("layers.0.")}
        block.update({n: w for n, w in weights.items() if n not in cls.MTP_RENAMES and not n.startswith("layers.")})
        state = {cls.MTP_RENAMES[n]: w for n, w in weights.items() if n in cls.MTP_RENAMES}
        state.update({f"mtp_block.{n}": w for n, w in block.items() if not n.startswith("mlp.experts.")})
        experts = range(num_experts)
        state["mtp_block.mlp.experts.gate_up_proj"] = np.stack([np.concatenate(
            [block[f"mlp.experts.{e}.gate_proj.weight"], block[f"mlp.experts.{e}.up_proj.weight"]]) for e in experts])
        state["mtp_block.mlp.experts.down_proj"] = np.stack([block[f"mlp.experts.{e}.down_proj.weight"]
                                                             for e in experts])
        return state

    def _mtp_config(self, config: dict):
        """The transformers config of one MTP depth: ``get_mtp_config()`` (MoE block, layer 0), or for
        Qwen3-Next, which has no ``num_mtp_layers``, one ``full_attention`` layer built by hand."""
        settings = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
        if config["model_type"] == "qwen3_next":
            settings.update(num_hidden_layers=1, layer_types=["full_attention"])
            settings.pop("num_nextn_predict_layers", None)
            return self.transformers.AutoConfig.for_model("qwen3_next", **settings)
        return self.transformers.AutoConfig.for_model(config["model_type"], **settings).get_mtp_config()

    def mtp_layer(self, hidden_states, next_token_embeddings, *, config, **weights):
        import importlib

        from transformers.modeling_layers import MtpLayer

        architecture = (config.get("architectures") or [None])[0]
        if architecture not in self.MTP_LAYERS:
            raise NotImplementedError(f"transformers has no MTP layer for architecture {architecture!r}")
        package, layer_class, norm_class, rotary_class = self.MTP_LAYERS[architecture]
        batch, length, _ = hidden_states.shape
        with self._running(self._dtype_name(hidden_states)):
            hf_config = self._mtp_config(config)
            hf_config._experts_implementation = "eager"
            hf_config._attn_implementation = "eager"
            modeling = importlib.import_module(f"transformers.models.{package}.modeling_{package}")
            layer = MtpLayer(hf_config, getattr(modeling, layer_class), getattr(modeling, norm_class), 0).eval()
            experts = getattr(hf_config, "n_routed_experts", None) or hf_config.num_experts
            state = self._mtp_state(weights, experts)
            layer.load_state_dict({k: self._tensor(v) for k, v in state.items()}, strict=True, assign=True)
            th, te = self._tensor(hidden_states), self._tensor(next_token_embeddings)
            positions = self.torch.arange(length)[None].expand(batch, -1)
            cos_sin = getattr(modeling, rotary_class)(hf_config)(te, positions)
            mask = self._mask(batch, length, length, None, None, th.dtype)
            return layer(te, th, position_embeddings=cos_sin, attention_mask=mask, position_ids=positions, cache=None)
