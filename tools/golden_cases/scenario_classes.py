"""Scenario golden cases aimed at the cache bug classes of ``shared/bug-classes.md`` (seeds 1701-1799).

The generic scenarios (``scenarios.py``) check that every architecture runs in pieces. These
cases are each built for one class of cache mistake that inference engines have shipped, so
that a backend making it fails *there*, at a known step (``tests/broken_scenario_backends.py``
holds one deliberately wrong backend per variant, ``tests/test_broken_scenarios.py`` checks
which cases each fails and where). Ids are ``scenario/classes/<class>-<what>``.

What each case needs to expose its class (W the sliding window, C the attention chunk):

* KV-01 (positions of a chunk): continuation calls whose RoPE positions differ from the
  call's slot indices (every decode); a left-padded batch, where positions are
  ``cumsum(mask) - 1``, not slot indices. RoPE is relative, so slot-index positions are
  invisible on a RoPE model (the whole row shifts) and visible only where absolute positions
  enter the math: Llama 4's chunk boundaries (``kv-01-llama4-...``) and its NoPE temperature.
  transformers itself takes that temperature's position from the slot count under left padding
  (``docs/architectures/llama4.md``), so the Llama 4 case runs a checkpoint without temperature
  tuning.
* KV-02 (window in context attention): a multi-token continuation past the window, after
  single-token decodes (the decode path is right in the reported bug).
* SWA-04 (decode ring one short): decodes past the window, then a multi-token continuation.
* KV-03 / KV-07 (rollback of a ring that has slid): rollbacks of 2 or more tokens after the
  window slid; a rollback of 1 cannot show a lost slot (a ring of W keeps one more key than
  the next token reads), so ``kv-03-...`` starts with one as a control.
* KV-05 (ring of 2W): pieces of W (fit) then of 2W (overflow).
* KV-08 (eviction below the window): decodes right after the prefill, and after 1-token calls.
* MLA-05: single-token absorbed decodes over up to 16 cached slots, then past 16 (the kernel
  block of the wrong backend). MLA-06: a 40-token prompt as 16 / 16 / 8. MLA-07: a batch whose
  second row has 38 pad slots before 2 real tokens, so whole 16-slot context chunks of that
  row are empty. MLA-08: 64 cached tokens, then 1 and 4 new. MLA-09: continuations over
  one context chunk (pass), then over two or more (the merge loop runs). DeepSeek-V3
  checkpoint ``yarn-mscale-differs``: Dc 16, Dr 8, Dn 8, Dv 12 (so Dv != Dn + Dr), one dense and
  one MoE layer.
* GDN-04 (chunked prefill -> recurrent decode): 4 + 1, then single tokens and a 3-token piece.
  GDN-06 (conv state layout): a 3-token prompt (K - 1 = 3 history columns), single-token
  decodes, then a 2-token piece. GDN-07: a multi-token continuation after decodes (has the
  initial state), in a left-padded batch. MTP-03: verifications accepting 1 of 3, none of 3,
  1 of 4, each followed by a decode. Qwen3-Next, layers [linear, full, linear, full].

Expected logits are those of one full forward per row (``make_goldens.scenario_steps``), so
none depends on a cache. Every case here reuses a model case's checkpoint (``checkpoint_of``).

Seeds (the scenario's tokens) were chosen so that transformers passes every case at float64,
float32, float16 and bfloat16 (``make_goldens.py --only`` then ``llm-conformance run --backend
transformers --level scenario``); the worst step's rel RMS as a fraction of its bound is at
most 0.05 at float32 and 0.92 in the half-precision runs. Seeds replaced because a half-precision
run failed: kv-07-prompt-reuse-chunked 1708 -> 1744 (bfloat16, a Llama 4 routing flip at the
prompt); mla-05 1711 -> 1721, mla-07 1713 -> 1728, mla-08 1714 -> 1736 (bfloat16: routing flips
over 18 to 70 tokens; the Kimi K2-like checkpoint with two MoE layers failed more often, hence
the one-MoE-layer checkpoint); gdn-06 1717 -> 1753, gdn-07 1718 -> 1767, mtp-03 1719 -> 1781
(float16 or bfloat16: ill-conditioned Gated DeltaNet read-outs of early tokens, which the gated
RMSNorm rescales to unit size; ``qwen3_next.py`` describes the hazard). Replaced in corpus
0.12.0 by the routing guard (the reference's own low-precision run flipped an expert:
``scenarios.py``): kv-01-llama4-left-padded-positions 1703 -> 1801, mla-05 1721 -> 1802,
mla-07 1728 -> 1805, mtp-03 1781 -> 1807.
"""

from __future__ import annotations

from .common import ScenarioCase, decode, prefill, rollback

