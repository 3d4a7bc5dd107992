"""Benchmark `generate` on each decoding path against transformers' PyTorch eager, on the same random weights.

    python bench/generate.py                              # CPU: greedy 1, greedy 32, beam 10; both paths
    python bench/generate.py --backend gpu --dtype bfloat16 --cases greedy1,greedy64,beam10

The sides run in turn within each repetition (transformers, then each path), so drift on a shared machine
hits all of them; a path's ratio is the median of its per-repetition ratios. Compile time (first call minus
the median) is reported apart.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

BEAM_DEFAULTS = dict(num_beams=10, min_length=20, max_length=128, length_penalty=0.65, no_repeat_ngram_size=3,
                     forced_eos_token_id=2)
# Peak memory bandwidth (GB/s) of accelerators, by a word of jax's device_kind; `--peak-bandwidth` overrides.
PEAK_BANDWIDTH = {"H200": 4800, "H100": 3350, "A100": 2039, "L4": 300, "v5 lite": 819, "v5e": 819, "v4": 1228,
                  "v5p": 2765, "v6": 1640}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default="cpu", help="JAX backend (and torch's "
                        "device: cuda for gpu; transformers is skipped on tpu)")
    parser.add_argument("--paths", default="portable,cpu", help="decoding paths to time (a model's decode_path)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype, both sides (transformers' weights cast to it)")
    parser.add_argument("--runs", type=int, default=3, help="timed repetitions per case")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy: tokens generated per sequence")
    parser.add_argument("--source-length", type=int, default=32, help="tokens per input sequence")
    parser.add_argument("--cases", default="greedy1,greedy32,beam10", help="comma-separated; see CASES")
    parser.add_argument("--small", action="store_true", help="a 4-layer, 8k-vocab model (quick smoke run)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="CPU threads for PyTorch (0: for each case, time a decoder step at 1 and at all "
                             "cores and keep the faster)")
    parser.add_argument("--no-torch", action="store_true", help="time ours only")
    parser.add_argument("--peak-bandwidth", type=float, default=0.0,
                        help="the device's memory bandwidth in GB/s for the bound column (default: a table for "
                             "accelerators, numpy's copy bandwidth on CPU)")
    return parser.parse_args()


ARGS = parse_args()
os.environ["JAX_PLATFORMS"] = ARGS.backend if ARGS.backend != "gpu" else "cuda"

import jax  # noqa: E402
import torch  # noqa: E402

from bbsmall_jax import BlenderbotSmallForConditionalGeneration  # noqa: E402
from bbsmall_jax.generation import plan as plan_lib  # noqa: E402
from bbsmall_jax.testing.machine import describe as machine  # noqa: E402
from bbsmall_jax.testing.reference_models import (random_hf_model, save_hf_model,  # noqa: E402
                                                  scale_reference_decoder_embeddings)
from bbsmall_jax.testing.shapes import FULL_90M  # noqa: E402


def greedy(batch):
    return batch, dict(max_new_tokens=ARGS.new_tokens, min_new_tokens=ARGS.new_tokens)


CASES = {  # name: (label, (batch, generate kwargs))
    "greedy1": ("greedy, batch 1", lambda: greedy(1)),
    "greedy32": ("greedy, batch 32", lambda: greedy(32)),
    "greedy64": ("greedy, batch 64", lambda: greedy(64)),
    "greedy256": ("greedy, batch 256", lambda: greedy(256)),
    "beam10": ("beam 10, checkpoint defaults, batch 1", lambda: (1, BEAM_DEFAULTS)),
    "beam4x64": ("beam 4, batch 64", lambda: (64, dict(BEAM_DEFAULTS, num_beams=4))),
}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes copied per second by numpy (one read plus one write of each byte, counted once)."""
    src = np.ones(megabytes * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    return src.nbytes / min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))


def peak_bandwidth() -> tuple[float, str]:
    """(bytes/s, where the figure comes from) of the device generation runs on."""
    if ARGS.peak_bandwidth:
        return ARGS.peak_bandwidth * 1e9, "--peak-bandwidth"
    kind = jax.devices()[0].device_kind
    for word, gbps in PEAK_BANDWIDTH.items():
        if word.lower() in kind.lower():
            return gbps * 1e9, f"{kind} peak"
    return copy_bandwidth(), "numpy copy bandwidth"


def step_weight_bytes(config, itemsize: int) -> int:
    """Weight bytes one decoder step reads: decoder layers (cross-attention K/V are cached), LM head, bias."""
    d, f, v = config.d_model, config.decoder_ffn_dim, config.vocab_size
    layer = 4 * (d * d + d) + 2 * (d * d + d) + (d * f + f + f * d + d) + 3 * 2 * d  # self, cross q/out, ffn, norms
    return itemsize * (config.decoder_layers * layer + v * d + v + 2 * d)


def pick_torch_threads(model, ids) -> int:
    """The CPU thread count at which one PyTorch decoder step is fastest (two can be slower on small VMs)."""
    best, best_time = 1, float("inf")
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(ids)
        start = torch.ones((ids.shape[0], 1), dtype=torch.long)
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            model(encoder_outputs=encoder_outputs, decoder_input_ids=start)
            elapsed = min(_timed(lambda: model(encoder_outputs=encoder_outputs, decoder_input_ids=start))
                          for _ in range(5))
            if elapsed < best_time:
                best, best_time = threads, elapsed
    torch.set_num_threads(best)
    return best


