"""Helpers shared by the ``test_hf_agreement_*.py`` files.

Each of those files builds tiny random checkpoints with transformers itself,
saves them with ``save_pretrained``, loads them with ``refimpl.from_pretrained``
and compares logits (and hidden states) with transformers as shipped and with its
float32 islands lifted (``conformance.backends.hf_exact``). The assertions and
tolerances stay in the test files; what is here only builds and runs the models.

Import it after ``pytest.importorskip("torch")`` / ``("transformers")``.
"""

import numpy as np
import torch
import transformers

import refimpl
from conformance.backends.hf_exact import exact_float64, load_exact_float64


def rel_rms(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def randomise(model, seed, norm_offset=1.0):
    """Random parameters of realistic scale, so every weight matters to the logits.

    Norm weights are ``norm_offset + 0.2 N`` (1 by default, so that w and 1 + w differ;
    Gemma 3 also draws them around 0, its stored offsets), biases ``0.2 N``, the
    embedding ``N`` and every matrix ``N / sqrt(fan_in)``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.endswith(".bias"):
                p.copy_(0.2 * noise)
            elif p.ndim == 1:
                p.copy_(norm_offset + 0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


def build_case(model_class, config, seed, name, tmp_path_factory, vocab, batch, seq, norm_offset=1.0):
    """Build ``model_class(config)`` under ``seed``, randomise and save it, run refimpl on it.

    Returns:
        ``(path, ids, ours)``: the checkpoint folder ``{name}-{seed}``, token ids
        ``(batch, seq)`` below ``vocab`` and refimpl's forward output with hidden states.
    """
    torch.manual_seed(seed)
    model = model_class(config)
    randomise(model, seed, norm_offset)
    path = tmp_path_factory.mktemp(f"{name}-{seed}")
    model.save_pretrained(path)
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, seq))
    ours = refimpl.from_pretrained(path).forward(ids, return_hidden_states=True)
    return path, ids, ours


def hf_logits(path, ids, dtype, attn, experts="eager"):
    """Logits of transformers as shipped, loaded in ``dtype``, as a float64 array
    (``experts``: ``experts_implementation``; dense models ignore it)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn, experts_implementation=experts)
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.double().numpy()


def tap_modules(model):
    """``(name, module)`` of the taps refimpl reports: ``embed``, ``layers.{l}``, ``norm``."""
    inner = model.model
    return [("embed", inner.embed_tokens)] + [(f"layers.{i}", m) for i, m in enumerate(inner.layers)] + [
        ("norm", inner.norm)]


def run_with_taps(model, ids):
    """Logits and taps of ``model`` on ``ids``, as arrays in the model's dtype."""
    taps = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: taps.__setitem__(n, out[0] if isinstance(
        out, tuple) else out)) for n, m in tap_modules(model)]
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(ids)).logits
    finally:
        for h in hooks:
            h.remove()
    return logits.numpy(), {n: v.numpy() for n, v in taps.items()}


def hf_lifted(path, ids, attn):
    """Logits and taps of transformers in float64 with its float32 islands lifted."""
    with exact_float64():
        model = load_exact_float64(path, attn_implementation=attn)
        return run_with_taps(model, ids)


def assert_agrees_to_float64(logits, taps, ours, bound=1e-10):
    """Logits and every named hidden state of a lifted float64 transformers run within ``bound``
    relative RMS of the reference's, with the same tap names in the same order."""
    assert logits.dtype == np.float64
    err = rel_rms(logits, ours.logits)
    assert err < bound, f"logits relative RMS {err:.2e}"
    assert list(taps) == list(ours.hidden_states)
    for name, expected in ours.hidden_states.items():
        tap_err = rel_rms(taps[name], expected)
        assert tap_err < bound, f"{name}: relative RMS {tap_err:.2e}"