QWEN3_SLIDING = "qwen3/sliding-window"            # layers [full, sliding, sliding], W = 4
QWEN3_FULL = "qwen3/untied-gqa-odd-len"           # full attention, RoPE
MISTRAL_W4 = "mistral/sliding-w4-len11"           # every layer sliding, W = 4
LLAMA4_SCOUT = "llama4/scout-chunked-nope-temperature"  # chunked C = 5 on layers 0-2, NoPE layer 3 (floor_scale 3)
#: [RoPE + chunk C = 5, NoPE] without temperature tuning: under left padding transformers takes the NoPE
#: temperature's p from the slot count (docs/architectures/llama4.md), the KV-01 mistake itself, so a padded
#: scenario with the temperature on would fail transformers; the chunk boundaries still read positions.
LLAMA4_NO_TEMPERATURE = "llama4/qk-norm-eps-visible"
DEEPSEEK = "deepseek_v3/yarn-mscale-differs"     # MLA (Dc 16, Dr 8, Dn 8, Dv 12); layer 0 dense, layer 1 MoE
QWEN3_NEXT = "qwen3_next/interval-2-gqa"          # [linear, full, linear, full], conv K = 4, d_k 8, d_v 12


def _case(what: str, description: str, seed: int, checkpoint: str, schedule: tuple, batch: int = 1,
          left_padding: tuple = ()) -> ScenarioCase:
    return ScenarioCase(f"scenario/classes/{what}", description, seed=seed, schedule=schedule, batch=batch,
                        left_padding=left_padding, checkpoint_of=checkpoint)