class Torch:
    """transformers' generate on torch's device, timed with a device synchronisation."""

    def __init__(self, hf, device: str):
        self.hf, self.device = hf, device

    def __call__(self, ids, mask, kwargs) -> np.ndarray:
        with torch.no_grad():
            out = self.hf.generate(torch.tensor(ids, device=self.device), attention_mask=torch.tensor(
                mask, device=self.device), **kwargs)
        return out.cpu().numpy()


def ours_on(path: str, ours):
    """Our generate on the decoding path `path`."""
    def run(ids, mask, kwargs) -> np.ndarray:
        ours.decode_path = path
        return np.asarray(ours.generate(ids, attention_mask=mask, **kwargs))
    return run


def time_case(sides: dict, ids, mask, kwargs) -> dict:
    """{side: (median s, compile s, output)}; each repetition runs every side once, in turn."""
    firsts = {name: _timed(lambda fn=fn: fn(ids, mask, kwargs)) for name, fn in sides.items()}
    outputs = {name: fn(ids, mask, kwargs) for name, fn in sides.items()}
    times = {name: [] for name in sides}
    for _ in range(ARGS.runs):
        for name, fn in sides.items():
            times[name].append(_timed(lambda fn=fn: fn(ids, mask, kwargs)))
    return {name: dict(time=statistics.median(t), compile=max(firsts[name] - statistics.median(t), 0.0),
                       out=outputs[name], times=t) for name, t in times.items()}


def main():
    names = ARGS.cases.split(",")
    paths = ARGS.paths.split(",")
    unknown = [n for n in names if n not in CASES] + [p for p in paths if p not in plan_lib.PATHS]
    if unknown:
        sys.exit(f"unknown case(s) or path(s) {', '.join(unknown)}; cases: {', '.join(CASES)}; "
                 f"paths: {', '.join(plan_lib.PATHS)}")
    shape = dict(FULL_90M)
    if ARGS.small:
        shape.update(vocab_size=8192, encoder_layers=4, decoder_layers=4)
    hf = random_hf_model(**shape)
    with tempfile.TemporaryDirectory() as directory:
        save_hf_model(hf, directory)
        ours = BlenderbotSmallForConditionalGeneration.from_pretrained(directory, dtype=ARGS.dtype)
    scale_reference_decoder_embeddings(hf)
    with_torch = not ARGS.no_torch and ARGS.backend != "tpu"
    device = "cuda" if ARGS.backend == "gpu" else "cpu"
    hf = hf.to(device=device, dtype=getattr(torch, ARGS.dtype))
    sides = {"transformers": Torch(hf, device)} if with_torch else {}
    sides.update({path: ours_on(path, ours) for path in paths})
    bandwidth, bandwidth_source = peak_bandwidth()
    bound_step = step_weight_bytes(ours.config, 2 if ARGS.dtype == "bfloat16" else 4) / bandwidth

    rng = np.random.default_rng(0)
    rows = []
    for name in names:
        label, make = CASES[name]
        batch, kwargs = make()
        ids = rng.integers(3, shape["vocab_size"], (batch, ARGS.source_length)).astype(np.int32)
        mask = np.ones_like(ids)
        threads = "-"
        if with_torch and device == "cpu":
            searched = np.repeat(ids, kwargs.get("num_beams", 1), axis=0)  # the rows each decoder step runs
            threads = ARGS.torch_threads or pick_torch_threads(hf, torch.tensor(searched, dtype=torch.long))
            torch.set_num_threads(threads)
        timing = time_case(sides, ids, mask, kwargs)
        for path in paths:
            mine = timing[path]
            steps = mine["out"].shape[1] - 1  # decoder steps run (the first token is the decoder start)
            tokens = steps * batch
            row = dict(case=label, path=path, tokens=tokens, ours=tokens / mine["time"], compile=mine["compile"],
                       per_device=tokens / mine["time"] / jax.local_device_count(),
                       bound=(tokens / mine["time"]) / (batch / bound_step), threads=threads)
            if with_torch:
                ref = timing["transformers"]
                row.update(torch=tokens / ref["time"], same=ref["out"].shape == mine["out"].shape and bool(
                    (ref["out"] == mine["out"]).all()),
                    ratio=statistics.median(t / o for t, o in zip(ref["times"], mine["times"])))
            rows.append(row)
            print(row, flush=True)

    print()
    print(f"machine: {machine()}; jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()} "
          f"({jax.process_count()} process), torch {torch.__version__} on {device}, dtype {ARGS.dtype}")
    print(f"bandwidth {bandwidth / 1e9:.0f} GB/s ({bandwidth_source}); a decoder step reads "
          f"{step_weight_bytes(ours.config, 2 if ARGS.dtype == 'bfloat16' else 4) / 1e6:.0f} MB of weights "
          f"-> bound {bound_step * 1e3:.2f} ms/step")
    print()
    print("| case | path | ours tok/s | per device | transformers tok/s (threads) | ratio | same tokens | compile s "
          "| of bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['path']} | {r['ours']:.1f} | {r['per_device']:.1f} "
              f"| {r.get('torch', float('nan')):.1f} ({r['threads']}) | {r.get('ratio', float('nan')):.2f}x "
              f"| {r.get('same', '-')} | {r['compile']:.1f} | {r['bound']:.2f} |")


if __name__ == "__main__":
    main()
