"""Deliberately wrong multi-token-prediction (MTP) backends: the reference with one MTP step made wrong.

Each factory is the refimpl backend with ``mtp_layer`` or ``mtp_chain`` of
``refimpl.models.deepseek_v3``, ``glm4_moe`` and ``qwen3_next`` patched for the run (model
cases and the ``mtp_layer`` op alike), so the main model is untouched and the only
difference from a correct backend is the mistake. Used as ``--backend broken_mtp:<factory>``
with ``tests/`` on the import path.

==========================  ===============================================================  =========
factory                     mistake                                                          bug class
==========================  ===============================================================  =========
depth1_pre_norm_hidden      depth 1 reads the main model's last hidden state before its      MTP-02
                            final norm (``layers.{L-1}``, not ``norm``)
norms_swapped               ``enorm`` applied to the hidden state and ``hnorm`` to the
                            embedding
concat_swapped              ``eh_proj`` over ``[hnorm(h); enorm(e)]`` (the paper's order)
                            instead of the checkpoint's ``[enorm(e); hnorm(h)]``
depth2_stale_hidden         depth k > 1 reads depth 1's *input* (the main hidden state)      MTP-02
                            instead of the previous depth's output
shift_off_by_one            depth k at position i embeds ``t_{i+k-1}`` instead of ``t_{i+k}``
head_norm_skipped           ``shared_head.norm`` skipped: the head (and the next depth) read
                            the block output unnormalised
carry_pre_norm              the head reads ``shared_head.norm(x)`` but the next depth reads  MTP-02
                            ``x`` (vLLM's DeepSeek / GLM MTP, ``docs/mtp.md``)
first_embedding_zeroed      the embedding at position 0 zeroed before ``enorm`` (vLLM's
                            ``inputs_embeds[positions == 0] = 0``)
==========================  ===============================================================  =========
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from unittest import mock

import numpy as np

from broken_backends import _BrokenBackend, _PatchedModel
from conformance.backends.base import BackendOutput
from refimpl.embedding import embed_tokens
from refimpl.models import deepseek_v3, glm4_moe, qwen3_next
from refimpl.rmsnorm import rms_norm

_MODULES = (deepseek_v3, glm4_moe, qwen3_next)


def _patched(name: str, replacement):
    """A patch of ``name`` (as imported by each MTP model module) with ``replacement``."""

    @contextmanager
    def patch():
        with ExitStack() as stack:
            for module in _MODULES:
                stack.enter_context(mock.patch.object(module, name, replacement))
            yield

    return patch


class _BrokenMtpBackend(_BrokenBackend):
    """A broken backend whose ops run inside the patch too (the ``mtp_layer`` op cases)."""

    @property
    def ops(self) -> dict:
        def wrap(function):
            def run(*args, **kwargs):
                with self._patch():
                    return function(*args, **kwargs)

            return run

        return {name: wrap(function) for name, function in super().ops.items()}


def _layer_with(**mistake):
    """``refimpl.mtp.mtp_layer`` written again with one mistake switchable."""

    def layer(hidden_states, next_token_embeddings, weights, *, rms_norm_eps, block, norm_weight_offset=0.0):
        eps, offset = rms_norm_eps, norm_weight_offset
        e_norm, h_norm = weights["enorm.weight"], weights["hnorm.weight"]
        if mistake.get("norms_swapped"):
            e_norm, h_norm = h_norm, e_norm
        e = rms_norm(next_token_embeddings, e_norm, eps, weight_offset=offset)
        h = rms_norm(hidden_states, h_norm, eps, weight_offset=offset)
        joined = np.concatenate([h, e] if mistake.get("concat_swapped") else [e, h], axis=-1)
        x = block(joined @ weights["eh_proj.weight"].T)
        if mistake.get("head_norm_skipped"):
            return x
        return rms_norm(x, weights["shared_head.norm.weight"], eps, weight_offset=offset)

    return layer


def _chain_with(**mistake):
    """``refimpl.mtp.mtp_chain`` written again with one mistake switchable."""

    def chain(main_hidden, input_ids, embedding, depths):
        length, h, out = input_ids.shape[1], main_hidden, []
        for k, depth in enumerate(depths, start=1):
            span = length - k
            ahead = input_ids[:, k - 1:length - 1] if mistake.get("shift_off_by_one") else input_ids[:, k:]
            e = embed_tokens(ahead, embedding)
            if mistake.get("first_embedding_zeroed"):
                e = e.copy()
                e[:, 0] = 0
            source = main_hidden if mistake.get("stale_hidden") else h
            h = depth(source[:, :span], e)
            out.append(h)
        return out

    return chain


def depth1_pre_norm_hidden() -> _BrokenMtpBackend:
    """Depth 1 fed ``taps["layers.{L-1}"]`` (before ``model.norm``) instead of ``taps["norm"]``."""

    class Model(_PatchedModel):
        def run(self, input_ids):
            model = self.model
            out = model.forward(input_ids, return_hidden_states=True)
            taps = out.hidden_states
            last = taps[f"layers.{model.config.num_hidden_layers - 1}"]
            weights = {**model.weights, **model.mtp_weights}
            drafts = model.architecture.mtp.forward(weights, model.config, np.asarray(input_ids), last)
            return BackendOutput(logits=out.logits, hidden_states=dict(taps), mtp_logits=drafts)

    class Backend(_BrokenMtpBackend):
        def load_model(self, checkpoint_dir, dtype):
            return Model(super().load_model(checkpoint_dir, dtype).model, self._patch)

    return Backend("broken:mtp-depth1-pre-norm-hidden")


def norms_swapped() -> _BrokenMtpBackend:
    return _BrokenMtpBackend("broken:mtp-norms-swapped", _patched("mtp_layer", _layer_with(norms_swapped=True)))


def concat_swapped() -> _BrokenMtpBackend:
    return _BrokenMtpBackend("broken:mtp-concat-hidden-first",
                             _patched("mtp_layer", _layer_with(concat_swapped=True)))


def head_norm_skipped() -> _BrokenMtpBackend:
    return _BrokenMtpBackend("broken:mtp-head-norm-skipped",
                             _patched("mtp_layer", _layer_with(head_norm_skipped=True)))


def depth2_stale_hidden() -> _BrokenMtpBackend:
    return _BrokenMtpBackend("broken:mtp-stale-hidden", _patched("mtp_chain", _chain_with(stale_hidden=True)))


def shift_off_by_one() -> _BrokenMtpBackend:
    return _BrokenMtpBackend("broken:mtp-shift-off-by-one", _patched("mtp_chain", _chain_with(shift_off_by_one=True)))


def first_embedding_zeroed() -> _BrokenMtpBackend:
    return _BrokenMtpBackend("broken:mtp-first-embedding-zeroed",
                             _patched("mtp_chain", _chain_with(first_embedding_zeroed=True)))


def carry_pre_norm() -> _BrokenMtpBackend:
    """The head reads the normalised block output, the next depth the unnormalised one (vLLM)."""

    def chain(main_hidden, input_ids, embedding, depths):
        length, h, out = input_ids.shape[1], main_hidden, []
        for k, depth in enumerate(depths, start=1):
            captured = {}

            def keep_block_output(x, weights, config, _real=_MTP_BLOCKS[depth.keywords["config"].__class__]):
                captured["x"] = _real(x, weights, config)
                return captured["x"]

            with ExitStack() as stack:
                for module in _MODULES:
                    stack.enter_context(mock.patch.object(module, "mtp_block", keep_block_output))
                out.append(depth(h[:, :length - k], embed_tokens(input_ids[:, k:], embedding)))
            h = captured["x"]
        return out

    return _BrokenMtpBackend("broken:mtp-carry-pre-norm", _patched("mtp_chain", chain))


#: The real MTP blocks, by config class (``carry_pre_norm`` wraps them).
_MTP_BLOCKS = {deepseek_v3.DeepseekV3Config: deepseek_v3.mtp_block, glm4_moe.Glm4MoeConfig: glm4_moe.mtp_block,
               qwen3_next.Qwen3NextConfig: qwen3_next.mtp_block}