CASES = [
    _case("kv-01-continuation-positions",
          "KV-01: Qwen3 (full attention, RoPE): prefill 5, then pieces of 4 and 3 tokens and single-token "
          "decodes; each call's tokens sit at positions 5, 9, 12, ... (not 0 again); batch 2",
          1701, QWEN3_FULL, (prefill(5), decode(4), decode(3), decode(1), decode(1)), batch=2),
    _case("kv-01-left-padded-positions",
          "KV-01: Qwen3 [full, sliding W=4, sliding], batch 3 left-padded by 0, 3 and 6 slots: positions "
          "cumsum(mask) - 1 in the prompt, each row's own next position in every decode (not the slot count); "
          "decodes of 1, 3, 1 and 5 (past the window)",
          1702, QWEN3_SLIDING, (prefill(8), decode(1), decode(3), decode(1), decode(5)), batch=3,
          left_padding=(0, 3, 6)),
    _case("kv-01-llama4-left-padded-positions",
          "KV-01: Llama 4 (layer 0 RoPE with chunk C=5, layer 1 NoPE without temperature tuning), batch 3 "
          "left-padded by 0, 3 and 7 slots (not multiples of C): chunk boundaries count from each row's first "
          "real token (positions cumsum(mask) - 1), so slot-index positions move them; then decodes of 1, 4, 1",
          1801, LLAMA4_NO_TEMPERATURE, (prefill(10), decode(1), decode(4), decode(1)), batch=3,
          left_padding=(0, 3, 7)),
    _case("kv-02-extend-past-window",
          "KV-02: Mistral, every layer sliding with W=4: prefill 6, two single-token decodes (the decode path), "
          "then continuations of 3 and 2 tokens whose queries must not see cached keys W or more positions back, "
          "then a decode; batch 2",
          1704, MISTRAL_W4, (prefill(6), decode(1), decode(1), decode(3), decode(2), decode(1)), batch=2),
    _case("swa-04-decode-past-window",
          "SWA-04: Mistral, W=4: prefill 7 (positions 0-6), decodes at positions 7 and 8 (each must read the W-1 "
          "previous keys and itself), a 3-token continuation, a decode; batch 2",
          1705, MISTRAL_W4, (prefill(7), decode(1), decode(1), decode(3), decode(1)), batch=2),
    _case("kv-03-rollback-after-slide",
          "KV-03: Qwen3 [full, sliding W=4, sliding]: prefill 6; verify 3 and roll back 1 (a ring of W loses "
          "nothing the next token reads); verify 4 past the window and roll back 2; verify 3 and roll back 3; "
          "a decode after each; batch 2",
          1706, QWEN3_SLIDING,
          (prefill(6), decode(3), rollback(1), decode(1), decode(4), rollback(2), decode(1), decode(3), rollback(3),
           decode(1), decode(1)), batch=2),
    _case("kv-07-prompt-reuse-sliding",
          "KV-07: Mistral, W=4: turn 1 of 7 tokens, turn 2 keeps its first 5 (roll back 2 of the prefill) and "
          "adds 3, a decode, then verify 4 and keep 1 (roll back 3), a decode",
          1707, MISTRAL_W4,
          (prefill(7), rollback(2), decode(3), decode(1), decode(4), rollback(3), decode(1), decode(1))),
    _case("kv-07-prompt-reuse-chunked",
          "KV-07: Llama 4, chunk C=5 on RoPE layers: prefill 8; verify 3 and keep 1 (roll back 2, back to "
          "position 9, the last of chunk 5-9, whose keys 5-8 a raw trim loses or replaces); verify 6 and keep 2 "
          "(roll back 4); a decode after each",
          1744, LLAMA4_SCOUT,
          (prefill(8), decode(3), rollback(2), decode(1), decode(1), decode(6), rollback(4), decode(1), decode(1))),
    _case("kv-05-pieces-larger-than-window",
          "KV-05: Mistral, W=4: prefill 8, a piece of W=4 tokens (fits a ring of 2W), a piece of 2W=8 tokens "
          "(its first queries need the previous piece's last keys), a decode; batch 2",
          1709, MISTRAL_W4, (prefill(8), decode(4), decode(8), decode(1)), batch=2),
    _case("kv-08-evict-below-window",
          "KV-08: Mistral, W=4: prefill 6, single-token decodes (each must see the last W-1 keys), a 2-token "
          "piece, two decodes; batch 2",
          1710, MISTRAL_W4, (prefill(6), decode(1), decode(1), decode(2), decode(1), decode(1)), batch=2),
    _case("mla-05-absorbed-decode-long-cache",
          "MLA-05: DeepSeek-V3 MLA, absorbed decode: prefill 10, single-token decodes over 11 and 12 slots, a "
          "4-token piece (16 slots), then single-token decodes over 17 and 18 slots (past one 16-row key block)",
          1802, DEEPSEEK, (prefill(10), decode(1), decode(1), decode(4), decode(1), decode(1))),
    _case("mla-06-chunked-prefill-16-16-8",
          "MLA-06: DeepSeek-V3 MLA: a 40-token prompt prefilled as 16, 16 and 8 tokens (cached context plus "
          "the new tokens), then a decode",
          1712, DEEPSEEK, (prefill(16), decode(16), decode(8), decode(1))),
    _case("mla-07-empty-context-chunk",
          "MLA-07: DeepSeek-V3 MLA, batch 2 with cached prompts of 40 and 2 real tokens (row 1 left-padded by "
          "38 slots, so 16-slot context chunks of row 1 hold no key), then continuations of 4 and 1 tokens",
          1805, DEEPSEEK, (prefill(40), decode(4), decode(1)), batch=2, left_padding=(0, 38)),
    _case("mla-08-multi-token-continuation",
          "MLA-08: DeepSeek-V3 MLA: 64 cached tokens, a single-token decode, a 4-token continuation (causal "
          "among its own tokens), a decode",
          1736, DEEPSEEK, (prefill(64), decode(1), decode(4), decode(1))),
    _case("mla-09-merge-two-context-chunks",
          "MLA-09: DeepSeek-V3 MLA (v_head_dim 12 != qk_head_dim 16): prefill 6, continuations of 4, 4 and 8 "
          "tokens over 6, 10 and 14 cached slots (one 16-slot context chunk), then of 4 over 22 (two chunks), then "
          "a decode",
          1715, DEEPSEEK, (prefill(6), decode(4), decode(4), decode(8), decode(4), decode(1))),
    _case("gdn-04-prefill-decode-handoff",
          "GDN-04: Qwen3-Next: prefill 4 (chunked delta rule), then single-token decodes (recurrent form from "
          "the prefill's state), a 3-token continuation (chunked from the state), a decode; batch 2",
          1716, QWEN3_NEXT, (prefill(4), decode(1), decode(1), decode(3), decode(1)), batch=2),
    _case("gdn-06-conv-state-handoff",
          "GDN-06: Qwen3-Next (conv K=4): prefill 3 (fills the K-1 history columns), four single-token decodes "
          "(the first K-1 read the prefill's conv history), a 2-token continuation, a decode; batch 2",
          1753, QWEN3_NEXT, (prefill(3), decode(1), decode(1), decode(1), decode(1), decode(2), decode(1)),
          batch=2),
    _case("gdn-07-continuation-initial-state",
          "GDN-07: Qwen3-Next, batch 2 left-padded by 0 and 2: prefill 5, a decode, a 4-token continuation (must "
          "start from the carried recurrent and conv state), a decode, a 3-token continuation",
          1767, QWEN3_NEXT, (prefill(5), decode(1), decode(4), decode(1), decode(3)), batch=2, left_padding=(0, 2)),
    _case("mtp-03-verify-accept-1-of-3",
          "MTP-03: Qwen3-Next speculative verification: prefill 6, a decode; verify 3 drafts and accept 1 (roll "
          "back 2), a decode; verify 3 and accept none, a decode; verify 4 and accept 1, a decode; batch 2",
          1807, QWEN3_NEXT,
          (prefill(6), decode(1), decode(3), rollback(2), decode(1), decode(3), rollback(3), decode(1), decode(4),
           rollback(3), decode(1)), batch=2),
]
