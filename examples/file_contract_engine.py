"""A stand-in engine for the file contract (docs/file-contract.md), written as an
engine outside Python would be: it reads only the exported folder and writes only
safetensors outputs. Here the "engine" is the NumPy reference itself.

    llm-conformance export /tmp/cases --case 'qwen3/*' --case 'op/rms_norm/*' --case 'scenario/qwen3/*'
    python examples/file_contract_engine.py /tmp/cases /tmp/outputs
    llm-conformance check --outputs /tmp/outputs --exported /tmp/cases
"""

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

import refimpl
from refimpl.ops import OPS


def replay_scenario(model, schedule: list, inputs: dict) -> dict:
    """Logits of every prefill / decode step of a scenario (docs/scenarios.md).

    This engine keeps no cache: it recomputes one full forward per row over the row's real
    tokens so far (an engine would decode from its cache instead). Pad slots get zeros.
    """
    rows = None
    tensors = {}
    for i, step in enumerate(schedule):
        n = step["num_tokens"]
        if step["op"] == "rollback":
            rows = [row[:len(row) - n] for row in rows]
            continue
        ids = inputs[f"steps.{i}.input_ids"]
        mask = inputs.get(f"steps.{i}.attention_mask", np.ones_like(ids))
        rows = [[] for _ in ids] if rows is None else rows
        logits = np.zeros((ids.shape[0], n, model.config.vocab_size), dtype=model.dtype)
        for b, row in enumerate(rows):
            # Left padding: the real tokens are those where the mask is 1.
            row += [int(t) for t in ids[b][mask[b] == 1]]
            real = int(mask[b].sum())
            logits[b, n - real:] = model(np.array([row]))[0, -real:]
        tensors[f"steps.{i}.logits"] = logits
    return tensors


def run_case(case_dir: Path, out_dir: Path) -> None:
    """Compute one exported case with the reference in the export's dtype (float16 and bfloat16
    too: refimpl's storage dtypes, ``docs/low-precision.md``) and write its outputs."""
    info = json.loads((case_dir / "case.json").read_text())
    inputs = load_file(str(case_dir / "inputs.safetensors"))
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = info["dtype"]
    if info["level"] in ("scenario", "model"):
        model = refimpl.from_pretrained(case_dir / info["checkpoint"], dtype=dtype)
        if info["level"] == "scenario":
            tensors = replay_scenario(model, info["schedule"], inputs)
        else:
            drafts = info.get("mtp_depths", 0) > 0  # multi-token prediction: write mtp_logits.1 .. mtp_logits.D
            out = model.forward(inputs["input_ids"], return_hidden_states=True, return_mtp_logits=drafts)
            tensors = {"logits": out.logits, **{f"hidden_states.{k}": v for k, v in out.hidden_states.items()}}
            if drafts:
                tensors.update({f"mtp_logits.{k}": v for k, v in enumerate(out.mtp_logits, 1)})
    else:
        # The inputs as stored, in the export dtype (BF16 loads as ml_dtypes.bfloat16 once ml_dtypes is imported).
        result = OPS[info["op"]].function(**inputs, **info["params"])
        names = list(info["outputs"])
        tensors = result if isinstance(result, dict) else {names[0]: result}
    # Written as float32 or wider (every float16 / bfloat16 value is exact in float32), integers as
    # they are; np.array(order="C"), not np.ascontiguousarray, which turns a 0-d output (a scalar
    # such as rope_frequencies' attention_scaling) into shape (1,).
    save_file({k: np.array(_widened(v), order="C") for k, v in tensors.items()}, str(out_dir / "outputs.safetensors"))


def _widened(value) -> np.ndarray:
    value = np.asarray(value)
    return value.astype(np.float32) if value.dtype in (np.float16, ml_dtypes.bfloat16) else value


def main(cases: str, outputs: str) -> None:
    if not (Path(cases) / "CONTRACT.json").is_file():
        sys.exit(f"error: {cases} has no CONTRACT.json; create it with llm-conformance export {cases}")
    contract = json.loads((Path(cases) / "CONTRACT.json").read_text())
    for entry in contract["cases"]:
        try:
            run_case(Path(cases) / entry["folder"], Path(outputs) / entry["folder"])
        except Exception as exc:  # an engine reports its own failures as ERROR files
            (Path(outputs) / entry["folder"] / "ERROR").write_text(f"{type(exc).__name__}: {exc}\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python examples/file_contract_engine.py CASES_DIR OUTPUTS_DIR")
    main(*sys.argv[1:3])
