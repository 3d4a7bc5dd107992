"""Benchmark `generate`: ours (jit) against transformers' PyTorch eager on the same random 90M-shaped weights."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3,
                        help="timed runs per case, ours and transformers' alternating (medians are reported; "
                             "the ratio is the median of the per-pair ratios)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy: tokens generated per sequence")
    parser.add_argument("--source-length", type=int, default=32, help="tokens per input sequence")
    parser.add_argument("--cases", default="greedy1,greedy32,beam10", help="comma-separated subset to run")
    parser.add_argument("--small", action="store_true", help="a 4-layer, 8k-vocab model (quick smoke run)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="threads for PyTorch (0: for each case, time one decoder step at its number of rows "
                             "with 1 and with all cores, and keep the faster)")
    parser.add_argument("--no-torch", action="store_true", help="time ours only")
    return parser.parse_args()


ARGS = parse_args()
os.environ.setdefault("XLA_FLAGS", "")  # set before jax is imported, to take effect

import jax  # noqa: E402
import torch  # noqa: E402

from bbsmall_jax.testing.reference_models import FULL_90M, random_hf_model, save_hf_model, scale_reference_decoder_embeddings  # noqa: E402

from bbsmall_jax import BlenderbotSmallForConditionalGeneration, cpu_kernels  # noqa: E402

BEAM_DEFAULTS = dict(num_beams=10, min_length=20, max_length=128, length_penalty=0.65, no_repeat_ngram_size=3,
                     forced_eos_token_id=2)


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes copied per second by numpy (one read plus one write of each byte, counted once)."""
    src = np.ones(megabytes * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return src.nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_weight_bytes(config) -> int:
    """Weight bytes one decoder step reads: decoder layers (cross-attention K/V are cached), LM head, bias."""
    d, f, v = config.d_model, config.decoder_ffn_dim, config.vocab_size
    attention = 4 * (d * d + d)  # q, k, v, out projections
    cross = 2 * (d * d + d)  # q and out only
    ffn = d * f + f + f * d + d
    norms = 3 * 2 * d
    layer = attention + cross + ffn + norms
    return 4 * (config.decoder_layers * layer + v * d + v + 2 * d)


def pick_torch_threads(model, ids) -> int:
    """The thread count at which one PyTorch decoder step is fastest (two threads can be slower on small VMs)."""
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


def time_case(ours, hf, ids, mask, kwargs, runs):
    """Time both sides on one case, alternating run by run so both see the machine in the same state.

    Returns ours' median time, its compile time (first call minus median), our output, and with `hf`
    transformers' median time, the median of the per-pair ratios and its output.
    """
    def run_ours():
        return np.asarray(ours.generate(ids, attention_mask=mask, **kwargs))

    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def run_torch():
        with torch.no_grad():
            return hf.generate(ids_t, attention_mask=mask_t, **kwargs).numpy()

    first = _timed(run_ours)
    ours_out = run_ours()
    torch_out = None if hf is None else run_torch()
    ours_times, torch_times = [], []
    for _ in range(runs):
        ours_times.append(_timed(run_ours))
        if hf is not None:
            torch_times.append(_timed(run_torch))
    result = dict(ours_time=statistics.median(ours_times), compile=first - statistics.median(ours_times),
                  ours_out=ours_out)
    if hf is not None:
        result.update(torch_time=statistics.median(torch_times), torch_out=torch_out,
                      ratio=statistics.median(t / o for t, o in zip(torch_times, ours_times)))
    return result


def main():
    cases = {
        "greedy1": ("greedy, batch 1", 1, dict(max_new_tokens=ARGS.new_tokens, min_new_tokens=ARGS.new_tokens)),
        "greedy32": ("greedy, batch 32", 32, dict(max_new_tokens=ARGS.new_tokens, min_new_tokens=ARGS.new_tokens)),
        "beam10": ("beam 10, checkpoint defaults, batch 1", 1, BEAM_DEFAULTS),
    }
    names = ARGS.cases.split(",")
    unknown = [name for name in names if name not in cases]
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(cases)}")
    shape = dict(FULL_90M)
    if ARGS.small:
        shape.update(vocab_size=8192, encoder_layers=4, decoder_layers=4)
    hf = random_hf_model(**shape)
    with tempfile.TemporaryDirectory() as directory:
        save_hf_model(hf, directory)
        ours = BlenderbotSmallForConditionalGeneration.from_pretrained(directory)
    scale_reference_decoder_embeddings(hf)
    bandwidth = copy_bandwidth()
    weight_bytes = step_weight_bytes(ours.config)
    bound_step = weight_bytes / bandwidth

    rng = np.random.default_rng(0)
    rows = []
    for name in names:
        label, batch, kwargs = cases[name]
        ids = rng.integers(3, shape["vocab_size"], (batch, ARGS.source_length)).astype(np.int32)
        mask = np.ones_like(ids)
        threads = None
        if not ARGS.no_torch:
            searched = np.repeat(ids, kwargs.get("num_beams", 1), axis=0)  # the rows each decoder step runs
            threads = ARGS.torch_threads or pick_torch_threads(hf, torch.tensor(searched, dtype=torch.long))
            torch.set_num_threads(threads)
        timing = time_case(ours, None if ARGS.no_torch else hf, ids, mask, kwargs, ARGS.runs)
        ours_out = timing["ours_out"]
        steps = ours_out.shape[1] - 1  # decoder steps run (the first token is the decoder start)
        tokens = steps * batch
        row = dict(label=label, tokens=tokens, ours=tokens / timing["ours_time"], compile=timing["compile"],
                   bound=batch / bound_step, ours_step=timing["ours_time"] / steps)
        if not ARGS.no_torch:
            torch_out = timing["torch_out"]
            row.update(torch=tokens / timing["torch_time"], ratio=timing["ratio"], threads=threads,
                       same=torch_out.shape == ours_out.shape and bool((torch_out == ours_out).all()))
        rows.append(row)
        print(row, flush=True)

    print()
    print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}, "
          f"CPU kernel {'on' if cpu_kernels.available() else 'off'}")
    print(f"numpy copy bandwidth {bandwidth / 1e9:.1f} GB/s; weights read per decoder step "
          f"{weight_bytes / 1e6:.0f} MB -> bound {bound_step * 1e3:.1f} ms/step")
    print()
    print("| case | tokens | ours tok/s | transformers tok/s (threads) | ratio | same tokens | compile s "
          "| ours ms/step | bound tok/s | ours / bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['tokens']} | {r['ours']:.1f} | {r.get('torch', float('nan')):.1f} "
              f"({r.get('threads', '-')}) "
              f"| {r.get('ratio', float('nan')):.2f}x | {r.get('same', '-')} | {r['compile']:.1f} "
              f"| {r['ours_step'] * 1e3:.1f} | {r['bound']:.1f} | {r['ours'] / r['bound']:.2f} |")


if __name__ == "__main__":
    main()
